-- Hold and checkout in one round trip each. A hold, the start of a checkout (replay check,
-- idempotency key, hold claim, pending payment) and the commit of an order were each a
-- transaction of 5 to 11 statements sent one by one; each is now one call of a function below,
-- run as a single autocommitted statement. The rules are exactly those of the Rust code that
-- sent the statements (purchase/src/seats.rs, checkout.rs): seats are locked in id order, every
-- check comes before the first write, and refusals come back as a code, with nothing changed.
-- The constraints of 0001 stay the last line (a unique violation still aborts the call).

-- A hold of `p_seat_ids` (sorted, distinct) or of `p_quantity` general-admission places of
-- `p_ticket_type`, replacing the pass's active hold. Codes: 'held', 'pass_used',
-- 'ticket_type_not_found', 'not_enough_places' (detail: places left), 'seat_not_found'
-- (detail: the missing ids), 'general_by_quantity', 'seat_unavailable' (detail: the taken ids).
CREATE FUNCTION fg_hold(p_event BIGINT, p_jti UUID, p_seat_ids BIGINT[], p_ticket_type TEXT,
                        p_quantity INTEGER, p_hold_id UUID, p_expires_at TIMESTAMPTZ)
RETURNS TABLE (code TEXT, seat_ids BIGINT[], freed BIGINT[], total_cents BIGINT, detail TEXT)
LANGUAGE plpgsql AS $$
DECLARE
    v_previous UUID[];
    v_ids BIGINT[];
    v_found BIGINT[];
    v_taken BIGINT[];
    v_any_general BOOLEAN;
    v_total BIGINT;
    v_freed BIGINT[] := '{}';
    v_exists BOOLEAN;
    v_left BIGINT;
BEGIN
    IF EXISTS (SELECT 1 FROM orders o WHERE o.jti = p_jti) THEN
        RETURN QUERY SELECT 'pass_used', NULL::BIGINT[], NULL::BIGINT[], NULL::BIGINT, NULL::TEXT;
        RETURN;
    END IF;
    SELECT COALESCE(array_agg(h.id), '{}') INTO v_previous
    FROM (SELECT id FROM holds WHERE jti = p_jti AND status = 'active' FOR UPDATE) h;

    IF p_ticket_type IS NOT NULL THEN
        -- SKIP LOCKED: concurrent holds take different places instead of queueing on one row.
        SELECT COALESCE(array_agg(g.id ORDER BY g.id), '{}') INTO v_ids
        FROM (SELECT s.id FROM seats s
              WHERE s.event_id = p_event AND s.section = p_ticket_type
                AND s.admission = 'general' AND s.status <> 'sold'
                AND (s.status = 'available' OR s.held_until < now() OR s.hold_id = ANY(v_previous))
              ORDER BY s.id LIMIT p_quantity FOR UPDATE SKIP LOCKED) g;
        IF cardinality(v_ids) < p_quantity THEN
            SELECT count(*) > 0,
                   count(*) FILTER (WHERE s.status = 'available'
                                    OR (s.status = 'held' AND s.held_until < now()))
            INTO v_exists, v_left
            FROM seats s
            WHERE s.event_id = p_event AND s.section = p_ticket_type AND s.admission = 'general';
            RETURN QUERY SELECT CASE WHEN v_exists THEN 'not_enough_places'
                                     ELSE 'ticket_type_not_found' END,
                                NULL::BIGINT[], NULL::BIGINT[], NULL::BIGINT, v_left::TEXT;
            RETURN;
        END IF;
    ELSE
        v_ids := p_seat_ids;
    END IF;

    -- Lock the seats in id order, the one order every transaction uses: no deadlocks.
    SELECT COALESCE(array_agg(l.id ORDER BY l.id), '{}'),
           COALESCE(array_agg(l.id ORDER BY l.id) FILTER (
               WHERE NOT (l.status = 'available'
                          OR (l.status = 'held' AND (l.held_until < now()
                                                     OR l.hold_id = ANY(v_previous))))), '{}'),
           COALESCE(bool_or(l.admission = 'general'), false),
           COALESCE(sum(l.price_cents), 0)::BIGINT
    INTO v_found, v_taken, v_any_general, v_total
    FROM (SELECT s.id, s.status, s.hold_id, s.held_until, s.price_cents, s.admission
          FROM seats s WHERE s.id = ANY(v_ids) AND s.event_id = p_event
          ORDER BY s.id FOR UPDATE) l;
    IF cardinality(v_found) <> cardinality(v_ids) THEN
        RETURN QUERY SELECT 'seat_not_found', NULL::BIGINT[], NULL::BIGINT[], NULL::BIGINT,
            (SELECT string_agg(m::TEXT, ', ' ORDER BY m)
             FROM unnest(v_ids) m WHERE m <> ALL(v_found));
        RETURN;
    END IF;
    IF p_ticket_type IS NULL AND v_any_general THEN
        RETURN QUERY SELECT 'general_by_quantity', NULL::BIGINT[], NULL::BIGINT[], NULL::BIGINT,
                            NULL::TEXT;
        RETURN;
    END IF;
    IF cardinality(v_taken) > 0 THEN
        RETURN QUERY SELECT 'seat_unavailable', NULL::BIGINT[], NULL::BIGINT[], NULL::BIGINT,
                            array_to_string(v_taken, ', ');
        RETURN;
    END IF;

    -- The new hold replaces the pass's previous one (in this statement: all or nothing).
    IF cardinality(v_previous) > 0 THEN
        WITH f AS (
            UPDATE seats s SET status = 'available', hold_id = NULL, held_until = NULL
            WHERE s.hold_id = ANY(v_previous) AND s.status = 'held' RETURNING s.id)
        SELECT COALESCE(array_agg(f.id), '{}') INTO v_freed FROM f;
        UPDATE holds h SET status = 'released' WHERE h.id = ANY(v_previous);
    END IF;
    UPDATE seats s SET status = 'held', hold_id = p_hold_id, held_until = p_expires_at
    WHERE s.id = ANY(v_ids);
    INSERT INTO holds (id, event_id, jti, seat_ids, expires_at)
    VALUES (p_hold_id, p_event, p_jti, v_ids, p_expires_at);
    RETURN QUERY SELECT 'held', v_ids, v_freed, v_total, NULL::TEXT;
