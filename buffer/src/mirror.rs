//! The live queue in Redis, as a mirror of what Postgres decided. Postgres gives every place:
//! the draw's positions 1..N are a pure function of its committed seed and entrants, live
//! arrivals get N+1..`draws.tail` in the transaction that records them, and the serving head is
//! `admission_state.head` (see `queue::admission`). Redis holds a projection of those facts for the waiting room's fast
//! reads, and nothing is ever decided there.
//!
//! Invariants of the projection, whatever Redis loses and whenever:
//! * Every write is a merge of Postgres facts: `ZADD` of a ticket at its position, and `tail`
//!   only ever raised (`SET` if greater; the serving head is mirrored the same way, by the
//!   admission tick that moved it, its only writer). Writing twice, in any order, from any
//!   instance, or replayed by fred after a reconnect, changes nothing; nothing is removed and no
//!   counter moves back.
//! * `drawn` (the mirror is whole) is set only by a script that first counts the members at
//!   positions 1..T, where T is the tail Postgres had when the rebuild started, and finds all T
//!   of them (positions are dense and each has one ticket, so the count proves it). A loss in the
//!   middle of a rebuild therefore leaves the flag unset and the rebuild runs again; a flag is
//!   never trusted on its own: every scheduler tick counts again ([`check`]).
//! * Readers that miss a ticket while the flag is unset answer "catching up" (503), never a
//!   wrong or missing position; live arrivals can always be read back from Postgres.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use futures::{StreamExt, TryStreamExt};
use shared::ids::EventId;
use shared::redis::Redis;
use shared::ApiError;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Members per `ZADD` of a rebuild (pipelined over the pool's connections).
const ZADD_CHUNK: usize = 5_000;
/// Members per call of the append script (Lua's `unpack` has a stack limit near 8,000).
const APPEND_CHUNK: usize = 1_000;
/// Live arrivals waiting to be mirrored at most; past it they are left to the repair.
const APPEND_QUEUE: usize = 4_096;

static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: queue, tail   ARGV: highest position, then score, member pairs
-- Mirrors places Postgres has given: adds the members, raises the tail. Safe to repeat.
redis.call('ZADD', KEYS[1], unpack(ARGV, 2))
local tail = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) > tail then
  redis.call('SET', KEYS[2], ARGV[1])
end
return 1
"#,
    )
});

static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: queue, tail, drawn   ARGV: tail T when the rebuild started
-- Marks the mirror whole only if all T members at positions 1..T are there.
local tail_pg = tonumber(ARGV[1])
if redis.call('ZCOUNT', KEYS[1], 1, tail_pg) < tail_pg then
  return 0
end
if tail_pg > tonumber(redis.call('GET', KEYS[2]) or '0') then
  redis.call('SET', KEYS[2], ARGV[1])
end
redis.call('SET', KEYS[3], '1')
return 1
"#,
    )
});

static CHECK: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: queue, tail, drawn
-- ARGV: entrants N, tail C to count up to, tail T (from Postgres)
-- Returns {whole flag, members at 1..N, members at N+1..C}; a whole flag over a queue missing
-- some of the draw's places is removed (readers then answer "catching up" until the rebuild);
-- the tail is raised to T.
local n, c = tonumber(ARGV[1]), tonumber(ARGV[2])
local flag = redis.call('EXISTS', KEYS[3])
local drawn = redis.call('ZCOUNT', KEYS[1], 1, n)
local live = 0
if c > n then live = redis.call('ZCOUNT', KEYS[1], n + 1, c) end
if flag == 1 and drawn < n then
  redis.call('DEL', KEYS[3])
end
if tonumber(ARGV[3]) > tonumber(redis.call('GET', KEYS[2]) or '0') then
  redis.call('SET', KEYS[2], ARGV[3])
end
return {flag, drawn, live}
"#,
    )
});

/// What Postgres says the line of a drawn event is: entrants N and tail T (dense positions
/// 1..T).
#[derive(Clone, Copy, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct LineFacts {
    pub event_id: i64,
    pub entrants: i64,
    pub tail: i64,
}

