//! The admission controller. Every instance runs this loop; for each event on sale, the instance
//! holding the event's leader lease in Redis runs the admission tick: it moves the serving head
//! by the configured rate and never lets active shoppers exceed the cap.
//!
//! Postgres decides every admission (`tick`): in one transaction holding the event's
//! `admission_state` row it counts the active slots, takes the rate owed since the previous
//! tick on Postgres's clock (`credit` carries the fractions, so the rate holds over a minute),
//! admits the next places that were not given up, records one `admissions` row per place and
//! moves the head. Only then is the outcome mirrored to Redis (head raised, never lowered) and
//! published to every instance.
//!
//! Safety, whatever happens to the leader:
//! * Two instances ticking at once (a paused old leader waking up after its lease passed on)
//!   serialise on the row lock (`SKIP LOCKED`: the second skips its tick), and each admits only
//!   what the rate owes since the last committed tick, so together they admit no more than one.
//! * A leader stopped inside its transaction holds the row for at most
//!   [`STALLED_TICK_SECS`]: Postgres then ends its session and the next leader proceeds; the
//!   stopped one's commit fails when it wakes.
//! * The cap is checked against the slots as one snapshot sees them: a claim turns an unclaimed
//!   slot into a pass's slot in one transaction, and a purchase ends its slot in the transaction
//!   that commits the order and, for the last seat, marks the event sold out
//!   (migration 0028), so no count is ever half old, half new.
//! * The lease in Redis only decides who does the work; while Redis is out of reach, or its
//!   mirror of the line is not whole, nobody ticks: waiters could not learn of their turn.

use std::collections::HashSet;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use fred::prelude::*;
use fred::types::scripts::Script;
use shared::event::SaleEvent;
use shared::ids::EventId;
use shared::redis::Redis;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::hub::QueueState;
use crate::AppState;

/// Longest a stalled tick keeps its row locked before Postgres ends its session.
pub const STALLED_TICK_SECS: u64 = 3;

static LEAD: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: leader, drawn   ARGV: instance id, lease ms
-- Returns {leading, mirror whole}.
local current = redis.call('GET', KEYS[1])
local leading = 0
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  leading = 1
elseif not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  leading = 1
end
return {leading, redis.call('EXISTS', KEYS[2])}
"#,
    )
});

static MIRROR: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: head, active   ARGV: head, active (decided in Postgres)
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"#,
    )
});

/// Who may tick an event now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    /// This instance leads and the line's mirror is whole.
    Leading,
    /// This instance leads, but the Redis queue is being rebuilt: waiters cannot be told yet.
    MirrorNotWhole,
    /// Another instance leads.
    Follower,
}

/// Takes or renews the event's admission lease for `instance`.
pub async fn lead(
    redis: &Redis,
    event: EventId,
    instance: &str,
    lease_ms: u64,
) -> Result<Lease, fred::error::Error> {
    let keys = redis.keys(event);
    let (leading, whole): (i64, i64) = LEAD
        .evalsha_with_reload(
            redis.client(),
            vec![keys.leader(), keys.drawn()],
            vec![instance.to_owned(), lease_ms.to_string()],
        )
        .await?;
    Ok(match (leading, whole) {
        (0, _) => Lease::Follower,
        (_, 0) => Lease::MirrorNotWhole,
        _ => Lease::Leading,
    })
}

