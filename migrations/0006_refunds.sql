-- Refunds: the seats come back in the transaction that voids the tickets (status 'refunding');
-- the provider refund follows, and reconciliation retries it until the order is 'refunded'.
ALTER TABLE orders DROP CONSTRAINT orders_status_check;
ALTER TABLE orders ADD CONSTRAINT orders_status_check
    CHECK (status IN ('paid', 'refunding', 'refunded'));
ALTER TABLE orders
    ADD COLUMN refunded_at TIMESTAMPTZ,
    ADD COLUMN refunded_by TEXT;
-- A refunded seat may be sold again, so a seat can be on several orders over time: one valid
-- ticket at a time is what tickets_one_valid_per_seat guarantees.
