//! Passes: issued to admitted fans, recorded in Postgres (one per ticket), signed with Ed25519.
//! Re-issuing returns the same pass: the claims come from the stored row and Ed25519 signatures
//! are deterministic, so no token needs storing. Public keys are at `/.well-known/jwks.json`.
//!
//! Whether a fan may have a pass is Postgres's decision alone, in the transaction that records
//! it: their place must have an `admissions` row (the controller admitted it) whose claim
//! window has not passed; claiming turns the place's slot into one that lasts as long as the
//! pass. Nothing here reads the serving head from Redis, so a Redis that lost its data can
//! neither refuse a fan admitted a moment ago nor let in one whose turn has not come.

use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::event::SaleEvent;
use shared::extract::{Json, Path};
use shared::ids::{EventId, Position, TicketId};
use shared::token::{Jwks, PassClaims, TicketClaims, TokenKind};
use shared::ApiError;
use tracing::instrument;
use uuid::Uuid;

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/api/v1/events/{id}/pass", post(claim))
}

async fn jwks(State(state): State<AppState>) -> Json<Jwks> {
    Json(state.signer.jwks())
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IssuedPass {
    pub pass: String,
    pub jti: Uuid,
    pub expires_at: DateTime<Utc>,
    pub seat_limit: i32,
}

#[derive(sqlx::FromRow)]
struct PassRow {
    jti: Uuid,
    identity: String,
    seat_limit: i32,
    issued_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

/// A place's admission as the claim reads it.
#[derive(sqlx::FromRow)]
struct Admitted {
    claim_by: DateTime<Utc>,
    /// The ticket whose pass took the place, once claimed.
    claimed_by: Option<Uuid>,
    /// The claim window is still open.
    open: bool,
    now: DateTime<Utc>,
}

/// The pass of an admitted ticket: the one already issued, or a new one if its place was
/// admitted and the claim window has not passed (its slot then lives as long as the pass).
#[instrument(skip_all, fields(event = %ticket.evt, ticket = %ticket.tkt))]
pub async fn issue(
    state: &AppState,
    event: &SaleEvent,
    ticket: &TicketClaims,
    position: Position,
) -> Result<IssuedPass, ApiError> {
    if let Some(row) = stored_pass(state, ticket.tkt).await? {
        return sign(state, event, ticket, row);
    }
    let mut tx = state.pg.begin().await?;
    let admission: Option<Admitted> = sqlx::query_as(
        "SELECT claim_by, ticket_id AS claimed_by, claim_by > now() AS open, now() AS now
         FROM admissions WHERE event_id = $1 AND position = $2 FOR UPDATE",
    )
    .bind(event.id)
    .bind(position.get())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(Admitted {
        claim_by,
        claimed_by,
        open,
        now,
    }) = admission
    else {
        tx.rollback().await?;
        return Err(not_admitted(state, event, ticket, position).await?);
    };
    match claimed_by {
        // Claimed by this ticket in a transaction that committed after our first read.
        Some(t) if t == ticket.tkt.0 => {
            tx.rollback().await?;
            let row = stored_pass(state, ticket.tkt)
                .await?
                .ok_or_else(|| ApiError::internal("a claimed place has no pass"))?;
            return sign(state, event, ticket, row);
        }
        Some(_) => {
            return Err(ApiError::Conflict(
                "place_claimed",
                "this place's pass was issued to another ticket".into(),
            ))
        }
        None if !open => {
            return Err(ApiError::Gone(
                "admission_lapsed",
                format!(
                    "your turn came at {} and was not claimed within {} seconds; the place has passed on",
                    (claim_by - chrono::Duration::seconds(i64::from(event.claim_window_secs)))
                        .to_rfc3339(),
                    event.claim_window_secs
                ),
            ))
        }
        None => {}
    }
    // Whole seconds: the token's `iat`/`exp` are seconds, and the row must sign identically.
    let issued = DateTime::<Utc>::from_timestamp(now.timestamp(), 0).unwrap_or(now);
    let expires = issued + chrono::Duration::seconds(i64::from(event.pass_ttl_secs));
    sqlx::query(
        "INSERT INTO passes (jti, event_id, ticket_id, identity, seat_limit, issued_at,
                             expires_at, kid, position)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(Uuid::now_v7())
    .bind(event.id)
    .bind(ticket.tkt.0)
    .bind(&ticket.sub)
    .bind(event.seats_per_fan)
    .bind(issued)
    .bind(expires)
    .bind(state.signer.kid())
    .bind(position.get())
    .execute(&mut *tx)
    .await
    .map_err(|e| match shared::error::violated_constraint(&e) {
        Some("passes_one_per_ticket") => ApiError::Conflict(
            "pass_issued",
            "this ticket's pass was issued a moment ago; ask again".into(),
        ),
        _ => ApiError::from(e),
    })?;
    sqlx::query(
        "UPDATE admissions SET ticket_id = $3, claimed_at = now(), slot_until = $4
         WHERE event_id = $1 AND position = $2",
    )
    .bind(event.id)
    .bind(position.get())
    .bind(ticket.tkt.0)
    .bind(expires)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let row = stored_pass(state, ticket.tkt)
        .await?
        .ok_or_else(|| ApiError::internal("a pass just recorded is missing"))?;
    metrics::counter!("queue_passes_issued_total").increment(1);
    sign(state, event, ticket, row)
}

/// Why a place without an admission has no pass: the fan left, or their turn has not come.
async fn not_admitted(
    state: &AppState,
    event: &SaleEvent,
    ticket: &TicketClaims,
    position: Position,
) -> Result<ApiError, ApiError> {
    let (left, head): (bool, i64) = sqlx::query_as(
        "SELECT COALESCE((SELECT left_at IS NOT NULL FROM joins WHERE ticket_id = $1), false),
                COALESCE((SELECT head FROM admission_state WHERE event_id = $2), 0)",
    )
    .bind(ticket.tkt.0)
    .bind(event.id)
    .fetch_one(&state.pg)
    .await?;
    Ok(if left {
        ApiError::Gone(
            "left_queue",
            "this ticket left the line; its place has passed on".into(),
        )
    } else {
        ApiError::Conflict(
            "not_admitted_yet",
            format!(
                "not your turn yet: {} fans are ahead of you",
                (position.get() - head - 1).max(0)
            ),
        )
    })
}

async fn stored_pass(state: &AppState, ticket: TicketId) -> Result<Option<PassRow>, ApiError> {
    Ok(sqlx::query_as::<_, PassRow>(
        "SELECT jti, identity, seat_limit, issued_at, expires_at FROM passes WHERE ticket_id = $1",
    )
    .bind(ticket.0)
    .fetch_optional(&state.pg)
    .await?)
}

/// Signs the pass recorded in `row` (deterministically: the same row gives the same token).
fn sign(
    state: &AppState,
    event: &SaleEvent,
    ticket: &TicketClaims,
    row: PassRow,
) -> Result<IssuedPass, ApiError> {
    let claims = PassClaims {
        iss: state.signer.issuer().to_owned(),
        aud: TokenKind::Pass.audience().to_owned(),
        sub: row.identity,
        evt: event.event_id(),
        tkt: ticket.tkt,
        jti: row.jti,
        iat: row.issued_at.timestamp(),
        nbf: row.issued_at.timestamp(),
        exp: row.expires_at.timestamp(),
        lim: u32::try_from(row.seat_limit).unwrap_or(1),
    };
    metrics::counter!("queue_passes_signed_total").increment(1);
    Ok(IssuedPass {
        pass: state.signer.sign(TokenKind::Pass, &claims)?,
        jti: row.jti,
        expires_at: row.expires_at,
        seat_limit: row.seat_limit,
    })
}

/// The event named by the path and the fan's verified ticket for it (401/403 otherwise).
pub fn ticket_for(
    state: &AppState,
    id: i64,
    token: &str,
) -> Result<(EventId, TicketClaims), ApiError> {
    let event = EventId::from_path(id)?;
    let ticket = state
        .verifier
        .verify_ticket(token, event)
        .map_err(|e| e.into_api(TokenKind::Ticket))?;
    Ok((event, ticket))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimRequest {
    ticket: String,
}

/// `POST /api/v1/events/{id}/pass`: a fan who was offline at their turn claims the pass with
/// their signed ticket (never just a ticket id, which is public once the draw is published).
#[instrument(skip_all, fields(event = id))]
async fn claim(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Json(request): Json<ClaimRequest>,
) -> Result<Json<IssuedPass>, ApiError> {
    let (event_id, ticket) = ticket_for(&state, id, &request.ticket)?;
    let event = SaleEvent::load(&state.pg, event_id).await?;
    let position = state
        .positions
        .of(event_id, ticket.tkt)
        .await?
        .ok_or_else(|| {
            ApiError::Conflict(
                "not_in_queue_yet",
                "this ticket has no queue position yet (the draw has not run)".into(),
            )
        })?;
    Ok(Json(issue(&state, &event, &ticket, position).await?))
}
