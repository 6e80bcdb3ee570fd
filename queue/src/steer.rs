//! Once a second, for each event on sale: the line's figures from Postgres (exported as
//! Prometheus gauges labelled by event on every instance), and on the admission leader what
//! steers the admission tick —
//! * **sized to what is left**: `admit_limit`, the most fresh shoppers worth having at once, is
//!   the places available (neither sold nor held) divided by the places one admission has
//!   bought so far (measured, starting from one place each over a prior of 20 admissions), with
//!   a quarter more for no-shows and dithering. Fresh shoppers are those who may still take an
//!   available place: admitted and not yet claimed, or claimed within the last
//!   [`FRESH_SHOPPER_SECS`] (`crate::admission::tick` counts them). A shopper holding places
//!   has them already, and one idle long after claiming (walked away, declined) does not keep
//!   the line from the places left. The last places are not fought over by thousands;
//! * **no-show compensation**: `rate_factor`, admissions per shopper who claims, from the
//!   admissions whose claim window ended in the last ten minutes (at least 30 of them; 1–3),
//!   so that the flow of actual shoppers matches the rate;
//! * **autotune** (`crate::autotune`): when on, one step of the control law, applied and
//!   recorded with its reason in the transaction that changes the controls.

use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::event::SaleEvent;
use shared::ids::EventId;

use crate::autotune::{self, Controls, Observed, Settings, State};
use crate::AppState;

/// Admissions whose claim window ended that no-show compensation needs before it applies.
pub const NO_SHOW_MIN_SAMPLE: i64 = 30;
/// The slack `admit_limit` gives over the shoppers the places left can serve.
pub const LIMIT_SLACK: f64 = 1.25;
/// How long after claiming the pass a shopper counts as fresh (still looking for a place).
pub const FRESH_SHOPPER_SECS: i64 = 60;

/// The line's figures as one snapshot of Postgres sees them.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct Figures {
    pub head: i64,
    pub tail: i64,
    pub active: i64,
    pub admitted: i64,
    pub admitted_last_minute: i64,
    pub finished: i64,
    pub places_total: i64,
    pub places_held: i64,
    pub places_sold: i64,
    pub due_recent: i64,
    pub lapsed_recent: i64,
    pub lapsed: i64,
    pub due: i64,
}

impl Figures {
    pub fn places_left(&self) -> i64 {
        (self.places_total - self.places_sold).max(0)
    }

    /// Places neither sold nor held.
    pub fn places_available(&self) -> i64 {
        (self.places_total - self.places_sold - self.places_held).max(0)
    }

    pub fn waiting(&self) -> i64 {
        (self.tail - self.head).max(0)
    }

    /// Places one admission buys, measured over the admissions that ended.
    pub fn per_shopper(&self) -> f64 {
        const PRIOR: f64 = 20.0;
        (self.places_sold as f64 + PRIOR) / (self.finished as f64 + PRIOR)
    }

    /// The most fresh shoppers worth having at once; `None` for an event without places in
    /// this service's seat map (nothing to size by).
    pub fn admit_limit(&self) -> Option<i64> {
        (self.places_total > 0).then(|| {
            (self.places_available() as f64 / self.per_shopper().max(0.05) * LIMIT_SLACK).ceil()
                as i64
        })
    }

    /// Admissions per shopper who claims (1–3).
    pub fn rate_factor(&self) -> f64 {
        if self.due_recent < NO_SHOW_MIN_SAMPLE {
            return 1.0;
        }
        let shows = (self.due_recent - self.lapsed_recent).max(0) as f64;
        if shows == 0.0 {
            return 3.0;
        }
        (self.due_recent as f64 / shows).clamp(1.0, 3.0)
    }

    pub fn no_show_rate(&self) -> f64 {
        if self.due == 0 {
            0.0
        } else {
            self.lapsed as f64 / self.due as f64
        }
    }
}

