//! The operator API: live statistics of an event's line and live controls — admission rate, cap
//! on active shoppers, pause/resume — and a short message to every waiter. Every change is
//! recorded in `operator_audit` with who made it and when, in the transaction that makes it, and
//! is pushed to every instance at once (the admission controller also re-reads controls every
//! tick).

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::routing::{get, patch, put};
use axum::Router;
use fred::prelude::*;
use serde::{Deserialize, Serialize};
use shared::event::{invalid, SaleEvent};
use shared::extract::{Json, Path};
use shared::ids::EventId;
use shared::ApiError;
use tracing::instrument;

use crate::hub::read_state;
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/operator/events/{id}/stats", get(stats))
        .route("/api/v1/operator/events/{id}/controls", patch(controls))
        .route("/api/v1/operator/events/{id}/message", put(message))
        .route("/operator/e/{id}", get(dashboard))
}

/// The operator dashboard: live figures and charts, the controls with the projected time to
/// drain the line shown before a change is applied. The page asks for the operator token and
/// sends it with each API call; the page itself is public.
async fn dashboard(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<axum::response::Html<String>, ApiError> {
    EventId::from_path(id)?;
    Ok(state
        .config
        .common
        .web
        .page(include_str!("operator.html"), serde_json::json!({})))
}

/// The operator who presented a valid token, by name.
pub struct Operator(pub String);

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state.operators.check(parts).map(Operator)
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Stats {
    pub event_id: i64,
    pub drawn: bool,
    pub paused: bool,
    pub sold_out: bool,
    /// In line and not yet admitted.
    pub waiting: i64,
    /// The serving head: every place up to it was admitted or given up.
    pub admitted: i64,
    /// Shoppers holding a slot now (admitted and unclaimed, or with a live pass).
    pub active: i64,
    pub max_active: i64,
    pub passes_issued: i64,
    /// Share of admissions whose claim window lapsed unclaimed.
    pub no_show_rate: f64,
    pub rate_per_minute: i64,
    /// Seconds until the last fan in line is admitted at the current rate (none while paused).
    pub eta_last_secs: Option<i64>,
    pub message: Option<String>,
}

#[instrument(skip_all, fields(event = id))]
async fn stats(
    State(state): State<AppState>,
    _operator: Operator,
    Path(id): Path<i64>,
) -> Result<Json<Stats>, ApiError> {
    let event_id = EventId::from_path(id)?;
    SaleEvent::load(&state.pg, event_id).await?;
    let q = read_state(&state.redis, &state.pg, event_id)
        .await
        .map_err(ApiError::internal)?;
    let (passes, admitted, lapsed): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM passes WHERE event_id = $1),
                (SELECT count(*) FROM admissions WHERE event_id = $1),
                (SELECT count(*) FROM admissions
                 WHERE event_id = $1 AND ticket_id IS NULL AND claim_by <= now())",
    )
    .bind(id)
    .fetch_one(&state.pg)
    .await?;
    let waiting = (q.tail - q.head).max(0);
    Ok(Json(Stats {
        event_id: id,
        drawn: q.drawn,
        paused: q.paused,
        sold_out: q.sold_out,
        waiting,
        admitted: q.head,
        active: q.active,
        max_active: q.max_active,
        passes_issued: passes,
        no_show_rate: if admitted > 0 {
            lapsed as f64 / admitted as f64
        } else {
            0.0
        },
        rate_per_minute: q.rate_per_minute,
        eta_last_secs: (!q.paused).then(|| waiting * 60 / q.rate_per_minute.max(1)),
        message: q.message,
    }))
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Controls {
    pub rate_per_minute: Option<i32>,
    pub max_active: Option<i32>,
    pub paused: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct ControlState {
    pub rate_per_minute: i32,
    pub max_active: i32,
    pub paused: bool,
}

#[instrument(skip_all, fields(event = id))]
async fn controls(
    State(state): State<AppState>,
    Operator(actor): Operator,
    Path(id): Path<i64>,
    Json(change): Json<Controls>,
) -> Result<Json<ControlState>, ApiError> {
    let event_id = EventId::from_path(id)?;
    if let Some(rate) = change.rate_per_minute {
        if !(1..=1_000_000).contains(&rate) {
            return Err(invalid("rate_per_minute", "must be 1 to 1000000"));
        }
    }
    if let Some(cap) = change.max_active {
        if !(1..=1_000_000).contains(&cap) {
            return Err(invalid("max_active", "must be 1 to 1000000"));
        }
    }
    let mut tx = state.pg.begin().await?;
    let before = sqlx::query_as::<_, ControlState>(
        "SELECT rate_per_minute, max_active, paused FROM events WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| ApiError::NotFound("event_not_found", format!("no event {id}")))?;
    let after = ControlState {
        rate_per_minute: change.rate_per_minute.unwrap_or(before.rate_per_minute),
        max_active: change.max_active.unwrap_or(before.max_active),
        paused: change.paused.unwrap_or(before.paused),
    };
    sqlx::query(
        "UPDATE events SET rate_per_minute = $2, max_active = $3, paused = $4 WHERE id = $1",
    )
    .bind(id)
    .bind(after.rate_per_minute)
    .bind(after.max_active)
    .bind(after.paused)
    .execute(&mut *tx)
    .await?;
    audit(&mut tx, id, &actor, "controls", &before, &after).await?;
    tx.commit().await?;
    tracing::info!(event = id, %actor, ?after, "operator changed controls");
    broadcast(&state, event_id).await;
    Ok(Json(after))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// The text every waiter sees; null or empty clears it.
    pub text: Option<String>,
}

#[instrument(skip_all, fields(event = id))]
async fn message(
    State(state): State<AppState>,
    Operator(actor): Operator,
    Path(id): Path<i64>,
    Json(next): Json<Message>,
) -> Result<Json<Message>, ApiError> {
    let event_id = EventId::from_path(id)?;
    let text = next
        .text
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    if let Some(t) = &text {
        if t.chars().count() > 280 || t.chars().any(char::is_control) {
            return Err(invalid("text", "must be at most 280 printable characters"));
        }
    }
    let mut tx = state.pg.begin().await?;
    let before: Option<Option<String>> =
        sqlx::query_scalar("SELECT message FROM events WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let before =
        before.ok_or_else(|| ApiError::NotFound("event_not_found", format!("no event {id}")))?;
    sqlx::query("UPDATE events SET message = $2 WHERE id = $1")
        .bind(id)
        .bind(&text)
        .execute(&mut *tx)
        .await?;
    audit(&mut tx, id, &actor, "message", &before, &text).await?;
    tx.commit().await?;
    broadcast(&state, event_id).await;
    Ok(Json(Message { text }))
}

async fn audit(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    event: i64,
    actor: &str,
    action: &str,
    before: &impl Serialize,
    after: &impl Serialize,
) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO operator_audit (event_id, actor, action, before, after)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(event)
    .bind(actor)
    .bind(action)
    .bind(serde_json::to_value(before).map_err(ApiError::internal)?)
    .bind(serde_json::to_value(after).map_err(ApiError::internal)?)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Pushes the event's fresh state to every instance's waiters now.
async fn broadcast(state: &AppState, event: EventId) {
    let published = async {
        let fresh = read_state(&state.redis, &state.pg, event).await?;
        let payload = serde_json::to_string(&fresh)?;
        let _: i64 = state
            .redis
            .client()
            .publish(state.redis.state_channel(), payload)
            .await?;
        anyhow::Ok(())
    };
    if let Err(e) = published.await {
        tracing::warn!(event = %event, error = %e, "could not broadcast the change; instances refresh within a second");
    }
}
