-- fairgate initial schema: events and their sale windows, seats, durable joins, the published
-- draw, issued passes, holds, orders, payments and the idempotency ledger.
-- Constraint names are stable: services map them to precise 409 errors.

CREATE TABLE events (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                TEXT        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    venue               TEXT        NOT NULL DEFAULT '' CHECK (length(venue) <= 200),
    starts_at           TIMESTAMPTZ NOT NULL,
    presale_opens_at    TIMESTAMPTZ NOT NULL,
    sale_starts_at      TIMESTAMPTZ NOT NULL,
    sale_ends_at        TIMESTAMPTZ NOT NULL,
    rate_per_minute     INTEGER     NOT NULL CHECK (rate_per_minute > 0),
    max_active          INTEGER     NOT NULL CHECK (max_active > 0),
    pass_ttl_secs       INTEGER     NOT NULL CHECK (pass_ttl_secs BETWEEN 60 AND 86400),
    claim_window_secs   INTEGER     NOT NULL CHECK (claim_window_secs BETWEEN 10 AND 86400),
    seats_per_fan       INTEGER     NOT NULL CHECK (seats_per_fan BETWEEN 1 AND 20),
    anonymous_allowed   BOOLEAN     NOT NULL DEFAULT TRUE,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT events_window_ordered
        CHECK (presale_opens_at < sale_starts_at AND sale_starts_at < sale_ends_at)
);

CREATE TABLE seats (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     BIGINT      NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    section      TEXT        NOT NULL,
    row_label    TEXT        NOT NULL,
    number       INTEGER     NOT NULL,
    price_cents  BIGINT      NOT NULL CHECK (price_cents >= 0),
    status       TEXT        NOT NULL DEFAULT 'available'
                 CHECK (status IN ('available', 'held', 'sold')),
    hold_id      UUID,
    held_until   TIMESTAMPTZ,
    CONSTRAINT seats_unique_place UNIQUE (event_id, section, row_label, number),
    CONSTRAINT seats_hold_consistent CHECK (
        (status = 'available' AND hold_id IS NULL AND held_until IS NULL)
        OR (status = 'held' AND hold_id IS NOT NULL AND held_until IS NOT NULL)
        OR (status = 'sold' AND held_until IS NULL))
);
CREATE INDEX seats_event_status ON seats (event_id, status, id);
CREATE INDEX seats_hold ON seats (hold_id) WHERE hold_id IS NOT NULL;

-- One row per identity per event: the durable record of a join. `position` is set by the draw
-- (presale joins) or at arrival (after the draw).
CREATE TABLE joins (
    ticket_id   UUID        PRIMARY KEY,
    event_id    BIGINT      NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    identity    TEXT        NOT NULL CHECK (length(identity) BETWEEN 1 AND 200),
    phase       TEXT        NOT NULL CHECK (phase IN ('presale', 'live')),
    joined_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    position    BIGINT      CHECK (position > 0),
    CONSTRAINT joins_one_per_identity UNIQUE (event_id, identity),
    CONSTRAINT joins_unique_position UNIQUE (event_id, position)
);
CREATE INDEX joins_unpositioned ON joins (event_id, joined_at) WHERE position IS NULL;

-- The verifiable draw: the commitment is public from presale; the seed only after the draw.
CREATE TABLE draws (
    event_id    BIGINT      PRIMARY KEY REFERENCES events (id) ON DELETE CASCADE,
    seed        BYTEA       NOT NULL CHECK (length(seed) = 32),
    commitment  BYTEA       NOT NULL CHECK (length(commitment) = 32),
    drawn_at    TIMESTAMPTZ,
    entrants    BIGINT      CHECK (entrants >= 0),
    algorithm   TEXT        NOT NULL
);

-- Every pass issued: one per ticket. The token is not stored (Ed25519 signatures are
-- deterministic, so re-signing the same claims yields the same pass).
CREATE TABLE passes (
    jti         UUID        PRIMARY KEY,
    event_id    BIGINT      NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    ticket_id   UUID        NOT NULL REFERENCES joins (ticket_id) ON DELETE CASCADE,
    identity    TEXT        NOT NULL,
    seat_limit  INTEGER     NOT NULL,
    issued_at   TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL,
    kid         TEXT        NOT NULL,
    CONSTRAINT passes_one_per_ticket UNIQUE (ticket_id)
);

CREATE TABLE holds (
    id          UUID        PRIMARY KEY,
    event_id    BIGINT      NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    jti         UUID        NOT NULL,
    seat_ids    BIGINT[]    NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ NOT NULL,
    status      TEXT        NOT NULL DEFAULT 'active'
                CHECK (status IN ('active', 'paying', 'released', 'purchased'))
);
CREATE INDEX holds_jti ON holds (jti);

CREATE TABLE orders (
    id            UUID        PRIMARY KEY,
    event_id      BIGINT      NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    jti           UUID        NOT NULL,
    identity      TEXT        NOT NULL,
    hold_id       UUID        NOT NULL REFERENCES holds (id),
    total_cents   BIGINT      NOT NULL CHECK (total_cents >= 0),
    status        TEXT        NOT NULL DEFAULT 'paid' CHECK (status IN ('paid', 'refunded')),
    payment_ref   TEXT        NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A pass buys once: its jti is redeemed in the transaction that commits the seats.
    CONSTRAINT orders_one_per_pass UNIQUE (jti),
    CONSTRAINT orders_one_per_hold UNIQUE (hold_id)
);

CREATE TABLE tickets (
    code        TEXT        PRIMARY KEY,
    order_id    UUID        NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    seat_id     BIGINT      NOT NULL REFERENCES seats (id),
    status      TEXT        NOT NULL DEFAULT 'valid' CHECK (status IN ('valid', 'void'))
);
-- The last line against oversell: a seat is on at most one valid ticket.
CREATE UNIQUE INDEX tickets_one_valid_per_seat ON tickets (seat_id) WHERE status = 'valid';

CREATE TABLE payments (
    idempotency_key TEXT        PRIMARY KEY,
    provider        TEXT        NOT NULL,
    provider_ref    TEXT,
    amount_cents    BIGINT      NOT NULL CHECK (amount_cents >= 0),
    status          TEXT        NOT NULL
                    CHECK (status IN ('pending', 'succeeded', 'declined', 'refunded')),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Checkout idempotency: one row per (pass, client key). A retry with the same body replays the
-- stored response; another body is refused; a retry while the first runs gets 409.
CREATE TABLE checkout_requests (
    jti             UUID        NOT NULL,
    idempotency_key TEXT        NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    request_hash    BYTEA       NOT NULL,
    state           TEXT        NOT NULL CHECK (state IN ('running', 'done')),
    status_code     INTEGER,
    response        JSONB,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (jti, idempotency_key)
);