/// What one committed admission tick did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tick {
    /// The places admitted, in order.
    pub admitted: Vec<i64>,
    pub head: i64,
    pub tail: i64,
    /// Active slots after the tick.
    pub active: i64,
    /// Places not sold, as the leader last counted them.
    pub places_left: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct Held {
    head: i64,
    credit: f64,
    ticked_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    admit_limit: Option<i64>,
    rate_factor: f64,
    places_left: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct Line {
    tail: i64,
    paused: bool,
    sold_out: bool,
    rate_per_minute: i32,
    max_active: i32,
    claim_window_secs: i32,
    active: i64,
    /// Active shoppers who may still take an available place (see `crate::steer`).
    fresh: i64,
}

/// One admission step for `event`, decided and committed in Postgres. `None` when there is
/// nothing to tick (the draw has not run) or another instance is ticking it right now. The
/// rate owed is measured from the previous committed tick, at most `longest_gap` of it (a line
/// that nobody ticked for a while does not admit a burst).
pub async fn tick(
    pg: &PgPool,
    event: EventId,
    longest_gap: Duration,
) -> Result<Option<Tick>, sqlx::Error> {
    let mut tx = pg.begin().await?;
    let held: Option<Held> = sqlx::query_as(
        "SELECT head, credit, ticked_at, now() AS now, admit_limit, rate_factor, places_left,
                set_config('idle_in_transaction_session_timeout', $2, true)
         FROM admission_state WHERE event_id = $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(event.get())
    .bind(format!("{}s", STALLED_TICK_SECS))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(held) = held else {
        return Ok(None);
    };
    // One snapshot for the count, the tail, the controls and sold out (see the module doc).
    let line: Line = sqlx::query_as(
        "SELECT d.tail, e.paused, e.sold_out_at IS NOT NULL AS sold_out, e.rate_per_minute,
                e.max_active, e.claim_window_secs,
                a.active, a.fresh
         FROM events e JOIN draws d ON d.event_id = e.id
         CROSS JOIN LATERAL (
             SELECT count(*) AS active,
                    count(*) FILTER (WHERE ticket_id IS NULL
                                       OR claimed_at > now() - make_interval(secs => $2)) AS fresh
             FROM admissions WHERE event_id = $1 AND slot_until > now()) a
         WHERE e.id = $1",
    )
    .bind(event.get())
    .bind(crate::steer::FRESH_SHOPPER_SECS as f64)
    .fetch_one(&mut *tx)
    .await?;

    let gap = match held.ticked_at {
        Some(at) => (held.now - at)
            .to_std()
            .unwrap_or_default()
            .min(longest_gap),
        None => Duration::ZERO,
    };
    // No-show compensation: the rate is of shoppers who come; admissions that lapse unclaimed
    // are made up for by admitting `rate_factor` places per shopper wanted.
    let rate = f64::from(line.rate_per_minute) * held.rate_factor.clamp(1.0, 3.0);
    let credit = held.credit + rate * gap.as_secs_f64() / 60.0;
    let wanted = if line.paused || line.sold_out {
        0
    } else {
        credit.floor() as i64
    };
    // The cap, and no more fresh shoppers than the places available can serve.
    let by_cap = i64::from(line.max_active) - line.active;
    let by_places = held
        .admit_limit
        .map_or(i64::MAX, |limit| limit - line.fresh);
    let room = by_cap.min(by_places).max(0);
    let (admitted, head) =
        next_places(&mut tx, event, held.head, line.tail, wanted.min(room)).await?;
    if !admitted.is_empty() {
        sqlx::query(
            "INSERT INTO admissions (event_id, position, admitted_at, claim_by, slot_until)
             SELECT $1, p, now(), now() + make_interval(secs => $3),
                    now() + make_interval(secs => $3)
             FROM unnest($2::bigint[]) AS p",
        )
        .bind(event.get())
        .bind(&admitted)
        .bind(f64::from(line.claim_window_secs))
        .execute(&mut *tx)
        .await?;
    }
    // Demand the cap, a pause or an empty line blocked is dropped, not saved for a burst later.
    sqlx::query(
        "UPDATE admission_state SET head = $2, credit = $3, ticked_at = now()
         WHERE event_id = $1",
    )
    .bind(event.get())
    .bind(head)
    .bind(credit.fract().clamp(0.0, 0.999_999))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Tick {
        active: line.active + admitted.len() as i64,
        admitted,
        head,
        tail: line.tail,
        places_left: held.places_left,
    }))
}

/// The next `wanted` places after `head` (not beyond `tail`) whose fans have not left, and the
/// head after them: places given up are passed over, taking neither a slot nor a share of the
/// rate.
async fn next_places(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    event: EventId,
    head: i64,
    tail: i64,
    wanted: i64,
) -> Result<(Vec<i64>, i64), sqlx::Error> {
    const PAGE: i64 = 256;
    let mut admitted = Vec::new();
    let mut cursor = head;
    while (admitted.len() as i64) < wanted && cursor < tail {
        let left: Vec<i64> = sqlx::query_scalar(
            "SELECT left_position FROM joins
             WHERE event_id = $1 AND left_position > $2 AND left_position <= $3
             ORDER BY left_position LIMIT $4",
        )
        .bind(event.get())
        .bind(cursor)
        .bind(tail)
        .bind(PAGE)
        .fetch_all(&mut **tx)
        .await?;
        // Without a full page every place given up before the tail is known; with one, only
        // those up to its last.
        let known_until = if (left.len() as i64) < PAGE {
            tail
        } else {
            left.last().copied().unwrap_or(tail)
        };
        let mut skipped = left.into_iter().peekable();
        while (admitted.len() as i64) < wanted && cursor < known_until {
            cursor += 1;
            if skipped.peek() == Some(&cursor) {
                skipped.next();
            } else {
                admitted.push(cursor);
            }
        }
    }
    Ok((admitted, cursor))
}

