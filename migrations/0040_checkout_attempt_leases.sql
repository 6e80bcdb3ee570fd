-- Checkout attempts hold a lease, and a refund is decided before the provider is asked.
--
-- Reconciliation judged an unsettled payment by `created_at`, the start of its *first* attempt:
-- a checkout that failed in a provider outage and was retried with the same Idempotency-Key kept
-- that first time (the retry's payment insert was `ON CONFLICT DO NOTHING`), so the reconciler
-- could take a live retry for a crashed checkout, find nothing at the provider yet, call it
-- abandoned, give its key and hold back — and a duplicate of the request then ran a second
-- attempt on the same provider charge, lost the commit race and refunded the charge behind the
-- order just committed.
--
-- Now each attempt renews the payment's lease: `attempt` counts the attempts (a fencing token)
-- and `attempt_at` is when the current one began. A fresh claim of a key whose payment exists
-- (the retry after an outage, or after reconciliation abandoned it) bumps both, and reopens an
-- abandoned payment. Reconciliation takes only payments whose current attempt began more than
-- the grace period ago, first takes the lease itself (bumping `attempt`), and acts only while
-- `attempt` is still its own; so does a live checkout giving back its key and hold after a
-- failure (purchase/src/checkout.rs, reconcile.rs).
--
-- `refunding`: a refund decided (in a transaction that checked no order holds the charge) whose
-- provider call has not yet been confirmed; reconciliation finishes it.
ALTER TABLE payments
    ADD COLUMN attempt    INTEGER     NOT NULL DEFAULT 1 CHECK (attempt > 0),
    ADD COLUMN attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The hash of the checkout request that claimed the key: an answer decided without a live
    -- request (reconciliation) is stored under the key with it, and a key claimed again after
    -- its request was given back must come with the same body.
    ADD COLUMN request_hash BYTEA;
UPDATE payments SET attempt_at = created_at;
ALTER TABLE payments DROP CONSTRAINT payments_status_check;
ALTER TABLE payments ADD CONSTRAINT payments_status_check
    CHECK (status IN ('pending', 'succeeded', 'declined', 'refunding', 'refunded', 'abandoned'));
CREATE INDEX payments_lease ON payments (attempt_at) WHERE settled_at IS NULL;
DROP INDEX payments_unsettled;

-- The functions below return the attempt they claimed, so they are dropped and created again
-- (a return type cannot be replaced). Everything else is as in 0013 / 0020 with 0025's settings,
-- except where marked "0040".
DROP FUNCTION fg_checkout_begin(BIGINT, UUID, TEXT, BYTEA, UUID, TEXT, TEXT, TEXT, UUID);
DROP FUNCTION fg_checkout_begins(BIGINT[], UUID[], TEXT[], BYTEA[], UUID[], TEXT[], TEXT,
                                 TEXT[], UUID[]);

-- The start of a checkout: the answer to a key already used, or the claim of the key and the
-- hold with the pending payment that reconciliation starts from. Codes: 'replay' (status,
-- response), 'key_reused', 'key_running', 'hold_not_found', 'pass_used', 'hold_paying',
-- 'hold_expired', 'hold_not_active' (detail: its status), 'claimed' (seat_ids, total, attempt).
-- A concurrent claim of the same key waits on the key's primary key until the first commits,
-- then reads what it stored.
CREATE FUNCTION fg_checkout_begin(p_event BIGINT, p_jti UUID, p_key TEXT, p_hash BYTEA,
                                  p_hold_id UUID, p_payment_key TEXT, p_provider TEXT,
                                  p_identity TEXT, p_ticket UUID)
RETURNS TABLE (code TEXT, status_code INTEGER, response JSONB, seat_ids BIGINT[],
               total_cents BIGINT, detail TEXT, attempt INTEGER)
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    v_hash BYTEA;
    v_state TEXT;
    v_status INTEGER;
    v_response JSONB;
    v_hold_jti UUID;
    v_seat_ids BIGINT[];
    v_used BOOLEAN;
    v_claimed INTEGER;
    v_hold_status TEXT;
    v_total BIGINT;
    v_attempt INTEGER;
    v_payment_status TEXT;
    v_payment_hash BYTEA;
BEGIN
    FOR v_try IN 1..2 LOOP
        SELECT c.request_hash, c.state, c.status_code, c.response
        INTO v_hash, v_state, v_status, v_response
        FROM checkout_requests c WHERE c.jti = p_jti AND c.idempotency_key = p_key;
        IF FOUND THEN
            IF v_hash <> p_hash THEN
                RETURN QUERY SELECT 'key_reused', NULL::INTEGER, NULL::JSONB, NULL::BIGINT[],
                                    NULL::BIGINT, NULL::TEXT, NULL::INTEGER;
            ELSIF v_state = 'done' AND v_status IS NOT NULL AND v_response IS NOT NULL THEN
                RETURN QUERY SELECT 'replay', v_status, v_response, NULL::BIGINT[],
                                    NULL::BIGINT, NULL::TEXT, NULL::INTEGER;
            ELSE
                RETURN QUERY SELECT 'key_running', NULL::INTEGER, NULL::JSONB, NULL::BIGINT[],
                                    NULL::BIGINT, NULL::TEXT, NULL::INTEGER;
            END IF;
            RETURN;
        END IF;
        IF v_try = 2 THEN
            -- Claimed by another request that then gave the key back: run again.
            RETURN QUERY SELECT 'key_running', NULL::INTEGER, NULL::JSONB, NULL::BIGINT[],
                                NULL::BIGINT, NULL::TEXT, NULL::INTEGER;
            RETURN;
        END IF;

        SELECT h.jti, h.seat_ids, EXISTS (SELECT 1 FROM orders o WHERE o.jti = h.jti)
        INTO v_hold_jti, v_seat_ids, v_used
        FROM holds h WHERE h.id = p_hold_id AND h.event_id = p_event;
        IF NOT FOUND OR v_hold_jti <> p_jti THEN
            RETURN QUERY SELECT 'hold_not_found', NULL::INTEGER, NULL::JSONB, NULL::BIGINT[],
                                NULL::BIGINT, NULL::TEXT, NULL::INTEGER;
            RETURN;
        END IF;
        IF v_used THEN
            RETURN QUERY SELECT 'pass_used', NULL::INTEGER, NULL::JSONB, NULL::BIGINT[],
                                NULL::BIGINT, NULL::TEXT, NULL::INTEGER;
            RETURN;
        END IF;

        INSERT INTO checkout_requests (jti, idempotency_key, request_hash, state)
        VALUES (p_jti, p_key, p_hash, 'running') ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS v_claimed = ROW_COUNT;
        EXIT WHEN v_claimed = 1;
        -- Another request with this key committed first: answer as it left the key.
    END LOOP;

    -- Mark the hold as being paid for, so a second checkout of it (another key, a second tab)
    -- is refused before it can charge the card again.
    UPDATE holds h SET status = 'paying'
    WHERE h.id = p_hold_id AND h.status = 'active' AND h.expires_at > now();
    GET DIAGNOSTICS v_claimed = ROW_COUNT;
    IF v_claimed = 0 THEN
        -- Nothing may stay behind: give the key back in this same statement.
        DELETE FROM checkout_requests c WHERE c.jti = p_jti AND c.idempotency_key = p_key;
        SELECT h.status INTO v_hold_status FROM holds h WHERE h.id = p_hold_id;
        RETURN QUERY SELECT CASE v_hold_status WHEN 'paying' THEN 'hold_paying'
                                               WHEN 'active' THEN 'hold_expired'
                                               ELSE 'hold_not_active' END,
                            NULL::INTEGER, NULL::JSONB, NULL::BIGINT[], NULL::BIGINT,
                            v_hold_status, NULL::INTEGER;
        RETURN;
    END IF;
    SELECT COALESCE(sum(s.price_cents), 0)::BIGINT INTO v_total
    FROM seats s WHERE s.id = ANY(v_seat_ids);
    -- 0040: a key claimed again (its earlier attempt failed, or was abandoned by
    -- reconciliation) starts a new attempt on the same payment: a new lease, a new fencing token.
    SELECT p.status, p.request_hash INTO v_payment_status, v_payment_hash
    FROM payments p WHERE p.idempotency_key = p_payment_key FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO payments (idempotency_key, provider, amount_cents, status, event_id, jti,
                              identity, ticket_id, hold_id, checkout_key, request_hash)
        VALUES (p_payment_key, p_provider, v_total, 'pending', p_event, p_jti, p_identity,
                p_ticket, p_hold_id, p_key, p_hash);
        v_attempt := 1;
    ELSIF (v_payment_hash IS NOT NULL AND v_payment_hash <> p_hash)
          OR v_payment_status NOT IN ('pending', 'abandoned') THEN
        -- Another body under a key whose payment exists (its request was given back after a
        -- failure): the provider would answer with the first body's charge. Or a payment
        -- settled otherwise although no answer is stored (not reached: every settlement stores
        -- one): never charge it again. Nothing stays behind.
        UPDATE holds h SET status = 'active' WHERE h.id = p_hold_id AND h.status = 'paying';
        DELETE FROM checkout_requests c WHERE c.jti = p_jti AND c.idempotency_key = p_key;
        RETURN QUERY SELECT CASE WHEN v_payment_status IN ('pending', 'abandoned')
                                 THEN 'key_reused' ELSE 'key_running' END,
                            NULL::INTEGER, NULL::JSONB, NULL::BIGINT[], NULL::BIGINT, NULL::TEXT,
                            NULL::INTEGER;
        RETURN;
    ELSE
        UPDATE payments p SET attempt = p.attempt + 1, attempt_at = now(), status = 'pending',
                              settled_at = NULL, request_hash = p_hash
        WHERE p.idempotency_key = p_payment_key
        RETURNING p.attempt INTO v_attempt;
    END IF;
    RETURN QUERY SELECT 'claimed', NULL::INTEGER, NULL::JSONB, v_seat_ids, v_total, NULL::TEXT,
                        v_attempt;
END;
$$;

-- Group commit of checkout starts (0020), for the common case only: a fresh key, the pass's own
-- active hold, and (0040) no payment recorded under the key yet, so every claim here is a first
-- attempt (attempt 1). A key claimed again goes to fg_checkout_begin, which renews its lease.
-- Answers: 'claimed' (seat_ids, total_cents, attempt) or 'defer'.
CREATE FUNCTION fg_checkout_begins(p_event BIGINT[], p_jti UUID[], p_key TEXT[], p_hash BYTEA[],
                                   p_hold UUID[], p_payment_key TEXT[], p_provider TEXT,
                                   p_identity TEXT[], p_ticket UUID[])
RETURNS TABLE (req INTEGER, code TEXT, seat_ids BIGINT[], total_cents BIGINT, attempt INTEGER)
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    v_n INTEGER := cardinality(p_jti);
    v_fresh INTEGER[];
    v_claimed INTEGER[] := '{}';
    v_paying INTEGER[] := '{}';
    v_paying_holds UUID[];
    v_totals BIGINT[];
    v_back INTEGER;
BEGIN
    -- Fresh: no request under this key yet, no payment under it either (0040), the hold is the
    -- pass's own in this event, and the pass has not bought.
    -- (Scalar subqueries, one index probe each: as EXISTS in WHERE the planner would turn
    -- them into joins and, not knowing the batch's size, scan whole tables.)
    SELECT COALESCE(array_agg(x.i ORDER BY x.i), '{}') INTO v_fresh
    FROM (SELECT i,
                 (SELECT h.jti FROM holds h
                  WHERE h.id = p_hold[i] AND h.event_id = p_event[i]) AS hold_jti,
                 (SELECT true FROM checkout_requests c
                  WHERE c.jti = p_jti[i] AND c.idempotency_key = p_key[i]) AS requested,
                 (SELECT true FROM payments p
                  WHERE p.idempotency_key = p_payment_key[i]) AS paid_before,
                 (SELECT true FROM orders o WHERE o.jti = p_jti[i]) AS bought
          FROM generate_series(1, v_n) AS i) x
    WHERE x.hold_jti = p_jti[x.i] AND x.requested IS NULL AND x.paid_before IS NULL
      AND x.bought IS NULL;

    IF cardinality(v_fresh) > 0 THEN
        WITH claimed AS (
            INSERT INTO checkout_requests (jti, idempotency_key, request_hash, state)
            SELECT p_jti[i], p_key[i], p_hash[i], 'running' FROM unnest(v_fresh) AS i
            -- One order of insertion for every batch: two batches claiming the same keys wait
            -- for each other in one direction only.
            ORDER BY p_jti[i], p_key[i]
            ON CONFLICT DO NOTHING
            RETURNING jti, idempotency_key)
        SELECT COALESCE(array_agg(i ORDER BY i), '{}') INTO v_claimed
        FROM unnest(v_fresh) AS i
        WHERE (p_jti[i], p_key[i]) IN (SELECT c.jti, c.idempotency_key FROM claimed c);
    END IF;

    IF cardinality(v_claimed) > 0 THEN
        WITH paying AS (
            UPDATE holds h SET status = 'paying'
            WHERE h.id = ANY(ARRAY(SELECT p_hold[i] FROM unnest(v_claimed) AS i))
              AND h.status = 'active' AND h.expires_at > now()
            RETURNING h.id)
        SELECT COALESCE(array_agg(id), '{}') INTO v_paying_holds FROM paying;
        SELECT COALESCE(array_agg(i ORDER BY i), '{}') INTO v_paying
        FROM unnest(v_claimed) AS i WHERE p_hold[i] = ANY(v_paying_holds);

        -- Keys claimed for holds that cannot be paid for are given back: nothing stays behind.
        FOR v_back IN SELECT x FROM unnest(v_claimed) AS x WHERE x <> ALL(v_paying) LOOP
            DELETE FROM checkout_requests c
            WHERE c.jti = p_jti[v_back] AND c.idempotency_key = p_key[v_back];
        END LOOP;
    END IF;

    -- The total of each paying hold (aligned with v_paying), from its seats' prices.
    SELECT COALESCE(array_agg(
               (SELECT COALESCE(sum(s.price_cents), 0)::BIGINT
                FROM holds h JOIN seats s ON s.id = ANY(h.seat_ids) WHERE h.id = p_hold[i])
               ORDER BY i), '{}')
    INTO v_totals FROM unnest(v_paying) AS i;
    INSERT INTO payments (idempotency_key, provider, amount_cents, status, event_id, jti,
                          identity, ticket_id, hold_id, checkout_key, request_hash)
    SELECT p_payment_key[v_paying[k]], p_provider, v_totals[k], 'pending', p_event[v_paying[k]],
           p_jti[v_paying[k]], p_identity[v_paying[k]], p_ticket[v_paying[k]],
           p_hold[v_paying[k]], p_key[v_paying[k]], p_hash[v_paying[k]]
    FROM generate_subscripts(v_paying, 1) AS k
    ORDER BY k;

    RETURN QUERY
    SELECT i,
           CASE WHEN array_position(v_paying, i) IS NULL THEN 'defer' ELSE 'claimed' END,
           CASE WHEN array_position(v_paying, i) IS NOT NULL THEN
               (SELECT h.seat_ids FROM holds h WHERE h.id = p_hold[i]) END,
           v_totals[array_position(v_paying, i)],
           CASE WHEN array_position(v_paying, i) IS NOT NULL THEN 1 END
    FROM generate_series(1, v_n) AS i;
END;
$$;

-- 0040: an order's answer is stored under its key whatever became of the key's request.
-- The order of a charged checkout: if the hold still owns every seat (locked in id order), the
-- seats are sold, the order, its tickets, the stored answer for retries, the outbox row and the
-- settled payment are written, and the event is marked sold out when this sold the last place.
-- Codes: 'ordered' (sold_out), 'hold_expired'. A pass or hold already used for an order aborts
-- the call on orders_one_per_pass / orders_one_per_hold.
CREATE OR REPLACE FUNCTION fg_commit_order(p_event BIGINT, p_jti UUID, p_identity TEXT, p_hold_id UUID,
                                p_seat_ids BIGINT[], p_total BIGINT, p_reference TEXT,
                                p_order_id UUID, p_created_at TIMESTAMPTZ, p_codes TEXT[],
                                p_key TEXT, p_body JSONB, p_payment_key TEXT)
RETURNS TABLE (code TEXT, sold_out BOOLEAN)
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    v_found INTEGER;
    v_ours INTEGER;
    v_sold_out INTEGER;
BEGIN
    SELECT count(*), count(*) FILTER (WHERE l.status = 'held' AND l.hold_id = p_hold_id
                                            AND l.held_until > now())
    INTO v_found, v_ours
    FROM (SELECT s.id, s.status, s.hold_id, s.held_until FROM seats s
          WHERE s.id = ANY(p_seat_ids) ORDER BY s.id FOR UPDATE) l;
    IF v_found <> cardinality(p_seat_ids) OR v_ours <> v_found THEN
        RETURN QUERY SELECT 'hold_expired', false;
        RETURN;
    END IF;
    UPDATE seats s SET status = 'sold', held_until = NULL WHERE s.id = ANY(p_seat_ids);
    INSERT INTO orders (id, event_id, jti, identity, hold_id, total_cents, payment_ref, created_at)
    VALUES (p_order_id, p_event, p_jti, p_identity, p_hold_id, p_total, p_reference, p_created_at);
    INSERT INTO tickets (code, order_id, seat_id)
    SELECT t.code, p_order_id, t.seat_id FROM unnest(p_codes, p_seat_ids) AS t(code, seat_id);
    UPDATE holds h SET status = 'purchased' WHERE h.id = p_hold_id;
    -- 0040: the answer is stored also when the key's request was given back meanwhile (a
    -- charge found by reconciliation), never over an answer already stored.
    INSERT INTO checkout_requests AS c (jti, idempotency_key, request_hash, state, status_code,
                                        response)
    VALUES (p_jti, p_key,
            COALESCE((SELECT p.request_hash FROM payments p
                      WHERE p.idempotency_key = p_payment_key), '\x'::BYTEA),
            'done', 201, p_body)
    ON CONFLICT (jti, idempotency_key) DO UPDATE
        SET state = 'done', status_code = 201, response = EXCLUDED.response
        WHERE c.state = 'running';
    INSERT INTO outbox (event_id, identity, order_id, kind, payload)
    VALUES (p_event, p_identity, p_order_id, 'order_confirmed', p_body);
    UPDATE payments p SET status = 'succeeded', provider_ref = p_reference, settled_at = now()
    WHERE p.idempotency_key = p_payment_key;
    -- The last place sold: from now on the line is closed (the buffer answers 410).
    UPDATE events e SET sold_out_at = now()
    WHERE e.id = p_event AND e.sold_out_at IS NULL AND NOT EXISTS (
        SELECT 1 FROM seats s WHERE s.event_id = p_event AND s.status IN ('available', 'held'));
    GET DIAGNOSTICS v_sold_out = ROW_COUNT;
    RETURN QUERY SELECT 'ordered', v_sold_out = 1;
END;
$$;

CREATE OR REPLACE FUNCTION fg_commit_orders(p_event BIGINT[], p_jti UUID[], p_identity TEXT[],
                                 p_hold UUID[], p_total BIGINT[], p_reference TEXT[],
                                 p_order UUID[], p_created TIMESTAMPTZ[], p_key TEXT[],
                                 p_body JSONB[], p_payment_key TEXT[],
                                 p_seat_order INTEGER[], p_seat_ids BIGINT[], p_codes TEXT[])
RETURNS TABLE (ord INTEGER, code TEXT, sold_out BOOLEAN)
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    v_ids BIGINT[];
    v_holds UUID[];
    v_live BOOLEAN[];
    v_ok INTEGER[];
    v_sold_out BIGINT[];
BEGIN
    SELECT COALESCE(array_agg(l.id ORDER BY l.id), '{}'),
           COALESCE(array_agg(l.hold_id ORDER BY l.id), '{}'),
           COALESCE(array_agg(l.status = 'held' AND l.held_until > now() ORDER BY l.id), '{}')
    INTO v_ids, v_holds, v_live
    FROM (SELECT s.id, s.status, s.hold_id, s.held_until FROM seats s
          WHERE s.id = ANY(p_seat_ids) ORDER BY s.id FOR UPDATE) l;

    SELECT COALESCE(array_agg(x.o), '{}') INTO v_ok
    FROM (SELECT r.o FROM unnest(p_seat_order, p_seat_ids) AS r(o, seat)
          LEFT JOIN unnest(v_ids, v_holds, v_live) AS l(id, hold_id, live) ON l.id = r.seat
          GROUP BY r.o
          HAVING bool_and(l.id IS NOT NULL AND l.live AND l.hold_id = p_hold[r.o])) x;

    IF cardinality(v_ok) > 0 THEN
        UPDATE seats s SET status = 'sold', held_until = NULL
        FROM unnest(p_seat_order, p_seat_ids) AS r(o, seat)
        WHERE s.id = r.seat AND r.o = ANY(v_ok);
        INSERT INTO orders (id, event_id, jti, identity, hold_id, total_cents, payment_ref,
                            created_at)
        SELECT p_order[o], p_event[o], p_jti[o], p_identity[o], p_hold[o], p_total[o],
               p_reference[o], p_created[o]
        FROM unnest(v_ok) AS o;
        INSERT INTO tickets (code, order_id, seat_id)
        SELECT r.code, p_order[r.o], r.seat
        FROM unnest(p_seat_order, p_seat_ids, p_codes) AS r(o, seat, code)
        WHERE r.o = ANY(v_ok);
        UPDATE holds h SET status = 'purchased'
        FROM unnest(v_ok) AS o WHERE h.id = p_hold[o];
        -- 0040: stored also when the key's request was given back meanwhile, never over an
        -- answer already stored.
        INSERT INTO checkout_requests AS c (jti, idempotency_key, request_hash, state,
                                            status_code, response)
        SELECT p_jti[o], p_key[o],
               COALESCE((SELECT p.request_hash FROM payments p
                         WHERE p.idempotency_key = p_payment_key[o]), '\x'::BYTEA),
               'done', 201, p_body[o]
        FROM unnest(v_ok) AS o
        ORDER BY p_jti[o], p_key[o]
        ON CONFLICT (jti, idempotency_key) DO UPDATE
            SET state = 'done', status_code = 201, response = EXCLUDED.response
            WHERE c.state = 'running';
        INSERT INTO outbox (event_id, identity, order_id, kind, payload)
        SELECT p_event[o], p_identity[o], p_order[o], 'order_confirmed', p_body[o]
        FROM unnest(v_ok) AS o ORDER BY o;
        UPDATE payments p SET status = 'succeeded', provider_ref = p_reference[o],
                              settled_at = now()
        FROM unnest(v_ok) AS o WHERE p.idempotency_key = p_payment_key[o];
        -- The last place sold: from now on the line is closed (the buffer answers 410).
        WITH closed AS (
            UPDATE events e SET sold_out_at = now()
            WHERE e.id IN (SELECT DISTINCT p_event[o] FROM unnest(v_ok) AS o)
              AND e.sold_out_at IS NULL
              AND NOT EXISTS (SELECT 1 FROM seats s WHERE s.event_id = e.id
                                                      AND s.status IN ('available', 'held'))
            RETURNING e.id)
        SELECT COALESCE(array_agg(closed.id), '{}') INTO v_sold_out FROM closed;
    ELSE
        v_sold_out := '{}';
    END IF;

    RETURN QUERY
    SELECT o, CASE WHEN o = ANY(v_ok) THEN 'ordered' ELSE 'hold_expired' END,
           o = ANY(v_ok) AND p_event[o] = ANY(v_sold_out)
    FROM generate_series(1, cardinality(p_order)) AS o;
END;
$$;
