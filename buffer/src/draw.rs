//! The draw: at `sale_starts_at`, every presale join is shuffled into positions 1..N with the
//! event's secret seed (algorithm `fairgate-draw-v1`, see `shared::draw`). The seed's SHA-256
//! commitment is published from presale; the seed and the resulting order after the draw.
//!
//! Exactly once: the draw runs in one Postgres transaction holding the event's exclusive advisory
//! lock (joins hold it shared), and only if `draws.drawn_at` is still null. A crash before commit
//! leaves nothing; after commit, the Redis queue is (re)built from Postgres by whoever notices it
//! missing, so a crash between the two is repaired by the next scheduler tick.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use fred::prelude::*;
use serde::Serialize;
use shared::event::{SaleEvent, SalePhase};
use shared::extract::{Json, Path};
use shared::ids::{EventId, Seed};
use shared::ApiError;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::instrument;
use uuid::Uuid;

use crate::{queue_store, AppState};

/// Advisory-lock class of "the draw of event N" (the second key is the event id).
pub(crate) const DRAW_LOCK_CLASS: i32 = 0x6667_0001;

/// Commitments never change once created, so each instance remembers them.
#[derive(Clone, Default)]
pub struct CommitmentCache(Arc<Mutex<HashMap<EventId, [u8; 32]>>>);

impl CommitmentCache {
    fn get(&self, event: EventId) -> Option<[u8; 32]> {
        self.0.lock().ok()?.get(&event).copied()
    }
    fn put(&self, event: EventId, commitment: [u8; 32]) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(event, commitment);
        }
    }
}

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/events/{id}/draw", get(published_draw))
}

