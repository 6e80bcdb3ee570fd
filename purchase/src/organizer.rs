//! The organizer API (`POST /api/v1/organizer/events`): an event with its sale window,
//! admission settings and seat map in one request, created in one transaction (seats by
//! `generate_series`, so 100,000 seats take one statement per section). And the public event
//! page (`GET /api/v1/events/{id}`) with availability.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::{get, patch, post};
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
        .route("/api/v1/organizer/events/{id}", patch(update_event))
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

/// The catalog's text fields of an event, each within its length.
fn check_details(
    description: Option<&str>,
    venue: Option<&str>,
    city: Option<&str>,
    category: Option<&str>,
) -> Result<(), ApiError> {
    for (field, value, max) in [
        ("description", description, 5000),
        ("venue", venue, 200),
        ("city", city, 100),
        ("category", category, 50),
    ] {
        check_len(field, value.unwrap_or_default(), max)?;
    }
    Ok(())
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.chars().count() > max {
        return Err(invalid(field, &format!("must be at most {max} characters")));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(invalid("name", "must be 1 to 200 characters"));
    }
    Ok(())
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct CreateEvent {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub venue: String,
    #[serde(default)]
    pub city: String,
    #[serde(default)]
    pub category: String,
    pub starts_at: DateTime<Utc>,
    pub sale: SaleSettings,
    #[serde(default)]
    pub seat_map: SeatMap,
    /// General-admission ticket types: places without a fixed seat.
    #[serde(default)]
    pub ticket_types: Vec<TicketType>,
    /// Fans may refund their own order until this many hours before the start; absent: no fan
    /// refunds.
    #[serde(default)]
    pub fan_refund_cutoff_hours: Option<i32>,
}

fn check_cutoff(hours: Option<i32>) -> Result<(), ApiError> {
    if hours.is_some_and(|h| !(0..=8760).contains(&h)) {
        return Err(invalid("fan_refund_cutoff_hours", "must be 0 to 8760"));
    }
    Ok(())
}

#[derive(Debug, Deserialize, Serialize, Clone, Default)]
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

/// A general-admission ticket type: `capacity` places at one price.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct TicketType {
    pub name: String,
    pub capacity: i32,
    pub price_cents: i64,
}

use shared::event::{invalid, SaleSettings};

/// Checks new sections and ticket types (their names must differ from each other and from
/// `taken`); returns the places they add.
fn validate_places(
    sections: &[Section],
    types: &[TicketType],
    taken: &[String],
    prefix: (&str, &str),
) -> Result<i64, ApiError> {
    let mut total: i64 = 0;
    let mut names: std::collections::HashSet<String> = taken.iter().cloned().collect();
    let mut check = |field: String, name: &str, price: i64| -> Result<(), ApiError> {
        if name.trim().is_empty() || name.chars().count() > 50 {
            return Err(invalid(
                &format!("{field}.name"),
                "must be 1 to 50 characters",
            ));
        }
        if !names.insert(name.trim().to_owned()) {
            return Err(invalid(
                &format!("{field}.name"),
                "is used by another section or ticket type",
            ));
        }
        if !(0..=100_000_000).contains(&price) {
            return Err(invalid(
                &format!("{field}.price_cents"),
                "must be 0 to 100,000,000",
            ));
        }
        Ok(())
    };
    for (i, section) in sections.iter().enumerate() {
        let field = format!("{}[{i}]", prefix.0);
        check(field.clone(), &section.name, section.price_cents)?;
        if !(1..=1000).contains(&section.rows) {
            return Err(invalid(&format!("{field}.rows"), "must be 1 to 1000"));
        }
        if !(1..=1000).contains(&section.seats_per_row) {
            return Err(invalid(
                &format!("{field}.seats_per_row"),
                "must be 1 to 1000",
            ));
        }
        total += i64::from(section.rows) * i64::from(section.seats_per_row);
    }
    for (i, kind) in types.iter().enumerate() {
        let field = format!("{}[{i}]", prefix.1);
        check(field.clone(), &kind.name, kind.price_cents)?;
        if !(1..=MAX_SEATS_PER_EVENT as i32).contains(&kind.capacity) {
            return Err(invalid(
                &format!("{field}.capacity"),
                &format!("must be 1 to {MAX_SEATS_PER_EVENT}"),
            ));
        }
        total += i64::from(kind.capacity);
    }
    if sections.len() + types.len() > 500 {
        return Err(invalid(
            prefix.0,
            "at most 500 sections and ticket types per event",
        ));
    }
    Ok(total)
}

