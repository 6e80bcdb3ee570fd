//! The shop's health as purchase instances report it to the admission controller (autotune):
//! per event, over a short sliding window, the latency of holds and checkouts (as counts in
//! fixed buckets, so reports of several instances merge exactly), requests, fan-visible errors
//! and how busy the instance's Postgres pool was.
//!
//! Reports travel through Redis in one hash per event (`EventKeys::health`), one field per
//! instance, stamped with Redis's own clock when written: the reader judges a report's age on
//! that same clock, so skew between machines does not make a live instance look silent.

use std::sync::LazyLock;

use fred::prelude::*;
use fred::types::scripts::Script;
use serde::{Deserialize, Serialize};

use crate::ids::EventId;
use crate::redis::Redis;

/// Upper bounds of the latency buckets, in milliseconds; one more bucket counts the rest.
pub const BOUNDS_MS: [u32; 26] = [
    5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 400, 500, 650, 800, 1_000, 1_300, 1_600, 2_000,
    2_500, 3_000, 4_000, 5_000, 7_500, 10_000, 15_000, 30_000,
];

/// What a quantile in the last bucket (beyond [`BOUNDS_MS`]) reads as.
pub const BEYOND_MS: u32 = 60_000;

/// Latencies counted in the buckets of [`BOUNDS_MS`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latencies {
    /// Count per bucket; shorter than the buckets when the last ones are empty.
    counts: Vec<u64>,
}

impl Latencies {
    pub fn record_ms(&mut self, ms: u64) {
        let bucket = BOUNDS_MS
            .iter()
            .position(|&bound| ms <= u64::from(bound))
            .unwrap_or(BOUNDS_MS.len());
        if self.counts.len() <= bucket {
            self.counts.resize(bucket + 1, 0);
        }
        self.counts[bucket] += 1;
    }

    pub fn merge(&mut self, other: &Latencies) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The upper bound of the bucket holding quantile `q` (0–1): a latency no smaller than the
    /// true quantile. `None` without any sample.
    pub fn quantile_ms(&self, q: f64) -> Option<u32> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(BOUNDS_MS.get(bucket).copied().unwrap_or(BEYOND_MS));
            }
        }
        Some(BEYOND_MS)
    }
}

/// One instance's view of one event over its window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub window_ms: u64,
    pub holds: Latencies,
    pub checkouts: Latencies,
    /// Requests of pass holders (holds, checkouts, seat maps, releases).
    pub requests: u64,
    /// Of them, answered with a server error (5xx, 503 included): what a fan sees as failure.
    pub errors: u64,
    /// Of the errors, 503s (the pool or a backend out of reach, the service shedding load).
    pub unavailable: u64,
    /// The largest share of the Postgres pool in use seen during the window (0–1).
    pub pool_busy: f64,
}

impl Report {
    pub fn merge(&mut self, other: &Report) {
        self.window_ms = self.window_ms.max(other.window_ms);
        self.holds.merge(&other.holds);
        self.checkouts.merge(&other.checkouts);
        self.requests += other.requests;
        self.errors += other.errors;
        self.unavailable += other.unavailable;
        self.pool_busy = self.pool_busy.max(other.pool_busy);
    }
}

/// The shop's health for one event as the admission controller reads it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShopHealth {
    /// Every fresh report merged.
    pub merged: Report,
    /// Instances whose reports are fresh.
    pub reporting: usize,
    /// Instances that reported within [`FORGET_MS`] but not within the freshness limit: an
    /// instance that stopped reporting counts as unhealthy, not as healthy.
    pub silent: usize,
}

/// A report older than this is forgotten (the instance is gone, not merely late).
pub const FORGET_MS: i64 = 60_000;

static REPORT: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: health hash   ARGV: instance, report json, key lifetime ms
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now .. '|' .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return now
"#,
    )
});

static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: health hash   ARGV: forget ms. Returns {now ms, field, value, field, value, ...}
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local all = redis.call('HGETALL', KEYS[1])
local out = {now}
for i = 1, #all, 2 do
  local at = tonumber(string.match(all[i + 1], '^(%d+)|'))
  if at and now - at > tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], all[i])
  else
    table.insert(out, all[i])
    table.insert(out, all[i + 1])
  end
end
return out
"#,
    )
});

