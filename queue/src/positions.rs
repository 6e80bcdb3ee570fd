//! Waiters' positions, looked up in batches. A socket learns its position once: at connect, or
//! when the draw places it. At the draw every waiter of an instance asks at the same moment, so
//! the lookups are coalesced — one `ZMSCORE` per event for everything queued (up to
//! [`MAX_BATCH`]) — instead of one Redis call per waiter.
//!
//! Redis only mirrors the places Postgres gave, so a position found there is right; a ticket not
//! found there is asked of Postgres (one query per batch): a live arrival's place is in its
//! row (its mirror write may still be on its way), a presale fan who left before the draw has
//! none, and a draw entrant's place is the draw's order, derived from the seed and the entrants
//! in Postgres (once per event and process) — so a fan admitted before Redis was lost can still
//! claim their pass inside the claim window while the mirror is rebuilt. Only when Postgres
//! cannot be read either is the answer "catching up" (503), never a wrong or missing place.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fred::prelude::*;
use shared::ids::{EventId, Position, TicketId};
use shared::redis::Redis;
use shared::ApiError;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Positions looked up in one Redis call at most.
pub const MAX_BATCH: usize = 2_000;

type Reply = oneshot::Sender<Result<Option<Position>, ApiError>>;

#[derive(Clone)]
pub struct Positions {
    queue: mpsc::Sender<(EventId, TicketId, Reply)>,
    batches: Arc<AtomicU64>,
}

impl Positions {
    /// The lookup service and the task to run for it (until `shutdown`).
    pub fn new(
        redis: Redis,
        pg: PgPool,
        shutdown: CancellationToken,
    ) -> (Self, impl std::future::Future<Output = anyhow::Result<()>>) {
        let (queue, receiver) = mpsc::channel(50_000);
        let batches = Arc::new(AtomicU64::new(0));
        (
            Positions {
                queue,
                batches: batches.clone(),
            },
            run(redis, pg, receiver, batches, shutdown),
        )
    }

    /// Redis calls made so far (one per batch).
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// The ticket's position in the event's queue (`None` if it has none: the draw has not
    /// run, or the fan left before it); 503 `catching_up` while it cannot be known.
    pub async fn of(&self, event: EventId, ticket: TicketId) -> Result<Option<Position>, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((event, ticket, reply))
            .await
            .map_err(|_| ApiError::internal("position lookups stopped"))?;
        answer
            .await
            .map_err(|_| ApiError::internal("a position lookup was dropped"))?
    }
}

async fn run(
    redis: Redis,
    pg: PgPool,
    mut receiver: mpsc::Receiver<(EventId, TicketId, Reply)>,
    batches: Arc<AtomicU64>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let orders = shared::draw::DrawnOrders::default();
    loop {
        let got = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            got = receiver.recv_many(&mut batch, MAX_BATCH) => got,
        };
        if got == 0 {
            return Ok(());
        }
        let mut by_event: HashMap<EventId, Vec<(TicketId, Reply)>> = HashMap::new();
        for (event, ticket, reply) in batch.drain(..) {
            by_event.entry(event).or_default().push((ticket, reply));
        }
        for (event, waiting) in by_event {
            batches.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("queue_position_batches_total").increment(1);
            metrics::counter!("queue_position_lookups_total").increment(waiting.len() as u64);
            let tickets: Vec<TicketId> = waiting.iter().map(|(t, _)| *t).collect();
            let found = look_up(&redis, &pg, &orders, event, &tickets).await;
            match found {
                Ok(found) => {
                    for ((_, reply), place) in waiting.into_iter().zip(found) {
                        let _ = reply.send(place);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "position lookup failed");
                    for (_, reply) in waiting {
                        let _ = reply.send(Err(catching_up()));
                    }
                }
            }
        }
    }
}

/// 503 while places cannot be read.
pub fn catching_up() -> ApiError {
    ApiError::Unavailable(
        "catching_up",
        "the waiting room is catching up after an interruption; your place is kept, retry shortly"
            .into(),
    )
}

/// The places of `tickets` (see the module doc), in their order.
async fn look_up(
    redis: &Redis,
    pg: &PgPool,
    orders: &shared::draw::DrawnOrders,
    event: EventId,
    tickets: &[TicketId],
) -> Result<Vec<Result<Option<Position>, ApiError>>, ApiError> {
    let members: Vec<String> = tickets.iter().map(|t| t.to_string()).collect();
    let scores: Vec<Option<f64>> = if !redis.client().is_connected() {
        // Redis out of reach: Postgres answers at once rather than after a command timeout.
        vec![None; tickets.len()]
    } else if members.len() == 1 {
        // ZMSCORE of one member answers a bare value, not a list.
        let score: Option<f64> = redis
            .client()
            .zscore(redis.keys(event).queue(), members[0].clone())
            .await
            .unwrap_or_else(|e| {
                tracing::debug!(error = %e, "redis position lookup failed; asking postgres");
                None
            });
        vec![score]
    } else {
        redis
            .client()
            .zmscore(redis.keys(event).queue(), members)
            .await
            .unwrap_or_else(|e| {
                tracing::debug!(error = %e, "redis position lookup failed; asking postgres");
                vec![None; tickets.len()]
            })
    };
    let missing: Vec<Uuid> = tickets
        .iter()
        .zip(&scores)
        .filter(|(_, s)| s.is_none())
        .map(|(t, _)| t.0)
        .collect();
    let mut known: HashMap<Uuid, Result<Option<Position>, ApiError>> = HashMap::new();
    if !missing.is_empty() {
        let rows: Vec<(Uuid, String, Option<i64>, bool, bool)> = sqlx::query_as(
            "SELECT j.ticket_id, j.phase, j.position, j.left_before_draw,
                    COALESCE(d.drawn_at IS NOT NULL, false)
             FROM joins j LEFT JOIN draws d ON d.event_id = j.event_id
             WHERE j.ticket_id = ANY($1) AND j.event_id = $2",
        )
        .bind(&missing)
        .bind(event.get())
        .fetch_all(pg)
        .await?;
        for (ticket, phase, position, left_before_draw, drawn) in rows {
            let place = match (phase.as_str(), position) {
                ("live", Some(p)) => Ok(Position::new(p)),
                ("presale", _) if left_before_draw || !drawn => Ok(None),
                // An entrant of the draw that Redis does not hold (its mirror being rebuilt):
                // the draw's order, derived from the seed and entrants in Postgres, says.
                ("presale", _) => match orders.get(pg, event).await {
                    Ok(Some(order)) => match order.position_of(ticket).await {
                        Ok(Some(p)) => Ok(Position::new(p)),
                        Ok(None) => Err(ApiError::internal("a draw entrant not in its order")),
                        Err(e) => Err(e),
                    },
                    Ok(None) => Ok(None),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot derive the draw's order");
                        Err(catching_up())
                    }
                },
                _ => Err(ApiError::internal("a live join without its place")),
            };
            known.insert(ticket, place);
        }
    }
    Ok(tickets
        .iter()
        .zip(scores)
        .map(|(t, score)| match score {
            Some(s) => Ok(Position::new(s as i64)),
            None => known.remove(&t.0).unwrap_or(Ok(None)),
        })
        .collect())
}
