//! The queue service's configuration.

use std::net::SocketAddr;

use clap::Parser;
use shared::config::{parse_bind, CommonConfig, SigningArgs};

/// fairgate queue: the websocket waiting room, the admission controller and passes.
#[derive(Clone, Debug, Parser)]
#[command(name = "queue", version)]
pub struct Config {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "FAIRGATE_QUEUE_BIND", default_value = "127.0.0.1:8082", value_parser = parse_bind)]
    pub bind: SocketAddr,

    #[command(flatten)]
    pub signing: SigningArgs,

    /// Admission controller tick, in milliseconds.
    #[arg(long, env = "FAIRGATE_ADMISSION_TICK_MS", default_value_t = 250)]
    pub admission_tick_ms: u64,

    /// Lease of the admission leader, in milliseconds: a dead leader is replaced after it.
    #[arg(long, env = "FAIRGATE_LEADER_LEASE_MS", default_value_t = 3000)]
    pub leader_lease_ms: u64,

    /// How often each instance reads the line's figures (gauges) and the leader steers
    /// admission (places left, no-shows, autotune), in milliseconds.
    #[arg(long, env = "FAIRGATE_STEER_MS", default_value_t = 1000)]
    pub steer_ms: u64,

    /// Age past which a purchase instance's health report counts as silent (autotune then
    /// treats the shop as unhealthy), in milliseconds.
    #[arg(long, env = "FAIRGATE_HEALTH_FRESH_MS", default_value_t = 3000)]
    pub health_fresh_ms: u64,

    /// The organizer's token (`Bearer`): besides operators, the organizer may switch an event's
    /// autotune on or off and set its target and bounds.
    #[arg(long, env = "FAIRGATE_ORGANIZER_TOKEN", hide_env_values = true)]
    pub organizer_token: Option<String>,

    /// How often each instance re-reads queue state from Redis, besides pub/sub, in ms.
    #[arg(long, env = "FAIRGATE_REFRESH_MS", default_value_t = 1000)]
    pub refresh_ms: u64,

    /// Origins allowed to open the waiting-room websocket, comma-separated; the service's own
    /// origin is always allowed, and clients sending no Origin (non-browsers) are too.
    #[arg(long, env = "FAIRGATE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Most open websockets per ticket (tabs); more are refused with 429.
    #[arg(long, env = "FAIRGATE_MAX_SOCKETS_PER_TICKET", default_value_t = 4)]
    pub max_sockets_per_ticket: usize,

    /// How often each instance renews its sockets' count in Redis (and closes any over a
    /// ticket's limit, opened while Redis had lost the count), in milliseconds; at most a
    /// third of the 60 s lease.
    #[arg(long, env = "FAIRGATE_SOCKET_RENEW_MS", default_value_t = 20_000)]
    pub socket_renew_ms: u64,

    /// Most open websockets on this instance (each is a file descriptor; the process limit here
    /// is 20,000): more are refused with 503 so a balancer or retry finds another instance.
    #[arg(long, env = "FAIRGATE_MAX_WEBSOCKETS", default_value_t = 19_000)]
    pub max_websockets: usize,

    /// Websocket keep-alive ping interval, in seconds.
    #[arg(long, env = "FAIRGATE_WS_PING_SECS", default_value_t = 20)]
    pub ws_ping_secs: u64,

    /// Shortest time between two position updates to one waiter, in milliseconds (the front
    /// of the line). Each fan ahead adds 2 ms, up to `--ws-update-max-ms`.
    #[arg(long, env = "FAIRGATE_WS_UPDATE_MIN_MS", default_value_t = 500)]
    pub ws_update_min_ms: u64,

    /// Longest time between two position updates to one waiter, in milliseconds (far back).
    #[arg(long, env = "FAIRGATE_WS_UPDATE_MAX_MS", default_value_t = 60_000)]
    pub ws_update_max_ms: u64,

    /// Operator API tokens as `name:token` pairs, comma-separated (tokens of 16+ characters);
    /// the name is what the audit trail records. Unset disables the operator API.
    #[arg(long, env = "FAIRGATE_OPERATOR_TOKENS", hide_env_values = true)]
    pub operator_tokens: Option<String>,

    /// Where the waiting page sends an admitted fan (e.g. the seat page), `{event}` replaced by
    /// the event id; the pass follows in the URL's fragment (`#pass=…`). Unset: the purchase
    /// service's seat page at its public URL.
    #[arg(long, env = "FAIRGATE_NEXT_PAGE_URL")]
    pub next_page_url: Option<String>,

    #[command(flatten)]
    pub common: CommonConfig,
}

/// Milliseconds each fan ahead adds to a waiter's update interval.
const UPDATE_MS_PER_FAN_AHEAD: u64 = 2;

