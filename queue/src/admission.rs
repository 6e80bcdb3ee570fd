//! The admission controller. Every instance runs this loop; for each event on sale, the instance
//! holding the event's leader lease in Redis admits fans: it moves the serving head by the
//! configured rate (carrying fractions between ticks, so the rate holds over a minute) and never
//! lets active shoppers exceed the cap.
//!
//! Safety: the admission script checks the lease atomically with the admission, so a paused old
//! leader that wakes up after losing its lease admits nobody; and it records the tick id it
//! applied, so a script replayed after a reconnect admits nobody twice.
//!
//! Active shoppers are the members of the event's slot set (see `EventKeys::slots`): each
//! admission adds one that lapses after the claim window, claiming the pass turns it into one
//! that lapses with the pass, buying removes it. The script drops lapsed slots before counting,
//! so no-shows and abandoned passes give their places back by themselves.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::scripts::Script;
use shared::event::SaleEvent;
use shared::ids::EventId;
use shared::redis::Redis;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::hub::QueueState;
use crate::AppState;

static LEAD: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: leader   ARGV: instance id, lease ms
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#,
    )
});

static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: leader, drawn, head, tail, slots, last-tick, sold-out, left
-- ARGV: instance id, wanted, max active, tick id, claim window (ms)
-- Returns {admitted, head, tail, active}; admitted = -1 when not the leader, -2 before the draw.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {-1, 0, 0, 0}
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  return {-2, 0, 0, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Lapsed admissions and expired passes free their slots.
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
local head = tonumber(redis.call('GET', KEYS[3]) or '0')
local tail = tonumber(redis.call('GET', KEYS[4]) or '0')
local active = redis.call('ZCARD', KEYS[5])
if redis.call('GET', KEYS[6]) == ARGV[4] then
  return {0, head, tail, active}
end
local n = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[7]) == 1 then n = 0 end
local room = tonumber(ARGV[3]) - active
if room < n then n = room end
if n < 0 then n = 0 end
local lapse = now + tonumber(ARGV[5])
local batch = {}
local admitted = 0
-- Fans who left are passed over: they take neither a slot nor a share of the rate.
while admitted < n and head < tail do
  head = head + 1
  if redis.call('SISMEMBER', KEYS[8], head) == 0 then
    admitted = admitted + 1
    batch[#batch + 1] = lapse
    batch[#batch + 1] = 'p:' .. head
    if #batch >= 1000 then
      redis.call('ZADD', KEYS[5], unpack(batch))
      batch = {}
    end
  end
end
if #batch > 0 then
  redis.call('ZADD', KEYS[5], unpack(batch))
end
n = admitted
redis.call('SET', KEYS[3], head)
redis.call('SET', KEYS[6], ARGV[4])
return {n, head, tail, active + n}
"#,
    )
});

/// What this instance remembers about an event it leads.
struct Led {
    credit: f64,
    last: Instant,
}

pub async fn run(state: AppState, shutdown: CancellationToken) -> anyhow::Result<()> {
    let instance = Uuid::new_v4().simple().to_string();
    let mut tick = tokio::time::interval(Duration::from_millis(
        state.config.admission_tick_ms.max(10),
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut led: HashMap<EventId, Led> = HashMap::new();
    let mut events: Vec<SaleEvent> = Vec::new();
    let mut events_read = Instant::now() - Duration::from_secs(60);
    let mut tick_no: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        tick_no += 1;
        // Controls are read every tick, so an operator's change applies within one.
        if events_read.elapsed() >= Duration::from_millis(state.config.admission_tick_ms) {
            match SaleEvent::on_sale(&state.pg).await {
                Ok(list) => {
                    events = list;
                    events_read = Instant::now();
                }
                Err(e) => tracing::warn!(error = %e, "cannot list events on sale"),
            }
        }
        for event in &events {
            let tick_id = format!("{instance}:{tick_no}");
            if let Err(e) = admit_tick(&state, &instance, event, &mut led, &tick_id).await {
                tracing::warn!(event = event.id, error = %e, "admission tick failed");
            }
        }
    }
    release_leases(&state.redis, &instance, led.keys().copied()).await;
    Ok(())
}

/// One admission step's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// This instance does not hold the event's lease (any more): it admitted nobody.
    NotLeader,
    /// The draw's queue is not in Redis yet.
    NotDrawn,
    Admitted {
        admitted: i64,
        head: i64,
        tail: i64,
        active: i64,
    },
}

