//! The live queue in Redis as the buffer writes it: the draw's queue built aside and renamed into
//! place once, and late arrivals appended at the back. Both steps are Lua scripts that are safe
//! to run twice: publishing again is a no-op once the queue is in place, and appending a ticket
//! already queued returns its existing position.

use std::sync::LazyLock;

use fred::prelude::*;
use fred::types::scripts::Script;
use shared::ids::{EventId, Position, TicketId};
use shared::redis::Redis;
use shared::ApiError;
use sqlx::PgPool;
use uuid::Uuid;

const ZADD_CHUNK: usize = 5_000;

static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: build, queue, tail, drawn   ARGV: highest position
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

/// Copies every positioned join of `event` from Postgres into the Redis queue, unless the queue
/// is already in place. Returns whether this call put it there.
pub async fn publish(pg: &PgPool, redis: &Redis, event: EventId) -> Result<bool, ApiError> {
    let keys = redis.keys(event);
    let client = redis.client();
    let already: i64 = client.exists(keys.drawn()).await?;
    if already == 1 {
        return Ok(false);
    }
    // Only a committed draw may be published: marking the queue drawn before that would let the
    // back of the line start at position 1, on top of the draw's positions.
    let committed: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM draws WHERE event_id = $1 AND drawn_at IS NOT NULL)",
    )
    .bind(event.get())
    .fetch_one(pg)
    .await?;
    if !committed {
        return Err(ApiError::Conflict(
            "draw_pending",
            "the draw has not run yet".into(),
        ));
    }
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT ticket_id, position FROM joins
         WHERE event_id = $1 AND position IS NOT NULL ORDER BY position",
    )
    .bind(event.get())
    .fetch_all(pg)
    .await?;
    let highest = rows.last().map_or(0, |(_, p)| *p);
    let build = keys.queue_build(&Uuid::new_v4().simple().to_string());
    for chunk in rows.chunks(ZADD_CHUNK) {
        let members: Vec<(f64, String)> = chunk
            .iter()
            .map(|(ticket, position)| (*position as f64, ticket.to_string()))
            .collect();
        let _: i64 = client
            .zadd(&build, None, None, false, false, members)
            .await?;
    }
    let placed: i64 = PUBLISH
        .evalsha_with_reload(
            client,
            vec![build, keys.queue(), keys.tail(), keys.drawn()],
            vec![highest],
        )
        .await?;
    if placed == 1 {
        tracing::info!(event = %event, fans = rows.len(), "queue published to redis");
    }
    Ok(placed == 1)
}

/// The back-of-the-line position of a ticket that arrived after the draw (its existing position
/// if it already has one).
pub async fn append(
    pg: &PgPool,
    redis: &Redis,
    event: EventId,
    ticket: TicketId,
) -> Result<Position, ApiError> {
    let keys = redis.keys(event);
    for _ in 0..3 {
        let position: i64 = APPEND
            .evalsha_with_reload(
                redis.client(),
                vec![keys.queue(), keys.tail(), keys.drawn()],
                vec![ticket.to_string()],
            )
            .await?;
        if let Some(p) = Position::new(position) {
            return Ok(p);
        }
        // The draw committed in Postgres but its queue is not in Redis yet: put it there.
        publish(pg, redis, event).await?;
    }
    Err(ApiError::internal(
        "queue still missing in redis after publishing it",
    ))
}
