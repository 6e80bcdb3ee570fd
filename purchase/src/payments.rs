//! Payment providers. Checkout talks to a [`PaymentProvider`]; the built-in [`Sandbox`] behaves
//! like a card processor's test mode (Stripe-like test tokens), with configurable latency and
//! outage rate. Every charge carries an idempotency key: the same key never charges twice, and
//! the provider can be asked later what became of a key (reconciliation after a crash).
//!
//! The sandbox keeps its books in Postgres (`sandbox_charges`), standing for an external
//! provider whose memory outlives a crash of ours — otherwise a retried key after a restart
//! would charge again. Like a processor's own books, it records the charges that arrive together
//! in one statement (group commit): a sale's rush costs it a few transactions, not one per card.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use shared::batch::{Pending, Writers};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargeOutcome {
    Succeeded { reference: String },
    Declined { code: &'static str, message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    #[error("the payment provider is unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait PaymentProvider: Send + Sync {
    fn name(&self) -> &'static str;
    /// Whether `token` is a payment token of this provider (checked before anything is stored).
    fn accepts(&self, token: &str) -> bool;
    /// Charges `amount_cents` to the card behind `token`. Idempotent per `key`.
    async fn charge(
        &self,
        key: &str,
        amount_cents: i64,
        token: &str,
    ) -> Result<ChargeOutcome, PaymentError>;
    /// What became of the charge made with `key`, if any was made.
    async fn lookup(&self, key: &str) -> Result<Option<ChargeOutcome>, PaymentError>;
    /// Refunds a successful charge. Idempotent per reference.
    async fn refund(&self, reference: &str) -> Result<(), PaymentError>;
}

/// Test tokens the sandbox understands.
pub const TOKEN_OK: &str = "tok_visa";
pub const TOKEN_DECLINED: &str = "tok_chargeDeclined";
pub const TOKEN_INSUFFICIENT: &str = "tok_chargeDeclinedInsufficientFunds";

pub fn is_known_token(token: &str) -> bool {
    [TOKEN_OK, TOKEN_DECLINED, TOKEN_INSUFFICIENT].contains(&token)
}

pub struct Sandbox {
    pg: PgPool,
    latency: Duration,
    failure_rate: f64,
    /// Records charges in batches, as a card processor's own books would.
    ledger: Writers<LedgerEntry, Recorded>,
}

/// The outcome and reference stored under a charge's key, or why the ledger could not tell.
type Recorded = Result<(String, String), String>;

/// A charge the sandbox is asked to record: the first under its key decides.
struct LedgerEntry {
    key: String,
    reference: String,
    amount_cents: i64,
    outcome: &'static str,
}

impl Sandbox {
    pub fn new(pg: PgPool, latency: Duration, failure_rate: f64) -> Self {
        let ledger_pg = pg.clone();
        Sandbox {
            pg,
            latency,
            failure_rate: failure_rate.clamp(0.0, 1.0),
            ledger: Writers::start(2, 256, 4_096, move |batch| {
                record_charges(ledger_pg.clone(), batch)
            }),
        }
    }

