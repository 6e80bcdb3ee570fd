-- Reconciliation looks for refunds whose provider call was interrupted every few seconds
-- (`status = 'refunding'` past the grace period), and had no index for it: a sequential scan of
-- every order ever sold, each time. Orders are inserted as 'paid', which this partial index
-- leaves out, so a purchase writes nothing more; only a refund (rare) adds an entry.
CREATE INDEX orders_refunding ON orders (refunded_at) WHERE status = 'refunding';
