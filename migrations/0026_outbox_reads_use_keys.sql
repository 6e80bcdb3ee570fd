-- The outbox is read by key ranges only: the relay (every 250 ms, rows above its mark and the
-- gaps below it), the feed for a notifier (rows after a cursor) and a fan's stream replay
-- (that fan's rows after the last one seen). As plain statements their generic plans
-- (fairgate runs `plan_cache_mode = force_generic_plan`, one plan per connection) were made from
-- the statistics of the moment, and on an outbox analysed while empty the relay's plan was
-- `Seq Scan on outbox` + sort: every poll read every notice ever written (auto_explain,
-- bench-checkout; see 0025 for the same failure in the purchase functions). As functions with
-- their own settings they plan by index whatever the statistics say.

CREATE FUNCTION fg_outbox_after(p_after BIGINT, p_limit BIGINT, p_gaps BIGINT[])
RETURNS SETOF outbox
LANGUAGE sql STABLE
SET enable_seqscan = off
SET jit = off
AS $$
    (SELECT o.* FROM outbox o WHERE o.id > p_after ORDER BY o.id LIMIT p_limit)
    UNION ALL
    (SELECT o.* FROM outbox o WHERE o.id = ANY(p_gaps) AND o.id <= p_after)
$$;

CREATE FUNCTION fg_outbox_of_fan(p_event BIGINT, p_identity TEXT, p_after BIGINT)
RETURNS SETOF outbox
LANGUAGE sql STABLE
SET enable_seqscan = off
SET jit = off
AS $$
    SELECT o.* FROM outbox o
    WHERE o.event_id = p_event AND o.identity = p_identity AND o.id > p_after
    ORDER BY o.id
$$;
