//! Seats and holds. A hold takes 1..limit seats all-or-nothing: the seats' rows are locked in id
//! order (so two holds never deadlock), each must be free (available, or held by a hold that has
//! expired, or by this pass's previous hold, which the new one replaces), and the hold keeps them
//! for `hold_ttl_secs`. Expired holds come back by themselves: every check treats a seat whose
//! `held_until` has passed as free, and a sweeper resets such rows.
//!
//! A pass has at most one hold that is active or being paid for, so its held seats never exceed
//! its limit: a new hold replaces the active one, a pass whose hold is being paid for is refused
//! (409 `checkout_in_progress`) until that checkout ends, and two holds of one pass at the same
//! moment are taken one after the other (an advisory lock of the pass, migration 0041).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::Router;
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use shared::extract::{Json, Path};
use shared::ids::EventId;
use shared::ApiError;
use tokio_util::sync::CancellationToken;
use tracing::instrument;
use uuid::Uuid;

use crate::hold_writer::{HoldOutcome, NewGeneralHold, NewHold};
use crate::passgate::Pass;
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/events/{id}/seats", get(seat_map))
        .route("/api/v1/events/{id}/holds", post(hold))
        .route("/api/v1/events/{id}/holds/{hold_id}", delete(release))
}

/// The fan's seat page: plain HTML, CSS and JS in one file, no external assets. The pass comes
/// in the URL fragment from the waiting room (never sent to a server).
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct SeatView {
    pub id: i64,
    pub section: String,
    pub row_label: String,
    pub number: i32,
    pub price_cents: i64,
    /// "available", "held" or "sold".
    pub status: String,
}

#[instrument(skip_all, fields(event = %pass.event))]
async fn seat_map(
    State(state): State<AppState>,
    pass: Pass,
) -> Result<Json<Vec<SeatView>>, ApiError> {
    let _turn = state
        .seat_map_reads
        .acquire()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let seats = sqlx::query_as::<_, SeatView>(
        "SELECT id, section, row_label, number, price_cents,
                CASE WHEN status = 'held' AND held_until < now() THEN 'available'
                     ELSE status END AS status
         FROM seats WHERE event_id = $1 AND admission = 'seated' ORDER BY id",
    )
    .bind(pass.event.get())
    .fetch_all(&state.pg)
    .await?;
    Ok(Json(seats))
}

/// A hold of named seats (`seat_ids`), or of a quantity of general-admission places of one
/// ticket type (`ticket_type` and `quantity`).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HoldRequest {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seat_ids: Vec<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<i64>,
}

/// What a hold asks for, once checked.
enum Wanted {
    Seats(Vec<i64>),
    General { ticket_type: String, quantity: i64 },
}

impl HoldRequest {
    fn wanted(&self, limit: usize) -> Result<Wanted, ApiError> {
        match (&self.ticket_type, self.quantity, self.seat_ids.is_empty()) {
            (None, None, false) => {
                let mut seat_ids = self.seat_ids.clone();
                if seat_ids.len() > limit {
                    return Err(ApiError::Unprocessable(
                        "invalid_field",
                        format!("seat_ids: must name 1 to {limit} seats (this pass's limit)"),
                    ));
                }
                seat_ids.sort_unstable();
                seat_ids.dedup();
                if seat_ids.len() != self.seat_ids.len() {
                    return Err(ApiError::Unprocessable(
                        "invalid_field",
                        "seat_ids: names a seat twice".into(),
                    ));
                }
                Ok(Wanted::Seats(seat_ids))
            }
            (Some(ticket_type), Some(quantity), true) => {
                if ticket_type.trim().is_empty() || ticket_type.chars().count() > 50 {
                    return Err(ApiError::Unprocessable(
                        "invalid_field",
                        "ticket_type: must be 1 to 50 characters".into(),
                    ));
                }
                if !(1..=limit as i64).contains(&quantity) {
                    return Err(ApiError::Unprocessable(
                        "invalid_field",
                        format!("quantity: must be 1 to {limit} (this pass's limit)"),
                    ));
                }
                Ok(Wanted::General {
                    ticket_type: ticket_type.trim().to_owned(),
                    quantity,
                })
            }
            _ => Err(ApiError::Unprocessable(
                "invalid_field",
                "seat_ids: name 1 or more seats, or give ticket_type and quantity (not both)"
                    .into(),
            )),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
pub struct HoldView {
    pub hold_id: Uuid,
    pub seat_ids: Vec<i64>,
    pub expires_at: DateTime<Utc>,
    pub total_cents: i64,
}

/// Locks the given seats (of `event`, if given) in id order, the one order every transaction
/// uses, so two of them never deadlock. Returns the ids locked.
pub(crate) async fn lock_seats(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    event: Option<EventId>,
    seat_ids: &[i64],
) -> Result<Vec<i64>, ApiError> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM seats WHERE id = ANY($2) AND ($1::bigint IS NULL OR event_id = $1)
         ORDER BY id FOR UPDATE",
    )
    .bind(event.map(EventId::get))
    .bind(seat_ids)
    .fetch_all(&mut **tx)
    .await?)
}

