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

use crate::autotune::Settings;
use crate::hub::read_state;
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/operator/events/{id}/stats", get(stats))
        .route("/api/v1/operator/events/{id}/controls", patch(controls))
        .route("/api/v1/operator/events/{id}/message", put(message))
        .route(
            "/api/v1/operator/events/{id}/autotune",
            get(autotune_show).put(autotune_set),
        )
        .route("/api/v1/operator/events/{id}/audit", get(audit_trail))
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

/// An operator (by name) or the organizer (`"organizer"`): who may set autotune.
pub struct Steerer(pub String);

impl FromRequestParts<AppState> for Steerer {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match state.operators.check(parts) {
            Ok(name) => Ok(Steerer(name)),
            Err(operator) => match state.organizer.check(parts) {
                Ok(()) => Ok(Steerer("organizer".to_owned())),
                // Both roles closed: the operator's 403; otherwise the credentials' 401.
                Err(ApiError::Forbidden(..)) => Err(operator),
                Err(organizer) => Err(match operator {
                    ApiError::Forbidden(..) => organizer,
                    _ => operator,
                }),
            },
        }
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
    /// Autotune's state (`off` unless switched on) and its latest reason.
    pub autotune: String,
    pub autotune_why: Option<String>,
    /// Places not sold yet, as the admission leader last counted them.
    pub places_left: Option<i64>,
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
    let tune: Option<(bool, String, Option<String>)> =
        sqlx::query_as("SELECT enabled, state, why FROM autotune WHERE event_id = $1")
            .bind(id)
            .fetch_optional(&state.pg)
            .await?;
    let (autotune, autotune_why) = match tune {
        Some((true, state, why)) => (state, why),
        Some((false, _, why)) => ("off".to_owned(), why),
        None => ("off".to_owned(), None),
    };
    let waiting = (q.tail - q.head).max(0);
    Ok(Json(Stats {
        autotune,
        autotune_why,
        places_left: q.places_left,
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
    if change.rate_per_minute.is_some() || change.max_active.is_some() {
        // A manual change of the rate or the cap wins at once: autotune stops moving them
        // until switched on again.
        let stopped = sqlx::query(
            "UPDATE autotune SET enabled = false, state = 'off', why = $2
             WHERE event_id = $1 AND enabled",
        )
        .bind(id)
        .bind(format!("switched off by {actor}'s manual change"))
        .execute(&mut *tx)
        .await?;
        if stopped.rows_affected() > 0 {
            audit_with_reason(
                &mut tx,
                id,
                &actor,
                "autotune",
                &serde_json::json!({ "enabled": true }),
                &serde_json::json!({ "enabled": false }),
                Some("manual change of the controls"),
            )
            .await?;
        }
    }
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
    audit_with_reason(tx, event, actor, action, before, after, None).await
}

async fn audit_with_reason(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    event: i64,
    actor: &str,
    action: &str,
    before: &impl Serialize,
    after: &impl Serialize,
    reason: Option<&str>,
) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO operator_audit (event_id, actor, action, before, after, reason)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(event)
    .bind(actor)
    .bind(action)
    .bind(serde_json::to_value(before).map_err(ApiError::internal)?)
    .bind(serde_json::to_value(after).map_err(ApiError::internal)?)
    .bind(reason)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Autotune of an event: its settings, state and latest changes.
#[derive(Debug, Serialize, Deserialize)]
pub struct AutotuneView {
    pub settings: Option<Settings>,
    pub state: String,
    pub why: Option<String>,
    pub decided_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The latest changes autotune made, newest first.
    pub changes: Vec<AuditEntry>,
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct AuditEntry {
    pub at: chrono::DateTime<chrono::Utc>,
    pub actor: String,
    pub action: String,
    pub before: serde_json::Value,
    pub after: serde_json::Value,
    pub reason: Option<String>,
}

async fn view(state: &AppState, id: i64) -> Result<AutotuneView, ApiError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        settings: Settings,
        state: String,
        why: Option<String>,
        decided_at: Option<chrono::DateTime<chrono::Utc>>,
    }
    let row: Option<Row> = sqlx::query_as(
        "SELECT enabled, target_p99_ms, target_error_rate, rate_floor, rate_ceiling, cap_floor,
                cap_ceiling, state, why, decided_at
         FROM autotune WHERE event_id = $1",
    )
    .bind(id)
    .fetch_optional(&state.pg)
    .await?;
    let changes = sqlx::query_as(
        "SELECT at, actor, action, before, after, reason FROM operator_audit
         WHERE event_id = $1 AND action IN ('auto', 'autotune') ORDER BY id DESC LIMIT 20",
    )
    .bind(id)
    .fetch_all(&state.pg)
    .await?;
    Ok(match row {
        Some(r) => AutotuneView {
            state: if r.settings.enabled {
                r.state
            } else {
                "off".to_owned()
            },
            settings: Some(r.settings),
            why: r.why,
            decided_at: r.decided_at,
            changes,
        },
        None => AutotuneView {
            settings: None,
            state: "off".to_owned(),
            why: None,
            decided_at: None,
            changes,
        },
    })
}

#[instrument(skip_all, fields(event = id))]
async fn autotune_show(
    State(state): State<AppState>,
    _who: Steerer,
    Path(id): Path<i64>,
) -> Result<Json<AutotuneView>, ApiError> {
    let event_id = EventId::from_path(id)?;
    SaleEvent::load(&state.pg, event_id).await?;
    Ok(Json(view(&state, id).await?))
}

/// Switches autotune on or off and sets its target and bounds. Switching on starts from the
/// controls as they are (brought inside the bounds by the law's own steps: no burst).
#[instrument(skip_all, fields(event = id))]
async fn autotune_set(
    State(state): State<AppState>,
    Steerer(actor): Steerer,
    Path(id): Path<i64>,
    Json(next): Json<Settings>,
) -> Result<Json<AutotuneView>, ApiError> {
    let event_id = EventId::from_path(id)?;
    next.validate()?;
    let mut tx = state.pg.begin().await?;
    sqlx::query_scalar::<_, i64>("SELECT id FROM events WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ApiError::NotFound("event_not_found", format!("no event {id}")))?;
    let before: Option<sqlx::types::Json<serde_json::Value>> = sqlx::query_scalar(
        "SELECT to_jsonb(a) - 'event_id' - 'state' - 'why' - 'decided_at' - 'lowered_at'
         FROM autotune a WHERE event_id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO autotune (event_id, enabled, target_p99_ms, target_error_rate, rate_floor,
                               rate_ceiling, cap_floor, cap_ceiling, state, why)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $2 THEN 'holding' ELSE 'off' END, $9)
         ON CONFLICT (event_id) DO UPDATE SET
             enabled = EXCLUDED.enabled, target_p99_ms = EXCLUDED.target_p99_ms,
             target_error_rate = EXCLUDED.target_error_rate, rate_floor = EXCLUDED.rate_floor,
             rate_ceiling = EXCLUDED.rate_ceiling, cap_floor = EXCLUDED.cap_floor,
             cap_ceiling = EXCLUDED.cap_ceiling, state = EXCLUDED.state, why = EXCLUDED.why",
    )
    .bind(id)
    .bind(next.enabled)
    .bind(next.target_p99_ms)
    .bind(next.target_error_rate)
    .bind(next.rate_floor)
    .bind(next.rate_ceiling)
    .bind(next.cap_floor)
    .bind(next.cap_ceiling)
    .bind(format!(
        "switched {} by {actor}",
        if next.enabled { "on" } else { "off" }
    ))
    .execute(&mut *tx)
    .await?;
    audit(&mut tx, id, &actor, "autotune", &before.map(|b| b.0), &next).await?;
    tx.commit().await?;
    tracing::info!(event = id, %actor, ?next, "autotune set");
    broadcast(&state, event_id).await;
    Ok(Json(view(&state, id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<i64>,
}

/// The event's audit trail, newest first: operators' changes and autotune's, with reasons.
#[instrument(skip_all, fields(event = id))]
async fn audit_trail(
    State(state): State<AppState>,
    _operator: Operator,
    Path(id): Path<i64>,
    shared::extract::Query(q): shared::extract::Query<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let event_id = EventId::from_path(id)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1_000).contains(&limit) {
        return Err(invalid("limit", "must be 1 to 1000"));
    }
    SaleEvent::load(&state.pg, event_id).await?;
    Ok(Json(
        sqlx::query_as(
            "SELECT at, actor, action, before, after, reason FROM operator_audit
             WHERE event_id = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(id)
        .bind(limit)
        .fetch_all(&state.pg)
        .await?,
    ))
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
