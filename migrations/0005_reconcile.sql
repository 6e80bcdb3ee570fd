-- What reconciliation needs to finish or undo a checkout interrupted between the charge and the
-- order: which pass, hold and client key a payment belongs to.
ALTER TABLE payments
    ADD COLUMN event_id     BIGINT REFERENCES events (id) ON DELETE CASCADE,
    ADD COLUMN jti          UUID,
    ADD COLUMN identity     TEXT,
    ADD COLUMN ticket_id    UUID,
    ADD COLUMN hold_id      UUID,
    ADD COLUMN checkout_key TEXT,
    ADD COLUMN settled_at   TIMESTAMPTZ;
CREATE INDEX payments_unsettled ON payments (created_at) WHERE settled_at IS NULL;

-- The sandbox payment provider's own books. It stands for an external provider, whose memory of
-- charges (and their idempotency keys) survives a crash of ours.
CREATE TABLE sandbox_charges (
    idempotency_key TEXT        PRIMARY KEY,
    reference       TEXT        NOT NULL UNIQUE,
    amount_cents    BIGINT      NOT NULL,
    outcome         TEXT        NOT NULL CHECK (outcome IN ('succeeded', 'card_declined', 'insufficient_funds')),
    refunded        BOOLEAN     NOT NULL DEFAULT FALSE,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A checkout interrupted before the provider was ever reached charged nothing: 'abandoned'.
ALTER TABLE payments DROP CONSTRAINT payments_status_check;
ALTER TABLE payments ADD CONSTRAINT payments_status_check
    CHECK (status IN ('pending', 'succeeded', 'declined', 'refunded', 'abandoned'));
