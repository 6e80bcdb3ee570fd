//! The control law against a simulated shop, one step a second, deterministic.
//!
//! The shop: shoppers stay [`SESSION`] seconds once admitted and each makes a request every two
//! seconds, their latencies spread exponentially; the p99 of its requests is `100 ms + 400 ms × (active / capacity)³` (the target,
//! 500 ms, is met at exactly `capacity` shoppers) and beyond 1.5 × capacity the excess
//! shoppers' requests fail. Admission follows the controls as the real tick does: the rate
//! owed a second, never above the cap, only while fans wait.

use std::collections::VecDeque;

use shared::health::{Report, ShopHealth};

use super::*;

const SESSION: usize = 20;
const TARGET_MS: i32 = 500;

fn settings() -> Settings {
    Settings {
        enabled: true,
        target_p99_ms: TARGET_MS,
        target_error_rate: 0.001,
        rate_floor: 60,
        rate_ceiling: 60_000,
        cap_floor: 50,
        cap_ceiling: 5_000,
    }
}

struct Shop {
    capacity: f64,
    /// Admitted per second, newest last (the last SESSION seconds).
    cohorts: VecDeque<i64>,
    /// Per-second reports, newest last (the last five: the health window).
    slots: VecDeque<Report>,
    waiting: i64,
    credit: f64,
    controls: Controls,
    since_decrease: Option<Duration>,
    /// Instances that stopped reporting.
    silent: usize,
    /// Seconds since the start, and when the law lowered anything.
    t: u32,
    decreases: Vec<u32>,
}

/// What one simulated second looked like.
#[derive(Debug, Clone, Copy)]
struct Second {
    cap: i32,
    active: i64,
    p99: f64,
}

impl Shop {
    fn new(capacity: f64, controls: Controls, waiting: i64) -> Shop {
        Shop {
            capacity,
            cohorts: VecDeque::new(),
            slots: VecDeque::new(),
            waiting,
            credit: 0.0,
            controls,
            since_decrease: None,
            silent: 0,
            t: 0,
            decreases: Vec::new(),
        }
    }

    fn active(&self) -> i64 {
        self.cohorts.iter().sum()
    }

    fn p99_at(&self, active: i64) -> f64 {
        100.0 + 400.0 * (active as f64 / self.capacity).powi(3)
    }

    /// One second: admit, serve, report, then one step of the law.
    fn second(&mut self, s: &Settings) -> Second {
        if self.cohorts.len() == SESSION {
            self.cohorts.pop_front();
        }
        self.credit += f64::from(self.controls.rate_per_minute) / 60.0;
        let room = (i64::from(self.controls.max_active) - self.active()).max(0);
        let admitted = (self.credit.floor() as i64).min(room).min(self.waiting);
        self.credit -= self.credit.floor();
        self.waiting -= admitted;
        self.cohorts.push_back(admitted);

        let active = self.active();
        let p99 = self.p99_at(active);
        let mut slot = Report::default();
        let requests = (active / 2) as u64;
        // Latencies spread exponentially, with this second's p99 at the 99th percentile.
        for i in 0..requests {
            let q = (i as f64 + 0.5) / requests as f64;
            let ms = p99 * (1.0 / (1.0 - q)).ln() / 100f64.ln();
            if i % 2 == 0 {
                slot.holds.record_ms(ms as u64);
            } else {
                slot.checkouts.record_ms(ms as u64);
            }
        }
        slot.requests = requests;
        let excess = active as f64 - 1.5 * self.capacity;
        if excess > 0.0 {
            slot.errors = (requests as f64 * excess / active as f64).ceil() as u64;
        }
        self.slots.push_back(slot);
        if self.slots.len() > 5 {
            self.slots.pop_front();
        }
        let mut merged = Report::default();
        for slot in &self.slots {
            merged.merge(slot);
        }
        let observed = Observed {
            health: ShopHealth {
                merged,
                reporting: 1,
                silent: self.silent,
            },
            active,
            waiting: self.waiting,
            since_decrease: self.since_decrease,
        };
        let decision = step(s, self.controls, &observed);
        if decision.next.max_active < self.controls.max_active
            || decision.next.rate_per_minute < self.controls.rate_per_minute
        {
            self.decreases.push(self.t);
            self.since_decrease = Some(Duration::ZERO);
        } else if let Some(d) = self.since_decrease.as_mut() {
            *d += Duration::from_secs(1);
        }
        self.controls = decision.next;
        self.t += 1;
        Second {
            cap: self.controls.max_active,
            active,
            p99,
        }
    }
}

fn generous() -> Controls {
    Controls {
        rate_per_minute: 20_000,
        max_active: 5_000,
    }
}

/// Stated band: once settled (after three minutes), the cap stays within 50%–130% of what the
/// shop can take at the target, and the p99 is over the target in at most 10% of seconds.
fn assert_settled(trace: &[Second], capacity: f64, from: usize) {
    let settled = &trace[from..];
    let (low, high) = (0.5 * capacity, 1.3 * capacity);
    for (t, s) in settled.iter().enumerate() {
        assert!(
            (low..=high).contains(&f64::from(s.cap)),
            "second {}: cap {} outside {low}–{high}: {:?}",
            from + t,
            s.cap,
            &trace[from + t.saturating_sub(10)..(from + t + 1)]
        );
    }
    let over = settled
        .iter()
        .filter(|s| s.p99 > f64::from(TARGET_MS))
        .count();
    assert!(
        over * 10 <= settled.len(),
        "p99 over target in {over} of {} seconds",
        settled.len()
    );
}