fn check_capacity(total: i64) -> Result<(), ApiError> {
    if total > MAX_SEATS_PER_EVENT {
        return Err(invalid(
            "seat_map",
            &format!("would have {total} places; at most {MAX_SEATS_PER_EVENT} per event"),
        ));
    }
    Ok(())
}

impl CreateEvent {
    /// Every rule a value must meet, each refusal naming the field.
    pub fn validate(&self) -> Result<i64, ApiError> {
        check_name(&self.name)?;
        check_details(
            Some(&self.description),
            Some(&self.venue),
            Some(&self.city),
            Some(&self.category),
        )?;
        self.sale.validate("sale.")?;
        check_cutoff(self.fan_refund_cutoff_hours)?;
        let total = validate_places(
            &self.seat_map.sections,
            &self.ticket_types,
            &[],
            ("seat_map.sections", "ticket_types"),
        )?;
        if total == 0 {
            return Err(invalid(
                "seat_map",
                "an event needs at least one section or ticket type",
            ));
        }
        check_capacity(total)?;
        Ok(total)
    }
}

/// Inserts the places of new sections (one row per seat) and ticket types (one row per place,
/// `admission = 'general'`), one statement each.
async fn insert_places(
    tx: &mut sqlx::PgConnection,
    event: i64,
    sections: &[Section],
    types: &[TicketType],
) -> Result<(), ApiError> {
    for section in sections {
        sqlx::query(
            "INSERT INTO seats (event_id, section, row_label, number, price_cents)
             SELECT $1, $2, r::text, n, $5
             FROM generate_series(1, $3) AS r, generate_series(1, $4) AS n
             ORDER BY r, n",
        )
        .bind(event)
        .bind(section.name.trim())
        .bind(section.rows)
        .bind(section.seats_per_row)
        .bind(section.price_cents)
        .execute(&mut *tx)
        .await?;
    }
    for kind in types {
        sqlx::query(
            "INSERT INTO seats (event_id, section, row_label, number, price_cents, admission)
             SELECT $1, $2, 'GA', n, $4, 'general' FROM generate_series(1, $3) AS n",
        )
        .bind(event)
        .bind(kind.name.trim())
        .bind(kind.capacity)
        .bind(kind.price_cents)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "UPDATE events SET (min_price_cents, max_price_cents) =
             (SELECT min(price_cents), max(price_cents) FROM seats WHERE event_id = $1)
         WHERE id = $1",
    )
    .bind(event)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Availability of one price tier: a section at a price, or a general-admission ticket type.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Tier {
    pub name: String,
    /// "seated" or "general".
    pub admission: String,
    pub price_cents: i64,
    pub total: i64,
    pub available: i64,
    pub sold: i64,
}

#[derive(Debug, Serialize)]
pub struct EventPage {
    #[serde(flatten)]
    pub event: SaleEvent,
    pub description: String,
    pub city: String,
    pub category: String,
    pub min_price_cents: Option<i64>,
    pub max_price_cents: Option<i64>,
    /// Fans may refund until this many hours before the start (absent: no fan refunds).
    pub fan_refund_cutoff_hours: Option<i32>,
    pub seats_total: i64,
    pub seats_available: i64,
    pub seats_sold: i64,
    pub tiers: Vec<Tier>,
}

#[instrument(skip_all)]
async fn create_event(
    State(state): State<AppState>,
    _organizer: Organizer,
    Json(request): Json<CreateEvent>,
) -> Result<(StatusCode, Json<EventPage>), ApiError> {
    let total = request.validate()?;
    let s = &request.sale;
    let d = &request;
    let mut tx = state.pg.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO events (name, venue, starts_at, presale_opens_at, sale_starts_at,
             sale_ends_at, rate_per_minute, max_active, pass_ttl_secs, claim_window_secs,
             seats_per_fan, anonymous_allowed, description, city, category,
             fan_refund_cutoff_hours)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
         RETURNING id",
    )
    .bind(request.name.trim())
    .bind(d.venue.trim())
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
    .bind(d.description.trim())
    .bind(d.city.trim())
    .bind(d.category.trim())
    .bind(request.fan_refund_cutoff_hours)
    .fetch_one(&mut *tx)
    .await?;
    insert_places(
        &mut tx,
        id,
        &request.seat_map.sections,
        &request.ticket_types,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(event = id, places = total, "event created");
    let event_id = EventId::from_path(id)?;
    Ok((StatusCode::CREATED, Json(page(&state, event_id).await?)))
}

/// A change to an event: any of its details, and sections or ticket types added or removed.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateEvent {
    pub name: Option<String>,
    pub description: Option<String>,
    pub venue: Option<String>,
    pub city: Option<String>,
    pub category: Option<String>,
    pub starts_at: Option<DateTime<Utc>>,
    /// Hours before the start until which fans may refund; -1 withdraws fan refunds.
    pub fan_refund_cutoff_hours: Option<i32>,
    #[serde(default)]
    pub add_sections: Vec<Section>,
    #[serde(default)]
    pub add_ticket_types: Vec<TicketType>,
    /// Names of sections or ticket types to take off sale: refused (409) while any of their
    /// places is held, sold or was ever sold.
    #[serde(default)]
    pub remove: Vec<String>,
}

