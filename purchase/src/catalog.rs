//! The public catalog (`GET /api/v1/events`): upcoming events, searched by text (Postgres
//! full-text search over name, venue, city, category and description, ranked) and filtered by
//! category, city, date range and price range. Paged by `offset`/`limit`.

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::event::invalid;
use shared::extract::{Json, Query};
use shared::ApiError;
use tracing::instrument;

use crate::AppState;

pub const MAX_LIMIT: i64 = 100;
const MAX_OFFSET: i64 = 10_000;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/events", get(catalog))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogQuery {
    /// Words to look for (web-search syntax: `"exact phrase"`, `-excluded`, `or`).
    pub q: Option<String>,
    pub category: Option<String>,
    pub city: Option<String>,
    /// Events starting at or after (default: now).
    pub from: Option<DateTime<Utc>>,
    /// Events starting before.
    pub to: Option<DateTime<Utc>>,
    /// Events with a place at this price or more.
    pub min_price_cents: Option<i64>,
    /// Events with a place at this price or less.
    pub max_price_cents: Option<i64>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

impl CatalogQuery {
    fn validate(&self) -> Result<(), ApiError> {
        if self.q.as_deref().is_some_and(|q| q.chars().count() > 200) {
            return Err(invalid("q", "must be at most 200 characters"));
        }
        for (field, value) in [("category", &self.category), ("city", &self.city)] {
            if value.as_deref().is_some_and(|v| v.chars().count() > 100) {
                return Err(invalid(field, "must be at most 100 characters"));
            }
        }
        if let (Some(from), Some(to)) = (self.from, self.to) {
            if from >= to {
                return Err(invalid("to", "must be after `from`"));
            }
        }
        for (field, value) in [
            ("min_price_cents", self.min_price_cents),
            ("max_price_cents", self.max_price_cents),
        ] {
            if value.is_some_and(|v| v < 0) {
                return Err(invalid(field, "must not be negative"));
            }
        }
        if let (Some(lo), Some(hi)) = (self.min_price_cents, self.max_price_cents) {
            if lo > hi {
                return Err(invalid(
                    "max_price_cents",
                    "must be at least min_price_cents",
                ));
            }
        }
        if self.limit.is_some_and(|l| !(1..=MAX_LIMIT).contains(&l)) {
            return Err(invalid("limit", &format!("must be 1 to {MAX_LIMIT}")));
        }
        if self.offset.is_some_and(|o| !(0..=MAX_OFFSET).contains(&o)) {
            return Err(invalid("offset", &format!("must be 0 to {MAX_OFFSET}")));
        }
        Ok(())
    }
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct Listing {
    pub id: i64,
    pub name: String,
    pub description: String,
    pub venue: String,
    pub city: String,
    pub category: String,
    pub starts_at: DateTime<Utc>,
    pub presale_opens_at: DateTime<Utc>,
    pub sale_starts_at: DateTime<Utc>,
    pub sale_ends_at: DateTime<Utc>,
    pub min_price_cents: Option<i64>,
    pub max_price_cents: Option<i64>,
    pub sold_out: bool,
}

#[derive(Debug, Serialize)]
pub struct Catalog {
    pub events: Vec<Listing>,
    /// The `offset` of the next page, if there is one.
    pub next_offset: Option<i64>,
}

#[instrument(skip_all)]
async fn catalog(
    State(state): State<AppState>,
    Query(query): Query<CatalogQuery>,
) -> Result<Json<Catalog>, ApiError> {
    query.validate()?;
    let limit = query.limit.unwrap_or(20);
    let offset = query.offset.unwrap_or(0);
    let text = query.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let mut events: Vec<Listing> = sqlx::query_as(
        "SELECT id, name, description, venue, city, category, starts_at, presale_opens_at,
                sale_starts_at, sale_ends_at, min_price_cents, max_price_cents,
                sold_out_at IS NOT NULL AS sold_out
         FROM events
         WHERE ($1::text IS NULL OR search @@ websearch_to_tsquery('english', $1))
           AND ($2::text IS NULL OR lower(category) = lower($2))
           AND ($3::text IS NULL OR lower(city) = lower($3))
           AND starts_at >= COALESCE($4, now())
           AND ($5::timestamptz IS NULL OR starts_at < $5)
           AND ($6::bigint IS NULL OR max_price_cents >= $6)
           AND ($7::bigint IS NULL OR min_price_cents <= $7)
         ORDER BY CASE WHEN $1::text IS NULL THEN 0
                       ELSE ts_rank(search, websearch_to_tsquery('english', $1)) END DESC,
                  starts_at, id
         LIMIT $8 OFFSET $9",
    )
    .bind(text)
    .bind(query.category.as_deref().map(str::trim))
    .bind(query.city.as_deref().map(str::trim))
    .bind(query.from)
    .bind(query.to)
    .bind(query.min_price_cents)
    .bind(query.max_price_cents)
    .bind(limit + 1)
    .bind(offset)
    .fetch_all(&state.pg)
    .await?;
    let more = events.len() as i64 > limit;
    events.truncate(limit as usize);
    Ok(Json(Catalog {
        events,
        next_offset: more.then_some(offset + limit),
    }))
}
