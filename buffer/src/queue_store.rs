//! The live queue in Redis as the buffer writes it: the draw's queue built aside and renamed into
//! place once, and late arrivals appended at the back. Both steps are Lua scripts that are safe
//! to run twice: publishing again is a no-op once the queue is in place, and appending a ticket
//! already queued returns its existing position.

use std::sync::LazyLock;

use fred::prelude::*;
use fred::types::scripts::Script;
use futures::{StreamExt, TryStreamExt};
use shared::ids::{EventId, Position, TicketId};
use shared::redis::Redis;
use shared::ApiError;
use sqlx::PgPool;
use uuid::Uuid;

const ZADD_CHUNK: usize = 5_000;

static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: build, queue, tail, drawn, head   ARGV: highest position, furthest position admitted
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('DEL', KEYS[1])
  return 0
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RENAME', KEYS[1], KEYS[2])
else
  redis.call('DEL', KEYS[2])
end
local tail = tonumber(redis.call('GET', KEYS[3]) or '0')
if tonumber(ARGV[1]) > tail then
  redis.call('SET', KEYS[3], ARGV[1])
end
local head = tonumber(redis.call('GET', KEYS[5]) or '0')
if tonumber(ARGV[2]) > head then
  redis.call('SET', KEYS[5], ARGV[2])
end
redis.call('SET', KEYS[4], '1')
return 1
"#,
    )
});

static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: queue, tail, drawn   ARGV: ticket id
if redis.call('EXISTS', KEYS[3]) == 0 then
  return -1
end
local existing = redis.call('ZSCORE', KEYS[1], ARGV[1])
if existing then
  return tonumber(existing)
end
local position = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], position, ARGV[1])
return position
"#,
    )
});

/// Puts the draw's queue in Redis unless it is already there: `order` (position 1 first), then
/// the live arrivals Postgres knows at their positions. Built aside with pipelined ZADDs and
/// renamed into place by one script, so the queue appears whole or not at all. Returns whether
/// this call put it there. The caller guarantees the draw has committed.
pub async fn publish(
    pg: &PgPool,
    redis: &Redis,
    event: EventId,
    order: &[Uuid],
) -> Result<bool, ApiError> {
    let keys = redis.keys(event);
    let client = redis.client();
    let already: i64 = client.exists(keys.drawn()).await?;
    if already == 1 {
        return Ok(false);
    }
    let live: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT ticket_id, position FROM joins
         WHERE event_id = $1 AND phase = 'live' AND position IS NOT NULL",
    )
    .bind(event.get())
    .fetch_all(pg)
    .await?;
    let highest = live
        .iter()
        .map(|(_, p)| *p)
        .max()
        .unwrap_or(0)
        .max(order.len() as i64);
    let build = keys.queue_build(&Uuid::new_v4().simple().to_string());
    let drawn = order
        .iter()
        .enumerate()
        .map(|(i, ticket)| (i as i64 + 1, *ticket));
    let members: Vec<(i64, Uuid)> = drawn.chain(live.iter().map(|(t, p)| (*p, *t))).collect();
    // Chunks go out concurrently on the pooled connections: fred pipelines them.
    let batches: Vec<Vec<(f64, String)>> = members
        .chunks(ZADD_CHUNK)
        .map(|chunk| {
            chunk
                .iter()
                .map(|(position, ticket)| (*position as f64, ticket.to_string()))
                .collect()
        })
        .collect();
    futures::stream::iter(batches)
        .map(|values| {
            let client = redis.client().clone();
            let build = build.clone();
            async move {
                client
                    .zadd::<i64, _, _>(build, None, None, false, false, values)
                    .await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<i64>>()
        .await?;
    // A rebuilt queue keeps what already happened: fans who left after the draw stay skipped,
    // and the serving head resumes after the furthest fan who already holds a pass.
    let left: Vec<(Uuid, Option<i64>)> = sqlx::query_as(
        "SELECT ticket_id, position FROM joins
         WHERE event_id = $1 AND left_at IS NOT NULL AND NOT left_before_draw",
    )
    .bind(event.get())
    .fetch_all(pg)
    .await?;
    let admitted: Vec<(Uuid, Option<i64>)> = sqlx::query_as(
        "SELECT p.ticket_id, j.position FROM passes p JOIN joins j ON j.ticket_id = p.ticket_id
         WHERE p.event_id = $1",
    )
    .bind(event.get())
    .fetch_all(pg)
    .await?;
    let mut head = 0;
    if !left.is_empty() || !admitted.is_empty() {
        let drawn_at: std::collections::HashMap<Uuid, i64> = order
            .iter()
            .enumerate()
            .map(|(i, t)| (*t, i as i64 + 1))
            .collect();
        let position = |(t, p): &(Uuid, Option<i64>)| p.or_else(|| drawn_at.get(t).copied());
        let positions: Vec<i64> = left.iter().filter_map(position).collect();
        if !positions.is_empty() {
            let _: i64 = client.sadd(keys.left(), positions).await?;
        }
        head = admitted.iter().filter_map(position).max().unwrap_or(0);
    }
    // Shoppers with a live pass who have not bought keep their slots, so the cap survives too.
    let live: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT p.ticket_id, (extract(epoch FROM p.expires_at) * 1000)::bigint FROM passes p
         WHERE p.event_id = $1 AND p.expires_at > now()
           AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.jti = p.jti)",
    )
    .bind(event.get())
    .fetch_all(pg)
    .await?;
    if !live.is_empty() {
        let slots: Vec<(f64, String)> = live
            .iter()
            .map(|(ticket, expires_ms)| (*expires_ms as f64, format!("t:{ticket}")))
            .collect();
        let _: i64 = client
            .zadd(keys.slots(), None, None, false, false, slots)
            .await?;
    }
    let placed: i64 = PUBLISH
        .evalsha_with_reload(
            client,
            vec![build, keys.queue(), keys.tail(), keys.drawn(), keys.head()],
            vec![highest, head],
        )
        .await?;
    if placed == 1 {
        tracing::info!(event = %event, fans = members.len(), "queue published to redis");
    }
    Ok(placed == 1)
}

/// The back-of-the-line position of a ticket that arrived after the draw (its existing position
/// if it already has one), or `None` while the draw's queue is not in Redis yet.
pub async fn append(
    redis: &Redis,
    event: EventId,
    ticket: TicketId,
) -> Result<Option<Position>, ApiError> {
    let keys = redis.keys(event);
    let position: i64 = APPEND
        .evalsha_with_reload(
            redis.client(),
            vec![keys.queue(), keys.tail(), keys.drawn()],
            vec![ticket.to_string()],
        )
        .await?;
    Ok(Position::new(position))
}
