//! The organizer's sale-window API: read and change an event's window and admission settings
//! (`GET`/`PUT /api/v1/organizer/events/{id}/sale`). Each value is checked on its own (422
//! naming the field) and against the sale's progress (409): once presale has opened its opening
//! time is history; once the draw has run, the sale's start is too; the seats a fan may buy cannot
//! drop below what one fan already holds or bought. The update takes the draw's
//! advisory lock, so it cannot interleave with a draw in progress.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::routing::get;
use axum::Router;
use chrono::Utc;
use shared::event::{invalid, SaleEvent, SaleSettings};
use shared::extract::{Json, Path};
use shared::ids::EventId;
use shared::ApiError;
use tracing::instrument;

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route(
        "/api/v1/organizer/events/{id}/sale",
        get(read_window).put(update_window),
    )
}

/// Proof the caller presented the organizer token.
pub struct Organizer;

impl FromRequestParts<AppState> for Organizer {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state.organizer.check(parts).map(|()| Organizer)
    }
}

#[instrument(skip_all, fields(event = id))]
async fn read_window(
    State(state): State<AppState>,
    _organizer: Organizer,
    Path(id): Path<i64>,
) -> Result<Json<SaleSettings>, ApiError> {
    let event = SaleEvent::load(&state.pg, EventId::from_path(id)?).await?;
    Ok(Json(SaleSettings::from(&event)))
}

