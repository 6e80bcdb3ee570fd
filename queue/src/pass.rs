//! Passes: issued to admitted fans, recorded in Postgres (one per ticket), signed with Ed25519.
//! Re-issuing returns the same pass: the claims come from the stored row and Ed25519 signatures
//! are deterministic, so no token needs storing. Public keys are at `/.well-known/jwks.json`.

use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use std::sync::LazyLock;

use fred::prelude::*;
use fred::types::scripts::Script;
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

static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
-- KEYS: slots   ARGV: position, ticket id, pass expiry (ms)
-- 1 if the ticket holds (or now takes over) a live admission slot; 0 if its admission lapsed.
if redis.call('ZSCORE', KEYS[1], 't:' .. ARGV[2]) then
  return 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lapse = redis.call('ZSCORE', KEYS[1], 'p:' .. ARGV[1])
if lapse and tonumber(lapse) > now then
  redis.call('ZREM', KEYS[1], 'p:' .. ARGV[1])
  redis.call('ZADD', KEYS[1], ARGV[3], 't:' .. ARGV[2])
  return 1
end
return 0
"#,
    )
});

/// The pass of an admitted ticket: the one already issued, or a new one if the admission has not
/// lapsed (its slot then lives as long as the pass).
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
    let left: bool = sqlx::query_scalar(
        "SELECT COALESCE((SELECT left_at IS NOT NULL FROM joins WHERE ticket_id = $1), false)",
    )
    .bind(ticket.tkt.0)
    .fetch_one(&state.pg)
    .await?;
    if left {
        return Err(ApiError::Gone(
            "left_queue",
            "this ticket left the line; its place has passed on".into(),
        ));
    }
    let now = DateTime::<Utc>::from_timestamp(Utc::now().timestamp(), 0).unwrap_or_else(Utc::now);
    let expires = now + chrono::Duration::seconds(i64::from(event.pass_ttl_secs));
    let claimed: i64 = CLAIM
        .evalsha_with_reload(
            state.redis.client(),
            vec![state.redis.keys(event.event_id()).slots()],
            vec![
                position.get().to_string(),
                ticket.tkt.to_string(),
                expires.timestamp_millis().to_string(),
            ],
        )
        .await?;
    if claimed == 0 {
        return Err(ApiError::Gone(
            "admission_lapsed",
            format!(
                "your turn came and was not claimed within {} seconds; the place has passed on",
                event.claim_window_secs
            ),
        ));
    }
    sqlx::query(
        "INSERT INTO passes (jti, event_id, ticket_id, identity, seat_limit, issued_at,
                             expires_at, kid)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT ON CONSTRAINT passes_one_per_ticket DO NOTHING",
    )
    .bind(Uuid::now_v7())
    .bind(event.id)
    .bind(ticket.tkt.0)
    .bind(&ticket.sub)
    .bind(event.seats_per_fan)
    .bind(now)
    .bind(expires)
    .bind(state.signer.kid())
    .execute(&state.pg)
    .await?;
    let row = stored_pass(state, ticket.tkt)
        .await?
        .ok_or_else(|| ApiError::internal("a pass just recorded is missing"))?;
    metrics::counter!("queue_passes_issued_total").increment(1);
    sign(state, event, ticket, row)
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

/// The ticket's queue position, if the draw has placed it.
pub async fn position_of(
    state: &AppState,
    event: EventId,
    ticket: TicketId,
) -> Result<Option<Position>, ApiError> {
    let score: Option<f64> = state
        .redis
        .client()
        .zscore(state.redis.keys(event).queue(), ticket.to_string())
        .await?;
    Ok(score.and_then(|s| Position::new(s as i64)))
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
    let position = position_of(&state, event_id, ticket.tkt)
        .await?
        .ok_or_else(|| {
            ApiError::Conflict(
                "not_in_queue_yet",
                "this ticket has no queue position yet (the draw has not run)".into(),
            )
        })?;
    let head: Option<i64> = state
        .redis
        .client()
        .get(state.redis.keys(event_id).head())
        .await?;
    let head = head.unwrap_or(0);
    if position.get() > head {
        return Err(ApiError::Conflict(
            "not_admitted_yet",
            format!(
                "not your turn yet: {} fans are ahead of you",
                position.get() - head - 1
            ),
        ));
    }
    Ok(Json(issue(&state, &event, &ticket, position).await?))
}
