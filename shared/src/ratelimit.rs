//! Per-key rate limits (client IP, identity) on governor's GCRA, answering 429 with
//! `Retry-After`. Memory is bounded: keys idle past their replenish time are pruned by
//! `retain_recent`, which services call periodically.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::ApiError;

#[derive(Clone)]
pub struct KeyedLimit<K: Hash + Eq + Clone> {
    limiter: Arc<DefaultKeyedRateLimiter<K>>,
    what: &'static str,
}

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    /// `per_minute` sustained with bursts of `burst`; zero values are raised to 1.
    pub fn per_minute(per_minute: u32, burst: u32, what: &'static str) -> Self {
        let rate = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
        KeyedLimit {
            limiter: Arc::new(RateLimiter::keyed(
                Quota::per_minute(rate).allow_burst(burst),
            )),
            what,
        }
    }

    pub fn check(&self, key: &K) -> Result<(), ApiError> {
        self.limiter.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ApiError::RateLimited {
                retry_after_secs: wait.as_secs().max(1),
                message: format!("too many requests from this {}; retry later", self.what),
            }
        })
    }

    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
    }
}
