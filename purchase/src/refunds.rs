//! Refunds by support staff (or the organizer): `POST /api/v1/support/orders/{order_id}/refund`.
//! In one transaction the order's tickets are voided and its seats return to sale (locked in id
//! order, like every other seat change), and the event is no longer sold out; the order is then
//! `refunding`. The provider refund follows the commit (no lock held across it) and marks the
//! order `refunded`; if that call is interrupted, reconciliation finishes it. A seat is therefore
//! never on two valid tickets, and money is returned only for seats back on sale.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use shared::extract::{Json, Path};
use shared::ids::EventId;
use shared::ApiError;
use tracing::instrument;
use uuid::Uuid;

use crate::seats::lock_seats;
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/support/orders/{order_id}/refund", post(refund))
}

/// Support staff by name, or the organizer.
pub struct Staff(pub String);

impl FromRequestParts<AppState> for Staff {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match state.support.check(parts) {
            Ok(name) => Ok(Staff(name)),
            Err(support_refusal) => state
                .organizer
                .check(parts)
                .map(|()| Staff("organizer".into()))
                .map_err(|_| support_refusal),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Refunded {
    pub order_id: Uuid,
    pub status: String,
    pub seats_returned: Vec<i64>,
}

#[instrument(skip_all, fields(order = %order_id))]
async fn refund(
    State(state): State<AppState>,
    Staff(actor): Staff,
    Path(order_id): Path<Uuid>,
) -> Result<Json<Refunded>, ApiError> {
    Ok(Json(
        refund_order(&state, order_id, Refunder::Staff(actor)).await?,
    ))
}

/// Who asks for a refund: staff always may; a fan only within the event's refund rule.
pub enum Refunder {
    Staff(String),
    Fan,
}

/// Voids an order's tickets, returns its seats and refunds its payment (see the module doc).
/// Who asked is recorded; a fan is held to the event's rule: fan refunds offered, and asked
/// before the cut-off ahead of the event's start.
pub async fn refund_order(
    state: &AppState,
    order_id: Uuid,
    refunder: Refunder,
) -> Result<Refunded, ApiError> {
    let actor = match &refunder {
        Refunder::Staff(name) => name.clone(),
        Refunder::Fan => "fan".to_owned(),
    };
    let mut tx = state.pg.begin().await?;
    let (event_id, status, payment_ref): (i64, String, String) =
        sqlx::query_as("SELECT event_id, status, payment_ref FROM orders WHERE id = $1 FOR UPDATE")
            .bind(order_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| ApiError::NotFound("order_not_found", "no such order".into()))?;
    if status != "paid" {
        return Err(ApiError::Conflict(
            "already_refunded",
            format!("this order is already {status}"),
        ));
    }
    if matches!(refunder, Refunder::Fan) {
        let (cutoff, starts_at): (Option<i32>, chrono::DateTime<chrono::Utc>) =
            sqlx::query_as("SELECT fan_refund_cutoff_hours, starts_at FROM events WHERE id = $1")
                .bind(event_id)
                .fetch_one(&mut *tx)
                .await?;
        let Some(hours) = cutoff else {
            return Err(ApiError::Forbidden(
                "refunds_not_offered",
                "this event's organizer does not offer refunds to fans; ask support".into(),
            ));
        };
        let deadline = starts_at - chrono::Duration::hours(i64::from(hours));
        if chrono::Utc::now() >= deadline {
            return Err(ApiError::Conflict(
                "refund_window_closed",
                format!(
                    "refunds closed {hours} hours before the event, at {}",
                    deadline.to_rfc3339()
                ),
            ));
        }
    }
    let event = EventId::new(event_id).ok_or_else(|| ApiError::internal("bad event id"))?;
    let seat_ids: Vec<i64> = sqlx::query_scalar(
        "SELECT seat_id FROM tickets WHERE order_id = $1 AND status = 'valid' ORDER BY seat_id",
    )
    .bind(order_id)
    .fetch_all(&mut *tx)
    .await?;
    lock_seats(&mut tx, Some(event), &seat_ids).await?;
    sqlx::query("UPDATE tickets SET status = 'void' WHERE order_id = $1")
        .bind(order_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE seats SET status = 'available', hold_id = NULL, held_until = NULL
         WHERE id = ANY($1) AND status = 'sold'",
    )
    .bind(&seat_ids)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE orders SET status = 'refunding', refunded_at = now(), refunded_by = $2
         WHERE id = $1",
    )
    .bind(order_id)
    .bind(&actor)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE events SET sold_out_at = NULL WHERE id = $1")
        .bind(event_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO outbox (event_id, identity, order_id, kind, payload)
         SELECT event_id, identity, id, 'order_refunded',
                jsonb_build_object('order_id', id, 'seats_returned', $2::bigint[],
                                   'total_cents', total_cents)
         FROM orders WHERE id = $1",
    )
    .bind(order_id)
    .bind(&seat_ids)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    crate::live::seats_changed(state, event, &seat_ids, "available");
    tracing::info!(%actor, seats = seat_ids.len(), "order refunded; seats back on sale");
    let status = match finish_refund(state, order_id, &payment_ref).await {
        Ok(()) => "refunded",
        Err(e) => {
            tracing::warn!(error = %e, "provider refund pending; reconciliation retries it");
            "refunding"
        }
    };
    metrics::counter!("purchase_refunds_total").increment(1);
    metrics::counter!("fairgate_refunds_total", "event" => event.to_string()).increment(1);
    Ok(Refunded {
        order_id,
        status: status.into(),
        seats_returned: seat_ids,
    })
}

/// Returns the money of an order whose seats are already back on sale.
pub async fn finish_refund(
    state: &AppState,
    order_id: Uuid,
    payment_ref: &str,
) -> Result<(), ApiError> {
    state
        .payments
        .refund(payment_ref)
        .await
        .map_err(|e| ApiError::Unavailable("payment_unavailable", e.to_string()))?;
    sqlx::query("UPDATE payments SET status = 'refunded' WHERE provider_ref = $1")
        .bind(payment_ref)
        .execute(&state.pg)
        .await?;
    sqlx::query("UPDATE orders SET status = 'refunded' WHERE id = $1 AND status = 'refunding'")
        .bind(order_id)
        .execute(&state.pg)
        .await?;
    Ok(())
}
