//! The sale settings of an event as every service reads them from Postgres, and where "now"
//! falls in its sale window.

use chrono::{DateTime, Utc};
use serde::Serialize;
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
    anonymous_allowed";

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
