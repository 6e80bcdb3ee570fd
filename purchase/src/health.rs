//! This instance's health per event, as the admission controller's autotune reads it: every
//! pass holder's request (seat map, hold, release, checkout) is timed and counted per event in
//! one-second slots; each second the last [`WINDOW_SLOTS`] slots are published to Redis
//! (`shared::health`). Events on sale (or starting within a minute) are reported even without
//! traffic, so "no shoppers" reads as a quiet shop and a silent instance as an unhealthy one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use shared::health::Report;
use shared::ids::EventId;
use tokio_util::sync::CancellationToken;

use crate::AppState;

/// Slots of one second in the window a report covers.
pub const WINDOW_SLOTS: usize = 5;

/// Which latency a request counts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hold,
    Checkout,
    /// Seat maps and releases: counted as requests (and errors), not timed.
    Other,
}

impl Kind {
    /// The kind of a pass holder's route, `None` for routes autotune does not watch.
    pub fn of_route(route: &str, method: &axum::http::Method) -> Option<Kind> {
        use axum::http::Method;
        match (route, method) {
            ("/api/v1/events/{id}/holds", &Method::POST) => Some(Kind::Hold),
            ("/api/v1/events/{id}/checkout", &Method::POST) => Some(Kind::Checkout),
            ("/api/v1/events/{id}/seats", &Method::GET)
            | ("/api/v1/events/{id}/holds/{hold_id}", &Method::DELETE) => Some(Kind::Other),
            _ => None,
        }
    }
}

/// One event's slots: (second since the book started, what happened in it), oldest first.
type Slots = VecDeque<(u64, Report)>;

/// Per event, the slots of the window.
#[derive(Clone)]
pub struct HealthBook {
    started: Instant,
    events: Arc<Mutex<HashMap<EventId, Slots>>>,
}

impl Default for HealthBook {
    fn default() -> Self {
        HealthBook {
            started: Instant::now(),
            events: Arc::default(),
        }
    }
}

impl HealthBook {
    fn slot_now(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    pub fn record(&self, event: EventId, kind: Kind, took: Duration, status: u16, pool_busy: f64) {
        let slot = self.slot_now();
        let Ok(mut events) = self.events.lock() else {
            return;
        };
        let slots = events.entry(event).or_default();
        if slots.back().is_none_or(|(s, _)| *s != slot) {
            slots.push_back((slot, Report::default()));
            while slots.len() > WINDOW_SLOTS {
                slots.pop_front();
            }
        }
        let Some((_, report)) = slots.back_mut() else {
            return;
        };
        let ms = took.as_millis() as u64;
        match kind {
            Kind::Hold => report.holds.record_ms(ms),
            Kind::Checkout => report.checkouts.record_ms(ms),
            Kind::Other => {}
        }
        report.requests += 1;
        if status >= 500 {
            report.errors += 1;
        }
        if status == 503 {
            report.unavailable += 1;
        }
        report.pool_busy = report.pool_busy.max(pool_busy);
    }

    /// The window's report for `event` (empty counts when nothing happened in it).
    pub fn report(&self, event: EventId, pool_busy: f64) -> Report {
        let now = self.slot_now();
        let mut report = Report {
            window_ms: (WINDOW_SLOTS as u64) * 1_000,
            pool_busy,
            ..Report::default()
        };
        if let Ok(mut events) = self.events.lock() {
            if let Some(slots) = events.get_mut(&event) {
                slots.retain(|(s, _)| now.saturating_sub(*s) < WINDOW_SLOTS as u64);
                for (_, slot) in slots.iter() {
                    report.merge(slot);
                }
            }
            events.retain(|_, slots| !slots.is_empty());
        }
        report
    }

    /// Events with requests in the window.
    pub fn active_events(&self) -> Vec<EventId> {
        self.events
            .lock()
            .map(|e| e.keys().copied().collect())
            .unwrap_or_default()
    }
}

/// Puts an event's sale counters on `/metrics` at zero before anything happens to them, so
/// dashboards and alerts read "none yet" rather than "no data".
fn register_series(event: EventId) {
    let event = event.to_string();
    for name in [
        "fairgate_orders_total",
        "fairgate_revenue_cents_total",
        "fairgate_refunds_total",
        "fairgate_reconciliations_total",
    ] {
        metrics::counter!(name, "event" => event.clone()).increment(0);
    }
    for outcome in ["succeeded", "declined", "provider_error"] {
        metrics::counter!("fairgate_payments_total", "event" => event.clone(), "outcome" => outcome)
            .increment(0);
    }
    for outcome in ["ok", "error"] {
        metrics::counter!("fairgate_shop_requests_total", "event" => event.clone(),
            "outcome" => outcome)
        .increment(0);
    }
}

/// The share of the Postgres pool in use now.
pub fn pool_busy(pg: &sqlx::PgPool) -> f64 {
    let max = pg.options().get_max_connections().max(1);
    let in_use = pg.size().saturating_sub(pg.num_idle() as u32);
    f64::from(in_use) / f64::from(max)
}

/// Middleware: times and counts pass holders' requests per event.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let kind = req
        .extensions()
        .get::<MatchedPath>()
        .and_then(|p| Kind::of_route(p.as_str(), req.method()));
    let event = req
        .uri()
        .path()
        .strip_prefix("/api/v1/events/")
        .and_then(|rest| rest.split('/').next())
        .and_then(|id| id.parse::<i64>().ok())
        .and_then(EventId::new);
    let started = Instant::now();
    let response = next.run(req).await;
    if let (Some(kind), Some(event)) = (kind, event) {
        let outcome = if response.status().is_server_error() {
            "error"
        } else {
            "ok"
        };
        metrics::counter!("fairgate_shop_requests_total", "event" => event.to_string(),
            "outcome" => outcome)
        .increment(1);
        state.health.record(
            event,
            kind,
            started.elapsed(),
            response.status().as_u16(),
            pool_busy(&state.pg),
        );
    }
    response
}

