//! Autotune: closed-loop admission. Once a second the admission leader of an event with
//! autotune on reads the shop's health (what purchase instances report, `shared::health`) and
//! moves the cap on active shoppers and the admission rate with the control law below, never
//! beyond the organizer's bounds. The law is a pure function ([`step`]), tested against a
//! simulated shop; [`crate::admission`] applies and records its decisions.
//!
//! # The control law (AIMD on the cap, in the manner of TCP and Netflix's concurrency-limits)
//! * **Overloaded** — the merged p99 of holds or checkouts above the target, fan-visible errors
//!   above the target share, or a purchase instance that stopped reporting (silence is not
//!   health): the cap falls to the active shoppers × a factor — `target / p99` (between ×0.5
//!   and ×0.9) for latency, ×0.75 for silence or errors, ×0.5 for errors ten times the
//!   target — and the rate by the same factor. It falls again (the cap, or the rate alone once
//!   the cap is at its floor) only once the shoppers already admitted have come down to the
//!   new cap and a whole health window has passed since the last decrease, so the law reacts
//!   to the effect of its own change, not to the load it already cut (shoppers admitted stay;
//!   no one is thrown out). With too few samples for a p99 (a trickle of shoppers at a low
//!   floor), a median over the target is overload and a window whose slowest request is under
//!   the headroom line is headroom, so a line at a low floor can still climb.
//! * **Healthy with headroom** — p99 at most [`HEADROOM`] × target, errors within target, fans
//!   waiting: if the cap binds (active ≥ 90% of it) it rises by up to √cap; if the rate binds
//!   (fans waiting, slots free) the rate rises by up to 10% — each step scaled by the share of
//!   the headroom still unused, so the law slows as the latency nears the line.
//! * **Otherwise** (p99 between 80% and 100% of target, no fans waiting, no traffic) it holds:
//!   that band is what keeps the law from oscillating around the target.
//!
//! A value outside the bounds (autotune switched on mid-sale) is brought inside: down at once,
//! up by the same steps as a rise, so switching modes never admits a burst.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shared::event::invalid;
use shared::health::ShopHealth;
use shared::ApiError;

/// A p99 at most this share of the target counts as headroom for a rise.
pub const HEADROOM: f64 = 0.8;
/// Latency samples a window needs before its p99 is judged.
pub const MIN_SAMPLES: u64 = 20;
/// Samples below which a window's median still judges a clearly slow shop.
pub const FEW_SAMPLES: u64 = 5;
/// Requests a window needs before its error share is judged.
pub const MIN_REQUESTS: u64 = 20;
/// How far a silent shop, or errors above the target, lower the controls at once.
pub const SILENCE_FACTOR: f64 = 0.75;
/// The shortest time between two decreases: one health window.
pub const DECREASE_SPACING: Duration = Duration::from_secs(5);

/// What an organizer or operator asks of autotune for an event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub enabled: bool,
    /// Hold and checkout p99 the shop should stay under, in milliseconds.
    #[serde(default = "default_target_p99")]
    pub target_p99_ms: i32,
    /// Share of pass holders' requests allowed to fail (5xx), 0–0.5.
    #[serde(default = "default_error_rate")]
    pub target_error_rate: f64,
    pub rate_floor: i32,
    pub rate_ceiling: i32,
    pub cap_floor: i32,
    pub cap_ceiling: i32,
}

fn default_target_p99() -> i32 {
    500
}
fn default_error_rate() -> f64 {
    0.001
}

impl Settings {
    /// Every rule on its own values: 422 naming the field.
    pub fn validate(&self) -> Result<(), ApiError> {
        if !(10..=60_000).contains(&self.target_p99_ms) {
            return Err(invalid("target_p99_ms", "must be 10 to 60000"));
        }
        if !(0.0..=0.5).contains(&self.target_error_rate) || self.target_error_rate.is_nan() {
            return Err(invalid("target_error_rate", "must be 0 to 0.5"));
        }
        for (name, value) in [
            ("rate_floor", self.rate_floor),
            ("rate_ceiling", self.rate_ceiling),
            ("cap_floor", self.cap_floor),
            ("cap_ceiling", self.cap_ceiling),
        ] {
            if !(1..=1_000_000).contains(&value) {
                return Err(invalid(name, "must be 1 to 1000000"));
            }
        }
        if self.rate_floor > self.rate_ceiling {
            return Err(invalid("rate_floor", "must not be above rate_ceiling"));
        }
        if self.cap_floor > self.cap_ceiling {
            return Err(invalid("cap_floor", "must not be above cap_ceiling"));
        }
        Ok(())
    }
}

