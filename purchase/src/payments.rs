//! Payment providers. Checkout talks to a [`PaymentProvider`]; the built-in [`Sandbox`] behaves
//! like a card processor's test mode (Stripe-like test tokens), with configurable latency and
//! outage rate. Every charge carries an idempotency key: the same key never charges twice, and
//! the provider can be asked later what became of a key (reconciliation after a crash).
//!
//! The sandbox keeps its books in Postgres (`sandbox_charges`), standing for an external
//! provider whose memory outlives a crash of ours — otherwise a retried key after a restart
//! would charge again.

use std::time::Duration;

use async_trait::async_trait;
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
}

impl Sandbox {
    pub fn new(pg: PgPool, latency: Duration, failure_rate: f64) -> Self {
        Sandbox {
            pg,
            latency,
            failure_rate: failure_rate.clamp(0.0, 1.0),
        }
    }

    async fn delay(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
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
        let created: Option<(String, String)> = sqlx::query_as(
            "INSERT INTO sandbox_charges (idempotency_key, reference, amount_cents, outcome)
             VALUES ($1, $2, $3, $4) ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING outcome, reference",
        )
        .bind(key)
        .bind(format!("sb_ch_{}", Uuid::now_v7().simple()))
        .bind(amount_cents)
        .bind(code)
        .fetch_optional(&self.pg)
        .await
        .map_err(unavailable)?;
        match created {
            Some((code, reference)) => Ok(outcome(&code, reference)),
            None => self
                .lookup(key)
                .await?
                .ok_or_else(|| PaymentError::Unavailable("charge vanished".into())),
        }
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