pub async fn figures(pg: &sqlx::PgPool, event: EventId) -> Result<Figures, sqlx::Error> {
    sqlx::query_as(
        "SELECT COALESCE(s.head, 0) AS head, COALESCE(d.tail, 0) AS tail,
                a.active, a.admitted, a.admitted_last_minute, a.finished, a.due_recent,
                a.lapsed_recent, a.lapsed, a.due,
                p.places_total, p.places_held, p.places_sold
         FROM (SELECT $1::bigint AS event_id) e
         LEFT JOIN draws d ON d.event_id = e.event_id
         LEFT JOIN admission_state s ON s.event_id = e.event_id
         CROSS JOIN LATERAL (
             SELECT count(*) FILTER (WHERE slot_until > now()) AS active,
                    count(*) AS admitted,
                    count(*) FILTER (WHERE admitted_at > now() - interval '60 seconds')
                        AS admitted_last_minute,
                    count(*) FILTER (WHERE slot_until <= now()) AS finished,
                    count(*) FILTER (WHERE claim_by <= now()
                                       AND claim_by > now() - interval '10 minutes') AS due_recent,
                    count(*) FILTER (WHERE claim_by <= now() AND ticket_id IS NULL
                                       AND claim_by > now() - interval '10 minutes')
                        AS lapsed_recent,
                    count(*) FILTER (WHERE claim_by <= now() AND ticket_id IS NULL) AS lapsed,
                    count(*) FILTER (WHERE claim_by <= now() OR ticket_id IS NOT NULL) AS due
             FROM admissions WHERE event_id = $1) a
         CROSS JOIN LATERAL (
             SELECT count(*) AS places_total,
                    count(*) FILTER (WHERE status = 'held') AS places_held,
                    count(*) FILTER (WHERE status = 'sold') AS places_sold
             FROM seats WHERE event_id = $1) p",
    )
    .bind(event.get())
    .fetch_one(pg)
    .await
}

/// The figures as Prometheus gauges labelled by event.
pub fn export(event: &SaleEvent, f: &Figures, autotune: Option<&Settings>, state: State) {
    let id = event.id.to_string();
    let gauge = |name: &'static str, value: f64| {
        metrics::gauge!(name, "event" => id.clone()).set(value);
    };
    gauge("fairgate_line_waiting", f.waiting() as f64);
    gauge("fairgate_line_serving_head", f.head as f64);
    gauge("fairgate_line_tail", f.tail as f64);
    gauge("fairgate_line_admitted", f.admitted as f64);
    gauge("fairgate_line_active_shoppers", f.active as f64);
    gauge(
        "fairgate_admission_rate_configured",
        f64::from(event.rate_per_minute),
    );
    gauge(
        "fairgate_admission_rate_achieved",
        f.admitted_last_minute as f64,
    );
    gauge("fairgate_admission_cap", f64::from(event.max_active));
    if let Some(limit) = f.admit_limit() {
        gauge("fairgate_admission_limit_by_places", limit as f64);
    }
    gauge("fairgate_admission_rate_factor", f.rate_factor());
    gauge("fairgate_line_no_show_rate", f.no_show_rate());
    gauge("fairgate_places_left", f.places_left() as f64);
    gauge("fairgate_places_held", f.places_held as f64);
    gauge("fairgate_places_sold", f.places_sold as f64);
    gauge("fairgate_sale_paused", if event.paused { 1.0 } else { 0.0 });
    gauge(
        "fairgate_sale_sold_out",
        if event.sold_out_at.is_some() {
            1.0
        } else {
            0.0
        },
    );
    gauge(
        "fairgate_autotune_enabled",
        if autotune.is_some_and(|a| a.enabled) {
            1.0
        } else {
            0.0
        },
    );
    if let Some(a) = autotune {
        gauge("fairgate_autotune_cap_floor", f64::from(a.cap_floor));
        gauge("fairgate_autotune_cap_ceiling", f64::from(a.cap_ceiling));
        gauge("fairgate_autotune_rate_floor", f64::from(a.rate_floor));
        gauge("fairgate_autotune_rate_ceiling", f64::from(a.rate_ceiling));
    }
    for s in State::ALL {
        metrics::gauge!("fairgate_autotune_state", "event" => id.clone(), "state" => s.as_str())
            .set(if s == state { 1.0 } else { 0.0 });
    }
}

#[derive(sqlx::FromRow)]
struct Stored {
    #[sqlx(flatten)]
    settings: Settings,
    state: State,
    lowered_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
}

async fn stored(pg: &sqlx::PgPool, event: EventId) -> Result<Option<Stored>, sqlx::Error> {
    sqlx::query_as(
        "SELECT enabled, target_p99_ms, target_error_rate, rate_floor, rate_ceiling, cap_floor,
                cap_ceiling, state, lowered_at, now() AS now
         FROM autotune WHERE event_id = $1",
    )
    .bind(event.get())
    .fetch_optional(pg)
    .await
}

/// One steering pass for `event`: figures and gauges on every instance; limits and autotune on
/// the leader.
pub async fn steer(state: &AppState, event: &SaleEvent, leading: bool) -> anyhow::Result<()> {
    let id = event.event_id();
    let f = figures(&state.pg, id).await?;
    let tune = stored(&state.pg, id).await?;
    let mut shown = tune.as_ref().map_or(State::Off, |t| t.state);
    if leading {
        size(&state.pg, id, &f).await?;
        if let Some(t) = tune.as_ref().filter(|t| t.settings.enabled) {
            shown = tune_step(state, event, &f, t).await?;
        }
    }
    export(event, &f, tune.as_ref().map(|t| &t.settings), shown);
    Ok(())
}