/// The controls autotune moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Controls {
    pub rate_per_minute: i32,
    pub max_active: i32,
}

/// What the line looks like now.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub health: ShopHealth,
    /// Slots taken now (admitted and unclaimed, or a live pass).
    pub active: i64,
    /// Fans in line not yet admitted.
    pub waiting: i64,
    /// Time since autotune last lowered the controls, if it has.
    pub since_decrease: Option<Duration>,
}

/// Autotune's state, as operators see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum State {
    Off,
    Raising,
    Lowering,
    /// Overloaded, waiting for its last decrease to take effect.
    Cooling,
    Holding,
    /// No shoppers and no traffic: nothing to judge.
    Idle,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Off,
        State::Raising,
        State::Lowering,
        State::Cooling,
        State::Holding,
        State::Idle,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            State::Off => "off",
            State::Raising => "raising",
            State::Lowering => "lowering",
            State::Cooling => "cooling",
            State::Holding => "holding",
            State::Idle => "idle",
        }
    }
}

/// One decision: the controls to apply, the state, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub next: Controls,
    pub state: State,
    /// Why, in an operator's words ("checkout p99 780 ms > 500 ms").
    pub why: String,
}

impl Decision {
    /// The audit line of a change ("auto: cap 420 → 380, checkout p99 780 ms > 500 ms").
    pub fn describe(&self, before: Controls) -> Option<String> {
        let mut parts = Vec::new();
        if self.next.max_active != before.max_active {
            parts.push(format!(
                "cap {} → {}",
                before.max_active, self.next.max_active
            ));
        }
        if self.next.rate_per_minute != before.rate_per_minute {
            parts.push(format!(
                "rate {} → {}/min",
                before.rate_per_minute, self.next.rate_per_minute
            ));
        }
        (!parts.is_empty()).then(|| format!("auto: {}, {}", parts.join(", "), self.why))
    }
}

/// What the health says, before bounds.
enum Verdict {
    /// Too much: lower by this factor (0.5–0.9).
    Overloaded(f64, String),
    /// Room to grow: the share (0–1) of the headroom latency not used.
    Headroom(f64, String),
    Band(String),
    Idle(String),
}

fn judge(s: &Settings, o: &Observed) -> Verdict {
    let h = &o.health;
    if h.silent > 0 {
        return Verdict::Overloaded(
            SILENCE_FACTOR,
            format!(
                "{} purchase instance{} stopped reporting",
                h.silent,
                if h.silent == 1 { "" } else { "s" }
            ),
        );
    }
    if h.reporting == 0 {
        return if o.active > 0 {
            Verdict::Overloaded(SILENCE_FACTOR, "no purchase instance reports".into())
        } else {
            Verdict::Idle("no purchase instance reports, no shoppers".into())
        };
    }
    let r = &h.merged;
    if r.requests >= MIN_REQUESTS {
        let share = r.errors as f64 / r.requests as f64;
        if share > s.target_error_rate {
            // Ten times the allowed share or more: halve.
            let factor = if share >= 10.0 * s.target_error_rate.max(0.001) {
                0.5
            } else {
                SILENCE_FACTOR
            };
            return Verdict::Overloaded(
                factor,
                format!(
                    "errors {:.1}% > {:.1}%",
                    share * 100.0,
                    s.target_error_rate * 100.0
                ),
            );
        }
    }
    let target = s.target_p99_ms.max(1) as u32;
    let steps = [("hold", &r.holds), ("checkout", &r.checkouts)];
    let worst = steps
        .into_iter()
        .filter(|(_, l)| l.count() >= MIN_SAMPLES)
        .filter_map(|(name, l)| Some((name, l.quantile_ms(0.99)?)))
        .max_by_key(|(_, p99)| *p99);
    if let Some((name, p99)) = worst {
        return if p99 > target {
            Verdict::Overloaded(
                (f64::from(target) / f64::from(p99)).clamp(0.5, 0.9),
                format!("{name} p99 {p99} ms > {target} ms"),
            )
        } else if f64::from(p99) <= HEADROOM * f64::from(target) {
            Verdict::Headroom(
                1.0 - f64::from(p99) / (HEADROOM * f64::from(target)),
                format!("{name} p99 {p99} ms ≤ {target} ms"),
            )
        } else {
            Verdict::Band(format!("{name} p99 {p99} ms near {target} ms"))
        };
    }
    // Too few samples for a p99 (a slow trickle of shoppers): a median over the target is
    // slow beyond doubt; every sample within the headroom line is room to grow, so a line at
    // a low floor can climb.
    let few: Vec<(&str, &shared::health::Latencies)> =
        steps.into_iter().filter(|(_, l)| l.count() > 0).collect();
    let slow = few
        .iter()
        .filter(|(_, l)| l.count() >= FEW_SAMPLES)
        .filter_map(|(name, l)| Some((*name, l.quantile_ms(0.5)?)))
        .max_by_key(|(_, p50)| *p50);
    if let Some((name, p50)) = slow.filter(|(_, p50)| *p50 > target) {
        return Verdict::Overloaded(
            (f64::from(target) / f64::from(p50)).clamp(0.5, 0.9),
            format!("{name} median {p50} ms > {target} ms"),
        );
    }
    let slowest = few
        .iter()
        .filter_map(|(name, l)| Some((*name, l.quantile_ms(1.0)?)))
        .max_by_key(|(_, max)| *max);
    match slowest {
        Some((name, max)) if f64::from(max) <= HEADROOM * f64::from(target) => Verdict::Headroom(
            1.0 - f64::from(max) / (HEADROOM * f64::from(target)),
            format!("{name} slowest {max} ms ≤ {target} ms (few requests)"),
        ),
        Some(_) => Verdict::Band("too few requests to judge".into()),
        None if o.active == 0 && r.requests == 0 => Verdict::Idle("no traffic".into()),
        // Shoppers admitted, no hold or checkout yet: not a reading.
        None => Verdict::Band("no holds or checkouts yet".into()),
    }
}