/// Takes or renews the event's admission lease for `instance`; true while it holds it.
pub async fn lead(
    redis: &Redis,
    event: EventId,
    instance: &str,
    lease_ms: u64,
) -> anyhow::Result<bool> {
    let leading: i64 = LEAD
        .evalsha_with_reload(
            redis.client(),
            vec![redis.keys(event).leader()],
            vec![instance.to_owned(), lease_ms.to_string()],
        )
        .await?;
    Ok(leading == 1)
}

/// Admits up to `wanted` fans as `instance`, in one atomic script that re-checks the lease, the
/// cap (`max_active`) and the tick id (a replayed `tick_id` admits nobody again).
pub async fn admit(
    redis: &Redis,
    event: EventId,
    instance: &str,
    wanted: i64,
    max_active: i64,
    tick_id: &str,
    claim_window_ms: i64,
) -> anyhow::Result<Admission> {
    let keys = redis.keys(event);
    let result: Vec<i64> = ADMIT
        .evalsha_with_reload(
            redis.client(),
            vec![
                keys.leader(),
                keys.drawn(),
                keys.head(),
                keys.tail(),
                keys.slots(),
                keys.last_tick(),
                keys.sold_out(),
                keys.left(),
            ],
            vec![
                instance.to_owned(),
                wanted.to_string(),
                max_active.to_string(),
                tick_id.to_owned(),
                claim_window_ms.to_string(),
            ],
        )
        .await?;
    Ok(match result[..] {
        [-1, ..] => Admission::NotLeader,
        [-2, ..] => Admission::NotDrawn,
        [admitted, head, tail, active] => Admission::Admitted {
            admitted,
            head,
            tail,
            active,
        },
        _ => anyhow::bail!("admission script returned {result:?}"),
    })
}

async fn admit_tick(
    state: &AppState,
    instance: &str,
    event: &SaleEvent,
    led: &mut HashMap<EventId, Led>,
    tick_id: &str,
) -> anyhow::Result<()> {
    let id = event.event_id();
    if !lead(&state.redis, id, instance, state.config.leader_lease_ms).await? {
        led.remove(&id);
        return Ok(());
    }
    let now = Instant::now();
    let entry = led.entry(id).or_insert_with(|| {
        tracing::info!(event = %id, "leading admissions");
        Led {
            credit: 0.0,
            last: now,
        }
    });
    let elapsed = now.duration_since(entry.last).as_secs_f64();
    entry.last = now;
    entry.credit += f64::from(event.rate_per_minute) * elapsed / 60.0;
    let wanted = if event.paused || event.sold_out_at.is_some() {
        0
    } else {
        entry.credit.floor() as i64
    };
    let outcome = admit(
        &state.redis,
        id,
        instance,
        wanted,
        i64::from(event.max_active),
        tick_id,
        i64::from(event.claim_window_secs) * 1000,
    )
    .await?;
    let (admitted, head, tail, active) = match outcome {
        Admission::NotLeader => {
            led.remove(&id);
            return Ok(());
        }
        Admission::NotDrawn => {
            // Not drawn yet: nothing accrues before the queue exists.
            entry.credit = 0.0;
            return Ok(());
        }
        Admission::Admitted {
            admitted,
            head,
            tail,
            active,
        } => (admitted, head, tail, active),
    };
    // Demand the cap, a pause or an empty line blocked is dropped, not saved for a burst later.
    entry.credit -= entry.credit.floor();
    if admitted > 0 {
        metrics::counter!("queue_admitted_total").increment(admitted as u64);
    }
    let snapshot = QueueState::of(event, true, head, tail, active);
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
