-- Webhook events from payment providers, stored once per event id (providers deliver at least
-- once): an audit trail, and the provider's reference for payments still being settled.
CREATE TABLE provider_events (
    provider    TEXT        NOT NULL,
    event_id    TEXT        NOT NULL CHECK (length(event_id) BETWEEN 1 AND 255),
    kind        TEXT        NOT NULL,
    payload     JSONB       NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);