/// The additive step of a rise of the cap.
fn cap_step(cap: i32) -> i32 {
    (f64::from(cap.max(1)).sqrt().round() as i32).max(1)
}

fn rate_step(rate: i32) -> i32 {
    (rate / 10).max(1)
}

/// Brings `value` (the law's wish, from `before`) inside `[floor, ceiling]`: down to the
/// ceiling at once; up to the floor at once from inside the bounds, by `step` a second from
/// below them (switched on under the floor: no burst).
fn bound(before: i32, value: i32, floor: i32, ceiling: i32) -> i32 {
    if value > ceiling {
        ceiling
    } else if value >= floor {
        value
    } else if before >= floor {
        floor
    } else {
        before.saturating_add(cap_step(before)).min(floor)
    }
}

/// One step of the control law.
pub fn step(s: &Settings, now: Controls, o: &Observed) -> Decision {
    let cap = now.max_active;
    let rate = now.rate_per_minute;
    let (mut next, mut state, why) = match judge(s, o) {
        Verdict::Overloaded(factor, why) => {
            let spaced = o.since_decrease.is_none_or(|d| d >= DECREASE_SPACING);
            if o.active > i64::from(cap) || !spaced {
                (now, State::Cooling, why)
            } else {
                let base = o.active.min(i64::from(cap)).max(1) as f64;
                (
                    Controls {
                        max_active: ((base * factor).floor() as i32).max(1),
                        rate_per_minute: ((f64::from(rate) * factor).floor() as i32).max(1),
                    },
                    State::Lowering,
                    why,
                )
            }
        }
        Verdict::Headroom(room, why) if o.waiting > 0 => {
            // The nearer the latency to the headroom line, the smaller the step.
            let scaled = |step: i32| ((f64::from(step) * room).round() as i32).max(1);
            if o.active * 10 >= i64::from(cap) * 9 {
                (
                    Controls {
                        max_active: cap.saturating_add(scaled(cap_step(cap))),
                        rate_per_minute: rate,
                    },
                    State::Raising,
                    format!("{why}, cap reached with fans waiting"),
                )
            } else {
                (
                    Controls {
                        max_active: cap,
                        rate_per_minute: rate.saturating_add(scaled(rate_step(rate))),
                    },
                    State::Raising,
                    format!("{why}, fans waiting and slots free"),
                )
            }
        }
        Verdict::Headroom(_, why) => (now, State::Holding, format!("{why}, nobody waiting")),
        Verdict::Band(why) => (now, State::Holding, why),
        Verdict::Idle(why) => (now, State::Idle, why),
    };
    next.max_active = bound(cap, next.max_active, s.cap_floor, s.cap_ceiling);
    next.rate_per_minute = bound(rate, next.rate_per_minute, s.rate_floor, s.rate_ceiling);
    if state == State::Raising && next == now {
        // Pinned at the ceiling.
        state = State::Holding;
    }
    Decision { next, state, why }
}

#[cfg(test)]
mod tests;
