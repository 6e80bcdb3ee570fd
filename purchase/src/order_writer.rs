//! Group commit of orders. A checkout whose card was charged hands its order to a few writer
//! tasks and waits for its transaction: a writer takes every order waiting (up to
//! [`MAX_BATCH`]) and commits them with one call of `fg_commit_orders` (migration 0018), which
//! runs the order's eleven statements once for the whole batch instead of once per order. An
//! order is answered only after the transaction that holds it has committed.
//!
//! Each order keeps its own answer: one whose hold lost a seat is `hold_expired` while the
//! others commit. A call Postgres refuses (a pass or hold already used for an order trips a
//! unique constraint, which aborts the whole statement) is retried one order at a time with
//! `fg_commit_order`, so each order gets exactly the answer or error it would have got alone.
//! A call whose connection fails is not retried: it may have committed.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// Most orders in one transaction.
pub const MAX_BATCH: usize = 64;
/// Orders waiting for a writer at most; more make checkouts wait (back-pressure).
const QUEUE_DEPTH: usize = 4_096;

/// Everything the order of a charged checkout writes.
#[derive(Clone, Debug)]
pub struct NewOrder {
    pub event: i64,
    pub jti: Uuid,
    pub identity: String,
    pub hold_id: Uuid,
    /// Sorted, with `codes` in the same order.
    pub seat_ids: Vec<i64>,
    pub codes: Vec<String>,
    pub total_cents: i64,
    pub reference: String,
    pub order_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub key: String,
    pub body: serde_json::Value,
    pub payment_key: String,
}

/// How committing an order ended: `ordered` (and whether it sold the event's last place) or
/// `hold_expired`; a database error is the one `fg_commit_order` raised for this order.
pub type Outcome = Result<(String, bool), sqlx::Error>;

type Pending = shared::batch::Pending<NewOrder, Outcome>;

#[derive(Clone)]
pub struct OrderWriter {
    writers: shared::batch::Writers<NewOrder, Outcome>,
}

impl OrderWriter {
    /// Starts `writers` writer tasks on `pg`. They stop once every handle is dropped and the
    /// queue is drained, not at shutdown: checkouts still running while the service drains its
    /// requests have charged cards and need their orders committed.
    pub fn start(pg: PgPool, writers: usize) -> Self {
        let writers =
            shared::batch::Writers::start(writers, MAX_BATCH, QUEUE_DEPTH, move |batch| {
                write_batch(pg.clone(), batch)
            });
        OrderWriter { writers }
    }

    /// Commits `order` (with whatever other orders are waiting) and returns its outcome.
    pub async fn commit(&self, order: NewOrder) -> Outcome {
        self.writers
            .submit(order)
            .await
            .unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

async fn write_batch(pg: PgPool, batch: Vec<Pending>) {
    metrics::histogram!("purchase_order_batch_size").record(batch.len() as f64);
    if batch.len() > 1 {
        match commit_batch(&pg, &batch).await {
            Ok(outcomes) if outcomes.len() == batch.len() => {
                for (pending, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = pending.reply.send(Ok(outcome));
                }
                return;
            }
            Ok(_) => {
                // Cannot happen (one row per order); the batch may have committed, so no
                // order is tried again here: reconciliation settles their payments.
                tracing::error!("fg_commit_orders answered for the wrong orders");
                for pending in batch {
                    let _ = pending.reply.send(Err(sqlx::Error::Protocol(
                        "fg_commit_orders answered for the wrong orders".into(),
                    )));
                }
                return;
            }
            // Postgres refused the statement (or no connection was free): nothing of the
            // batch was written, so each order is tried alone.
            Err(e @ (sqlx::Error::Database(_) | sqlx::Error::PoolTimedOut)) => {
                metrics::counter!("purchase_order_batches_retried_total").increment(1);
                tracing::debug!(error = %e, orders = batch.len(), "order batch failed; committing one by one");
            }
            // The connection failed mid-call: the batch may have committed, so trying the
            // orders again could refund sold seats; their checkouts fail like a single
            // order's would, and reconciliation settles the payments from what was stored.
            Err(e) => {
                tracing::warn!(error = %e, orders = batch.len(), "order batch outcome unknown");
                for pending in batch {
                    let _ = pending.reply.send(Err(sqlx::Error::Protocol(format!(
                        "the order batch's outcome is unknown: {e}"
                    ))));
                }
                return;
            }
        }
    }
    for pending in batch {
        let outcome = commit_one(&pg, &pending.item).await;
        let _ = pending.reply.send(outcome);
    }
}

/// One order alone (`fg_commit_order`, migration 0013).
async fn commit_one(pg: &PgPool, o: &NewOrder) -> Outcome {
    sqlx::query_as(
        "SELECT * FROM fg_commit_order($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(o.event)
    .bind(o.jti)
    .bind(&o.identity)
    .bind(o.hold_id)
    .bind(&o.seat_ids)
    .bind(o.total_cents)
    .bind(&o.reference)
    .bind(o.order_id)
    .bind(o.created_at)
    .bind(&o.codes)
    .bind(&o.key)
    .bind(&o.body)
    .bind(&o.payment_key)
    .fetch_one(pg)
    .await
}

/// The whole batch in one statement (`fg_commit_orders`, migration 0018); outcomes in order.
async fn commit_batch(pg: &PgPool, batch: &[Pending]) -> Result<Vec<(String, bool)>, sqlx::Error> {
    let orders: Vec<&NewOrder> = batch.iter().map(|p| &p.item).collect();
    let (mut seat_order, mut seat_ids, mut codes) = (Vec::new(), Vec::new(), Vec::new());
    for (index, order) in orders.iter().enumerate() {
        for (seat, code) in order.seat_ids.iter().zip(&order.codes) {
            seat_order.push(index as i32 + 1);
            seat_ids.push(*seat);
            codes.push(code.as_str());
        }
    }
    let rows: Vec<(i32, String, bool)> = sqlx::query_as(
        "SELECT ord, code, sold_out FROM fg_commit_orders(
             $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) ORDER BY ord",
    )
    .bind(orders.iter().map(|o| o.event).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.jti).collect::<Vec<_>>())
    .bind(
        orders
            .iter()
            .map(|o| o.identity.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(orders.iter().map(|o| o.hold_id).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.total_cents).collect::<Vec<_>>())
    .bind(
        orders
            .iter()
            .map(|o| o.reference.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(orders.iter().map(|o| o.order_id).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.created_at).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.key.as_str()).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.body.clone()).collect::<Vec<_>>())
    .bind(
        orders
            .iter()
            .map(|o| o.payment_key.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(&seat_order)
    .bind(&seat_ids)
    .bind(&codes)
    .fetch_all(pg)
    .await?;
    Ok(rows
        .into_iter()
        .enumerate()
        .filter(|(i, (ord, _, _))| *ord == *i as i32 + 1)
        .map(|(_, (_, code, sold_out))| (code, sold_out))
        .collect())
}