#[instrument(skip_all, fields(event = id))]
async fn update_window(
    State(state): State<AppState>,
    _organizer: Organizer,
    Path(id): Path<i64>,
    Json(next): Json<SaleSettings>,
) -> Result<Json<SaleSettings>, ApiError> {
    let event_id = EventId::from_path(id)?;
    next.validate("")?;
    let mut tx = state.pg.begin().await?;
    shared::db::lock_draw(&mut tx, event_id, true).await?;
    let current = SaleSettings::from(&SaleEvent::load(&state.pg, event_id).await?);
    let drawn: bool = sqlx::query_scalar(
        "SELECT COALESCE((SELECT drawn_at IS NOT NULL FROM draws WHERE event_id = $1), false)",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    check_progress(&current, &next, drawn)?;
    if next.seats_per_fan < current.seats_per_fan {
        check_seats_per_fan(&mut tx, event_id, next.seats_per_fan).await?;
    }
    sqlx::query(
        "UPDATE events SET presale_opens_at = $2, sale_starts_at = $3, sale_ends_at = $4,
             rate_per_minute = $5, max_active = $6, pass_ttl_secs = $7,
             claim_window_secs = $8, seats_per_fan = $9, anonymous_allowed = $10
         WHERE id = $1",
    )
    .bind(id)
    .bind(next.presale_opens_at)
    .bind(next.sale_starts_at)
    .bind(next.sale_ends_at)
    .bind(next.rate_per_minute)
    .bind(next.max_active)
    .bind(next.pass_ttl_secs)
    .bind(next.claim_window_secs)
    .bind(next.seats_per_fan)
    .bind(next.anonymous_allowed)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    state.events.forget(event_id);
    tracing::info!(event = id, "sale window updated");
    Ok(Json(next))
}

/// Lowering the seats a fan may buy below what one fan already holds or bought would break the
/// rule for sales already made: 409 naming the figure.
async fn check_seats_per_fan(
    tx: &mut sqlx::PgConnection,
    event: EventId,
    wanted: i32,
) -> Result<(), ApiError> {
    let most: i32 = sqlx::query_scalar(
        "SELECT COALESCE(max(cardinality(h.seat_ids)), 0) FROM holds h
         WHERE h.event_id = $1
           AND (h.status IN ('active', 'paying')
                OR EXISTS (SELECT 1 FROM orders o WHERE o.hold_id = h.id AND o.status = 'paid'))",
    )
    .bind(event.get())
    .fetch_one(tx)
    .await?;
    if wanted < most {
        return Err(ApiError::Conflict(
            "below_sold",
            format!(
                "seats_per_fan: a fan already holds or bought {most} seats; \
                 the limit cannot go below that"
            ),
        ));
    }
    Ok(())
}

/// Changes the sale's progress forbids.
fn check_progress(
    current: &SaleSettings,
    next: &SaleSettings,
    drawn: bool,
) -> Result<(), ApiError> {
    let now = Utc::now();
    if drawn && next.sale_starts_at != current.sale_starts_at {
        return Err(ApiError::Conflict(
            "draw_done",
            "sale_starts_at: the draw has run; the sale's start can no longer move".into(),
        ));
    }
    if drawn && next.presale_opens_at != current.presale_opens_at {
        return Err(ApiError::Conflict(
            "draw_done",
            "presale_opens_at: the draw has run; the presale can no longer move".into(),
        ));
    }
    let presale_open = now >= current.presale_opens_at;
    if presale_open && next.presale_opens_at != current.presale_opens_at {
        return Err(ApiError::Conflict(
            "presale_open",
            "presale_opens_at: presale has opened and fans have joined; it can no longer move"
                .into(),
        ));
    }
    if !drawn && next.sale_starts_at != current.sale_starts_at && next.sale_starts_at <= now {
        return Err(invalid(
            "sale_starts_at",
            "a new sale start must be in the future (the draw runs at it)",
        ));
    }
    if next.presale_opens_at != current.presale_opens_at && next.presale_opens_at <= now {
        return Err(invalid(
            "presale_opens_at",
            "a new presale opening must be in the future",
        ));
    }
    if next.sale_ends_at != current.sale_ends_at && next.sale_ends_at <= now {
        return Err(invalid(
            "sale_ends_at",
            "a new sale end must be in the future (pause admission to stop a sale now)",
        ));
    }
    if next.anonymous_allowed != current.anonymous_allowed && presale_open {
        return Err(ApiError::Conflict(
            "presale_open",
            "anonymous_allowed: fans have joined under the current rule; it can no longer change"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(offset_mins: i64) -> SaleSettings {
        let now = Utc::now();
        SaleSettings {
            presale_opens_at: now + chrono::Duration::minutes(offset_mins),
            sale_starts_at: now + chrono::Duration::minutes(offset_mins + 10),
            sale_ends_at: now + chrono::Duration::minutes(offset_mins + 60),
            rate_per_minute: 100,
            max_active: 10,
            pass_ttl_secs: 600,
            claim_window_secs: 60,
            seats_per_fan: 2,
            anonymous_allowed: true,
        }
    }

    #[test]
    fn a_running_sale_refuses_changes_to_its_past() {
        let open = settings(-5);
        let mut moved = open.clone();
        moved.presale_opens_at += chrono::Duration::minutes(1);
        assert_eq!(
            check_progress(&open, &moved, false).map_err(|e| e.code()),
            Err("presale_open")
        );
        let mut later_start = open.clone();
        later_start.sale_starts_at += chrono::Duration::minutes(1);
        assert!(check_progress(&open, &later_start, false).is_ok());
        assert_eq!(
            check_progress(&open, &later_start, true).map_err(|e| e.code()),
            Err("draw_done")
        );
        let mut faster = open.clone();
        faster.rate_per_minute = 500;
        assert!(
            check_progress(&open, &faster, true).is_ok(),
            "rates change any time"
        );
    }

    #[test]
    fn a_future_sale_may_move_but_not_into_the_past() {
        let future = settings(30);
        let mut sooner = future.clone();
        sooner.presale_opens_at = Utc::now() - chrono::Duration::minutes(1);
        assert_eq!(
            check_progress(&future, &sooner, false).map_err(|e| e.code()),
            Err("invalid_field")
        );
        let mut later = future.clone();
        later.presale_opens_at += chrono::Duration::minutes(5);
        later.sale_starts_at += chrono::Duration::minutes(5);
        assert!(check_progress(&future, &later, false).is_ok());
    }
}