impl LineFacts {
    /// The facts of one drawn event (`None` before its draw).
    pub async fn load(pg: &PgPool, event: EventId) -> Result<Option<LineFacts>, ApiError> {
        Ok(sqlx::query_as(
            "SELECT event_id, COALESCE(entrants, 0) AS entrants, tail FROM draws
             WHERE event_id = $1 AND drawn_at IS NOT NULL",
        )
        .bind(event.get())
        .fetch_optional(pg)
        .await?)
    }

    /// The facts of every drawn event whose sale has not ended.
    pub async fn live_events(pg: &PgPool) -> Result<Vec<LineFacts>, ApiError> {
        Ok(sqlx::query_as(
            "SELECT d.event_id, COALESCE(d.entrants, 0) AS entrants, d.tail
             FROM draws d JOIN events e ON e.id = d.event_id
             WHERE d.drawn_at IS NOT NULL AND e.sale_ends_at > now()",
        )
        .fetch_all(pg)
        .await?)
    }
}

/// How the mirror of one event compares with Postgres.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Flagged whole and every place up to the tail checked is there.
    Whole,
    /// The draw's part is whole but live arrivals are missing: add them back.
    LiveMissing,
    /// The flag or part of the draw's places is missing: rebuild it all.
    Broken,
}

/// Counts the mirror of `facts.event_id` against Postgres and raises its tail to Postgres's while
/// at it. Live places are counted up to `settled_tail`, a tail Postgres had a
/// while ago (the previous tick's), so arrivals committed a moment ago whose mirror write is on
/// its way do not count as missing.
pub async fn check(
    redis: &Redis,
    facts: &LineFacts,
    settled_tail: i64,
) -> Result<Health, ApiError> {
    let event = EventId::new(facts.event_id).ok_or_else(|| ApiError::internal("bad event id"))?;
    let keys = redis.keys(event);
    let settled_tail = settled_tail.clamp(facts.entrants, facts.tail);
    let (flag, drawn, live): (i64, i64, i64) = CHECK
        .evalsha_with_reload(
            redis.client(),
            vec![keys.queue(), keys.tail(), keys.drawn()],
            vec![facts.entrants, settled_tail, facts.tail],
        )
        .await?;
    Ok(if flag == 0 || drawn < facts.entrants {
        Health::Broken
    } else if live < settled_tail - facts.entrants {
        Health::LiveMissing
    } else {
        Health::Whole
    })
}

/// Puts every place of a drawn event into Redis: `order` (position 1 first) and the live
/// arrivals Postgres holds, then marks the mirror whole if all of them are still there. Returns
/// whether it was marked whole (false: Redis lost data meanwhile; run it again). The caller
/// guarantees the draw has committed and `order` is its order.
pub async fn rebuild(
    pg: &PgPool,
    redis: &Redis,
    event: EventId,
    order: &[Uuid],
) -> Result<bool, ApiError> {
    // The facts first: every live position up to this tail is committed, so the read below
    // sees all of them.
    let facts = LineFacts::load(pg, event)
        .await?
        .ok_or_else(|| ApiError::internal("rebuilding the queue of an event not drawn"))?;
    let live = live_places(pg, event, facts.entrants).await?;
    let drawn = order
        .iter()
        .enumerate()
        .map(|(i, ticket)| (i as i64 + 1, *ticket));
    let members: Vec<(i64, Uuid)> = drawn.chain(live).collect();
    zadd_all(redis, event, &members).await?;
    let keys = redis.keys(event);
    let whole: i64 = COMPLETE
        .evalsha_with_reload(
            redis.client(),
            vec![keys.queue(), keys.tail(), keys.drawn()],
            vec![facts.tail],
        )
        .await?;
    if whole == 1 {
        tracing::info!(event = %event, places = facts.tail, "queue mirrored to redis");
    } else {
        metrics::counter!("buffer_mirror_rebuilds_interrupted_total").increment(1);
        tracing::warn!(event = %event, "redis lost data during the rebuild; rebuilding again");
    }
    Ok(whole == 1)
}

