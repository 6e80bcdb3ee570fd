//! Each instance's view of every event that has a waiter here: one `watch` channel per event,
//! fed by one Redis pub/sub subscription for the whole instance (fast path) and a periodic
//! re-read of the event's counters (so a missed message costs at most one refresh interval).
//! Waiters only read their event's channel: an update costs O(1) Redis work per instance.
//!
//! Besides the full state, each event has a second channel carrying only what every waiter must
//! hear at once (`Notice`: the draw, a pause, a message, the rate, sold out, the room catching
//! up). A waiter far back listens only to that one and sleeps until its next paced update, so
//! the head moving, a late arrival or a shopper finishing wakes the few waiters near the front,
//! not all 200,000.
//!
//! The numbers are Postgres's (the leader publishes what its tick committed; the refresher reads
//! Postgres), so they never depend on what Redis still holds; each instance's view only moves
//! forward (head and tail are raised, never lowered). While Redis is out of reach or its mirror
//! of the line is being rebuilt, the state says `catching_up` and waiters keep their sockets.
//!
//! Open sockets per ticket are counted across every instance in Redis (`EventKeys::sockets`):
//! each socket is a member that lapses unless its instance renews it, so a crashed instance's
//! sockets stop counting within [`SOCKET_LEASE`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use chrono::Utc;
use fred::prelude::*;
use fred::types::scripts::Script;
use serde::{Deserialize, Serialize};
use shared::config::CommonConfig;
use shared::event::SaleEvent;
use shared::ids::{EventId, TicketId};
use shared::redis::Redis;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The state of one event's queue that every waiter's numbers derive from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueState {
    pub event_id: i64,
    /// The draw's queue is in Redis.
    pub drawn: bool,
    /// Highest position admitted.
    pub head: i64,
    /// Highest position handed out.
    pub tail: i64,
    pub active: i64,
    pub rate_per_minute: i64,
    pub max_active: i64,
    /// Admissions stopped by an operator.
    #[serde(default)]
    pub paused: bool,
    /// The operators' message to every waiter.
    #[serde(default)]
    pub message: Option<String>,
    /// Every seat is sold: the line is over.
    #[serde(default)]
    pub sold_out: bool,
    /// The draw has run but Redis is out of reach or its mirror of the line is being rebuilt:
    /// places cannot be looked up for a moment.
    #[serde(default)]
    pub catching_up: bool,
    /// Places not sold yet (available or held), as the admission leader last counted them.
    #[serde(default)]
    pub places_left: Option<i64>,
    /// Milliseconds since the epoch when this was read.
    pub at_ms: i64,
}

impl QueueState {
    /// The state of `event` with these counters and its current settings.
    pub fn of(event: &SaleEvent, drawn: bool, head: i64, tail: i64, active: i64) -> Self {
        QueueState {
            event_id: event.id,
            drawn,
            head,
            tail,
            active,
            rate_per_minute: i64::from(event.rate_per_minute),
            max_active: i64::from(event.max_active),
            paused: event.paused,
            message: event.message.clone(),
            sold_out: event.sold_out_at.is_some(),
            catching_up: false,
            places_left: None,
            at_ms: Utc::now().timestamp_millis(),
        }
    }
}

/// The part of an event's state that every waiter must see at once, whatever their update
/// interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Notice {
    pub drawn: bool,
    pub paused: bool,
    pub message: Option<String>,
    pub rate_per_minute: i64,
    pub sold_out: bool,
    pub catching_up: bool,
    /// Fewer places left than fans waiting: every waiter hears it at once (the count itself
    /// follows in their paced updates).
    pub places_short: bool,
}

impl Notice {
    pub fn of(state: &QueueState) -> Self {
        Notice {
            drawn: state.drawn,
            paused: state.paused,
            message: state.message.clone(),
            rate_per_minute: state.rate_per_minute,
            sold_out: state.sold_out,
            catching_up: state.catching_up,
            places_short: state
                .places_left
                .is_some_and(|left| left < (state.tail - state.head).max(0)),
        }
    }
}