/// Takes the hold in one round trip. Named seats go through the hold writer (group commit,
/// `hold_writer.rs`, migration 0019), general admission by quantity through its own writer
/// (migration 0024).
/// Either way the seats are locked in id order without waiting, checked, and held all or
/// nothing, replacing the pass's previous hold (see migrations 0013, 0014 and 0019).
#[instrument(skip_all, fields(event = %pass.event))]
async fn hold(
    State(state): State<AppState>,
    pass: Pass,
    Json(request): Json<HoldRequest>,
) -> Result<(StatusCode, Json<HoldView>), ApiError> {
    let wanted = request.wanted(pass.claims.lim as usize)?;
    let hold_id = Uuid::now_v7();
    // Whole microseconds, as Postgres keeps them: the answer matches what is stored.
    let expires_at = (Utc::now() + chrono::Duration::seconds(state.config.hold_ttl_secs as i64))
        .trunc_subsecs(6);
    let (outcome, ticket_type, quantity): (HoldOutcome, _, _) = match wanted {
        Wanted::Seats(seat_ids) => {
            let outcome = state
                .hold_writer
                .submit(NewHold {
                    event: pass.event.get(),
                    jti: pass.claims.jti,
                    seat_ids,
                    hold_id,
                    expires_at,
                })
                .await?;
            (outcome, None, None)
        }
        Wanted::General {
            ticket_type,
            quantity,
        } => {
            let outcome = state
                .general_hold_writer
                .submit(NewGeneralHold {
                    event: pass.event.get(),
                    jti: pass.claims.jti,
                    ticket_type: ticket_type.clone(),
                    quantity: quantity as i32,
                    hold_id,
                    expires_at,
                })
                .await?;
            (outcome, Some(ticket_type), Some(quantity as i32))
        }
    };
    let detail = outcome.detail.unwrap_or_default();
    let (Some(seat_ids), Some(mut freed), Some(total_cents)) =
        (outcome.seat_ids, outcome.freed, outcome.total_cents)
    else {
        return Err(hold_refusal(
            &outcome.code,
            &detail,
            ticket_type.as_deref(),
            quantity,
        ));
    };
    freed.retain(|id| !seat_ids.contains(id));
    crate::live::seats_changed(&state, pass.event, &freed, "available");
    crate::live::seats_changed(&state, pass.event, &seat_ids, "held");
    metrics::counter!("purchase_holds_total").increment(1);
    Ok((
        StatusCode::CREATED,
        Json(HoldView {
            hold_id,
            total_cents,
            seat_ids,
            expires_at,
        }),
    ))
}

