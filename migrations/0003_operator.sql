-- Live operator controls and their audit trail.
ALTER TABLE events
    ADD COLUMN paused BOOLEAN NOT NULL DEFAULT FALSE,
    ADD COLUMN message TEXT CHECK (length(message) <= 280);

CREATE TABLE operator_audit (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id   BIGINT      NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    actor      TEXT        NOT NULL,
    action     TEXT        NOT NULL CHECK (action IN ('controls', 'message')),
    before     JSONB       NOT NULL,
    after      JSONB       NOT NULL,
    at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX operator_audit_event ON operator_audit (event_id, at);
