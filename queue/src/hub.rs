//! Each instance's view of every event that has a waiter here: one `watch` channel per event,
//! fed by one Redis pub/sub subscription for the whole instance (fast path) and a periodic
//! re-read of the event's counters (so a missed message costs at most one refresh interval).
//! Waiters only read their event's channel: an update costs O(1) Redis work per instance.
//!
//! Besides the full state, each event has a second channel carrying only what every waiter must
//! hear at once (`Notice`: the draw, a pause, a message, the rate, sold out). A waiter far back
//! listens only to that one and sleeps until its next paced update, so the head moving, a late
//! arrival or a shopper finishing wakes the few waiters near the front, not all 200,000.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use fred::prelude::*;
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
}

impl Notice {
    pub fn of(state: &QueueState) -> Self {
        Notice {
            drawn: state.drawn,
            paused: state.paused,
            message: state.message.clone(),
            rate_per_minute: state.rate_per_minute,
            sold_out: state.sold_out,
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
}

#[derive(Default)]
struct Sockets {
    total: usize,
    per_ticket: HashMap<TicketId, usize>,
}

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
                let next = QueueState {
                    head: current.head.max(state.head),
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

    /// Registers a socket for `ticket`, within `per_ticket` sockets for it and `total` for this
    /// instance.
    pub fn open_socket(
        &self,
        ticket: TicketId,
        per_ticket: usize,
        total: usize,
    ) -> Result<SocketGuard, SocketRefused> {
        let mut sockets = self.inner.sockets.lock().unwrap_or_else(|p| p.into_inner());
        if sockets.total >= total {
            return Err(SocketRefused::InstanceFull);
        }
        let count = sockets.per_ticket.entry(ticket).or_insert(0);
        if *count >= per_ticket {
            return Err(SocketRefused::TicketFull);
        }
        *count += 1;
        sockets.total += 1;
        metrics::gauge!("queue_websockets_open").increment(1.0);
        Ok(SocketGuard {
            hub: self.clone(),
            ticket,
        })
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

/// Decrements a ticket's open-socket count when the socket ends.
pub struct SocketGuard {
    hub: Hub,
    ticket: TicketId,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
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
        metrics::gauge!("queue_websockets_open").decrement(1.0);
    }
}

/// Reads an event's queue counters from Redis (one MGET) and its settings from Postgres.
pub async fn read_state(redis: &Redis, pg: &PgPool, event: EventId) -> anyhow::Result<QueueState> {
    let keys = redis.keys(event);
    let values: Vec<Option<i64>> = redis
        .client()
        .mget(vec![keys.drawn(), keys.head(), keys.tail()])
        .await?;
    let active: i64 = redis.client().zcard(keys.slots()).await?;
    let get = |i: usize| values.get(i).copied().flatten().unwrap_or(0);
    let settings = SaleEvent::load(pg, event)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(QueueState::of(
        &settings,
        get(0) == 1,
        get(1),
        get(2),
        active,
    ))
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

    #[tokio::test]
    async fn socket_caps_per_ticket_and_per_instance_hold_and_free() {
        let hub = hub();
        let (a, b) = (TicketId::mint(), TicketId::mint());
        let a1 = hub.open_socket(a, 2, 3).expect("first");
        let _a2 = hub.open_socket(a, 2, 3).expect("second");
        assert_eq!(
            hub.open_socket(a, 2, 3).err(),
            Some(SocketRefused::TicketFull)
        );
        let _b1 = hub.open_socket(b, 2, 3).expect("b");
        assert_eq!(
            hub.open_socket(b, 2, 3).err(),
            Some(SocketRefused::InstanceFull)
        );
        drop(a1);
        assert!(
            hub.open_socket(b, 2, 3).is_ok(),
            "a closed socket frees its place"
        );
    }
}
