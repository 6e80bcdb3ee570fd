//! Redis set-up and key naming. Connections reconnect for ever with capped exponential back-off;
//! every command has a timeout, so a lost Redis turns into quick 503s instead of hung requests.
//! fred replays commands in flight after a reconnect, which is why every state-changing step we
//! run is an idempotent Lua script.
//!
//! Keys are hash-tagged per event (`fg:{evt:42}:queue`) so an event's keys share a Redis Cluster
//! slot and multi-key scripts work unchanged there.

use std::time::Duration;

use fred::prelude::*;
use fred::types::config::UnresponsiveConfig;

use crate::config::CommonConfig;
use crate::ids::EventId;

/// A pool of Redis connections plus the key prefix of this deployment.
#[derive(Clone)]
pub struct Redis {
    pool: Pool,
    prefix: String,
}

impl Redis {
    pub async fn connect(config: &CommonConfig) -> anyhow::Result<Self> {
        let pool = builder(&config.redis_url, config.redis_command_timeout())?
            .build_pool(config.redis_pool_size.max(1))?;
        pool.init().await?;
        Ok(Redis {
            pool,
            prefix: config.redis_prefix.clone(),
        })
    }

    /// A pool that has not connected (for unit tests of code that only holds a handle): its
    /// commands fail after 50 ms, as they would with Redis out of reach.
    pub fn lazy_for_tests() -> Self {
        let pool = Builder::default_centralized()
            .with_performance_config(|p| {
                p.default_command_timeout = Duration::from_millis(50);
            })
            .build_pool(1)
            .expect("a default pool builds without connecting");
        Redis {
            pool,
            prefix: "test".into(),
        }
    }

    /// One connection of the pool (round-robin).
    pub fn client(&self) -> &Client {
        self.pool.next()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn keys(&self, event: EventId) -> EventKeys {
        EventKeys::new(&self.prefix, event)
    }

    /// The channel on which admission controllers publish queue state to every instance.
    pub fn state_channel(&self) -> String {
        format!("{}:queue-state", self.prefix)
    }

    pub async fn quit(&self) {
        let _ = self.pool.quit().await;
    }

    /// Reachable, and not configured to evict keys (an evicted queue would lose fans' places).
    pub async fn check_ready(&self) -> Result<(), String> {
        let client = self.client();
        let _: String = client
            .ping(None)
            .await
            .map_err(|e| format!("redis unreachable: {e}"))?;
        let policy: Vec<String> = client
            .config_get("maxmemory-policy")
            .await
            .map_err(|e| format!("redis CONFIG GET failed: {e}"))?;
        match policy.get(1).map(String::as_str) {
            Some("noeviction") => Ok(()),
            Some(other) => Err(format!(
                "redis maxmemory-policy is {other}; fairgate needs noeviction"
            )),
            None => Err("redis did not report its maxmemory-policy".into()),
        }
    }
}

/// Runs one subscription to `channel` for the whole process until `shutdown`, handing each
/// message's text to `handle`. The subscription is renewed after a reconnect.
pub async fn subscribe(
    config: &crate::config::CommonConfig,
    channel: String,
    shutdown: tokio_util::sync::CancellationToken,
    mut handle: impl FnMut(&str),
) -> anyhow::Result<()> {
    let subscriber =
        builder(&config.redis_url, config.redis_command_timeout())?.build_subscriber_client()?;
    subscriber.init().await?;
    let _resubscribe = subscriber.manage_subscriptions();
    let mut messages = subscriber.message_rx();
    subscriber.subscribe(channel.clone()).await?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            message = messages.recv() => match message {
                Ok(message) => {
                    if let Some(text) = message.value.as_str() {
                        handle(&text);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, %channel, "redis subscriber lagged");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    let _ = subscriber.quit().await;
    Ok(())
}

/// A fred builder with fairgate's reconnect policy and timeouts.
pub fn builder(url: &str, command_timeout: Duration) -> anyhow::Result<Builder> {
    let config = Config::from_url(url)?;
    let mut builder = Builder::from_config(config);
    builder
        // Unlimited attempts, 50 ms doubling up to 2 s between them.
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = 3;
            c.unresponsive = UnresponsiveConfig {
                max_timeout: Some(Duration::from_secs(5)),
                interval: Duration::from_secs(1),
            };
        })
        .with_performance_config(|p| {
            p.default_command_timeout = command_timeout;
        });
    Ok(builder)
}

/// The keys of one event's live queue.
#[derive(Clone, Debug)]
pub struct EventKeys {
    base: String,
}

impl EventKeys {
    pub fn new(prefix: &str, event: EventId) -> Self {
        EventKeys {
            base: format!("{prefix}:{{evt:{}}}", event.get()),
        }
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.base)
    }

    /// Sorted set: ticket id → position (a mirror of the places Postgres gave).
    pub fn queue(&self) -> String {
        self.key("queue")
    }
    /// Highest position given (mirror of `draws.tail`; only ever raised).
    pub fn tail(&self) -> String {
        self.key("tail")
    }
    /// Highest position admitted (mirror of `admission_state.head`; only ever raised).
    pub fn head(&self) -> String {
        self.key("head")
    }
    /// Active shoppers as the last admission tick counted them in Postgres (for display).
    pub fn active(&self) -> String {
        self.key("active")
    }
    /// Set once the mirror of the line is whole (see `buffer::mirror`); readers that miss a
    /// ticket without it answer "catching up".
    pub fn drawn(&self) -> String {
        self.key("drawn")
    }
    /// Instance id of the admission controller's leader (expires).
    pub fn leader(&self) -> String {
        self.key("leader")
    }
    /// Hash: purchase instance → its latest health report for the event (see `health`).
    pub fn health(&self) -> String {
        self.key("health")
    }
    /// Every key of the event but the per-ticket socket sets: what a flush or a failover to an
    /// empty replica loses at once.
    pub fn every(&self) -> Vec<String> {
        vec![
            self.queue(),
            self.tail(),
            self.head(),
            self.active(),
            self.drawn(),
            self.leader(),
        ]
    }
    /// Sorted set of one ticket's open waiting-room sockets on every instance, scored by when
    /// each lapses unless renewed (ms since the epoch).
    pub fn sockets(&self, ticket: &str) -> String {
        self.key(&format!("sockets:{ticket}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag_per_event() {
        let k = EventKeys::new("fg", EventId::new(42).expect("positive"));
        assert_eq!(k.queue(), "fg:{evt:42}:queue");
        assert_eq!(k.sockets("t"), "fg:{evt:42}:sockets:t");
        assert_eq!(k.head(), "fg:{evt:42}:head");
    }
}