    async fn delay(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

/// Records a batch of charges in one statement: each key's first charge is stored, and every
/// entry is answered with its key's stored outcome and reference (an earlier charge's, if the
/// key was used before or twice in this batch).
async fn record_charges(pg: PgPool, batch: Vec<Pending<LedgerEntry, Recorded>>) {
    let recorded: Result<Vec<(String, String, String)>, sqlx::Error> = sqlx::query_as(
        "WITH asked AS (
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[])
                 AS a(idempotency_key, reference, amount_cents, outcome)),
         created AS (
             INSERT INTO sandbox_charges (idempotency_key, reference, amount_cents, outcome)
             -- In key order: batches sharing keys wait for each other one way only.
             SELECT * FROM asked ORDER BY idempotency_key
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING idempotency_key, outcome, reference)
         SELECT idempotency_key, outcome, reference FROM created
         UNION ALL
         SELECT c.idempotency_key, c.outcome, c.reference FROM sandbox_charges c
         WHERE c.idempotency_key = ANY($1::text[])
           AND c.idempotency_key NOT IN (SELECT idempotency_key FROM created)",
    )
    .bind(
        batch
            .iter()
            .map(|p| p.item.key.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        batch
            .iter()
            .map(|p| p.item.reference.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        batch
            .iter()
            .map(|p| p.item.amount_cents)
            .collect::<Vec<_>>(),
    )
    .bind(batch.iter().map(|p| p.item.outcome).collect::<Vec<_>>())
    .fetch_all(&pg)
    .await;
    // A key another transaction stored after this statement began is not in its snapshot: it
    // is read back by a statement of its own.
    let recorded = match recorded {
        Ok(mut rows) if rows.len() < batch.len() => {
            let missing: Vec<&str> = batch
                .iter()
                .map(|p| p.item.key.as_str())
                .filter(|key| !rows.iter().any(|(k, ..)| k == key))
                .collect();
            if !missing.is_empty() {
                match sqlx::query_as(
                    "SELECT idempotency_key, outcome, reference FROM sandbox_charges
                     WHERE idempotency_key = ANY($1)",
                )
                .bind(&missing)
                .fetch_all(&pg)
                .await
                {
                    Ok(more) => rows.extend(more),
                    Err(e) => tracing::warn!(error = %e, "sandbox ledger read-back failed"),
                }
            }
            Ok(rows)
        }
        other => other,
    };
    let recorded: HashMap<String, (String, String)> = match recorded {
        Ok(rows) => rows
            .into_iter()
            .map(|(key, code, reference)| (key, (code, reference)))
            .collect(),
        Err(e) => {
            let e = e.to_string();
            for pending in batch {
                let _ = pending.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    for pending in batch {
        let answer = recorded
            .get(&pending.item.key)
            .cloned()
            .ok_or_else(|| "charge vanished".to_owned());
        let _ = pending.reply.send(answer);
    }
}

fn unavailable(e: sqlx::Error) -> PaymentError {
    PaymentError::Unavailable(e.to_string())
}

fn outcome(code: &str, reference: String) -> ChargeOutcome {
    match code {
        "succeeded" => ChargeOutcome::Succeeded { reference },
        "insufficient_funds" => ChargeOutcome::Declined {
            code: "insufficient_funds",
            message: "the card has insufficient funds".into(),
        },
        _ => ChargeOutcome::Declined {
            code: "card_declined",
            message: "the card was declined".into(),
        },
    }
}

#[async_trait]
impl PaymentProvider for Sandbox {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn accepts(&self, token: &str) -> bool {
        is_known_token(token)
    }

    async fn charge(
        &self,
        key: &str,
        amount_cents: i64,
        token: &str,
    ) -> Result<ChargeOutcome, PaymentError> {
        self.delay().await;
        if self.failure_rate > 0.0 && rand::random::<f64>() < self.failure_rate {
            return Err(PaymentError::Unavailable("sandbox outage".into()));
        }
        let code = match token {
            TOKEN_OK => "succeeded",
            TOKEN_INSUFFICIENT => "insufficient_funds",
            _ => "card_declined",
        };
        // The first charge under a key decides; later ones read it back.
        let (code, reference) = self
            .ledger
            .submit(LedgerEntry {
                key: key.to_owned(),
                reference: format!("sb_ch_{}", Uuid::now_v7().simple()),
                amount_cents,
                outcome: code,
            })
            .await
            .unwrap_or_else(|| Err("the sandbox ledger stopped".into()))
            .map_err(PaymentError::Unavailable)?;
        Ok(outcome(&code, reference))
    }

    async fn lookup(&self, key: &str) -> Result<Option<ChargeOutcome>, PaymentError> {
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT outcome, reference FROM sandbox_charges WHERE idempotency_key = $1",
        )
        .bind(key)
        .fetch_optional(&self.pg)
        .await
        .map_err(unavailable)?;
        Ok(row.map(|(code, reference)| outcome(&code, reference)))
    }

    async fn refund(&self, reference: &str) -> Result<(), PaymentError> {
        self.delay().await;
        sqlx::query("UPDATE sandbox_charges SET refunded = true WHERE reference = $1")
            .bind(reference)
            .execute(&self.pg)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
