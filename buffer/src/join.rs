//! `POST /api/v1/events/{id}/join`: a fan takes a place in an event's line.
//!
//! Before presale: 425. During presale: the join is buffered for the draw. After the draw: the
//! fan goes to the back of the queue. After the sale: 410. Presenting the ticket already held
//! returns the same place (a second tab, a retry), never a second one. Every acknowledged join,
//! with its place for a live arrival, is committed to Postgres before the answer is sent; the
//! answer never waits for Redis, which only mirrors the place (`mirror`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::event::{SaleEvent, SalePhase};
use shared::extract::{Json, OptionalJson, Path};
use shared::ids::{EventId, Identity, TicketId};
use shared::ratelimit::KeyedLimit;
use shared::token::{TicketClaims, TokenKind};
use shared::ApiError;
use tokio_util::sync::CancellationToken;
use tracing::instrument;
use uuid::Uuid;

use crate::draw::ensure_commitment;
use crate::ingest::{JoinRow, Joined, ReceiptTerms};
use crate::{AppState, Config};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/events/{id}/join", post(join))
}

#[derive(Clone)]
pub struct JoinLimits {
    per_ip: Option<KeyedLimit<IpAddr>>,
    per_identity: Option<KeyedLimit<String>>,
}

impl JoinLimits {
    pub fn new(config: &Config) -> Self {
        let per_ip = (config.join_limit_per_ip > 0).then(|| {
            KeyedLimit::per_minute(
                config.join_limit_per_ip,
                (config.join_limit_per_ip / 10).max(5),
                "IP address",
            )
        });
        // A burst of 20 lets a fan's tabs and devices all ask at once and get the same place.
        let per_identity = (config.join_limit_per_identity > 0).then(|| {
            KeyedLimit::per_minute(
                config.join_limit_per_identity,
                (config.join_limit_per_identity / 3).max(20),
                "identity",
            )
        });
        JoinLimits {
            per_ip,
            per_identity,
        }
    }

    fn check_identity(&self, identity: &str) -> Result<(), ApiError> {
        match &self.per_identity {
            Some(limit) => limit.check(&identity.to_owned()),
            None => Ok(()),
        }
    }
}

