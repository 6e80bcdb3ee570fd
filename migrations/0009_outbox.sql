-- Transactional outbox: each order confirmation and refund notice is written in the transaction
-- that makes it true. A relay in every purchase instance pushes new rows to the fan's live
-- stream; the rows stay for notifiers (e-mail, SMS), which page through them by id.
CREATE TABLE outbox (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    BIGINT      NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    identity    TEXT        NOT NULL,
    order_id    UUID        NOT NULL,
    kind        TEXT        NOT NULL CHECK (kind IN ('order_confirmed', 'order_refunded')),
    payload     JSONB       NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX outbox_fan ON outbox (event_id, identity, id);