/// A waiter's view of its event: the full state (changes often) and the notices (rarely).
pub struct Watch {
    pub state: watch::Receiver<QueueState>,
    pub notices: watch::Receiver<Notice>,
}

struct Channels {
    state: watch::Sender<QueueState>,
    notices: watch::Sender<Notice>,
}

impl Channels {
    fn subscribe(&self) -> Watch {
        Watch {
            state: self.state.subscribe(),
            notices: self.notices.subscribe(),
        }
    }
}

#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    redis: Redis,
    pg: PgPool,
    events: Mutex<HashMap<EventId, Channels>>,
    sockets: Mutex<Sockets>,
    /// This instance's id, naming its sockets in Redis.
    instance: String,
    next_socket: AtomicU64,
    /// The most sockets per ticket, as the sockets were opened with (for the renewal).
    per_ticket: std::sync::atomic::AtomicUsize,
}

/// The sockets open on this instance.
#[derive(Default)]
struct Sockets {
    total: usize,
    per_ticket: HashMap<TicketId, usize>,
    /// Each open socket's Redis member, by event, with its ticket (renewed together) and what
    /// closes it if it turns out to be over its ticket's limit.
    members: HashMap<EventId, HashMap<String, (TicketId, CancellationToken)>>,
}

/// How long a socket counts for its ticket in Redis unless its instance renews it.
pub const SOCKET_LEASE: Duration = Duration::from_secs(60);

static SOCKET_OPEN: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: the ticket's sockets   ARGV: member, lease ms, most sockets
-- 1 if the socket may open (and now counts), 0 if the ticket has its most open already.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#,
    )
});

static SOCKET_RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: tickets' socket sets   ARGV: lease ms, most sockets, then one member per key
-- Renews (or, after Redis lost them, restores) this instance's open sockets. Returns the
-- members of this instance over their ticket's limit: the newest (members begin with their
-- opening time), which sockets opened while the set was lost (counted per instance) leave.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local most = tonumber(ARGV[2])
local over = {}
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + tonumber(ARGV[1]), ARGV[i + 2])
  redis.call('PEXPIRE', key, ARGV[1])
end
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) > most then
    local members = redis.call('ZRANGE', key, 0, -1)
    table.sort(members)
    for rank = most + 1, #members do
      if members[rank] == ARGV[i + 2] then
        table.insert(over, ARGV[i + 2])
      end
    end
  end
end
return over
"#,
    )
});

/// Why a websocket was not opened.
#[derive(Debug, PartialEq, Eq)]
pub enum SocketRefused {
    /// This ticket has its maximum of open sockets (tabs).
    TicketFull,
    /// This instance holds its maximum of sockets (bounded by the open-files limit).
    InstanceFull,
}

impl Hub {
    pub fn new(redis: Redis, pg: PgPool) -> Self {
        Hub {
            inner: Arc::new(HubInner {
                redis,
                pg,
                events: Mutex::default(),
                sockets: Mutex::default(),
                instance: uuid::Uuid::new_v4().simple().to_string(),
                next_socket: AtomicU64::new(0),
                per_ticket: std::sync::atomic::AtomicUsize::new(usize::MAX),
            }),
        }
    }

    /// Receivers of `event`'s state and notices, reading it from Redis first if no one here
    /// watched it.
    pub async fn watch(&self, event: EventId) -> Watch {
        let (receiver, fresh) = {
            let mut events = self.inner.events.lock().unwrap_or_else(|p| p.into_inner());
            match events.get(&event) {
                Some(channels) => (channels.subscribe(), false),
                None => {
                    let state = QueueState {
                        event_id: event.get(),
                        ..QueueState::default()
                    };
                    let channels = Channels {
                        notices: watch::channel(Notice::of(&state)).0,
                        state: watch::channel(state).0,
                    };
                    let receiver = channels.subscribe();
                    events.insert(event, channels);
                    (receiver, true)
                }
            }
        };
        if fresh {
            if let Ok(state) = read_state(&self.inner.redis, &self.inner.pg, event).await {
                self.apply(state);
            }
        }
        receiver
    }

