//! Group commit for joins. Handlers hand each join to a few writer tasks and wait for its
//! transaction: a writer takes everything queued (up to [`MAX_BATCH`]) and inserts it in one
//! transaction, so a burst of a thousand joins costs a handful of commits instead of a thousand.
//! A join is still acknowledged only after the transaction that holds it has committed.
//!
//! Each batch takes the shared draw lock of every event in it (in event order), so it is ordered
//! against the draw exactly like a single join: joins committed before the draw are in it, later
//! ones are live arrivals.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use shared::ids::{EventId, Identity, TicketId};
use shared::ApiError;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Most joins in one transaction.
pub const MAX_BATCH: usize = 1_000;
/// Joins waiting for a writer at most; more make handlers wait (back-pressure).
const QUEUE_DEPTH: usize = 20_000;

/// A join as Postgres holds it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct JoinRow {
    pub ticket_id: Uuid,
    pub event_id: i64,
    pub identity: String,
    pub joined_at: DateTime<Utc>,
    pub position: Option<i64>,
    pub phase: String,
}

/// The outcome of one join: its row, and whether the identity already had it.
pub type Joined = Result<(JoinRow, bool), ApiError>;

struct Pending {
    event: EventId,
    ticket: TicketId,
    identity: Identity,
    reply: oneshot::Sender<Joined>,
}

#[derive(Clone)]
pub struct JoinWriter {
    queue: mpsc::Sender<Pending>,
}

impl JoinWriter {
    /// Starts `writers` writer tasks on `pg`; they stop when `shutdown` fires and the queue is
    /// drained.
    pub fn start(pg: PgPool, writers: usize, shutdown: CancellationToken) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers.max(1) {
            tokio::spawn(write_batches(
                pg.clone(),
                receiver.clone(),
                shutdown.clone(),
            ));
        }
        JoinWriter { queue }
    }

    /// Records the join of `identity` (or finds the place it already has) durably.
    pub async fn join(&self, event: EventId, ticket: TicketId, identity: Identity) -> Joined {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending {
                event,
                ticket,
                identity,
                reply,
            })
            .await
            .map_err(|_| ApiError::internal("join writer stopped"))?;
        answer
            .await
            .map_err(|_| ApiError::internal("join writer dropped a join"))?
    }
}

async fn write_batches(
    pg: PgPool,
    receiver: Arc<Mutex<mpsc::Receiver<Pending>>>,
    shutdown: CancellationToken,
) {
    loop {
        let batch = {
            let mut receiver = receiver.lock().await;
            let first = tokio::select! {
                item = receiver.recv() => item,
                _ = shutdown.cancelled() => receiver.try_recv().ok(),
            };
            let Some(first) = first else { return };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            batch
        };
        metrics::histogram!("buffer_join_batch_size").record(batch.len() as f64);
        match write(&pg, &batch).await {
            Ok(mut rows) => {
                for pending in batch {
                    let outcome = rows.remove(&pending.ticket.0).ok_or_else(|| {
                        ApiError::internal("a join is missing from its batch's result")
                    });
                    let _ = pending.reply.send(outcome);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, joins = batch.len(), "join batch failed");
                for pending in batch {
                    let _ = pending
                        .reply
                        .send(Err(ApiError::internal("the join could not be recorded")));
                }
            }
        }
    }
}

/// Inserts a batch in one transaction; answers per pending ticket id: the row (its own, or the
/// one its identity already had) and whether it already existed.
async fn write(
    pg: &PgPool,
    batch: &[Pending],
) -> Result<HashMap<Uuid, (JoinRow, bool)>, sqlx::Error> {
    let events: BTreeSet<EventId> = batch.iter().map(|p| p.event).collect();
    let mut tx = pg.begin().await?;
    for event in &events {
        shared::db::lock_draw(&mut tx, *event, false).await?;
    }
    let events: Vec<i64> = events.into_iter().map(EventId::get).collect();
    let drawn: HashSet<i64> = sqlx::query_scalar(
        "SELECT event_id FROM draws WHERE event_id = ANY($1) AND drawn_at IS NOT NULL",
    )
    .bind(&events)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect();
    let tickets: Vec<Uuid> = batch.iter().map(|p| p.ticket.0).collect();
    let event_ids: Vec<i64> = batch.iter().map(|p| p.event.get()).collect();
    let identities: Vec<String> = batch
        .iter()
        .map(|p| p.identity.as_str().to_owned())
        .collect();
    let phases: Vec<&str> = batch
        .iter()
        .map(|p| {
            if drawn.contains(&p.event.get()) {
                "live"
            } else {
                "presale"
            }
        })
        .collect();
    let inserted: Vec<JoinRow> = sqlx::query_as(
        "INSERT INTO joins (ticket_id, event_id, identity, phase)
         SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::text[], $4::text[])
         ON CONFLICT ON CONSTRAINT joins_one_per_identity DO NOTHING
         RETURNING ticket_id, event_id, identity, joined_at, position, phase",
    )
    .bind(&tickets)
    .bind(&event_ids)
    .bind(&identities)
    .bind(&phases)
    .fetch_all(&mut *tx)
    .await?;
    let created: HashSet<Uuid> = inserted.iter().map(|r| r.ticket_id).collect();
    let mut by_identity: HashMap<(i64, String), JoinRow> = inserted
        .into_iter()
        .map(|r| ((r.event_id, r.identity.clone()), r))
        .collect();
    let missing: Vec<&Pending> = batch
        .iter()
        .filter(|p| !by_identity.contains_key(&(p.event.get(), p.identity.as_str().to_owned())))
        .collect();
    if !missing.is_empty() {
        let existing: Vec<JoinRow> = sqlx::query_as(
            "SELECT j.ticket_id, j.event_id, j.identity, j.joined_at, j.position, j.phase
             FROM joins j JOIN UNNEST($1::bigint[], $2::text[]) AS w(event_id, identity)
               ON j.event_id = w.event_id AND j.identity = w.identity",
        )
        .bind(missing.iter().map(|p| p.event.get()).collect::<Vec<_>>())
        .bind(
            missing
                .iter()
                .map(|p| p.identity.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *tx)
        .await?;
        for row in existing {
            by_identity.insert((row.event_id, row.identity.clone()), row);
        }
    }
    tx.commit().await?;
    Ok(batch
        .iter()
        .filter_map(|p| {
            let row = by_identity.get(&(p.event.get(), p.identity.as_str().to_owned()))?;
            Some((p.ticket.0, (row.clone(), !created.contains(&p.ticket.0))))
        })
        .collect())
}
