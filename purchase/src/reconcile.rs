//! Reconciliation of checkouts interrupted between the card charge and the order (a crash, a
//! lost connection to Postgres). A payment not settled well after it began is looked up at the
//! provider by its idempotency key, and then settled exactly as checkout would have: charged →
//! the order is committed if the hold still owns its seats, else the charge is refunded;
//! declined → recorded; never charged → abandoned and the client may retry. So there is no
//! charged-but-unsold and no sold-but-uncharged, whatever instant a process dies at.

use std::time::Duration;

use shared::ids::{EventId, TicketId};
use shared::ApiError;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::checkout::{mark_settled, settle, Buyer, HoldRow};
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
    amount_cents: i64,
    event_id: Option<i64>,
    jti: Option<Uuid>,
    identity: Option<String>,
    ticket_id: Option<Uuid>,
    hold_id: Option<Uuid>,
    checkout_key: Option<String>,
}

/// Settles every payment left unsettled past the grace period, and finishes refunds whose
/// provider call was interrupted; returns how many.
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

async fn settle_payments(state: &AppState) -> Result<usize, ApiError> {
    let stale = sqlx::query_as::<_, Unsettled>(
        "SELECT idempotency_key, amount_cents, event_id, jti, identity, ticket_id, hold_id,
                checkout_key
         FROM payments
         WHERE settled_at IS NULL AND created_at < now() - make_interval(secs => $1)
         ORDER BY created_at LIMIT 100",
    )
    .bind(state.config.reconcile_grace_secs as f64)
    .fetch_all(&state.pg)
    .await?;
    let mut settled = 0;
    for payment in stale {
        let (Some(event), Some(jti), Some(identity), Some(ticket), Some(hold_id), Some(key)) = (
            payment.event_id.and_then(EventId::new),
            payment.jti,
            payment.identity,
            payment.ticket_id,
            payment.hold_id,
            payment.checkout_key,
        ) else {
            tracing::error!(payment = %payment.idempotency_key, "payment without checkout context");
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
            .lookup(&payment.idempotency_key)
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
                    &payment.idempotency_key,
                    outcome,
                )
                .await?;
            }
            None => {
                // The provider never saw it: nothing was charged; the client may simply retry.
                mark_settled(&state.pg, &payment.idempotency_key, "abandoned").await?;
                sqlx::query(
                    "DELETE FROM checkout_requests
                     WHERE jti = $1 AND idempotency_key = $2 AND state = 'running'",
                )
                .bind(jti)
                .bind(&key)
                .execute(&state.pg)
                .await?;
            }
        }
        // Whatever did not end in a purchase gives the hold back (it still expires on time).
        sqlx::query("UPDATE holds SET status = 'active' WHERE id = $1 AND status = 'paying'")
            .bind(hold_id)
            .execute(&state.pg)
            .await?;
        tracing::warn!(payment = %payment.idempotency_key, "interrupted checkout reconciled");
        settled += 1;
    }
    Ok(settled)
}
