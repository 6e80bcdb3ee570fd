//! `POST /api/v1/events/{id}/leave`: a fan gives up their place. Before the draw they leave the
//! draw's entrant set (decided under the draw lock, so the published order stays recomputable);
//! after it their position is skipped by the admission controller and takes no one's slot.

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use fred::prelude::*;
use serde::{Deserialize, Serialize};
use shared::extract::{Json, Path};
use shared::ApiError;
use tracing::instrument;

use crate::pass::{position_of, ticket_for};
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/events/{id}/leave", post(leave))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaveRequest {
    ticket: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Left {
    pub left: bool,
    /// True when the fan left before the draw (and so is not among its entrants).
    pub before_draw: bool,
}

#[instrument(skip_all, fields(event = id))]
async fn leave(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Json(request): Json<LeaveRequest>,
) -> Result<Json<Left>, ApiError> {
    let (event, ticket) = ticket_for(&state, id, &request.ticket)?;
    let mut tx = state.pg.begin().await?;
    shared::db::lock_draw(&mut tx, event, false).await?;
    let drawn: bool = sqlx::query_scalar(
        "SELECT COALESCE((SELECT drawn_at IS NOT NULL FROM draws WHERE event_id = $1), false)",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    if !drawn {
        sqlx::query(
            "UPDATE joins SET left_at = COALESCE(left_at, now()), left_before_draw = true
             WHERE ticket_id = $1 AND phase = 'presale'",
        )
        .bind(ticket.tkt.0)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        return Ok(Json(Left {
            left: true,
            before_draw: true,
        }));
    }
    tx.commit().await?;

    let position = position_of(&state, event, ticket.tkt)
        .await?
        .ok_or_else(|| {
            ApiError::Conflict(
                "not_in_queue_yet",
                "the queue is being set up after the draw; retry in a moment".into(),
            )
        })?;
    let keys = state.redis.keys(event);
    let head: Option<i64> = state.redis.client().get(keys.head()).await?;
    if position.get() <= head.unwrap_or(0) {
        return Err(ApiError::Conflict(
            "already_admitted",
            "your turn has already come; simply do not use your pass".into(),
        ));
    }
    // Durable first (a rebuilt queue restores it), then the position the controller skips.
    sqlx::query("UPDATE joins SET left_at = COALESCE(left_at, now()) WHERE ticket_id = $1")
        .bind(ticket.tkt.0)
        .execute(&state.pg)
        .await?;
    let _: i64 = state
        .redis
        .client()
        .sadd(keys.left(), position.get())
        .await?;
    metrics::counter!("queue_fans_left_total").increment(1);
    Ok(Json(Left {
        left: true,
        before_draw: false,
    }))
}
