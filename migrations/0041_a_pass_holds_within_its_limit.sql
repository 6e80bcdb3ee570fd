-- A pass's seats over its holds that are active or being paid for never exceed its limit.
--
-- A hold in `paying` was neither replaced nor counted by a new hold, and went back to `active`
-- when its payment was declined: a pass limited to 2 seats held 10 in 5 active holds (hold,
-- check out with a declined card, hold again while the provider is slow, repeat). And two holds
-- of one pass taken at the same moment by different transactions (the hold writer and the
-- general-admission writer, or two instances) each found no earlier hold to replace, so both
-- stayed active.
--
-- Now:
--   * every hold change of a pass runs under a transaction-scoped advisory lock of the pass
--     (`fg_pass_lock_class()`, `hashtext(jti)`; a collision only serialises two passes), taken
--     first, in jti-hash order when a batch names several passes; the second of two holds at
--     the same moment waits, then sees and replaces the first;
--   * a pass with a hold being paid for gets 'hold_paying' (409): it takes no other hold until
--     that checkout ends, so the declined hold that goes back to `active` is its only hold.
-- So a pass has at most one hold active or paying, of at most its limit (checked by the
-- service against the pass's `lim` before the call). Everything else is as in 0019 / 0024 /
-- 0027, with 0025's settings.

CREATE FUNCTION fg_pass_lock_class() RETURNS INTEGER LANGUAGE sql IMMUTABLE AS
$$ SELECT 1718055265 $$; -- 'fgpa'

-- Locks the given passes (duplicates once) in one order: no two batches wait on each other.
CREATE FUNCTION fg_lock_passes(p_jti UUID[]) RETURNS VOID
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    v_key INTEGER;
BEGIN
    FOR v_key IN SELECT DISTINCT hashtext(j::TEXT) FROM unnest(p_jti) AS j ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(fg_pass_lock_class(), v_key);
    END LOOP;
END;
$$;

CREATE OR REPLACE FUNCTION fg_hold(p_event BIGINT, p_jti UUID, p_seat_ids BIGINT[], p_ticket_type TEXT,
                        p_quantity INTEGER, p_hold_id UUID, p_expires_at TIMESTAMPTZ)
RETURNS TABLE (code TEXT, seat_ids BIGINT[], freed BIGINT[], total_cents BIGINT, detail TEXT)
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
AS $$
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
    v_existing BIGINT[];
    v_paying BOOLEAN;
BEGIN
    -- 0041: one hold change of a pass at a time, whichever writer or instance takes it.
    PERFORM pg_advisory_xact_lock(fg_pass_lock_class(), hashtext(p_jti::TEXT));
    IF EXISTS (SELECT 1 FROM orders o WHERE o.jti = p_jti) THEN
        RETURN QUERY SELECT 'pass_used', NULL::BIGINT[], NULL::BIGINT[], NULL::BIGINT, NULL::TEXT;
        RETURN;
    END IF;
    -- 0041: the pass's active and paying holds, locked. A hold being paid for is neither
    -- replaced nor added to: the new hold waits for that checkout to end.
    SELECT COALESCE(array_agg(h.id) FILTER (WHERE h.status = 'active'), '{}'),
           COALESCE(bool_or(h.status = 'paying'), false)
    INTO v_previous, v_paying
    FROM (SELECT id, status FROM holds
          WHERE jti = p_jti AND status IN ('active', 'paying') FOR UPDATE) h;
    IF v_paying THEN
        RETURN QUERY SELECT 'hold_paying', NULL::BIGINT[], NULL::BIGINT[], NULL::BIGINT,
                            NULL::TEXT;
        RETURN;
    END IF;

    IF p_ticket_type IS NOT NULL THEN
        -- SKIP LOCKED: concurrent holds take different places instead of queueing on one row.
        -- Available places first, through the index that holds nothing else (0027).
        SELECT COALESCE(array_agg(g.id ORDER BY g.id), '{}') INTO v_ids
        FROM (SELECT s.id FROM seats s
              WHERE s.event_id = p_event AND s.section = p_ticket_type
                AND s.admission = 'general' AND s.status = 'available'
              ORDER BY s.id LIMIT p_quantity FOR UPDATE SKIP LOCKED) g;
        IF cardinality(v_ids) < p_quantity THEN
            -- Too few (the type is nearly sold, or others hold locks): also expired holds the
            -- sweeper has not returned yet and this pass's own previous hold, as before 0027.
            SELECT COALESCE(array_agg(g.id ORDER BY g.id), '{}') INTO v_ids
            FROM (SELECT s.id FROM seats s
                  WHERE s.event_id = p_event AND s.section = p_ticket_type
                    AND s.admission = 'general' AND s.status <> 'sold'
                    AND (s.status = 'available' OR s.held_until < now()
                         OR s.hold_id = ANY(v_previous))
                  ORDER BY s.id LIMIT p_quantity FOR UPDATE SKIP LOCKED) g;
        END IF;
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

    -- Lock the seats without waiting (SKIP LOCKED): a seat that another transaction has locked
    -- is being held or bought at this moment, so it is not free for this fan.
    SELECT COALESCE(array_agg(l.id ORDER BY l.id), '{}'),
           COALESCE(array_agg(l.id ORDER BY l.id) FILTER (
               WHERE NOT (l.status = 'available'
                          OR (l.status = 'held' AND (l.held_until < now()
                                                     OR l.hold_id = ANY(v_previous))))), '{}'),
           COALESCE(bool_or(l.admission = 'general'), false),
           COALESCE(sum(l.price_cents), 0)::BIGINT
    INTO v_found, v_taken, v_any_general, v_total
    FROM (SELECT s.id, s.status, s.hold_id, s.held_until, s.price_cents, s.admission
          FROM seats s WHERE s.id = ANY(v_ids) AND s.event_id + 0 = p_event
          ORDER BY s.id FOR UPDATE SKIP LOCKED) l;
    IF cardinality(v_found) <> cardinality(v_ids) THEN
        -- Not locked: no such seat in this event, or someone else's transaction holds it.
        SELECT COALESCE(array_agg(s.id ORDER BY s.id), '{}') INTO v_existing
        FROM seats s WHERE s.id = ANY(v_ids) AND s.event_id + 0 = p_event;
        IF cardinality(v_existing) <> cardinality(v_ids) THEN
            RETURN QUERY SELECT 'seat_not_found', NULL::BIGINT[], NULL::BIGINT[], NULL::BIGINT,
                (SELECT string_agg(m::TEXT, ', ' ORDER BY m)
                 FROM unnest(v_ids) m WHERE m <> ALL(v_existing));
            RETURN;
        END IF;
        RETURN QUERY SELECT 'seat_unavailable', NULL::BIGINT[], NULL::BIGINT[], NULL::BIGINT,
            (SELECT string_agg(m::TEXT, ', ' ORDER BY m)
             FROM unnest(v_ids) m WHERE m <> ALL(v_found) OR m = ANY(v_taken));
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

CREATE OR REPLACE FUNCTION fg_holds(p_event BIGINT[], p_jti UUID[], p_hold UUID[], p_expires TIMESTAMPTZ[],
                         p_seat_req INTEGER[], p_seat_ids BIGINT[])
RETURNS TABLE (req INTEGER, code TEXT, seat_ids BIGINT[], freed BIGINT[], total_cents BIGINT,
               detail TEXT)
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
AS $$
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
    -- 0041: the batch's passes locked in one order (as fg_hold locks one), so no hold of theirs
    -- is taken elsewhere meanwhile; a pass with an active or paying hold goes to fg_hold.
    PERFORM fg_lock_passes(p_jti);
    SELECT COALESCE(array_agg(o.jti), '{}') INTO v_used FROM orders o WHERE o.jti = ANY(p_jti);
    SELECT COALESCE(array_agg(h.jti), '{}') INTO v_active
    FROM holds h WHERE h.jti = ANY(p_jti) AND h.status IN ('active', 'paying');
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

CREATE OR REPLACE FUNCTION fg_holds_general(p_event BIGINT[], p_jti UUID[], p_ticket_type TEXT[],
                                 p_quantity INTEGER[], p_hold UUID[], p_expires TIMESTAMPTZ[])
RETURNS TABLE (req INTEGER, code TEXT, seat_ids BIGINT[], freed BIGINT[], total_cents BIGINT,
               detail TEXT)
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
AS $$
BEGIN
    -- 0041: every pass of the batch locked first, in one order, before fg_hold locks each again.
    PERFORM fg_lock_passes(p_jti);
    FOR i IN 1 .. cardinality(p_event) LOOP
        RETURN QUERY
        SELECT i, h.code, h.seat_ids, h.freed, h.total_cents, h.detail
        FROM fg_hold(p_event[i], p_jti[i], '{}', p_ticket_type[i], p_quantity[i], p_hold[i],
                     p_expires[i]) AS h;
    END LOOP;
END;
$$;
