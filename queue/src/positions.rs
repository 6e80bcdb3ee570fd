//! Waiters' positions, looked up in batches. A socket learns its position once: at connect, or
//! when the draw places it. At the draw every waiter of an instance asks at the same moment, so
//! the lookups are coalesced — one `ZMSCORE` per event for everything queued (up to
//! [`MAX_BATCH`]) — instead of one Redis call per waiter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fred::prelude::*;
use shared::ids::{EventId, Position, TicketId};
use shared::redis::Redis;
use shared::ApiError;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

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
        shutdown: CancellationToken,
    ) -> (Self, impl std::future::Future<Output = anyhow::Result<()>>) {
        let (queue, receiver) = mpsc::channel(50_000);
        let batches = Arc::new(AtomicU64::new(0));
        (
            Positions {
                queue,
                batches: batches.clone(),
            },
            run(redis, receiver, batches, shutdown),
        )
    }

    /// Redis calls made so far (one per batch).
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// The ticket's position in the event's queue (`None` if it has none).
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
    mut receiver: mpsc::Receiver<(EventId, TicketId, Reply)>,
    batches: Arc<AtomicU64>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut batch = Vec::with_capacity(MAX_BATCH);
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
            let members: Vec<String> = waiting.iter().map(|(t, _)| t.to_string()).collect();
            let scores: Result<Vec<Option<f64>>, _> = if members.len() == 1 {
                // ZMSCORE of one member answers a bare value, not a list.
                redis
                    .client()
                    .zscore(redis.keys(event).queue(), members[0].clone())
                    .await
                    .map(|s: Option<f64>| vec![s])
            } else {
                redis
                    .client()
                    .zmscore(redis.keys(event).queue(), members)
                    .await
            };
            match scores {
                Ok(scores) => {
                    for ((_, reply), score) in waiting.into_iter().zip(scores) {
                        let _ = reply.send(Ok(score.and_then(|s| Position::new(s as i64))));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "position lookup failed");
                    for (_, reply) in waiting {
                        let _ = reply.send(Err(ApiError::internal("position lookup failed")));
                    }
                }
            }
        }
    }
}