impl Config {
    /// How long a waiter at `position` waits between two position updates: the further back,
    /// the longer, between `ws_update_min_ms` and `ws_update_max_ms`.
    pub fn update_interval(
        &self,
        queue: &crate::hub::QueueState,
        position: Option<shared::ids::Position>,
    ) -> std::time::Duration {
        let ahead = position.map_or(0, |p| (p.get() - queue.head - 1).max(0)) as u64;
        let ms = ahead.saturating_mul(UPDATE_MS_PER_FAN_AHEAD).clamp(
            self.ws_update_min_ms,
            self.ws_update_max_ms.max(self.ws_update_min_ms),
        );
        std::time::Duration::from_millis(ms)
    }

    /// How long a waiter at `position` may sleep hearing only notices (the draw, a pause, a
    /// message, the rate, sold out), not every move of the line: until its next paced update,
    /// and at most half the shortest time its turn can take at the current rate (the head moves
    /// at most at the rate), so nobody learns of their turn late. `None` near the front, or
    /// without a place yet: the waiter follows every change, paced by `update_interval`.
    pub fn quiet_for(
        &self,
        queue: &crate::hub::QueueState,
        position: Option<shared::ids::Position>,
    ) -> Option<std::time::Duration> {
        let p = position.filter(|_| queue.drawn)?;
        let interval = self.update_interval(queue, position);
        let quiet = if queue.paused {
            interval
        } else {
            let ahead = (p.get() - queue.head - 1).max(0) as u64;
            let turn_ms = ahead.saturating_mul(60_000) / queue.rate_per_minute.max(1) as u64;
            interval.min(std::time::Duration::from_millis(turn_ms / 2))
        };
        (quiet > std::time::Duration::from_millis(self.ws_update_min_ms)).then_some(quiet)
    }

    /// Where an admitted fan goes next, `{event}` still to be replaced.
    pub fn next_page(&self) -> String {
        match &self.next_page_url {
            Some(url) if !url.trim().is_empty() => url.trim().to_owned(),
            _ => format!(
                "{}/e/{{event}}/seats",
                self.common.web.purchase_public_url.trim_end_matches('/')
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::QueueState;
    use shared::ids::Position;
    use std::time::Duration;

    #[test]
    fn waiters_further_back_are_updated_less_often() {
        let config = Config::parse_from(["queue"]);
        let queue = QueueState {
            head: 1_000,
            ..QueueState::default()
        };
        let at = |p: i64| config.update_interval(&queue, Position::new(p));
        assert_eq!(at(1_001), Duration::from_millis(500), "next in line");
        assert_eq!(at(1_400), Duration::from_millis(798));
        assert_eq!(at(6_001), Duration::from_secs(10));
        assert_eq!(
            at(101_000),
            Duration::from_secs(60),
            "far back: the ceiling"
        );
        assert_eq!(
            config.update_interval(&queue, None),
            Duration::from_millis(500),
            "no place yet"
        );
    }

    #[test]
    fn far_waiters_sleep_but_never_past_half_their_shortest_wait() {
        let config = Config::parse_from(["queue"]);
        let queue = QueueState {
            drawn: true,
            head: 1_000,
            rate_per_minute: 6_000,
            ..QueueState::default()
        };
        let quiet = |q: &QueueState, p: i64| config.quiet_for(q, Position::new(p));
        assert_eq!(
            quiet(&queue, 1_001),
            None,
            "next in line follows every move"
        );
        assert_eq!(
            quiet(&queue, 1_200),
            None,
            "199 ahead: paced at the floor, follows"
        );
        assert_eq!(quiet(&queue, 1_300), Some(Duration::from_millis(598)));
        // 5,000 ahead: paced every 10 s, but the turn can come in 50 s: sleeps 10 s.
        assert_eq!(quiet(&queue, 6_001), Some(Duration::from_secs(10)));
        // At 600,000/min the same fan could be in within 0.5 s: follows every move.
        let fast = QueueState {
            rate_per_minute: 600_000,
            ..queue.clone()
        };
        assert_eq!(quiet(&fast, 6_001), None);
        // At 60,000/min (1,000/s) the turn is 5 s away: sleeps at most 2.5 s.
        let brisk = QueueState {
            rate_per_minute: 60_000,
            ..queue.clone()
        };
        assert_eq!(quiet(&brisk, 6_001), Some(Duration::from_millis(2_500)));
        let paused = QueueState {
            paused: true,
            ..brisk.clone()
        };
        assert_eq!(
            quiet(&paused, 6_001),
            Some(Duration::from_secs(10)),
            "paused: the resume is a notice"
        );
        let undrawn = QueueState {
            drawn: false,
            ..queue.clone()
        };
        assert_eq!(quiet(&undrawn, 6_001), None, "before the draw");
        assert_eq!(config.quiet_for(&queue, None), None, "no place yet");
    }
}
