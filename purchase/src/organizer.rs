//! The organizer API (`POST /api/v1/organizer/events`): an event with its sale window,
//! admission settings and seat map in one request, created in one transaction (seats by
//! `generate_series`, so 100,000 seats take one statement per section). And the public event
//! page (`GET /api/v1/events/{id}`) with availability.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::event::SaleEvent;
use shared::extract::{Json, Path};
use shared::ids::EventId;
use shared::ApiError;
use tracing::instrument;

use crate::AppState;

pub const MAX_SEATS_PER_EVENT: i64 = 200_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/organizer/events", post(create_event))
        .route("/api/v1/events/{id}", get(event_page))
}

/// Proof the caller presented the organizer token.
pub struct Organizer;

impl FromRequestParts<AppState> for Organizer {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state.organizer.check(parts).map(|()| Organizer)
    }
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct CreateEvent {
    pub name: String,
    #[serde(default)]
    pub venue: String,
    pub starts_at: DateTime<Utc>,
    pub sale: SaleSettings,
    pub seat_map: SeatMap,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SeatMap {
    pub sections: Vec<Section>,
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Section {
    pub name: String,
    pub rows: i32,
    pub seats_per_row: i32,
    pub price_cents: i64,
}

use shared::event::{invalid, SaleSettings};

impl CreateEvent {
    /// Every rule a value must meet, each refusal naming the field.
    pub fn validate(&self) -> Result<i64, ApiError> {
        let name = self.name.trim();
        if name.is_empty() || name.len() > 200 {
            return Err(invalid("name", "must be 1 to 200 characters"));
        }
        if self.venue.len() > 200 {
            return Err(invalid("venue", "must be at most 200 characters"));
        }
        self.sale.validate("sale.")?;
        if self.seat_map.sections.is_empty() || self.seat_map.sections.len() > 500 {
            return Err(invalid("seat_map.sections", "must have 1 to 500 sections"));
        }
        let mut total: i64 = 0;
        let mut names = std::collections::HashSet::new();
        for (i, section) in self.seat_map.sections.iter().enumerate() {
            let field = |f: &str| format!("seat_map.sections[{i}].{f}");
            if section.name.trim().is_empty() || section.name.len() > 50 {
                return Err(invalid(&field("name"), "must be 1 to 50 characters"));
            }
            if !names.insert(section.name.as_str()) {
                return Err(invalid(&field("name"), "is used by another section"));
            }
            if !(1..=1000).contains(&section.rows) {
                return Err(invalid(&field("rows"), "must be 1 to 1000"));
            }
            if !(1..=1000).contains(&section.seats_per_row) {
                return Err(invalid(&field("seats_per_row"), "must be 1 to 1000"));
            }
            if !(0..=100_000_000).contains(&section.price_cents) {
                return Err(invalid(&field("price_cents"), "must be 0 to 100,000,000"));
            }
            total += i64::from(section.rows) * i64::from(section.seats_per_row);
        }
        if total > MAX_SEATS_PER_EVENT {
            return Err(invalid(
                "seat_map",
                &format!("has {total} seats; at most {MAX_SEATS_PER_EVENT} per event"),
            ));
        }
        Ok(total)
    }
}

#[derive(Debug, Serialize)]
pub struct EventPage {
    #[serde(flatten)]
    pub event: SaleEvent,
    pub seats_total: i64,
    pub seats_available: i64,
    pub seats_sold: i64,
}

#[instrument(skip_all)]
async fn create_event(
    State(state): State<AppState>,
    _organizer: Organizer,
    Json(request): Json<CreateEvent>,
) -> Result<(StatusCode, Json<EventPage>), ApiError> {
    let total = request.validate()?;
    let s = &request.sale;
    let mut tx = state.pg.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO events (name, venue, starts_at, presale_opens_at, sale_starts_at,
             sale_ends_at, rate_per_minute, max_active, pass_ttl_secs, claim_window_secs,
             seats_per_fan, anonymous_allowed)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id",
    )
    .bind(request.name.trim())
    .bind(&request.venue)
    .bind(request.starts_at)
    .bind(s.presale_opens_at)
    .bind(s.sale_starts_at)
    .bind(s.sale_ends_at)
    .bind(s.rate_per_minute)
    .bind(s.max_active)
    .bind(s.pass_ttl_secs)
    .bind(s.claim_window_secs)
    .bind(s.seats_per_fan)
    .bind(s.anonymous_allowed)
    .fetch_one(&mut *tx)
    .await?;
    for section in &request.seat_map.sections {
        sqlx::query(
            "INSERT INTO seats (event_id, section, row_label, number, price_cents)
             SELECT $1, $2, r::text, n, $5
             FROM generate_series(1, $3) AS r, generate_series(1, $4) AS n
             ORDER BY r, n",
        )
        .bind(id)
        .bind(&section.name)
        .bind(section.rows)
        .bind(section.seats_per_row)
        .bind(section.price_cents)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    tracing::info!(event = id, seats = total, "event created");
    let event_id = EventId::from_path(id)?;
    Ok((StatusCode::CREATED, Json(page(&state, event_id).await?)))
}

#[instrument(skip_all, fields(event = id))]
async fn event_page(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Json<EventPage>, ApiError> {
    let event_id = EventId::from_path(id)?;
    Ok(Json(page(&state, event_id).await?))
}

async fn page(state: &AppState, id: EventId) -> Result<EventPage, ApiError> {
    let event = SaleEvent::load(&state.pg, id).await?;
    let (total, available, sold): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*),
                count(*) FILTER (WHERE status = 'available'
                                 OR (status = 'held' AND held_until < now())),
                count(*) FILTER (WHERE status = 'sold')
         FROM seats WHERE event_id = $1",
    )
    .bind(id.get())
    .fetch_one(&state.pg)
    .await?;
    Ok(EventPage {
        event,
        seats_total: total,
        seats_available: available,
        seats_sold: sold,
    })
}