/// Records what the admission tick sizes itself by: the limit from the places left, the
/// no-show compensation and the places left (shown to waiters).
pub async fn size(pg: &sqlx::PgPool, event: EventId, f: &Figures) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE admission_state SET admit_limit = $2, rate_factor = $3, places_left = $4
         WHERE event_id = $1",
    )
    .bind(event.get())
    .bind(f.admit_limit())
    .bind(f.rate_factor())
    .bind((f.places_total > 0).then(|| f.places_left()))
    .execute(pg)
    .await?;
    Ok(())
}

/// One step of the control law, applied if the controls are still those it judged (an
/// operator's change in between wins).
async fn tune_step(
    state: &AppState,
    event: &SaleEvent,
    f: &Figures,
    t: &Stored,
) -> anyhow::Result<State> {
    let id = event.event_id();
    let health =
        shared::health::read(&state.redis, id, state.config.health_fresh_ms as i64).await?;
    let now = Controls {
        rate_per_minute: event.rate_per_minute,
        max_active: event.max_active,
    };
    let observed = Observed {
        health,
        active: f.active,
        waiting: f.waiting(),
        since_decrease: t
            .lowered_at
            .map(|at| (t.now - at).to_std().unwrap_or(Duration::ZERO)),
    };
    let decision = autotune::step(&t.settings, now, &observed);
    let reason = decision.describe(now);
    let mut tx = state.pg.begin().await?;
    let current: Option<(i32, i32, bool)> = sqlx::query_as(
        "SELECT e.rate_per_minute, e.max_active, a.enabled
         FROM events e JOIN autotune a ON a.event_id = e.id
         WHERE e.id = $1 FOR UPDATE OF e, a",
    )
    .bind(id.get())
    .fetch_optional(&mut *tx)
    .await?;
    let Some((rate, cap, enabled)) = current else {
        return Ok(State::Off);
    };
    if !enabled || rate != now.rate_per_minute || cap != now.max_active {
        // Switched off or changed by hand since the controls were read: that change wins.
        return Ok(t.state);
    }
    if let Some(reason) = &reason {
        sqlx::query("UPDATE events SET rate_per_minute = $2, max_active = $3 WHERE id = $1")
            .bind(id.get())
            .bind(decision.next.rate_per_minute)
            .bind(decision.next.max_active)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO operator_audit (event_id, actor, action, before, after, reason)
             VALUES ($1, 'autotune', 'auto', $2, $3, $4)",
        )
        .bind(id.get())
        .bind(serde_json::to_value(now)?)
        .bind(serde_json::to_value(decision.next)?)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        tracing::info!(event = %id, %reason, "autotune changed the controls");
        metrics::counter!("fairgate_autotune_changes_total", "event" => event.id.to_string(),
            "direction" => if decision.next.max_active < now.max_active
                || decision.next.rate_per_minute < now.rate_per_minute { "down" } else { "up" })
        .increment(1);
    }
    // Any decrease, of the cap or of the rate alone (the cap at its floor), starts the spacing.
    let lowered = decision.next.max_active < now.max_active
        || decision.next.rate_per_minute < now.rate_per_minute;
    sqlx::query(
        "UPDATE autotune SET state = $2, why = $3, decided_at = now(),
                lowered_at = CASE WHEN $4 THEN now() ELSE lowered_at END
         WHERE event_id = $1",
    )
    .bind(id.get())
    .bind(decision.state)
    .bind(reason.as_deref().unwrap_or(&decision.why))
    .bind(lowered)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(decision.state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_follows_the_places_left_and_the_conversion() {
        let mut f = Figures {
            places_total: 1_000,
            places_sold: 700,
            finished: 330,
            ..Figures::default()
        };
        // 720 places over 350 admissions: ~2.06 a shopper; 300 left → 146 × 1.25.
        assert_eq!(f.admit_limit(), Some(183));
        f.places_sold = 1_000;
        assert_eq!(f.admit_limit(), Some(0));
        // Nothing measured yet: one place a shopper.
        let start = Figures {
            places_total: 100,
            ..Figures::default()
        };
        assert_eq!(start.admit_limit(), Some(125));
        assert_eq!(Figures::default().admit_limit(), None);
    }

    #[test]
    fn no_shows_are_made_up_for_once_measured() {
        let mut f = Figures {
            due_recent: 29,
            lapsed_recent: 29,
            ..Figures::default()
        };
        assert_eq!(f.rate_factor(), 1.0);
        f.due_recent = 100;
        f.lapsed_recent = 20;
        assert!((f.rate_factor() - 1.25).abs() < 1e-9);
        f.lapsed_recent = 100;
        assert_eq!(f.rate_factor(), 3.0);
    }
}