/// Adds back every live arrival of `event` (the draw's places are whole).
pub async fn repair_live(
    pg: &PgPool,
    redis: &Redis,
    event: EventId,
    entrants: i64,
) -> Result<(), ApiError> {
    let live: Vec<(i64, Uuid)> = live_places(pg, event, entrants).await?.collect();
    zadd_all(redis, event, &live).await?;
    metrics::counter!("buffer_mirror_live_repairs_total").increment(1);
    tracing::warn!(event = %event, places = live.len(), "live arrivals added back to the redis queue");
    Ok(())
}

async fn live_places(
    pg: &PgPool,
    event: EventId,
    entrants: i64,
) -> Result<impl Iterator<Item = (i64, Uuid)>, ApiError> {
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT ticket_id, position FROM joins
         WHERE event_id = $1 AND phase = 'live' AND position > $2",
    )
    .bind(event.get())
    .bind(entrants)
    .fetch_all(pg)
    .await?;
    Ok(rows.into_iter().map(|(t, p)| (p, t)))
}

/// `ZADD`s the members in chunks sent concurrently on the pooled connections (fred pipelines
/// them).
async fn zadd_all(redis: &Redis, event: EventId, members: &[(i64, Uuid)]) -> Result<(), ApiError> {
    let queue = redis.keys(event).queue();
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
            let queue = queue.clone();
            async move {
                client
                    .zadd::<i64, _, _>(queue, None, None, false, false, values)
                    .await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<i64>>()
        .await?;
    Ok(())
}

/// Hands live arrivals, once committed, to one task that mirrors them to Redis. Joins are
/// answered without waiting for it: their places are already durable, and a mirror write that
/// is lost (Redis down, queue full) is repaired by the scheduler's next [`check`].
#[derive(Clone)]
pub struct Appender {
    queue: mpsc::Sender<(EventId, Vec<(i64, Uuid)>)>,
}

impl Appender {
    pub fn start(redis: Redis, shutdown: CancellationToken) -> Self {
        let (queue, receiver) = mpsc::channel(APPEND_QUEUE);
        tokio::spawn(run_appender(redis, receiver, shutdown));
        Appender { queue }
    }

    /// Queues places to mirror; never waits.
    pub fn append(&self, event: EventId, places: Vec<(i64, Uuid)>) {
        if places.is_empty() {
            return;
        }
        if self.queue.try_send((event, places)).is_err() {
            metrics::counter!("buffer_mirror_appends_dropped_total").increment(1);
        }
    }
}

async fn run_appender(
    redis: Redis,
    mut receiver: mpsc::Receiver<(EventId, Vec<(i64, Uuid)>)>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(64);
    loop {
        let got = tokio::select! {
            got = receiver.recv_many(&mut batch, 64) => got,
            _ = shutdown.cancelled() => 0,
        };
        if got == 0 {
            return;
        }
        let mut by_event: HashMap<EventId, Vec<(i64, Uuid)>> = HashMap::new();
        for (event, places) in batch.drain(..) {
            by_event.entry(event).or_default().extend(places);
        }
        for (event, places) in by_event {
            if let Err(e) = append(&redis, event, &places).await {
                metrics::counter!("buffer_mirror_appends_failed_total").increment(1);
                tracing::warn!(event = %event, error = %e, "mirroring live arrivals failed; the scheduler repairs it");
                // Redis is likely down: do not spin through the queue at full speed.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Mirrors places Postgres has given (idempotent).
pub async fn append(redis: &Redis, event: EventId, places: &[(i64, Uuid)]) -> Result<(), ApiError> {
    let keys = redis.keys(event);
    for chunk in places.chunks(APPEND_CHUNK) {
        let highest = chunk.iter().map(|(p, _)| *p).max().unwrap_or(0);
        let mut args: Vec<String> = Vec::with_capacity(chunk.len() * 2 + 1);
        args.push(highest.to_string());
        for (position, ticket) in chunk {
            args.push(position.to_string());
            args.push(ticket.to_string());
        }
        let _: i64 = APPEND
            .evalsha_with_reload(redis.client(), vec![keys.queue(), keys.tail()], args)
            .await?;
    }
    Ok(())
}