END;
$$;

-- The start of a checkout: the answer to a key already used, or the claim of the key and the
-- hold with the pending payment that reconciliation starts from. Codes: 'replay' (status,
-- response), 'key_reused', 'key_running', 'hold_not_found', 'pass_used', 'hold_paying',
-- 'hold_expired', 'hold_not_active' (detail: its status), 'claimed' (seat_ids, total).
-- A concurrent claim of the same key waits on the key's primary key until the first commits,
-- then reads what it stored.
CREATE FUNCTION fg_checkout_begin(p_event BIGINT, p_jti UUID, p_key TEXT, p_hash BYTEA,
                                  p_hold_id UUID, p_payment_key TEXT, p_provider TEXT,
                                  p_identity TEXT, p_ticket UUID)
RETURNS TABLE (code TEXT, status_code INTEGER, response JSONB, seat_ids BIGINT[],
               total_cents BIGINT, detail TEXT)
LANGUAGE plpgsql AS $$
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
BEGIN
    FOR attempt IN 1..2 LOOP
        SELECT c.request_hash, c.state, c.status_code, c.response
        INTO v_hash, v_state, v_status, v_response
        FROM checkout_requests c WHERE c.jti = p_jti AND c.idempotency_key = p_key;
        IF FOUND THEN
            IF v_hash <> p_hash THEN
                RETURN QUERY SELECT 'key_reused', NULL::INTEGER, NULL::JSONB, NULL::BIGINT[],
                                    NULL::BIGINT, NULL::TEXT;
            ELSIF v_state = 'done' AND v_status IS NOT NULL AND v_response IS NOT NULL THEN
                RETURN QUERY SELECT 'replay', v_status, v_response, NULL::BIGINT[],
                                    NULL::BIGINT, NULL::TEXT;
            ELSE
                RETURN QUERY SELECT 'key_running', NULL::INTEGER, NULL::JSONB, NULL::BIGINT[],
                                    NULL::BIGINT, NULL::TEXT;
            END IF;
            RETURN;
        END IF;
        IF attempt = 2 THEN
            -- Claimed by another request that then gave the key back: run again.
            RETURN QUERY SELECT 'key_running', NULL::INTEGER, NULL::JSONB, NULL::BIGINT[],
                                NULL::BIGINT, NULL::TEXT;
            RETURN;
        END IF;

        SELECT h.jti, h.seat_ids, EXISTS (SELECT 1 FROM orders o WHERE o.jti = h.jti)
        INTO v_hold_jti, v_seat_ids, v_used
        FROM holds h WHERE h.id = p_hold_id AND h.event_id = p_event;
        IF NOT FOUND OR v_hold_jti <> p_jti THEN
            RETURN QUERY SELECT 'hold_not_found', NULL::INTEGER, NULL::JSONB, NULL::BIGINT[],
                                NULL::BIGINT, NULL::TEXT;
            RETURN;
        END IF;
        IF v_used THEN
            RETURN QUERY SELECT 'pass_used', NULL::INTEGER, NULL::JSONB, NULL::BIGINT[],
                                NULL::BIGINT, NULL::TEXT;
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
                            v_hold_status;
        RETURN;
    END IF;
    SELECT COALESCE(sum(s.price_cents), 0)::BIGINT INTO v_total
    FROM seats s WHERE s.id = ANY(v_seat_ids);
    INSERT INTO payments (idempotency_key, provider, amount_cents, status, event_id, jti,
                          identity, ticket_id, hold_id, checkout_key)
    VALUES (p_payment_key, p_provider, v_total, 'pending', p_event, p_jti, p_identity, p_ticket,
            p_hold_id, p_key)
    ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT 'claimed', NULL::INTEGER, NULL::JSONB, v_seat_ids, v_total, NULL::TEXT;
END;
$$;

-- The order of a charged checkout: if the hold still owns every seat (locked in id order), the
-- seats are sold, the order, its tickets, the stored answer for retries, the outbox row and the
-- settled payment are written, and the event is marked sold out when this sold the last place.
-- Codes: 'ordered' (sold_out), 'hold_expired'. A pass or hold already used for an order aborts
-- the call on orders_one_per_pass / orders_one_per_hold.
CREATE FUNCTION fg_commit_order(p_event BIGINT, p_jti UUID, p_identity TEXT, p_hold_id UUID,
                                p_seat_ids BIGINT[], p_total BIGINT, p_reference TEXT,
                                p_order_id UUID, p_created_at TIMESTAMPTZ, p_codes TEXT[],
                                p_key TEXT, p_body JSONB, p_payment_key TEXT)
RETURNS TABLE (code TEXT, sold_out BOOLEAN)
LANGUAGE plpgsql AS $$
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
    UPDATE checkout_requests c SET state = 'done', status_code = 201, response = p_body
    WHERE c.jti = p_jti AND c.idempotency_key = p_key;
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