pub async fn run(state: AppState, shutdown: CancellationToken) -> anyhow::Result<()> {
    // The pid in the id lets an operator (and the chaos command) find the leader's process.
    let instance = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
    let tick_ms = state.config.admission_tick_ms.max(10);
    let mut tick = tokio::time::interval(Duration::from_millis(tick_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut led: HashSet<EventId> = HashSet::new();
    let mut events: Vec<SaleEvent> = Vec::new();
    let mut events_read = Instant::now() - Duration::from_secs(60);
    let steer_every = Duration::from_millis(state.config.steer_ms.max(100));
    let mut steered = Instant::now() - steer_every;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        // Controls are read every tick, so an operator's change applies within one.
        if events_read.elapsed() >= Duration::from_millis(tick_ms) {
            match SaleEvent::on_sale(&state.pg).await {
                Ok(list) => {
                    events = list;
                    events_read = Instant::now();
                }
                Err(e) => tracing::warn!(error = %e, "cannot list events on sale"),
            }
        }
        for event in &events {
            if let Err(e) = admit_tick(&state, &instance, event, &mut led).await {
                tracing::warn!(event = event.id, error = %e, "admission tick failed");
            }
        }
        if steered.elapsed() >= steer_every {
            steered = Instant::now();
            for event in &events {
                let leading = led.contains(&event.event_id());
                if let Err(e) = crate::steer::steer(&state, event, leading).await {
                    tracing::warn!(event = event.id, error = %e, "steering pass failed");
                }
            }
        }
    }
    release_leases(&state.redis, &instance, led.iter().copied()).await;
    Ok(())
}

async fn admit_tick(
    state: &AppState,
    instance: &str,
    event: &SaleEvent,
    led: &mut HashSet<EventId>,
) -> anyhow::Result<()> {
    let id = event.event_id();
    match lead(&state.redis, id, instance, state.config.leader_lease_ms).await? {
        Lease::Follower => {
            led.remove(&id);
            return Ok(());
        }
        Lease::MirrorNotWhole => return Ok(()),
        Lease::Leading => {}
    }
    if led.insert(id) {
        tracing::info!(event = %id, "leading admissions");
        // Sized to the places left before the first admission, not a steering pass later.
        crate::steer::steer(state, event, true).await?;
    }
    // A handover after a leader died (its lease running out) is caught up on, so the rate holds
    // over the minute; a longer silence (Redis out of reach for a while) is not made up in a burst.
    let longest_gap = Duration::from_millis(
        state.config.leader_lease_ms.max(1_000) + state.config.admission_tick_ms.max(10) * 2,
    );
    let Some(done) = tick(&state.pg, id, longest_gap).await? else {
        return Ok(());
    };
    if !done.admitted.is_empty() {
        metrics::counter!("queue_admitted_total").increment(done.admitted.len() as u64);
    }
    let keys = state.redis.keys(id);
    let _: i64 = MIRROR
        .evalsha_with_reload(
            state.redis.client(),
            vec![keys.head(), keys.active()],
            vec![done.head, done.active],
        )
        .await?;
    let mut snapshot = QueueState::of(event, true, done.head, done.tail, done.active);
    snapshot.places_left = done.places_left;
    let payload = serde_json::to_string(&snapshot)?;
    let _: i64 = state
        .redis
        .client()
        .publish(state.redis.state_channel(), payload)
        .await?;
    Ok(())
}

static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#,
    )
});

/// Gives up this instance's leases at shutdown so another instance takes over at once.
async fn release_leases(redis: &Redis, instance: &str, events: impl Iterator<Item = EventId>) {
    for event in events {
        let result: Result<i64, _> = RELEASE
            .evalsha_with_reload(
                redis.client(),
                vec![redis.keys(event).leader()],
                vec![instance.to_owned()],
            )
            .await;
        if let Err(e) = result {
            tracing::warn!(event = %event, error = %e, "could not release admission lease");
        }
    }
}
