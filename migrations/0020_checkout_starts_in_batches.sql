-- Group commit of checkout starts. `fg_checkout_begin` (0013) claims an Idempotency-Key, marks
-- the hold as being paid for and records the pending payment: eight statements and a commit
-- per checkout, most of its time spent starting statements. The purchase service now hands the
-- checkouts that start together to one call of the function below, which does the common case
-- — a fresh key, the pass's own active hold — once for the whole batch, with the same effect
-- per checkout as fg_checkout_begin:
--   * the key is claimed (`checkout_requests`, state 'running'); a key another transaction
--     claims first is left to it;
--   * the hold, which must be the pass's, in this event, active and unexpired, becomes
--     'paying', so no second checkout of it can charge the card again;
--   * the pending payment that reconciliation starts from is recorded with the hold's total.
-- Every other case answers 'defer' and leaves nothing behind in this call (a key it claimed for
-- a checkout that then cannot go on is given back in the same statement): the service runs
-- those checkouts through fg_checkout_begin one at a time, which gives each its precise answer
-- (a replay, a reused key, a key still running, a hold not found, used, paying or expired).
-- The caller never sends one pass twice in a batch.
--
-- Checkouts are parallel arrays indexed 1..n. Answers: 'claimed' (seat_ids, total_cents) or
-- 'defer'.
-- Every row is found through an index by one of the checkout's own keys (`= ANY`, or a
-- subquery per checkout), never by a join the planner could turn into a scan of `holds`.
CREATE FUNCTION fg_checkout_begins(p_event BIGINT[], p_jti UUID[], p_key TEXT[], p_hash BYTEA[],
                                   p_hold UUID[], p_payment_key TEXT[], p_provider TEXT,
                                   p_identity TEXT[], p_ticket UUID[])
RETURNS TABLE (req INTEGER, code TEXT, seat_ids BIGINT[], total_cents BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    v_n INTEGER := cardinality(p_jti);
    v_fresh INTEGER[];
    v_claimed INTEGER[] := '{}';
    v_paying INTEGER[] := '{}';
    v_paying_holds UUID[];
    v_totals BIGINT[];
    v_back INTEGER;
BEGIN
    -- Fresh: no request under this key yet, the hold is the pass's own in this event, and the
    -- pass has not bought.
    -- (Scalar subqueries, one index probe each: as EXISTS in WHERE the planner would turn
    -- them into joins and, not knowing the batch's size, scan whole tables.)
    SELECT COALESCE(array_agg(x.i ORDER BY x.i), '{}') INTO v_fresh
    FROM (SELECT i,
                 (SELECT h.jti FROM holds h
                  WHERE h.id = p_hold[i] AND h.event_id = p_event[i]) AS hold_jti,
                 (SELECT true FROM checkout_requests c
                  WHERE c.jti = p_jti[i] AND c.idempotency_key = p_key[i]) AS requested,
                 (SELECT true FROM orders o WHERE o.jti = p_jti[i]) AS bought
          FROM generate_series(1, v_n) AS i) x
    WHERE x.hold_jti = p_jti[x.i] AND x.requested IS NULL AND x.bought IS NULL;

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
                          identity, ticket_id, hold_id, checkout_key)
    SELECT p_payment_key[v_paying[k]], p_provider, v_totals[k], 'pending', p_event[v_paying[k]],
           p_jti[v_paying[k]], p_identity[v_paying[k]], p_ticket[v_paying[k]],
           p_hold[v_paying[k]], p_key[v_paying[k]]
    FROM generate_subscripts(v_paying, 1) AS k
    ORDER BY k
    ON CONFLICT DO NOTHING;

    RETURN QUERY
    SELECT i,
           CASE WHEN array_position(v_paying, i) IS NULL THEN 'defer' ELSE 'claimed' END,
           CASE WHEN array_position(v_paying, i) IS NOT NULL THEN
               (SELECT h.seat_ids FROM holds h WHERE h.id = p_hold[i]) END,
           v_totals[array_position(v_paying, i)]
    FROM generate_series(1, v_n) AS i;
END;
$$;
