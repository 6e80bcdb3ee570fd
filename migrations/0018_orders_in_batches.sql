-- Group commit of orders. `fg_commit_order` (0013) ran eleven statements and one commit per
-- order, and Postgres's time went to starting each statement, not to the rows it wrote
-- (bench-checkout: the order commit was half of the purchase path's time in the database). The
-- purchase service now hands the orders that are ready at the same moment to one call of the
-- function below, which runs the same steps once for all of them: eleven statements and one
-- commit per batch. The rules are fg_commit_order's, per order:
--   * every seat of the batch is locked in id order (the one order every transaction uses);
--   * an order is written only if its hold still owns every one of its seats, unexpired;
--     otherwise its answer is 'hold_expired' and nothing of it is written;
--   * an order that sold the last place of its event marks the event sold out ('sold_out').
-- A constraint violation (a pass or hold already used for an order, which fg_commit_order turns
-- into a refusal of that one order) aborts the whole call: the service then commits each order
-- of the batch alone with fg_commit_order, so one bad order cannot fail the others.
--
-- Orders are given as parallel arrays indexed 1..n; seats as parallel arrays naming their
-- order's index (`p_seat_order`), with the ticket code of each seat.
CREATE FUNCTION fg_commit_orders(p_event BIGINT[], p_jti UUID[], p_identity TEXT[],
                                 p_hold UUID[], p_total BIGINT[], p_reference TEXT[],
                                 p_order UUID[], p_created TIMESTAMPTZ[], p_key TEXT[],
                                 p_body JSONB[], p_payment_key TEXT[],
                                 p_seat_order INTEGER[], p_seat_ids BIGINT[], p_codes TEXT[])
RETURNS TABLE (ord INTEGER, code TEXT, sold_out BOOLEAN)
LANGUAGE plpgsql AS $$
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
        UPDATE checkout_requests c SET state = 'done', status_code = 201, response = p_body[o]
        FROM unnest(v_ok) AS o WHERE c.jti = p_jti[o] AND c.idempotency_key = p_key[o];
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
