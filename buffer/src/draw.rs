//! The draw: at `sale_starts_at`, every presale join is shuffled into positions 1..N with the
//! event's secret seed (algorithm `fairgate-draw-v1`, see `shared::draw`). The seed's SHA-256
//! commitment is published from presale; the seed and the resulting order after the draw.
//!
//! Exactly once: the draw runs in one Postgres transaction holding the event's exclusive advisory
//! lock (joins hold it shared), and only if `draws.drawn_at` is still null. What it records is
//! the seed and the number of entrants: the order is a pure function of the seed and the presale
//! entrants, which the lock freezes, so it is recomputed wherever it is needed (the Redis queue,
//! a rebuild after Redis lost it, the publication) instead of writing a million positions back.
//! A crash after commit is repaired by whoever finds the Redis queue missing: every tick, each
//! instance counts every live event's mirror against Postgres (`mirror::check`) and rebuilds
//! or repairs it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::event::{SaleEvent, SalePhase};
use shared::extract::{Json, Path, Query};
use shared::ids::{EventId, Seed};
use shared::ApiError;
use tokio_util::sync::CancellationToken;
use tracing::instrument;
use uuid::Uuid;

use crate::mirror::{self, Health, LineFacts};
use crate::AppState;

pub use shared::draw::DrawnOrder;
use shared::draw::{entrants, shuffle};

/// What each instance remembers about draws: commitments and computed orders never change once
/// made; rebuilding a Redis queue is done by one task at a time per instance.
#[derive(Clone, Default)]
pub struct DrawCache {
    commitments: Arc<Mutex<HashMap<EventId, [u8; 32]>>>,
    orders: shared::draw::DrawnOrders,
    publishing: Arc<tokio::sync::Mutex<()>>,
    /// Per live event, the tail Postgres had at the previous mirror check.
    settled: Arc<Mutex<HashMap<EventId, i64>>>,
}

impl DrawCache {
    fn commitment(&self, event: EventId) -> Option<[u8; 32]> {
        self.commitments.lock().ok()?.get(&event).copied()
    }
    /// The tail Postgres had for `event` at the previous check, remembering `tail` for the next.
    fn settled(&self, event: EventId, tail: i64) -> i64 {
        match self.settled.lock() {
            Ok(mut map) => map.insert(event, tail).unwrap_or(0),
            Err(_) => 0,
        }
    }
    fn put_commitment(&self, event: EventId, commitment: [u8; 32]) {
        if let Ok(mut map) = self.commitments.lock() {
            map.insert(event, commitment);
        }
    }
    fn put_order(&self, event: EventId, order: Arc<DrawnOrder>) {
        self.orders.put(event, order);
    }
}

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/events/{id}/draw", get(published_draw))
}

