//! `POST /api/v1/events/{id}/leave`: a fan gives up their place. Before the draw they leave the
//! draw's entrant set (decided under the draw lock, so the published order stays recomputable);
//! after it their position is recorded as given up (`joins.left_position`) and the admission
//! controller passes over it, taking no one's slot. The leave and the admission tick serialise
//! on the event's `admission_state` row, so a fan is either admitted or gone, never both.

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use shared::extract::{Json, Path};
use shared::ApiError;
use tracing::instrument;

use crate::pass::ticket_for;
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

    let position = state
        .positions
        .of(event, ticket.tkt)
        .await?
        .ok_or_else(|| {
            ApiError::Conflict(
                "not_in_queue_yet",
                "this ticket has no place in the line".into(),
            )
        })?;
    let mut tx = state.pg.begin().await?;
    let head: i64 =
        sqlx::query_scalar("SELECT head FROM admission_state WHERE event_id = $1 FOR SHARE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .unwrap_or(0);
    if position.get() <= head {
        return Err(ApiError::Conflict(
            "already_admitted",
            "your turn has already come; simply do not use your pass".into(),
        ));
    }
    sqlx::query(
        "UPDATE joins SET left_at = COALESCE(left_at, now()), left_position = $2
         WHERE ticket_id = $1",
    )
    .bind(ticket.tkt.0)
    .bind(position.get())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    metrics::counter!("queue_fans_left_total").increment(1);
    Ok(Json(Left {
        left: true,
        before_draw: false,
    }))
}