/// Publishes this instance's reports every `every`, for events on sale and events with traffic.
pub async fn run_reporter(
    state: AppState,
    every: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let instance = format!(
        "purchase-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut on_sale: Vec<EventId> = Vec::new();
    let mut reported: std::collections::HashSet<EventId> = Default::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        {
            match sqlx::query_scalar::<_, i64>(
                // A minute ahead too: the leader finds the shop reporting from the sale's start.
                "SELECT id FROM events
                 WHERE sale_starts_at <= now() + interval '1 minute' AND sale_ends_at > now()",
            )
            .fetch_all(&state.pg)
            .await
            {
                Ok(ids) => on_sale = ids.into_iter().filter_map(EventId::new).collect(),
                Err(e) => tracing::warn!(error = %e, "cannot list events on sale for health"),
            }
        }
        let mut events = on_sale.clone();
        for event in state.health.active_events() {
            if !events.contains(&event) {
                events.push(event);
            }
        }
        let busy = pool_busy(&state.pg);
        for event in &on_sale {
            register_series(*event);
        }
        for event in events {
            reported.insert(event);
            let report = state.health.report(event, busy);
            if let Err(e) = shared::health::publish(&state.redis, event, &instance, &report).await {
                tracing::warn!(event = %event, error = %e, "cannot publish health");
                break;
            }
        }
    }
    // Shutting down on purpose: withdraw the reports, so a rolling restart does not read as
    // an instance falling silent (a crash still does).
    for event in reported {
        if let Err(e) = shared::health::withdraw(&state.redis, event, &instance).await {
            tracing::debug!(event = %event, error = %e, "could not withdraw the health report");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_counts_the_window_by_kind() {
        let book = HealthBook::default();
        let e = EventId::new(7).expect("positive");
        book.record(e, Kind::Hold, Duration::from_millis(12), 200, 0.1);
        book.record(e, Kind::Checkout, Duration::from_millis(700), 200, 0.5);
        book.record(e, Kind::Checkout, Duration::from_millis(40), 503, 0.3);
        book.record(e, Kind::Other, Duration::from_millis(3), 500, 0.2);
        let r = book.report(e, 0.0);
        assert_eq!(r.holds.count(), 1);
        assert_eq!(r.checkouts.count(), 2);
        assert_eq!((r.requests, r.errors, r.unavailable), (4, 2, 1));
        assert_eq!(r.pool_busy, 0.5);
        let other = book.report(EventId::new(8).expect("positive"), 0.25);
        assert_eq!((other.requests, other.pool_busy), (0, 0.25));
    }

    #[test]
    fn only_pass_holders_routes_are_watched() {
        use axum::http::Method;
        assert_eq!(
            Kind::of_route("/api/v1/events/{id}/holds", &Method::POST),
            Some(Kind::Hold)
        );
        assert_eq!(Kind::of_route("/api/v1/events/{id}", &Method::GET), None);
    }
}