pub async fn prune_limits(state: AppState, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {
                if let Some(limit) = &state.limits.per_ip {
                    limit.retain_recent();
                }
                if let Some(limit) = &state.limits.per_identity {
                    limit.retain_recent();
                }
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The signed queue ticket already held, to get the same place back.
    pub ticket: Option<String>,
    /// An identity assertion signed by the organizer's site (see `identity.rs`).
    pub identity: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct JoinResponse {
    pub event_id: i64,
    pub ticket_id: Uuid,
    /// Signed queue ticket: present it to the waiting room; keep it secret.
    pub ticket: String,
    /// Signed join receipt: check it against the published draw.
    pub receipt: String,
    /// "buffered" (waiting for the draw), "queued" (has a position) or "left" (gave the place
    /// up).
    pub status: &'static str,
    pub position: Option<i64>,
    pub joined_at: DateTime<Utc>,
    /// Hex SHA-256 commitment to the draw seed.
    pub commitment: String,
    pub sale_starts_at: DateTime<Utc>,
    /// True when the fan already had this place.
    pub resumed: bool,
}

#[instrument(skip_all, fields(event = id))]
async fn join(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<i64>,
    OptionalJson(request): OptionalJson<JoinRequest>,
) -> Result<(StatusCode, Json<JoinResponse>), ApiError> {
    if let Some(limit) = &state.limits.per_ip {
        limit.check(&peer.ip())?;
    }
    let event_id = EventId::from_path(id)?;
    let event = state.events.get(&state.pg, event_id).await?;
    match event.phase(Utc::now()) {
        SalePhase::NotOpen => {
            return Err(ApiError::TooEarly(
                "presale_not_open",
                format!(
                    "the line for this event opens at {}",
                    event.presale_opens_at.to_rfc3339()
                ),
            ))
        }
        SalePhase::Over => {
            return Err(ApiError::Gone(
                "sale_over",
                format!("the sale ended at {}", event.sale_ends_at.to_rfc3339()),
            ))
        }
        SalePhase::Presale | SalePhase::OnSale => {}
    }
    if event.sold_out_at.is_some() {
        return Err(ApiError::Gone(
            "sold_out",
            "every seat of this event has been sold".into(),
        ));
    }
    let commitment = ensure_commitment(&state, event_id).await?;
    let terms = ReceiptTerms {
        commitment,
        expires_at: (event.sale_ends_at + chrono::Duration::days(365)).timestamp(),
    };

    let Joined {
        row,
        resumed,
        receipt,
    } = match (request.ticket.as_deref(), request.identity.as_deref()) {
        (Some(token), _) => {
            let claims = state
                .verifier
                .verify_ticket(token, event_id)
                .map_err(|e| e.into_api(TokenKind::Ticket))?;
            state.limits.check_identity(&claims.sub)?;
            let row = existing_join(&state, claims.tkt).await?;
            let receipt = shared::receipt::sign_batch(
                &state.signer,
                &[terms.claims(&state.signer, event_id, &row)],
            )?
            .pop()
            .ok_or_else(|| ApiError::internal("no receipt signed"))?;
            Joined {
                row,
                resumed: true,
                receipt,
            }
        }
        (None, Some(assertion)) => {
            let verifier = state.identities.as_ref().ok_or_else(|| {
                ApiError::BadRequest(
                    "identity_not_supported",
                    "this deployment accepts no identity assertions; join without one".into(),
                )
            })?;
            let identity = verifier.verify(assertion, event_id)?;
            state.limits.check_identity(identity.as_str())?;
            state
                .writer
                .join(event_id, TicketId::mint(), identity, terms)
                .await?
        }
        (None, None) => {
            if !event.anonymous_allowed {
                return Err(ApiError::Unauthorized(
                    "identity_required",
                    "this event admits only signed-in fans".into(),
                ));
            }
            let ticket = TicketId::mint();
            state
                .writer
                .join(event_id, ticket, Identity::anonymous(ticket), terms)
                .await?
        }
    };

    let ticket = TicketId(row.ticket_id);
    // Live arrivals got their place with their row. A presale fan coming back after the draw
    // learns where the draw put them (it is not written per fan: see `draw`).
    let position = match row.position {
        None if resumed && row.phase == "presale" => {
            match crate::draw::order(&state, event_id).await? {
                Some(order) => order.position_of(row.ticket_id).await?,
                None => None,
            }
        }
        position => position,
    };

    let response = JoinResponse {
        event_id: id,
        ticket_id: row.ticket_id,
        ticket: sign_ticket(&state, &event, ticket, &row)?,
        receipt,
        status: if row.left {
            "left"
        } else if position.is_some() {
            "queued"
        } else {
            "buffered"
        },
        position,
        joined_at: row.joined_at,
        commitment: hex::encode(commitment),
        sale_starts_at: event.sale_starts_at,
        resumed,
    };
    let status = if resumed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    metrics::counter!("buffer_joins_total", "resumed" => resumed.to_string()).increment(1);
    Ok((status, Json(response)))
}

async fn existing_join(state: &AppState, ticket: TicketId) -> Result<JoinRow, ApiError> {
    sqlx::query_as::<_, JoinRow>(
        "SELECT ticket_id, event_id, identity, joined_at, position, phase,
                left_at IS NOT NULL AS left
         FROM joins WHERE ticket_id = $1",
    )
    .bind(ticket.0)
    .fetch_optional(&state.pg)
    .await?
    .ok_or_else(|| {
        ApiError::NotFound(
            "ticket_not_found",
            "this ticket's place no longer exists".into(),
        )
    })
}

fn sign_ticket(
    state: &AppState,
    event: &SaleEvent,
    ticket: TicketId,
    row: &JoinRow,
) -> Result<String, ApiError> {
    let iat = row.joined_at.timestamp();
    let claims = TicketClaims {
        iss: state.signer.issuer().to_owned(),
        aud: TokenKind::Ticket.audience().to_owned(),
        sub: row.identity.clone(),
        evt: event.event_id(),
        tkt: ticket,
        iat,
        nbf: iat,
        exp: (event.sale_ends_at + chrono::Duration::days(1)).timestamp(),
    };
    state.signer.sign(TokenKind::Ticket, &claims)
}