    /// Publishes a newer state to this instance's waiters of that event.
    pub fn apply(&self, state: QueueState) {
        let Some(event) = EventId::new(state.event_id) else {
            return;
        };
        let events = self.inner.events.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channels) = events.get(&event) {
            let mut notice = None;
            channels.state.send_if_modified(|current| {
                // Never go back: an older read arriving late must not move anyone backwards.
                if state.at_ms < current.at_ms {
                    return false;
                }
                // Once drawn, always drawn; the line's head and tail only move forward.
                let next = QueueState {
                    head: current.head.max(state.head),
                    tail: current.tail.max(state.tail),
                    drawn: current.drawn || state.drawn,
                    ..state
                };
                let changed = QueueState {
                    at_ms: current.at_ms,
                    ..next.clone()
                } != *current;
                if changed {
                    notice = Some(Notice::of(&next));
                    *current = next;
                }
                changed
            });
            if let Some(notice) = notice {
                channels.notices.send_if_modified(|current| {
                    let changed = *current != notice;
                    if changed {
                        *current = notice;
                    }
                    changed
                });
            }
        }
    }

    /// Registers a socket for `ticket` of `event`, within `per_ticket` sockets for that ticket
    /// across every instance and `total` for this instance. While Redis is out of reach the
    /// ticket's sockets are counted on this instance only.
    pub async fn open_socket(
        &self,
        event: EventId,
        ticket: TicketId,
        per_ticket: usize,
        total: usize,
    ) -> Result<SocketGuard, SocketRefused> {
        self.inner.per_ticket.store(per_ticket, Ordering::Relaxed);
        {
            let sockets = self.inner.sockets.lock().unwrap_or_else(|p| p.into_inner());
            if sockets.total >= total {
                return Err(SocketRefused::InstanceFull);
            }
        }
        // Opening time first: the renewal tells the newest sockets from the oldest by name.
        let member = format!(
            "{:015}:{}:{}",
            Utc::now().timestamp_millis(),
            self.inner.instance,
            self.inner.next_socket.fetch_add(1, Ordering::Relaxed)
        );
        let key = self.inner.redis.keys(event).sockets(&ticket.to_string());
        let shared: Result<i64, _> = SOCKET_OPEN
            .evalsha_with_reload(
                self.inner.redis.client(),
                vec![key.clone()],
                vec![
                    member.clone(),
                    SOCKET_LEASE.as_millis().to_string(),
                    per_ticket.to_string(),
                ],
            )
            .await;
        let counted = match shared {
            Ok(0) => return Err(SocketRefused::TicketFull),
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count the ticket's sockets in redis; counting here only");
                false
            }
        };
        let mut sockets = self.inner.sockets.lock().unwrap_or_else(|p| p.into_inner());
        if sockets.total >= total {
            drop(sockets);
            if counted {
                self.forget_member(key, member);
            }
            return Err(SocketRefused::InstanceFull);
        }
        let count = sockets.per_ticket.entry(ticket).or_insert(0);
        if !counted && *count >= per_ticket {
            return Err(SocketRefused::TicketFull);
        }
        *count += 1;
        sockets.total += 1;
        let evicted = CancellationToken::new();
        sockets
            .members
            .entry(event)
            .or_default()
            .insert(member.clone(), (ticket, evicted.clone()));
        metrics::gauge!("queue_websockets_open").increment(1.0);
        Ok(SocketGuard {
            hub: self.clone(),
            event,
            ticket,
            member,
            evicted,
        })
    }

    /// Closes this instance's sockets over their ticket's limit (opened while Redis had lost
    /// the ticket's set and each instance counted its own).
    fn evict(&self, event: EventId, over: &[String]) {
        if over.is_empty() {
            return;
        }
        let sockets = self.inner.sockets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(members) = sockets.members.get(&event) {
            for member in over {
                if let Some((_, evicted)) = members.get(member) {
                    evicted.cancel();
                    metrics::counter!("queue_websockets_evicted_total").increment(1);
                }
            }
        }
    }

    /// Stops counting a socket in Redis (in the background: a closing socket never waits).
    fn forget_member(&self, key: String, member: String) {
        let redis = self.inner.redis.clone();
        tokio::spawn(async move {
            let removed: Result<i64, _> = redis.client().zrem(key, member).await;
            if let Err(e) = removed {
                tracing::debug!(error = %e, "could not uncount a closed socket; it lapses by itself");
            }
        });
    }

    /// Renews this instance's sockets in Redis every `every` (at most a third of their lease),
    /// until `shutdown`; sockets over their ticket's limit are closed.
    pub async fn run_socket_renewal(
        self,
        every: Duration,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut tick =
            tokio::time::interval(every.clamp(Duration::from_millis(100), SOCKET_LEASE / 3));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let open: Vec<(EventId, Vec<(String, String)>)> = {
                let sockets = self.inner.sockets.lock().unwrap_or_else(|p| p.into_inner());
                sockets
                    .members
                    .iter()
                    .map(|(event, members)| {
                        let keys = self.inner.redis.keys(*event);
                        let members = members
                            .iter()
                            .map(|(m, (t, _))| (keys.sockets(&t.to_string()), m.clone()))
                            .collect();
                        (*event, members)
                    })
                    .collect()
            };
            for (event, members) in open {
                for chunk in members.chunks(500) {
                    let (keys, mut args): (Vec<String>, Vec<String>) =
                        chunk.iter().cloned().unzip();
                    args.insert(0, self.inner.per_ticket.load(Ordering::Relaxed).to_string());
                    args.insert(0, SOCKET_LEASE.as_millis().to_string());
                    let renewed: Result<Vec<String>, _> = SOCKET_RENEW
                        .evalsha_with_reload(self.inner.redis.client(), keys, args)
                        .await;
                    match renewed {
                        Ok(over) => self.evict(event, &over),
                        Err(e) => {
                            tracing::warn!(event = %event, error = %e, "could not renew open sockets");
                            break;
                        }
                    }
                }
            }
        }
    }

    /// One subscription for the whole instance to the admission controllers' state channel.
    pub async fn run_subscriber(
        self,
        config: CommonConfig,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let channel = self.inner.redis.state_channel();
        shared::redis::subscribe(&config, channel, shutdown, |raw| {
            if let Ok(state) = serde_json::from_str::<QueueState>(raw) {
                self.apply(state);
            }
        })
        .await
    }

    /// Re-reads every watched event's state periodically and forgets events nobody watches.
    pub async fn run_refresher(
        self,
        every_ms: u64,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(Duration::from_millis(every_ms.max(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let watched: Vec<EventId> = {
                let mut events = self.inner.events.lock().unwrap_or_else(|p| p.into_inner());
                events.retain(|_, channels| channels.state.receiver_count() > 0);
                events.keys().copied().collect()
            };
            for event in watched {
                match read_state(&self.inner.redis, &self.inner.pg, event).await {
                    Ok(state) => self.apply(state),
                    Err(e) => {
                        tracing::warn!(event = %event, error = %e, "queue state refresh failed")
                    }
                }
            }
        }
    }
}

/// Uncounts a socket (here and in Redis) when it ends.
pub struct SocketGuard {
    hub: Hub,
    event: EventId,
    ticket: TicketId,
    member: String,
    evicted: CancellationToken,
}

impl SocketGuard {
    /// Fires when this socket is one too many for its ticket across instances.
    pub async fn evicted(&self) {
        self.evicted.cancelled().await;
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        {
            let mut sockets = self
                .hub
                .inner
                .sockets
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            sockets.total = sockets.total.saturating_sub(1);
            if let Some(count) = sockets.per_ticket.get_mut(&self.ticket) {
                *count -= 1;
                if *count == 0 {
                    sockets.per_ticket.remove(&self.ticket);
                }
            }
            if let Some(members) = sockets.members.get_mut(&self.event) {
                members.remove(&self.member);
                if members.is_empty() {
                    sockets.members.remove(&self.event);
                }
            }
        }
        metrics::gauge!("queue_websockets_open").decrement(1.0);
        let key = self
            .hub
            .inner
            .redis
            .keys(self.event)
            .sockets(&self.ticket.to_string());
        self.hub
            .forget_member(key, std::mem::take(&mut self.member));
    }
}

#[derive(sqlx::FromRow)]
struct Line {
    drawn: bool,
    /// The draw committed moments ago: its queue is still being mirrored for the first time.
    just_drawn: bool,
    head: i64,
    tail: i64,
    active: i64,
    places_left: Option<i64>,
}

/// How long the state's read waits for Redis before telling waiters the room is catching up.
const REDIS_PROBE: Duration = Duration::from_millis(500);

/// How long after the draw a mirror that is not whole yet is the draw's own publication (the
/// waiters keep waiting for the draw) rather than Redis catching up after a loss.
const PUBLICATION_SECS: i64 = 30;

/// Reads an event's line from Postgres (head, tail and active shoppers as committed, and its
/// settings), and from Redis only whether its mirror is whole.
pub async fn read_state(redis: &Redis, pg: &PgPool, event: EventId) -> anyhow::Result<QueueState> {
    let settings = SaleEvent::load(pg, event)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let line: Line = sqlx::query_as(
        "SELECT d.drawn_at IS NOT NULL AS drawn,
                COALESCE(d.drawn_at > now() - make_interval(secs => $2), false) AS just_drawn,
                COALESCE(d.tail, 0) AS tail, COALESCE(a.head, 0) AS head, a.places_left,
                (SELECT count(*) FROM admissions s
                 WHERE s.event_id = $1 AND s.slot_until > now()) AS active
         FROM (SELECT $1::bigint AS event_id) e
         LEFT JOIN draws d ON d.event_id = e.event_id
         LEFT JOIN admission_state a ON a.event_id = e.event_id",
    )
    .bind(event.get())
    .bind(PUBLICATION_SECS as f64)
    .fetch_one(pg)
    .await?;
    let mut state = QueueState::of(&settings, line.drawn, line.head, line.tail, line.active);
    state.places_left = line.places_left;
    if line.drawn && !redis.client().is_connected() {
        // Out of reach: say so now, not after a command timeout.
        state.catching_up = true;
    } else if line.drawn {
        // A Redis that does not answer within a moment is out of reach for the waiters too
        // (a dead server is not always noticed at once by the connection).
        let whole: Result<i64, _> = tokio::time::timeout(
            REDIS_PROBE,
            redis.client().exists(redis.keys(event).drawn()),
        )
        .await
        .unwrap_or_else(|_| {
            Err(fred::error::Error::new(
                fred::error::ErrorKind::Timeout,
                "no answer",
            ))
        });
        match whole {
            Ok(1) => {}
            // Redis answers, but the draw's queue is still on its way there.
            Ok(_) if line.just_drawn => state.drawn = false,
            // Out of reach, or being rebuilt after a loss.
            _ => state.catching_up = true,
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Hub {
        // The socket registry needs no live connection; a lazily connecting pool is enough.
        let pg = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://unused@127.0.0.1:1/none")
            .expect("lazy pool");
        let redis = Redis::lazy_for_tests();
        Hub::new(redis, pg)
    }

    /// Without Redis (never connected here) each instance still holds both caps on its own.
    #[tokio::test]
    async fn socket_caps_hold_and_free_on_one_instance_without_redis() {
        let hub = hub();
        let event = EventId::new(1).expect("id");
        let (a, b) = (TicketId::mint(), TicketId::mint());
        let a1 = hub.open_socket(event, a, 2, 3).await.expect("first");
        let _a2 = hub.open_socket(event, a, 2, 3).await.expect("second");
        assert_eq!(
            hub.open_socket(event, a, 2, 3).await.err(),
            Some(SocketRefused::TicketFull)
        );
        let _b1 = hub.open_socket(event, b, 2, 3).await.expect("b");
        assert_eq!(
            hub.open_socket(event, b, 2, 3).await.err(),
            Some(SocketRefused::InstanceFull)
        );
        drop(a1);
        assert!(
            hub.open_socket(event, b, 2, 3).await.is_ok(),
            "a closed socket frees its place"
        );
    }
}
