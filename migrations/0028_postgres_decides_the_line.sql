-- Postgres decides every fact of the line; Redis only mirrors it (issue 17).
--
-- Before this, a live arrival's position was taken from Redis (`INCR tail`) and written to
-- Postgres afterwards, the serving head and the admitted-but-unclaimed places lived only in
-- Redis, and a rebuild after Redis lost its data trusted Redis flags. Two losses close together
-- handed one position to two tickets, lost acknowledged places and moved the head backwards.
-- Now:
-- * `draws.tail` is the line's back: the draw sets it to its entrant count, and each batch of
--   live joins advances it in the transaction that inserts them, so positions N+1..tail are
--   dense, unique and committed with their joins (a rolled-back batch takes its numbers back).
-- * `admission_state` holds the serving head and the admission controller's rate credit; one
--   tick at a time advances it (row lock), whichever instance runs it, at the rate measured
--   between ticks on Postgres's clock.
-- * `admissions` is one row per admitted position: when, until when its slot under the cap is
--   taken (`slot_until`: the claim deadline until a pass is claimed, then the pass's expiry, then
--   the moment the shopper bought), and the ticket that claimed it. Active shoppers are the rows
--   whose slot has not ended; the primary key admits a position once.
-- * `joins.left_position` records where a fan who left after the draw stood, so the controller
--   skips that place without asking Redis.
ALTER TABLE draws ADD COLUMN tail BIGINT NOT NULL DEFAULT 0 CHECK (tail >= 0);

-- Live joins of earlier versions whose position never reached Postgres get one now, after
-- every position already given, in arrival order.
WITH given AS (
    SELECT d.event_id,
           GREATEST(COALESCE(d.entrants, 0),
                    COALESCE((SELECT max(j.position) FROM joins j
                              WHERE j.event_id = d.event_id AND j.phase = 'live'), 0)) AS tail
    FROM draws d WHERE d.drawn_at IS NOT NULL),
numbered AS (
    SELECT j.ticket_id, g.tail + row_number() OVER (PARTITION BY j.event_id
                                                    ORDER BY j.joined_at, j.ticket_id) AS position
    FROM joins j JOIN given g ON g.event_id = j.event_id
    WHERE j.phase = 'live' AND j.position IS NULL)
UPDATE joins j SET position = n.position FROM numbered n WHERE j.ticket_id = n.ticket_id;
UPDATE draws d SET tail = GREATEST(COALESCE(d.entrants, 0),
                                   COALESCE((SELECT max(j.position) FROM joins j
                                             WHERE j.event_id = d.event_id AND j.phase = 'live'), 0))
WHERE d.drawn_at IS NOT NULL;

CREATE TABLE admission_state (
    event_id   BIGINT           PRIMARY KEY REFERENCES events (id) ON DELETE CASCADE,
    head       BIGINT           NOT NULL DEFAULT 0 CHECK (head >= 0),
    -- Admissions owed to the rate but not yet whole (a fraction below one).
    credit     DOUBLE PRECISION NOT NULL DEFAULT 0 CHECK (credit >= 0 AND credit < 1),
    ticked_at  TIMESTAMPTZ
);

CREATE TABLE admissions (
    event_id     BIGINT      NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    position     BIGINT      NOT NULL CHECK (position > 0),
    admitted_at  TIMESTAMPTZ NOT NULL,
    claim_by     TIMESTAMPTZ NOT NULL,
    slot_until   TIMESTAMPTZ NOT NULL,
    ticket_id    UUID,
    claimed_at   TIMESTAMPTZ,
    finished_at  TIMESTAMPTZ,
    CONSTRAINT admissions_one_per_position PRIMARY KEY (event_id, position),
    CONSTRAINT admissions_claimed_in_window CHECK (claimed_at IS NULL OR claimed_at <= claim_by),
    CONSTRAINT admissions_claim_consistent CHECK ((ticket_id IS NULL) = (claimed_at IS NULL))
);
-- Active shoppers: the slots that have not ended (at most the cap, whatever the history).
CREATE INDEX admissions_slots ON admissions (event_id, slot_until);

ALTER TABLE passes ADD COLUMN position BIGINT CHECK (position > 0);

ALTER TABLE joins ADD COLUMN left_position BIGINT CHECK (left_position > 0);
CREATE INDEX joins_left_positions ON joins (event_id, left_position)
    WHERE left_position IS NOT NULL;
-- Leaves recorded by earlier versions: their live positions are known here (drawn positions
-- were only in Redis; such fans are admitted and simply do not claim).
UPDATE joins SET left_position = position
WHERE left_at IS NOT NULL AND NOT left_before_draw AND position IS NOT NULL;

-- A shopper who buys gives their slot back in the transaction that commits the order, so the
-- controller's count and the sold-out mark are always seen together.
CREATE FUNCTION fg_orders_end_slots() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE admissions a SET slot_until = LEAST(a.slot_until, now()),
                            finished_at = COALESCE(a.finished_at, now())
    FROM new_orders o JOIN passes p ON p.jti = o.jti
    WHERE a.event_id = p.event_id AND a.position = p.position AND a.ticket_id = p.ticket_id;
    RETURN NULL;
END;
$$;
CREATE TRIGGER orders_end_slots AFTER INSERT ON orders
    REFERENCING NEW TABLE AS new_orders
    FOR EACH STATEMENT EXECUTE FUNCTION fg_orders_end_slots();