/// The event's draw commitment, creating the secret seed on first use.
pub async fn ensure_commitment(state: &AppState, event: EventId) -> Result<[u8; 32], ApiError> {
    if let Some(c) = state.commitments.get(event) {
        return Ok(c);
    }
    let seed = Seed::generate();
    sqlx::query(
        "INSERT INTO draws (event_id, seed, commitment, algorithm) VALUES ($1, $2, $3, $4)
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(event.get())
    .bind(seed.0.as_slice())
    .bind(seed.commitment().as_slice())
    .bind(shared::draw::ALGORITHM)
    .execute(&state.pg)
    .await?;
    let stored: Vec<u8> = sqlx::query_scalar("SELECT commitment FROM draws WHERE event_id = $1")
        .bind(event.get())
        .fetch_one(&state.pg)
        .await?;
    let commitment: [u8; 32] = stored
        .try_into()
        .map_err(|_| ApiError::internal("stored commitment is not 32 bytes"))?;
    state.commitments.put(event, commitment);
    Ok(commitment)
}

/// Runs the draw of `event` if it has not run. Returns the number of entrants it ordered, or
/// `None` if another instance (or an earlier call) drew already.
#[instrument(skip_all, fields(event = %event))]
pub async fn run_draw(state: &AppState, event: EventId) -> Result<Option<usize>, ApiError> {
    ensure_commitment(state, event).await?;
    let mut tx = state.pg.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(DRAW_LOCK_CLASS)
        .bind(event_lock_key(event))
        .execute(&mut *tx)
        .await?;
    let (seed, drawn_at): (Vec<u8>, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT seed, drawn_at FROM draws WHERE event_id = $1 FOR UPDATE")
            .bind(event.get())
            .fetch_one(&mut *tx)
            .await?;
    if drawn_at.is_some() {
        return Ok(None);
    }
    let seed = Seed::from_slice(&seed).ok_or_else(|| ApiError::internal("bad stored seed"))?;
    let mut entrants: Vec<Uuid> =
        sqlx::query_scalar("SELECT ticket_id FROM joins WHERE event_id = $1 AND phase = 'presale'")
            .bind(event.get())
            .fetch_all(&mut *tx)
            .await?;
    let entrants = tokio::task::spawn_blocking(move || {
        shared::draw::draw_order(&seed, &mut entrants);
        entrants
    })
    .await
    .map_err(ApiError::internal)?;
    let positions: Vec<i64> = (1..=entrants.len() as i64).collect();
    sqlx::query(
        "UPDATE joins SET position = u.position
         FROM UNNEST($1::uuid[], $2::bigint[]) AS u(ticket_id, position)
         WHERE joins.ticket_id = u.ticket_id",
    )
    .bind(&entrants)
    .bind(&positions)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE draws SET drawn_at = now(), entrants = $2 WHERE event_id = $1")
        .bind(event.get())
        .bind(entrants.len() as i64)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(entrants = entrants.len(), "draw committed");
    queue_store::publish(&state.pg, &state.redis, event).await?;
    Ok(Some(entrants.len()))
}

pub(crate) fn event_lock_key(event: EventId) -> i32 {
    // Event ids are identity values far below 2^31; wrap rather than fail beyond that.
    event.get() as i32
}

/// Looks for commitments to publish, draws to run and Redis queues to restore, every tick.
pub async fn run_scheduler(state: AppState, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(state.config.draw_tick_ms.max(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        if let Err(e) = scheduler_tick(&state).await {
            tracing::warn!(error = %e, "draw scheduler tick failed; retrying next tick");
        }
    }
}

async fn scheduler_tick(state: &AppState) -> Result<(), ApiError> {
    let opened: Vec<i64> = sqlx::query_scalar(
        "SELECT e.id FROM events e
         WHERE e.presale_opens_at <= now() AND e.sale_ends_at > now()
           AND NOT EXISTS (SELECT 1 FROM draws d WHERE d.event_id = e.id)",
    )
    .fetch_all(&state.pg)
    .await?;
    for id in opened.into_iter().filter_map(EventId::new) {
        ensure_commitment(state, id).await?;
    }
    let due: Vec<i64> = sqlx::query_scalar(
        "SELECT d.event_id FROM draws d JOIN events e ON e.id = d.event_id
         WHERE d.drawn_at IS NULL AND e.sale_starts_at <= now()",
    )
    .fetch_all(&state.pg)
    .await?;
    for id in due.into_iter().filter_map(EventId::new) {
        run_draw(state, id).await?;
    }
    let live: Vec<i64> = sqlx::query_scalar(
        "SELECT d.event_id FROM draws d JOIN events e ON e.id = d.event_id
         WHERE d.drawn_at IS NOT NULL AND e.sale_ends_at > now()",
    )
    .fetch_all(&state.pg)
    .await?;
    for id in live.into_iter().filter_map(EventId::new) {
        let present: i64 = state
            .redis
            .client()
            .exists(state.redis.keys(id).drawn())
            .await?;
        if present == 0 && queue_store::publish(&state.pg, &state.redis, id).await? {
            tracing::warn!(event = %id, "redis queue was missing; rebuilt from postgres");
        }
    }
    Ok(())
}

#[derive(Serialize)]
pub struct PublishedDraw {
    pub event_id: i64,
    pub algorithm: &'static str,
    /// "not_open" (no commitment yet), "pending" (committed, not drawn) or "drawn".
    pub status: &'static str,
    pub sale_starts_at: DateTime<Utc>,
    /// Hex SHA-256 of the seed.
    pub commitment: Option<String>,
    /// Hex seed, published after the draw.
    pub seed: Option<String>,
    pub drawn_at: Option<DateTime<Utc>>,
    pub entrants: Option<i64>,
    /// Ticket ids in position order (position 1 first), after the draw.
    pub order: Option<Vec<Uuid>>,
}

#[instrument(skip_all, fields(event = id))]
async fn published_draw(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Json<PublishedDraw>, ApiError> {
    let event_id = EventId::from_path(id)?;
    let event = SaleEvent::load(&state.pg, event_id).await?;
    let mut published = PublishedDraw {
        event_id: id,
        algorithm: shared::draw::ALGORITHM,
        status: "not_open",
        sale_starts_at: event.sale_starts_at,
        commitment: None,
        seed: None,
        drawn_at: None,
        entrants: None,
        order: None,
    };
    if event.phase(Utc::now()) == SalePhase::NotOpen {
        return Ok(Json(published));
    }
    published.commitment = Some(hex::encode(ensure_commitment(&state, event_id).await?));
    published.status = "pending";
    let (seed, drawn_at, entrants): (Vec<u8>, Option<DateTime<Utc>>, Option<i64>) =
        sqlx::query_as("SELECT seed, drawn_at, entrants FROM draws WHERE event_id = $1")
            .bind(id)
            .fetch_one(&state.pg)
            .await?;
    if drawn_at.is_some() {
        published.status = "drawn";
        published.seed = Some(hex::encode(seed));
        published.drawn_at = drawn_at;
        published.entrants = entrants;
        published.order = Some(order_of(&state.pg, event_id).await?);
    }
    Ok(Json(published))
}

async fn order_of(pg: &PgPool, event: EventId) -> Result<Vec<Uuid>, ApiError> {
    Ok(sqlx::query_scalar(
        "SELECT ticket_id FROM joins WHERE event_id = $1 AND phase = 'presale'
         ORDER BY position",
    )
    .bind(event.get())
    .fetch_all(pg)
    .await?)
}
