//! Payment providers. Checkout talks to a [`PaymentProvider`]; the built-in [`Sandbox`] behaves
//! like a card processor's test mode (Stripe-like test tokens), with configurable latency and
//! outage rate. Every charge carries an idempotency key: the same key never charges twice.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
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
    /// Charges `amount_cents` to the card behind `token`. Idempotent per `key`.
    async fn charge(
        &self,
        key: &str,
        amount_cents: i64,
        token: &str,
    ) -> Result<ChargeOutcome, PaymentError>;
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
    latency: Duration,
    failure_rate: f64,
    charges: Mutex<HashMap<String, ChargeOutcome>>,
}

impl Sandbox {
    pub fn new(latency: Duration, failure_rate: f64) -> Self {
        Sandbox {
            latency,
            failure_rate: failure_rate.clamp(0.0, 1.0),
            charges: Mutex::default(),
        }
    }
}

#[async_trait]
impl PaymentProvider for Sandbox {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    async fn charge(
        &self,
        key: &str,
        _amount_cents: i64,
        token: &str,
    ) -> Result<ChargeOutcome, PaymentError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.failure_rate > 0.0 && rand::random::<f64>() < self.failure_rate {
            return Err(PaymentError::Unavailable("sandbox outage".into()));
        }
        let mut charges = self.charges.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = charges
            .entry(key.to_owned())
            .or_insert_with(|| match token {
                TOKEN_OK => ChargeOutcome::Succeeded {
                    reference: format!("sb_ch_{}", Uuid::new_v4().simple()),
                },
                TOKEN_INSUFFICIENT => ChargeOutcome::Declined {
                    code: "insufficient_funds",
                    message: "the card has insufficient funds".into(),
                },
                _ => ChargeOutcome::Declined {
                    code: "card_declined",
                    message: "the card was declined".into(),
                },
            });
        Ok(outcome.clone())
    }

    async fn refund(&self, _reference: &str) -> Result<(), PaymentError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_same_key_never_charges_twice() {
        let sandbox = Sandbox::new(Duration::ZERO, 0.0);
        let a = sandbox.charge("k1", 100, TOKEN_OK).await.expect("charge");
        let b = sandbox.charge("k1", 100, TOKEN_OK).await.expect("charge");
        assert_eq!(a, b);
        let c = sandbox.charge("k2", 100, TOKEN_OK).await.expect("charge");
        assert_ne!(a, c);
        assert!(matches!(
            sandbox.charge("k3", 100, TOKEN_DECLINED).await,
            Ok(ChargeOutcome::Declined {
                code: "card_declined",
                ..
            })
        ));
    }
}
