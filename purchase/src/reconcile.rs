//! Reconciliation of checkouts interrupted between the card charge and the order (a crash, a
//! lost connection to Postgres). A payment not settled well after it began is looked up at the
//! provider by its idempotency key, and then settled exactly as checkout would have: charged →
//! the order is committed if the hold still owns its seats, else the charge is refunded;
//! declined → recorded; never charged → abandoned and the client may retry. So there is no
//! charged-but-unsold and no sold-but-uncharged, whatever instant a process dies at.
//!
//! "Well after it began" means after the *current attempt* began: every claim of the key renews
//! the payment's lease (`attempt_at`, migration 0040), so a retry after a provider outage is
//! never taken for a crashed checkout. Reconciliation takes the lease itself before it looks
//! (the next `attempt`, a fencing token), and gives the key and hold back as abandoned only
//! while that lease is still its own; a decision it makes after a charge is the one checkout
//! makes (`checkout::settle`), which never refunds a charge an order holds.

use std::time::Duration;

use shared::ids::{EventId, TicketId};
use shared::ApiError;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::checkout::{abandon, finish_payment_refund, settle, Attempt, Buyer, HoldRow};
use crate::AppState;

pub async fn run(state: AppState, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(state.config.reconcile_ms.max(100)));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        match reconcile_once(&state).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(payments = n, "reconciled interrupted checkouts"),
            Err(e) => tracing::warn!(error = %e, "reconciliation failed; retrying next round"),
        }
    }
}

#[derive(sqlx::FromRow)]
struct Unsettled {
    idempotency_key: String,
    attempt: i32,
}

#[derive(sqlx::FromRow)]
struct Payment {
    amount_cents: i64,
    status: String,
    provider_ref: Option<String>,
    event_id: Option<i64>,
    jti: Option<Uuid>,
    identity: Option<String>,
    ticket_id: Option<Uuid>,
    hold_id: Option<Uuid>,
    checkout_key: Option<String>,
}

/// Settles every payment whose current attempt began more than the grace period ago, and
/// finishes refunds whose provider call was interrupted; returns how many.
pub async fn reconcile_once(state: &AppState) -> Result<usize, ApiError> {
    let refunding: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, payment_ref FROM orders
         WHERE status = 'refunding' AND refunded_at < now() - make_interval(secs => $1)
         LIMIT 100",
    )
    .bind(state.config.reconcile_grace_secs as f64)
    .fetch_all(&state.pg)
    .await?;
    let finished = refunding.len();
    for (order, reference) in refunding {
        crate::refunds::finish_refund(state, order, &reference).await?;
    }
    Ok(finished + settle_payments(state).await?)
}

/// Reconciliation's lease on a payment whose attempt went quiet: the next attempt number, taken
/// only if the attempt it saw is still the current one and the payment still unsettled. A
/// checkout claiming the key meanwhile has renewed the lease, and the payment is left to it.
async fn take_over(state: &AppState, stale: &Unsettled) -> Result<Option<i32>, ApiError> {
    Ok(sqlx::query_scalar(
        "UPDATE payments SET attempt = attempt + 1, attempt_at = now()
         WHERE idempotency_key = $1 AND attempt = $2 AND settled_at IS NULL
           AND attempt_at < now() - make_interval(secs => $3)
         RETURNING attempt",
    )
    .bind(&stale.idempotency_key)
    .bind(stale.attempt)
    .bind(state.config.reconcile_grace_secs as f64)
    .fetch_optional(&state.pg)
    .await?)
}

async fn settle_payments(state: &AppState) -> Result<usize, ApiError> {
    let stale = sqlx::query_as::<_, Unsettled>(
        "SELECT idempotency_key, attempt FROM payments
         WHERE settled_at IS NULL AND attempt_at < now() - make_interval(secs => $1)
         ORDER BY attempt_at LIMIT 100",
    )
    .bind(state.config.reconcile_grace_secs as f64)
    .fetch_all(&state.pg)
    .await?;
    let mut settled = 0;
    for stale in stale {
        let Some(attempt) = take_over(state, &stale).await? else {
            continue;
        };
        let payment_key = stale.idempotency_key;
        let payment = sqlx::query_as::<_, Payment>(
            "SELECT amount_cents, status, provider_ref, event_id, jti, identity, ticket_id,
                    hold_id, checkout_key
             FROM payments WHERE idempotency_key = $1",
        )
        .bind(&payment_key)
        .fetch_one(&state.pg)
        .await?;
        metrics::counter!("fairgate_reconciliations_total",
            "event" => payment.event_id.map(|e| e.to_string()).unwrap_or_default())
        .increment(1);
        if payment.status == "refunding" {
            // Decided already; only the provider's refund is missing.
            if let Some(reference) = &payment.provider_ref {
                finish_payment_refund(state, &payment_key, reference).await;
            }
            settled += 1;
            continue;
        }
        let (Some(event), Some(jti), Some(identity), Some(ticket), Some(hold_id), Some(key)) = (
            payment.event_id.and_then(EventId::new),
            payment.jti,
            payment.identity,
            payment.ticket_id,
            payment.hold_id,
            payment.checkout_key,
        ) else {
            tracing::error!(payment = %payment_key, "payment without checkout context");
            continue;
        };
        let buyer = Buyer {
            event,
            jti,
            ticket: TicketId(ticket),
            identity,
        };
        let hold = sqlx::query_as::<_, HoldRow>("SELECT seat_ids FROM holds WHERE id = $1")
            .bind(hold_id)
            .fetch_one(&state.pg)
            .await?;
        let outcome = state
            .payments
            .lookup(&payment_key)
            .await
            .map_err(ApiError::internal)?;
        match outcome {
            Some(outcome) => {
                settle(
                    state,
                    &buyer,
                    &key,
                    hold_id,
                    &hold,
                    payment.amount_cents,
                    &payment_key,
                    outcome,
                )
                .await?;
            }
            None => {
                // The provider never saw it: nothing was charged; the client may simply retry.
                // Only while the lease is still ours: a retry that claimed the key since then
                // is live, and its charge must not be judged by this lookup.
                let mine = Attempt {
                    hold_id,
                    jti,
                    key: &key,
                    payment_key: &payment_key,
                    attempt,
                };
                if !abandon(&state.pg, &mine).await? {
                    continue;
                }
            }
        }
        tracing::warn!(payment = %payment_key, "interrupted checkout reconciled");
        settled += 1;
    }
    Ok(settled)
}
