-- Autotune: closed-loop admission (queue/src/autotune.rs).
--
-- * `autotune` holds, per event, the target and bounds an organizer or operator set, whether it
--   is on, its last state and when it last lowered the controls (so a new leader keeps the
--   law's spacing between decreases).
-- * Every change autotune makes is an `operator_audit` row by actor `autotune`, action `auto`,
--   with its reason; switching autotune on or off is action `autotune`.
-- * `admission_state` gains what the admission tick needs beyond the controls, refreshed once a
--   second by the leader: `admit_limit`, the most shoppers worth having at once given the
--   places left and the conversion measured (NULL: no limit known yet), and `rate_factor`, the
--   no-show compensation (admissions per shopper who claims, 1 to 3).

CREATE TABLE autotune (
    event_id          BIGINT           PRIMARY KEY REFERENCES events (id) ON DELETE CASCADE,
    enabled           BOOLEAN          NOT NULL DEFAULT FALSE,
    target_p99_ms     INTEGER          NOT NULL CHECK (target_p99_ms BETWEEN 10 AND 60000),
    target_error_rate DOUBLE PRECISION NOT NULL
                      CHECK (target_error_rate >= 0 AND target_error_rate <= 0.5),
    rate_floor        INTEGER          NOT NULL CHECK (rate_floor >= 1),
    rate_ceiling      INTEGER          NOT NULL CHECK (rate_ceiling <= 1000000),
    cap_floor         INTEGER          NOT NULL CHECK (cap_floor >= 1),
    cap_ceiling       INTEGER          NOT NULL CHECK (cap_ceiling <= 1000000),
    state             TEXT             NOT NULL DEFAULT 'off'
                      CHECK (state IN ('off', 'raising', 'lowering', 'cooling', 'holding', 'idle')),
    why               TEXT,
    decided_at        TIMESTAMPTZ,
    lowered_at        TIMESTAMPTZ,
    CONSTRAINT autotune_rate_bounds CHECK (rate_floor <= rate_ceiling),
    CONSTRAINT autotune_cap_bounds CHECK (cap_floor <= cap_ceiling)
);

ALTER TABLE operator_audit DROP CONSTRAINT operator_audit_action_check;
ALTER TABLE operator_audit
    ADD CONSTRAINT operator_audit_action_check
        CHECK (action IN ('controls', 'message', 'autotune', 'auto')),
    ADD COLUMN reason TEXT;

ALTER TABLE admission_state
    ADD COLUMN admit_limit BIGINT CHECK (admit_limit >= 0),
    ADD COLUMN rate_factor DOUBLE PRECISION NOT NULL DEFAULT 1
        CHECK (rate_factor >= 1 AND rate_factor <= 3),
    ADD COLUMN places_left BIGINT CHECK (places_left >= 0);
