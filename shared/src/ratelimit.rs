//! Per-key rate limits (client IP, identity) on governor's GCRA, answering 429 with
//! `Retry-After`. Memory is bounded: keys idle past their replenish time are pruned by
//! `retain_recent`, which services call periodically.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

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
                retry_after_secs: retry_after_secs(wait),
                message: format!("too many requests from this {}; retry later", self.what),
            }
        })
    }

    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
    }
}

/// The whole seconds a client told to wait `wait` must wait: rounded up, so a retry after
/// exactly that many seconds is let through, and at least one.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let whole = wait.as_secs();
    let up = if wait.subsec_nanos() > 0 {
        whole + 1
    } else {
        whole
    };
    up.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(59_001)), 60);
        assert_eq!(retry_after_secs(Duration::from_millis(1_999)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[test]
    fn a_refused_client_is_told_a_wait_it_can_keep() {
        // One a minute: the second request must wait (just under) a whole minute.
        let limit = KeyedLimit::per_minute(1, 1, "test");
        limit.check(&1).expect("the first is allowed");
        match limit.check(&1) {
            Err(ApiError::RateLimited {
                retry_after_secs, ..
            }) => assert_eq!(retry_after_secs, 60),
            other => panic!("expected 429, got {other:?}"),
        }
    }
}
