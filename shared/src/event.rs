//! The sale settings of an event as every service reads them from Postgres, and where "now"
//! falls in its sale window.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::ids::EventId;
use crate::ApiError;

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct SaleEvent {
    pub id: i64,
    pub name: String,
    pub venue: String,
    pub starts_at: DateTime<Utc>,
    pub presale_opens_at: DateTime<Utc>,
    pub sale_starts_at: DateTime<Utc>,
    pub sale_ends_at: DateTime<Utc>,
    pub rate_per_minute: i32,
    pub max_active: i32,
    pub pass_ttl_secs: i32,
    pub claim_window_secs: i32,
    pub seats_per_fan: i32,
    pub anonymous_allowed: bool,
    /// When the last seat was sold, if it has been.
    pub sold_out_at: Option<DateTime<Utc>>,
    /// Admissions stopped by an operator.
    pub paused: bool,
    /// A short message operators show every waiter.
    pub message: Option<String>,
}

/// Where a moment falls in an event's sale window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SalePhase {
    /// Before `presale_opens_at`.
    NotOpen,
    /// From `presale_opens_at` until `sale_starts_at`: joins are buffered for the draw.
    Presale,
    /// From `sale_starts_at` until `sale_ends_at`: the queue moves, late joins go to the back.
    OnSale,
    /// From `sale_ends_at`.
    Over,
}

const COLUMNS: &str = "id, name, venue, starts_at, presale_opens_at, sale_starts_at, \
    sale_ends_at, rate_per_minute, max_active, pass_ttl_secs, claim_window_secs, seats_per_fan, \
    anonymous_allowed, sold_out_at, paused, message";

impl SaleEvent {
    pub async fn load(pg: &PgPool, id: EventId) -> Result<SaleEvent, ApiError> {
        sqlx::query_as::<_, SaleEvent>(&format!("SELECT {COLUMNS} FROM events WHERE id = $1"))
            .bind(id.get())
            .fetch_optional(pg)
            .await?
            .ok_or_else(|| ApiError::NotFound("event_not_found", format!("no event {id}")))
    }

    /// Events whose sale is running now (for admission controllers).
    pub async fn on_sale(pg: &PgPool) -> Result<Vec<SaleEvent>, sqlx::Error> {
        sqlx::query_as::<_, SaleEvent>(&format!(
            "SELECT {COLUMNS} FROM events WHERE sale_starts_at <= now() AND sale_ends_at > now()"
        ))
        .fetch_all(pg)
        .await
    }

    pub fn event_id(&self) -> EventId {
        EventId::new(self.id).expect("event ids from Postgres are positive")
    }

    pub fn phase(&self, now: DateTime<Utc>) -> SalePhase {
        if now < self.presale_opens_at {
            SalePhase::NotOpen
        } else if now < self.sale_starts_at {
            SalePhase::Presale
        } else if now < self.sale_ends_at {
            SalePhase::OnSale
        } else {
            SalePhase::Over
        }
    }
}

/// The sale window and admission settings an organizer sets for an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaleSettings {
    pub presale_opens_at: DateTime<Utc>,
    pub sale_starts_at: DateTime<Utc>,
    pub sale_ends_at: DateTime<Utc>,
    pub rate_per_minute: i32,
    pub max_active: i32,
    #[serde(default = "default_pass_ttl")]
    pub pass_ttl_secs: i32,
    #[serde(default = "default_claim_window")]
    pub claim_window_secs: i32,
    #[serde(default = "default_seats_per_fan")]
    pub seats_per_fan: i32,
    #[serde(default = "default_true")]
    pub anonymous_allowed: bool,
}

fn default_pass_ttl() -> i32 {
    900
}
fn default_claim_window() -> i32 {
    300
}
fn default_seats_per_fan() -> i32 {
    4
}
fn default_true() -> bool {
    true
}

/// A 422 naming the field that broke a rule.
pub fn invalid(field: &str, why: &str) -> ApiError {
    ApiError::Unprocessable("invalid_field", format!("{field}: {why}"))
}

impl SaleSettings {
    /// Every rule a value must meet on its own; `prefix` names where the settings sit in the
    /// request (`"sale."` inside an event, `""` alone).
    pub fn validate(&self, prefix: &str) -> Result<(), ApiError> {
        let f = |name: &str| format!("{prefix}{name}");
        if self.presale_opens_at >= self.sale_starts_at {
            return Err(invalid(
                &f("presale_opens_at"),
                &format!("must be before {}", f("sale_starts_at")),
            ));
        }
        if self.sale_starts_at >= self.sale_ends_at {
            return Err(invalid(
                &f("sale_ends_at"),
                &format!("must be after {}", f("sale_starts_at")),
            ));
        }
        if self.sale_ends_at <= Utc::now() {
            return Err(invalid(&f("sale_ends_at"), "must be in the future"));
        }
        let ranges: [(&str, i32, i32, i32); 5] = [
            ("rate_per_minute", self.rate_per_minute, 1, 1_000_000),
            ("max_active", self.max_active, 1, 1_000_000),
            ("pass_ttl_secs", self.pass_ttl_secs, 60, 86_400),
            ("claim_window_secs", self.claim_window_secs, 10, 86_400),
            ("seats_per_fan", self.seats_per_fan, 1, 20),
        ];
        for (name, value, low, high) in ranges {
            if !(low..=high).contains(&value) {
                return Err(invalid(&f(name), &format!("must be {low} to {high}")));
            }
        }
        Ok(())
    }
}

impl From<&SaleEvent> for SaleSettings {
    fn from(e: &SaleEvent) -> Self {
        SaleSettings {
            presale_opens_at: e.presale_opens_at,
            sale_starts_at: e.sale_starts_at,
            sale_ends_at: e.sale_ends_at,
            rate_per_minute: e.rate_per_minute,
            max_active: e.max_active,
            pass_ttl_secs: e.pass_ttl_secs,
            claim_window_secs: e.claim_window_secs,
            seats_per_fan: e.seats_per_fan,
            anonymous_allowed: e.anonymous_allowed,
        }
    }
}

/// Event settings remembered for a short while, so a burst of joins does not read the same row
/// thousands of times a second. A change made elsewhere is seen within [`EventCache::TTL`].
#[derive(Clone, Default)]
pub struct EventCache {
    entries: Arc<Mutex<HashMap<EventId, Cached>>>,
}

/// When an event was read, and what.
type Cached = (Instant, Arc<SaleEvent>);

impl EventCache {
    pub const TTL: Duration = Duration::from_secs(1);

    pub async fn get(&self, pg: &PgPool, id: EventId) -> Result<Arc<SaleEvent>, ApiError> {
        if let Ok(entries) = self.entries.lock() {
            if let Some((at, event)) = entries.get(&id) {
                if at.elapsed() < Self::TTL {
                    return Ok(event.clone());
                }
            }
        }
        let event = Arc::new(SaleEvent::load(pg, id).await?);
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|_, (at, _)| at.elapsed() < Self::TTL);
            entries.insert(id, (Instant::now(), event.clone()));
        }
        Ok(event)
    }

    /// Forgets an event this instance has just changed.
    pub fn forget(&self, id: EventId) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(&id);
        }
    }
}