/// The error for a hold `fg_hold` refused with `code`.
fn hold_refusal(
    code: &str,
    detail: &str,
    ticket_type: Option<&str>,
    quantity: Option<i32>,
) -> ApiError {
    let ticket_type = ticket_type.unwrap_or_default();
    match code {
        "pass_used" => ApiError::Conflict(
            "pass_used",
            "this pass has already been used for a purchase".into(),
        ),
        "hold_paying" => ApiError::Conflict(
            "checkout_in_progress",
            "this pass's hold is being paid for; hold other seats once that checkout has ended"
                .into(),
        ),
        "ticket_type_not_found" => ApiError::NotFound(
            "ticket_type_not_found",
            format!("this event has no general-admission ticket type {ticket_type:?}"),
        ),
        "not_enough_places" => ApiError::Conflict(
            "not_enough_places",
            format!(
                "{ticket_type}: {} wanted, {detail} left (others may be mid-purchase)",
                quantity.unwrap_or_default()
            ),
        ),
        "seat_not_found" => ApiError::NotFound(
            "seat_not_found",
            format!("no such seats in this event: [{detail}]"),
        ),
        "general_by_quantity" => ApiError::Unprocessable(
            "invalid_field",
            "seat_ids: general-admission places are held by ticket_type and quantity".into(),
        ),
        "seat_unavailable" => ApiError::Conflict(
            "seat_unavailable",
            format!("these seats are taken: [{detail}]"),
        ),
        other => ApiError::internal(format!("fg_hold answered {other:?}")),
    }
}

#[instrument(skip_all, fields(event = %pass.event))]
async fn release(
    State(state): State<AppState>,
    pass: Pass,
    Path((_, hold_id)): Path<(i64, Uuid)>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pg.begin().await?;
    let released = sqlx::query(
        "UPDATE holds SET status = 'released'
         WHERE id = $1 AND jti = $2 AND event_id = $3 AND status = 'active'",
    )
    .bind(hold_id)
    .bind(pass.claims.jti)
    .bind(pass.event.get())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if released == 0 {
        return Err(ApiError::NotFound(
            "hold_not_found",
            "this pass has no active hold with that id".into(),
        ));
    }
    let freed: Vec<i64> = sqlx::query_scalar(
        "UPDATE seats SET status = 'available', hold_id = NULL, held_until = NULL
         WHERE hold_id = $1 AND status = 'held' RETURNING id",
    )
    .bind(hold_id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    crate::live::seats_changed(&state, pass.event, &freed, "available");
    Ok(StatusCode::NO_CONTENT)
}

/// Returns the seats of expired holds to sale (they are already treated as free; this keeps the
/// table honest for reports and for the next hold's scan). The held seats are found event by
/// event through `seats_event_status`: a search on status alone read every seat ever created
/// (a sequential scan, 240 ms per sweep on 1,000,000 seats against 1.3 ms by event).
pub async fn run_hold_sweeper(state: AppState, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut tick =
        tokio::time::interval(Duration::from_millis(state.config.hold_sweep_ms.max(100)));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        sweep_once(&state).await;
    }
}

/// One sweep: expired holds' seats back on sale, and events whose every place is sold closed.
pub async fn sweep_once(state: &AppState) {
    let swept: Result<Vec<(i64, i64)>, _> = sqlx::query_as(
        "UPDATE seats SET status = 'available', hold_id = NULL, held_until = NULL
         WHERE event_id IN (SELECT id FROM events) AND status = 'held'
           AND held_until < now()
         RETURNING event_id, id",
    )
    .fetch_all(&state.pg)
    .await;
    match swept {
        Ok(rows) if !rows.is_empty() => {
            metrics::counter!("purchase_seats_returned_total").increment(rows.len() as u64);
            tracing::info!(seats = rows.len(), "expired holds returned to sale");
            let mut by_event: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
            for (event, seat) in rows {
                by_event.entry(event).or_default().push(seat);
            }
            for (event, seats) in by_event {
                if let Some(event) = EventId::new(event) {
                    crate::live::seats_changed(state, event, &seats, "available");
                }
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "hold sweep failed"),
    }
    // Two checkouts selling the last seats at once may each miss the other's commit; this
    // closes the line for them.
    if let Err(e) = sqlx::query(
        "UPDATE events e SET sold_out_at = now()
         WHERE sold_out_at IS NULL AND sale_ends_at > now()
           AND EXISTS (SELECT 1 FROM seats WHERE event_id = e.id)
           AND NOT EXISTS (SELECT 1 FROM seats WHERE event_id = e.id
                           AND status IN ('available', 'held'))",
    )
    .execute(&state.pg)
    .await
    {
        tracing::warn!(error = %e, "sold-out sweep failed");
    }
}