/// The event's draw commitment, creating the secret seed on first use.
pub async fn ensure_commitment(state: &AppState, event: EventId) -> Result<[u8; 32], ApiError> {
    if let Some(c) = state.draws.commitment(event) {
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
    state.draws.put_commitment(event, commitment);
    Ok(commitment)
}

/// Runs the draw of `event` if it has not run. Returns the number of entrants it ordered, or
/// `None` if another instance (or an earlier call) drew already.
#[instrument(skip_all, fields(event = %event))]
pub async fn run_draw(state: &AppState, event: EventId) -> Result<Option<usize>, ApiError> {
    ensure_commitment(state, event).await?;
    let started = std::time::Instant::now();
    let mut tx = state.pg.begin().await?;
    shared::db::lock_draw(&mut tx, event, true).await?;
    let (seed, drawn_at): (Vec<u8>, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT seed, drawn_at FROM draws WHERE event_id = $1 FOR UPDATE")
            .bind(event.get())
            .fetch_one(&mut *tx)
            .await?;
    if drawn_at.is_some() {
        return Ok(None);
    }
    let seed = Seed::from_slice(&seed).ok_or_else(|| ApiError::internal("bad stored seed"))?;
    let entrants = entrants(&mut *tx, event).await?;
    // The draw gives places 1..N: the line's tail starts there, and its serving head at 0.
    sqlx::query("UPDATE draws SET drawn_at = now(), entrants = $2, tail = $2 WHERE event_id = $1")
        .bind(event.get())
        .bind(entrants.len() as i64)
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO admission_state (event_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(event.get())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let count = entrants.len();
    let committed = started.elapsed();
    let order = shuffle(seed, entrants).await?;
    let shuffled = started.elapsed();
    state.draws.put_order(event, order.clone());
    publish_order(state, event, &order).await?;
    tracing::info!(
        entrants = count,
        commit_ms = committed.as_millis() as u64,
        shuffle_ms = (shuffled - committed).as_millis() as u64,
        publish_ms = (started.elapsed() - shuffled).as_millis() as u64,
        "draw done"
    );
    metrics::histogram!("buffer_draw_seconds").record(started.elapsed().as_secs_f64());
    Ok(Some(count))
}

/// The order of a committed draw (position 1 first), recomputed from Postgres on first use;
/// `None` before the draw.
pub async fn order(state: &AppState, event: EventId) -> Result<Option<Arc<DrawnOrder>>, ApiError> {
    state.draws.orders.get(&state.pg, event).await
}

/// Makes sure the committed draw's queue is whole in Redis (after the draw, or after Redis lost
/// it), rebuilding it from Postgres.
pub async fn ensure_published(state: &AppState, event: EventId) -> Result<(), ApiError> {
    let order = order(state, event)
        .await?
        .ok_or_else(|| ApiError::Conflict("draw_pending", "the draw has not run yet".into()))?;
    publish_order(state, event, &order).await
}

async fn publish_order(
    state: &AppState,
    event: EventId,
    order: &DrawnOrder,
) -> Result<(), ApiError> {
    // One rebuild per instance at a time: a second one would write the same members again.
    let _publishing = state.draws.publishing.lock().await;
    // Redis losing data again in the middle leaves the mirror unmarked; try again at once a
    // few times, then leave it to the next tick.
    for _ in 0..3 {
        if mirror::rebuild(&state.pg, &state.redis, event, order.tickets()).await? {
            return Ok(());
        }
    }
    Err(ApiError::Unavailable(
        "catching_up",
        "the live queue is being rebuilt; retry shortly".into(),
    ))
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
    for facts in LineFacts::live_events(&state.pg).await? {
        if let Err(e) = keep_mirror(state, &facts).await {
            tracing::warn!(event = facts.event_id, error = %e, "keeping the redis queue failed; retrying next tick");
        }
    }
    Ok(())
}

/// Counts one live event's Redis queue against Postgres and repairs what is missing.
async fn keep_mirror(state: &AppState, facts: &LineFacts) -> Result<(), ApiError> {
    let id = EventId::new(facts.event_id).ok_or_else(|| ApiError::internal("bad event id"))?;
    let settled = state.draws.settled(id, facts.tail);
    match mirror::check(&state.redis, facts, settled).await? {
        Health::Whole => Ok(()),
        Health::LiveMissing => {
            mirror::repair_live(&state.pg, &state.redis, id, facts.entrants).await
        }
        Health::Broken => {
            metrics::counter!("buffer_mirror_rebuilds_total").increment(1);
            tracing::warn!(event = %id, "redis queue is missing or partial; rebuilding it from postgres");
            ensure_published(state, id).await
        }
    }
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
    /// Position of the first ticket in `order` minus one (the page's start).
    pub offset: usize,
    /// Ticket ids in position order (position `offset + 1` first), after the draw: one page of
    /// at most `limit`.
    pub order: Option<Vec<Uuid>>,
    /// The `offset` of the next page, while there is one.
    pub next_offset: Option<usize>,
}

/// Most ticket ids in one page of a published draw.
pub const MAX_PAGE: usize = 100_000;

/// `?offset=&limit=` of a published draw's order.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    #[serde(default)]
    offset: usize,
    #[serde(default = "max_page")]
    limit: usize,
}

fn max_page() -> usize {
    MAX_PAGE
}

#[instrument(skip_all, fields(event = id))]
async fn published_draw(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Query(Page { offset, limit }): Query<Page>,
) -> Result<Json<PublishedDraw>, ApiError> {
    let event_id = EventId::from_path(id)?;
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::Unprocessable(
            "invalid_field",
            format!("limit: must be between 1 and {MAX_PAGE}"),
        ));
    }
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
        offset,
        order: None,
        next_offset: None,
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
        if let Some(order) = order(&state, event_id).await? {
            let order = order.tickets();
            let end = offset.saturating_add(limit).min(order.len());
            published.order = Some(order.get(offset..end).unwrap_or_default().to_vec());
            published.next_offset = (end < order.len()).then_some(end);
        }
    }
    Ok(Json(published))
}
