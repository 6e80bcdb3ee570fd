-- Group commit of seat holds. Every hold was its own transaction: `fg_hold` (0013, 0014) runs
-- up to ten statements and a commit for one fan's two seats, and as with orders (0018) the
-- database's time went to starting statements and transactions rather than to the rows. The
-- purchase service now hands the seat holds that arrive together to one call of the function
-- below: the same steps, once per batch.
--
-- The rules are fg_hold's, per request:
--   * a pass that has bought is refused ('pass_used');
--   * seats are locked without waiting (SKIP LOCKED), in id order: a seat another transaction
--     has locked is being held or bought at that moment, so it is not free for this fan;
--   * all or nothing: every seat must exist in the request's event ('seat_not_found', detail:
--     the missing ids), be a numbered seat ('general_by_quantity') and be free — available, or
--     held by a hold that has expired ('seat_unavailable', detail: the taken ids);
--   * the seats are held until the request's expiry, under the request's hold id.
-- A pass that already has an active hold is answered 'defer': replacing a hold (freeing the
-- seats of the old one in the same transaction) stays with fg_hold, one request at a time.
-- The caller sends no pass and no seat twice in one batch (it splits such batches), so the
-- requests of a batch never compete with each other. General admission by quantity (SKIP
-- LOCKED over a ticket type's places) also stays with fg_hold.
--
-- Requests are parallel arrays indexed 1..n; their seats are parallel arrays naming their
-- request's index (`p_seat_req`). The answer is fg_hold's, per request (`freed` is empty: no
-- hold is replaced here).
CREATE FUNCTION fg_holds(p_event BIGINT[], p_jti UUID[], p_hold UUID[], p_expires TIMESTAMPTZ[],
                         p_seat_req INTEGER[], p_seat_ids BIGINT[])
RETURNS TABLE (req INTEGER, code TEXT, seat_ids BIGINT[], freed BIGINT[], total_cents BIGINT,
               detail TEXT)
LANGUAGE plpgsql AS $$
DECLARE
    v_n INTEGER := cardinality(p_jti);
    v_code TEXT[] := array_fill(NULL::TEXT, ARRAY[cardinality(p_jti)]);
    v_detail TEXT[] := array_fill(NULL::TEXT, ARRAY[cardinality(p_jti)]);
    v_total BIGINT[] := array_fill(NULL::BIGINT, ARRAY[cardinality(p_jti)]);
    v_used UUID[];
    v_active UUID[];
    v_want BIGINT[];
    v_ids BIGINT[];
    v_events BIGINT[];
    v_free BOOLEAN[];
    v_general BOOLEAN[];
    v_prices BIGINT[];
    v_unlocked BIGINT[];
    v_existing BIGINT[] := '{}';
    v_existing_events BIGINT[] := '{}';
    v_ok INTEGER[] := '{}';
    r RECORD;
BEGIN
    SELECT COALESCE(array_agg(o.jti), '{}') INTO v_used FROM orders o WHERE o.jti = ANY(p_jti);
    SELECT COALESCE(array_agg(h.jti), '{}') INTO v_active
    FROM holds h WHERE h.jti = ANY(p_jti) AND h.status = 'active';
    FOR i IN 1..v_n LOOP
        IF p_jti[i] = ANY(v_used) THEN
            v_code[i] := 'pass_used';
        ELSIF p_jti[i] = ANY(v_active) THEN
            v_code[i] := 'defer';
        END IF;
    END LOOP;

    SELECT COALESCE(array_agg(p_seat_ids[k]), '{}') INTO v_want
    FROM generate_series(1, cardinality(p_seat_ids)) AS k WHERE v_code[p_seat_req[k]] IS NULL;

    -- Lock without waiting, in id order (SKIP LOCKED never waits, so it cannot deadlock).
    SELECT COALESCE(array_agg(l.id ORDER BY l.id), '{}'),
           COALESCE(array_agg(l.event_id ORDER BY l.id), '{}'),
           COALESCE(array_agg(l.free ORDER BY l.id), '{}'),
           COALESCE(array_agg(l.general ORDER BY l.id), '{}'),
           COALESCE(array_agg(l.price_cents ORDER BY l.id), '{}')
    INTO v_ids, v_events, v_free, v_general, v_prices
    FROM (SELECT s.id, s.event_id, s.price_cents, s.admission = 'general' AS general,
                 (s.status = 'available' OR (s.status = 'held' AND s.held_until < now())) AS free
          FROM seats s WHERE s.id = ANY(v_want) ORDER BY s.id FOR UPDATE SKIP LOCKED) l;

    -- Seats not locked: missing, or locked by someone else (told apart below, as fg_hold does).
    SELECT COALESCE(array_agg(w), '{}') INTO v_unlocked FROM unnest(v_want) AS w
    WHERE w <> ALL(v_ids);
    IF cardinality(v_unlocked) > 0 THEN
        SELECT COALESCE(array_agg(s.id), '{}'), COALESCE(array_agg(s.event_id), '{}')
        INTO v_existing, v_existing_events
        FROM seats s WHERE s.id = ANY(v_unlocked);
    END IF;

    FOR r IN
        SELECT q.req,
               -- Seats not in this event, or in no event at all.
               array_agg(q.seat ORDER BY q.seat) FILTER (
                   WHERE COALESCE(l.event_id, e.event_id) IS DISTINCT FROM p_event[q.req])
                   AS missing,
               -- Seats of this event someone else's transaction has locked.
               array_agg(q.seat ORDER BY q.seat) FILTER (WHERE l.id IS NULL) AS busy,
               array_agg(q.seat ORDER BY q.seat) FILTER (WHERE l.id IS NOT NULL AND NOT l.free)
                   AS taken,
               COALESCE(bool_or(l.general), false) AS any_general,
               COALESCE(sum(l.price_cents), 0)::BIGINT AS total
        FROM unnest(p_seat_req, p_seat_ids) AS q(req, seat)
        LEFT JOIN unnest(v_ids, v_events, v_free, v_general, v_prices)
                  AS l(id, event_id, free, general, price_cents) ON l.id = q.seat
        LEFT JOIN unnest(v_existing, v_existing_events) AS e(id, event_id) ON e.id = q.seat
        WHERE v_code[q.req] IS NULL
        GROUP BY q.req
    LOOP
        IF r.missing IS NOT NULL THEN
            v_code[r.req] := 'seat_not_found';
            v_detail[r.req] := array_to_string(r.missing, ', ');
        ELSIF r.busy IS NOT NULL THEN
            v_code[r.req] := 'seat_unavailable';
            v_detail[r.req] := (SELECT string_agg(m::TEXT, ', ' ORDER BY m)
                                FROM unnest(r.busy || COALESCE(r.taken, '{}')) AS m);
        ELSIF r.any_general THEN
            v_code[r.req] := 'general_by_quantity';
        ELSIF r.taken IS NOT NULL THEN
            v_code[r.req] := 'seat_unavailable';
            v_detail[r.req] := array_to_string(r.taken, ', ');
        ELSE
            v_code[r.req] := 'held';
            v_total[r.req] := r.total;
            v_ok := v_ok || r.req;
        END IF;
    END LOOP;

    IF cardinality(v_ok) > 0 THEN
        UPDATE seats s SET status = 'held', hold_id = p_hold[q.req], held_until = p_expires[q.req]
        FROM unnest(p_seat_req, p_seat_ids) AS q(req, seat)
        WHERE s.id = q.seat AND q.req = ANY(v_ok);
        INSERT INTO holds (id, event_id, jti, seat_ids, expires_at)
        SELECT p_hold[o], p_event[o], p_jti[o],
               (SELECT array_agg(q.seat ORDER BY q.seat)
                FROM unnest(p_seat_req, p_seat_ids) AS q(req, seat) WHERE q.req = o),
               p_expires[o]
        FROM unnest(v_ok) AS o;
    END IF;

    RETURN QUERY
    SELECT i, v_code[i],
           CASE WHEN v_code[i] = 'held' THEN
               (SELECT array_agg(q.seat ORDER BY q.seat)
                FROM unnest(p_seat_req, p_seat_ids) AS q(req, seat) WHERE q.req = i) END,
           CASE WHEN v_code[i] = 'held' THEN '{}'::BIGINT[] END,
           v_total[i], v_detail[i]
    FROM generate_series(1, v_n) AS i;
END;
$$;
