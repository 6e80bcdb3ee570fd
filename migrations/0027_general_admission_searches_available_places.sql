-- General-admission holds find free places through an index of available places only.
--
-- fg_hold searched `seats_general_free` (every general place not sold) in id order and
-- skipped, row by row, the places other fans held. Places stay held for up to five minutes
-- (the hold's TTL) while fans pay or walk away, so in a rush each new hold read past every
-- place already held: `bench-checkout --general --holds-only` (holds that are never paid)
-- ran at ~520 holds/s with p50 61 ms at 32 in flight and fell as holds piled up, each search
-- longer than the last. Now the search reads `seats_general_available`, which holds only
-- available places, and takes the first `quantity` it can lock. Only when that finds too few
-- (a nearly sold type, or places locked by holds in flight) does it search as before, which
-- also takes expired holds the sweeper has not returned yet and the pass's own previous hold.
-- Everything else is as in 0022; the function keeps 0025's settings.

CREATE INDEX seats_general_available ON seats (event_id, section, id)
    WHERE admission = 'general' AND status = 'available';

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
BEGIN
    IF EXISTS (SELECT 1 FROM orders o WHERE o.jti = p_jti) THEN
        RETURN QUERY SELECT 'pass_used', NULL::BIGINT[], NULL::BIGINT[], NULL::BIGINT, NULL::TEXT;
        RETURN;
    END IF;
    SELECT COALESCE(array_agg(h.id), '{}') INTO v_previous
    FROM (SELECT id FROM holds WHERE jti = p_jti AND status = 'active' FOR UPDATE) h;

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