#[instrument(skip_all, fields(event = id))]
async fn update_event(
    State(state): State<AppState>,
    _organizer: Organizer,
    Path(id): Path<i64>,
    Json(change): Json<UpdateEvent>,
) -> Result<Json<EventPage>, ApiError> {
    let event_id = EventId::from_path(id)?;
    if let Some(name) = &change.name {
        check_name(name)?;
    }
    check_details(
        change.description.as_deref(),
        change.venue.as_deref(),
        change.city.as_deref(),
        change.category.as_deref(),
    )?;
    if change.fan_refund_cutoff_hours != Some(-1) {
        check_cutoff(change.fan_refund_cutoff_hours)?;
    }
    if change.starts_at.is_some_and(|t| t <= Utc::now()) {
        return Err(invalid("starts_at", "must be in the future"));
    }
    let mut tx = state.pg.begin().await?;
    // The event's row lock orders concurrent changes of its seat map.
    let found: Option<i64> = sqlx::query_scalar("SELECT id FROM events WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    if found.is_none() {
        return Err(ApiError::NotFound(
            "event_not_found",
            format!("no event {id}"),
        ));
    }
    let existing: Vec<(String, i64)> =
        sqlx::query_as("SELECT section, count(*) FROM seats WHERE event_id = $1 GROUP BY section")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
    for (i, name) in change.remove.iter().enumerate() {
        if !existing.iter().any(|(n, _)| n == name) {
            return Err(invalid(
                &format!("remove[{i}]"),
                &format!("no section or ticket type named {name:?}"),
            ));
        }
    }
    let kept: Vec<String> = existing
        .iter()
        .filter(|(n, _)| !change.remove.contains(n))
        .map(|(n, _)| n.clone())
        .collect();
    let added = validate_places(
        &change.add_sections,
        &change.add_ticket_types,
        &kept,
        ("add_sections", "add_ticket_types"),
    )?;
    let remaining: i64 = existing
        .iter()
        .filter(|(n, _)| !change.remove.contains(n))
        .map(|(_, c)| c)
        .sum();
    check_capacity(remaining + added)?;
    if remaining + added == 0 {
        return Err(invalid(
            "remove",
            "an event needs at least one section or ticket type",
        ));
    }
    if !change.remove.is_empty() {
        // Lock the places in id order, like every hold, then refuse if any is in use or has
        // ever had a ticket (valid or void: each kind has its own partial index, 0021).
        let in_use: Vec<String> = sqlx::query_scalar(
            "WITH locked AS (
                 SELECT id, section, status, held_until FROM seats
                 WHERE event_id = $1 AND section = ANY($2) ORDER BY id FOR UPDATE)
             SELECT DISTINCT section FROM locked l
             WHERE l.status = 'sold'
                OR (l.status = 'held' AND l.held_until >= now())
                OR EXISTS (SELECT 1 FROM tickets t WHERE t.seat_id = l.id AND t.status = 'valid')
                OR EXISTS (SELECT 1 FROM tickets t WHERE t.seat_id = l.id AND t.status = 'void')",
        )
        .bind(id)
        .bind(&change.remove)
        .fetch_all(&mut *tx)
        .await?;
        if !in_use.is_empty() {
            return Err(ApiError::Conflict(
                "places_in_use",
                format!("remove: {in_use:?} have places held or sold; they cannot leave the map"),
            ));
        }
        sqlx::query("DELETE FROM seats WHERE event_id = $1 AND section = ANY($2)")
            .bind(id)
            .bind(&change.remove)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(
        "UPDATE events SET name = COALESCE($2, name), description = COALESCE($3, description),
             venue = COALESCE($4, venue), city = COALESCE($5, city),
             category = COALESCE($6, category), starts_at = COALESCE($7, starts_at),
             fan_refund_cutoff_hours = CASE WHEN $8::int IS NULL THEN fan_refund_cutoff_hours
                                            WHEN $8 = -1 THEN NULL ELSE $8 END
         WHERE id = $1",
    )
    .bind(id)
    .bind(change.name.as_deref().map(str::trim))
    .bind(change.description.as_deref().map(str::trim))
    .bind(change.venue.as_deref().map(str::trim))
    .bind(change.city.as_deref().map(str::trim))
    .bind(change.category.as_deref().map(str::trim))
    .bind(change.starts_at)
    .bind(change.fan_refund_cutoff_hours)
    .execute(&mut *tx)
    .await?;
    insert_places(&mut tx, id, &change.add_sections, &change.add_ticket_types).await?;
    // New places reopen a sold-out line: the admission controller reads this (Postgres)
    // before each tick.
    if added > 0 {
        sqlx::query(
            "UPDATE events SET sold_out_at = NULL WHERE id = $1 AND sold_out_at IS NOT NULL",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    tracing::info!(
        event = id,
        added,
        removed = change.remove.len(),
        "event updated"
    );
    Ok(Json(page(&state, event_id).await?))
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
    let (description, city, category, min_price_cents, max_price_cents, fan_refund_cutoff_hours): (
        String,
        String,
        String,
        Option<i64>,
        Option<i64>,
        Option<i32>,
    ) = sqlx::query_as(
        "SELECT description, city, category, min_price_cents, max_price_cents,
                fan_refund_cutoff_hours
         FROM events WHERE id = $1",
    )
    .bind(id.get())
    .fetch_one(&state.pg)
    .await?;
    let tiers: Vec<Tier> = sqlx::query_as(
        "SELECT section AS name, admission, price_cents, count(*) AS total,
                count(*) FILTER (WHERE status = 'available'
                                 OR (status = 'held' AND held_until < now())) AS available,
                count(*) FILTER (WHERE status = 'sold') AS sold
         FROM seats WHERE event_id = $1
         GROUP BY section, admission, price_cents
         ORDER BY min(id)",
    )
    .bind(id.get())
    .fetch_all(&state.pg)
    .await?;
    Ok(EventPage {
        event,
        description,
        city,
        category,
        min_price_cents,
        max_price_cents,
        fan_refund_cutoff_hours,
        seats_total: tiers.iter().map(|t| t.total).sum(),
        seats_available: tiers.iter().map(|t| t.available).sum(),
        seats_sold: tiers.iter().map(|t| t.sold).sum(),
        tiers,
    })
}
