-- The public catalog: what an event is, where, and for how much; searchable by text (a
-- generated tsvector under a GIN index) and filterable by category, city, date and price.
ALTER TABLE events
    ADD COLUMN description     TEXT   NOT NULL DEFAULT '' CHECK (length(description) <= 5000),
    ADD COLUMN city            TEXT   NOT NULL DEFAULT '' CHECK (length(city) <= 100),
    ADD COLUMN category        TEXT   NOT NULL DEFAULT '' CHECK (length(category) <= 50),
    ADD COLUMN min_price_cents BIGINT CHECK (min_price_cents >= 0),
    ADD COLUMN max_price_cents BIGINT CHECK (max_price_cents >= min_price_cents),
    ADD COLUMN search tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('english', name), 'A')
        || setweight(to_tsvector('english', venue || ' ' || city || ' ' || category), 'B')
        || setweight(to_tsvector('english', description), 'C')
    ) STORED;
CREATE INDEX events_search ON events USING GIN (search);
CREATE INDEX events_starts_at ON events (starts_at);
CREATE INDEX events_category_city ON events (lower(category), lower(city), starts_at);

UPDATE events e SET min_price_cents = p.lo, max_price_cents = p.hi
FROM (SELECT event_id, min(price_cents) AS lo, max(price_cents) AS hi FROM seats
      GROUP BY event_id) p
WHERE p.event_id = e.id;

-- General admission: a ticket type of N places is N rows without a fixed place ('general'),
-- so holds, orders, tickets and refunds work exactly as for seats, and a hold by quantity
-- locks N distinct rows (FOR UPDATE SKIP LOCKED) instead of decrementing one hot counter.
ALTER TABLE seats
    ADD COLUMN admission TEXT NOT NULL DEFAULT 'seated'
        CHECK (admission IN ('seated', 'general'));
CREATE INDEX seats_general_free ON seats (event_id, section, id)
    WHERE admission = 'general' AND status <> 'sold';
