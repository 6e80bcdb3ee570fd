//! Read-only views for staff: support looks up a fan's orders by identity
//! (`GET /api/v1/support/orders?identity=…`), the organizer reads an event's sales report
//! (`GET /api/v1/organizer/events/{id}/report`: sold, revenue, by price tier, per minute).

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::event::SaleEvent;
use shared::extract::{Json, Path, Query};
use shared::ids::{EventId, Identity};
use shared::ApiError;
use tracing::instrument;
use uuid::Uuid;

use crate::organizer::Organizer;
use crate::refunds::Staff;
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/support/orders", get(fan_orders))
        .route("/api/v1/organizer/events/{id}/report", get(report))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FanQuery {
    identity: String,
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct FanOrder {
    pub order_id: Uuid,
    pub event_id: i64,
    pub status: String,
    pub total_cents: i64,
    pub seat_ids: Vec<i64>,
    pub created_at: DateTime<Utc>,
    pub refunded_at: Option<DateTime<Utc>>,
    pub refunded_by: Option<String>,
}

#[instrument(skip_all)]
async fn fan_orders(
    State(state): State<AppState>,
    _staff: Staff,
    Query(query): Query<FanQuery>,
) -> Result<Json<Vec<FanOrder>>, ApiError> {
    let identity = Identity::new(query.identity).ok_or_else(|| {
        ApiError::Unprocessable(
            "invalid_field",
            "identity: 1 to 200 printable characters".into(),
        )
    })?;
    let orders = sqlx::query_as::<_, FanOrder>(
        "SELECT o.id AS order_id, o.event_id, o.status, o.total_cents,
                COALESCE(array_agg(t.seat_id ORDER BY t.seat_id)
                         FILTER (WHERE t.seat_id IS NOT NULL), '{}') AS seat_ids,
                o.created_at, o.refunded_at, o.refunded_by
         FROM orders o LEFT JOIN tickets t ON t.order_id = o.id
         WHERE o.identity = $1
         GROUP BY o.id ORDER BY o.created_at DESC LIMIT 200",
    )
    .bind(identity.as_str())
    .fetch_all(&state.pg)
    .await?;
    Ok(Json(orders))
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct Tier {
    pub price_cents: i64,
    pub seats: i64,
    pub sold: i64,
    pub revenue_cents: i64,
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct Minute {
    pub minute: DateTime<Utc>,
    pub orders: i64,
    pub seats: i64,
    pub revenue_cents: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub event_id: i64,
    pub seats: i64,
    pub sold: i64,
    pub revenue_cents: i64,
    pub orders_paid: i64,
    pub orders_refunded: i64,
    pub by_tier: Vec<Tier>,
    pub per_minute: Vec<Minute>,
}

#[instrument(skip_all, fields(event = id))]
async fn report(
    State(state): State<AppState>,
    _organizer: Organizer,
    Path(id): Path<i64>,
) -> Result<Json<Report>, ApiError> {
    SaleEvent::load(&state.pg, EventId::from_path(id)?).await?;
    let by_tier = sqlx::query_as::<_, Tier>(
        "SELECT price_cents, count(*) AS seats,
                count(*) FILTER (WHERE status = 'sold') AS sold,
                (COALESCE(sum(price_cents) FILTER (WHERE status = 'sold'), 0))::bigint
                    AS revenue_cents
         FROM seats WHERE event_id = $1 GROUP BY price_cents ORDER BY price_cents DESC",
    )
    .bind(id)
    .fetch_all(&state.pg)
    .await?;
    let per_minute = sqlx::query_as::<_, Minute>(
        "SELECT date_trunc('minute', o.created_at) AS minute, count(DISTINCT o.id) AS orders,
                count(t.code) AS seats, (COALESCE(sum(s.price_cents), 0))::bigint AS revenue_cents
         FROM orders o
         JOIN tickets t ON t.order_id = o.id AND t.status = 'valid'
         JOIN seats s ON s.id = t.seat_id
         WHERE o.event_id = $1 AND o.status = 'paid'
         GROUP BY 1 ORDER BY 1",
    )
    .bind(id)
    .fetch_all(&state.pg)
    .await?;
    let (orders_paid, orders_refunded): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'paid'),
                count(*) FILTER (WHERE status IN ('refunding', 'refunded'))
         FROM orders WHERE event_id = $1",
    )
    .bind(id)
    .fetch_one(&state.pg)
    .await?;
    Ok(Json(Report {
        event_id: id,
        seats: by_tier.iter().map(|t| t.seats).sum(),
        sold: by_tier.iter().map(|t| t.sold).sum(),
        revenue_cents: by_tier.iter().map(|t| t.revenue_cents).sum(),
        orders_paid,
        orders_refunded,
        by_tier,
        per_minute,
    }))
}