/// Publishes `report` as `instance`'s health for `event`.
pub async fn publish(
    redis: &Redis,
    event: EventId,
    instance: &str,
    report: &Report,
) -> Result<(), fred::error::Error> {
    let json = serde_json::to_string(report)
        .map_err(|e| fred::error::Error::new(fred::error::ErrorKind::Parse, e.to_string()))?;
    let _: i64 = REPORT
        .evalsha_with_reload(
            redis.client(),
            vec![redis.keys(event).health()],
            vec![instance.to_owned(), json, (FORGET_MS * 2).to_string()],
        )
        .await?;
    Ok(())
}

/// Withdraws `instance`'s report for `event` (a graceful shutdown: gone, not silent).
pub async fn withdraw(
    redis: &Redis,
    event: EventId,
    instance: &str,
) -> Result<(), fred::error::Error> {
    let _: i64 = redis
        .client()
        .hdel(redis.keys(event).health(), instance)
        .await?;
    Ok(())
}

/// Reads every instance's report for `event`: those at most `fresh_ms` old are merged, older
/// ones (up to [`FORGET_MS`]) count as silent.
pub async fn read(
    redis: &Redis,
    event: EventId,
    fresh_ms: i64,
) -> Result<ShopHealth, fred::error::Error> {
    let raw: Vec<Value> = READ
        .evalsha_with_reload(
            redis.client(),
            vec![redis.keys(event).health()],
            vec![FORGET_MS.to_string()],
        )
        .await?;
    let mut values = raw.into_iter();
    let now = values.next().and_then(|v| v.as_i64()).unwrap_or_default();
    let mut fields = Vec::new();
    while let (Some(_instance), Some(value)) = (values.next(), values.next()) {
        if let Some(text) = value.as_string() {
            fields.push(text);
        }
    }
    Ok(judge(now, fields.iter().map(String::as_str), fresh_ms))
}

/// Merges the stored values (`"<stamp ms>|<report json>"`) fresh at `now`.
pub fn judge<'a>(now: i64, values: impl Iterator<Item = &'a str>, fresh_ms: i64) -> ShopHealth {
    let mut health = ShopHealth::default();
    for value in values {
        let parsed = value.split_once('|').and_then(|(at, json)| {
            Some((
                at.parse::<i64>().ok()?,
                serde_json::from_str::<Report>(json).ok()?,
            ))
        });
        match parsed {
            Some((at, report)) if now - at <= fresh_ms => {
                health.merged.merge(&report);
                health.reporting += 1;
            }
            // Late, or unreadable (a newer or broken writer): not to be trusted as healthy.
            _ => health.silent += 1,
        }
    }
    health
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_read_the_bucket_bound_at_or_above_the_true_value() {
        let mut l = Latencies::default();
        assert_eq!(l.quantile_ms(0.99), None);
        for ms in 1..=100 {
            l.record_ms(ms);
        }
        // 99 of 100 samples are ≤ 99 ms, in the bucket bounded by 100.
        assert_eq!(l.quantile_ms(0.99), Some(100));
        assert_eq!(l.quantile_ms(0.5), Some(50));
        l.record_ms(90_000);
        assert_eq!(l.quantile_ms(1.0), Some(BEYOND_MS));
    }

    #[test]
    fn merged_reports_count_every_sample_once() {
        let mut a = Report::default();
        let mut b = Report::default();
        a.checkouts.record_ms(40);
        b.checkouts.record_ms(700);
        b.checkouts.record_ms(700);
        a.requests = 3;
        b.requests = 4;
        b.errors = 1;
        a.pool_busy = 0.2;
        b.pool_busy = 0.9;
        a.merge(&b);
        assert_eq!(a.checkouts.count(), 3);
        assert_eq!(a.checkouts.quantile_ms(0.99), Some(800));
        assert_eq!((a.requests, a.errors), (7, 1));
        assert_eq!(a.pool_busy, 0.9);
    }

    #[test]
    fn a_late_or_unreadable_report_counts_as_silent() {
        let fresh = format!(
            "1000|{}",
            serde_json::to_string(&Report::default()).expect("json")
        );
        let late = format!(
            "100|{}",
            serde_json::to_string(&Report::default()).expect("json")
        );
        let health = judge(
            1_500,
            [fresh.as_str(), late.as_str(), "garbage"].into_iter(),
            1_000,
        );
        assert_eq!((health.reporting, health.silent), (1, 2));
    }
}