#[test]
fn a_too_generous_cap_converges_to_what_the_shop_can_take() {
    let s = settings();
    let mut shop = Shop::new(800.0, generous(), 200_000);
    let trace: Vec<Second> = (0..600).map(|_| shop.second(&s)).collect();
    assert_settled(&trace, 800.0, 180);
    // The rush itself was cut short: no second with more than 1.5 × capacity shopping.
    let worst = trace.iter().map(|s| s.active).max().unwrap_or(0);
    assert!(worst as f64 <= 1.6 * 800.0, "peak of {worst} active");
}

#[test]
fn a_low_start_rises_to_what_the_shop_can_take() {
    let s = settings();
    let start = Controls {
        rate_per_minute: 60,
        max_active: 50,
    };
    let mut shop = Shop::new(800.0, start, 200_000);
    let trace: Vec<Second> = (0..600).map(|_| shop.second(&s)).collect();
    assert_settled(&trace, 800.0, 300);
}

#[test]
fn the_shop_losing_capacity_then_regaining_it_is_followed_both_ways() {
    let s = settings();
    let mut shop = Shop::new(800.0, generous(), 500_000);
    let mut trace: Vec<Second> = (0..300).map(|_| shop.second(&s)).collect();
    shop.capacity = 300.0;
    trace.extend((0..300).map(|_| shop.second(&s)));
    assert_settled(&trace[300..], 300.0, 90);
    shop.capacity = 800.0;
    trace.extend((0..400).map(|_| shop.second(&s)));
    assert_settled(&trace[600..], 800.0, 240);
}

#[test]
fn without_traffic_the_floor_is_held() {
    let s = settings();
    let floor = Controls {
        rate_per_minute: s.rate_floor,
        max_active: s.cap_floor,
    };
    let mut shop = Shop::new(800.0, floor, 0);
    for _ in 0..300 {
        let second = shop.second(&s);
        assert_eq!(second.cap, s.cap_floor);
        assert_eq!(shop.controls, floor);
    }
}

#[test]
fn a_silent_purchase_instance_lowers_to_the_floor_and_never_below() {
    let s = settings();
    let mut shop = Shop::new(800.0, generous(), 200_000);
    shop.silent = 1;
    let trace: Vec<Second> = (0..600).map(|_| shop.second(&s)).collect();
    assert!(trace.iter().all(|t| t.cap >= s.cap_floor));
    assert_eq!(shop.controls.max_active, s.cap_floor);
    assert_eq!(shop.controls.rate_per_minute, s.rate_floor);
}

#[test]
fn switched_on_below_the_floor_it_climbs_by_steps_not_at_once() {
    let s = settings();
    // A reporting shop with too few requests to judge: the law holds, the bounds move.
    let o = Observed {
        active: 5,
        waiting: 1_000,
        health: ShopHealth {
            reporting: 1,
            ..ShopHealth::default()
        },
        ..Observed::default()
    };
    let d = step(
        &s,
        Controls {
            rate_per_minute: 10,
            max_active: 9,
        },
        &o,
    );
    assert_eq!(d.next.max_active, 12);
    assert_eq!(d.next.rate_per_minute, 13);
    let above = step(
        &s,
        Controls {
            rate_per_minute: 100_000,
            max_active: 9_000,
        },
        &o,
    );
    assert_eq!(above.next.max_active, s.cap_ceiling);
    assert_eq!(above.next.rate_per_minute, s.rate_ceiling);
}

#[test]
fn a_change_explains_itself() {
    let d = Decision {
        next: Controls {
            rate_per_minute: 600,
            max_active: 380,
        },
        state: State::Lowering,
        why: "checkout p99 800 ms > 500 ms".into(),
    };
    let before = Controls {
        rate_per_minute: 600,
        max_active: 420,
    };
    assert_eq!(
        d.describe(before).as_deref(),
        Some("auto: cap 420 → 380, checkout p99 800 ms > 500 ms")
    );
    assert_eq!(d.describe(d.next), None);
}

#[test]
fn bounds_are_checked_field_by_field() {
    let mut s = settings();
    assert!(s.validate().is_ok());
    s.cap_floor = 6_000;
    let e = s.validate().expect_err("floor above ceiling");
    assert!(format!("{e:?}").contains("cap_floor"), "{e:?}");
    let mut s = settings();
    s.target_error_rate = f64::NAN;
    assert!(format!("{:?}", s.validate().expect_err("nan")).contains("target_error_rate"));
    let mut s = settings();
    s.rate_floor = 0;
    assert!(format!("{:?}", s.validate().expect_err("zero")).contains("rate_floor"));
}

#[test]
fn decreases_are_spaced_even_with_the_cap_at_its_floor() {
    let s = settings();
    // A shop too slow even for the floor: the rate keeps falling, one step a health window.
    let mut shop = Shop::new(20.0, generous(), 200_000);
    for _ in 0..300 {
        shop.second(&s);
    }
    assert_eq!(shop.controls.max_active, s.cap_floor);
    assert!(shop.decreases.len() > 3, "{:?}", shop.decreases);
    for pair in shop.decreases.windows(2) {
        assert!(
            pair[1] - pair[0] >= DECREASE_SPACING.as_secs() as u32,
            "decreases at {:?}",
            shop.decreases
        );
    }
}

#[test]
fn a_trickle_of_shoppers_at_a_low_floor_still_climbs() {
    let s = Settings {
        rate_floor: 60,
        cap_floor: 8,
        ..settings()
    };
    let start = Controls {
        rate_per_minute: 60,
        max_active: 8,
    };
    // One shopper a second, a request every two seconds each: a handful of samples a window.
    let mut shop = Shop::new(800.0, start, 200_000);
    for _ in 0..120 {
        shop.second(&s);
    }
    assert!(
        shop.controls.max_active > 8 && shop.controls.rate_per_minute > 60,
        "{:?}",
        shop.controls
    );
}
