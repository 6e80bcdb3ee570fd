//! The Stripe provider, over Stripe's HTTP API (`FAIRGATE_PAYMENT_PROVIDER=stripe`).
//!
//! - **Charge**: `POST /v1/payment_intents` (form-encoded: `amount`, `currency`,
//!   `payment_method` — the card's `pm_…` id from Stripe.js or a test id such as `pm_card_visa` —
//!   `confirm=true`, card only, and our key in `metadata[fairgate_key]`) with the checkout's key as
//!   `Idempotency-Key`, so a retried request never charges twice. `status: succeeded` is a
//!   success; a `402` `card_error` is a decline with its `decline_code`; anything else (5xx, a
//!   timeout, `requires_action`) is not a success.
//! - **Lookup** (reconciliation after a crash): `GET /v1/payment_intents/search` by that metadata.
//! - **Refund**: `POST /v1/refunds` with `payment_intent`, idempotent per payment intent.
//! - **Webhook** (`POST /api/v1/payments/stripe/webhook`): the `Stripe-Signature` header is
//!   checked (HMAC-SHA256 of `"{t}.{body}"` under the endpoint secret, constant-time, at most
//!   five minutes old); events are stored once per id in `provider_events`, and a
//!   `payment_intent.succeeded` for one of our payments records its reference. Settling stays
//!   with checkout and reconciliation, so a webhook arriving mid-checkout cannot race it.
//!
//! `FAIRGATE_STRIPE_BASE_URL` points elsewhere for tests (a local fake speaking the same wire
//! format). The secret key is sent as a bearer token and never logged.

use std::time::Duration;

use async_trait::async_trait;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde::Deserialize;
use shared::extract::{Json, RawBody};
use shared::ApiError;

use crate::payments::{ChargeOutcome, PaymentError, PaymentProvider};
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/payments/stripe/webhook", post(webhook))
}

pub struct Stripe {
    http: reqwest::Client,
    base_url: String,
    secret_key: String,
    currency: String,
}

impl Stripe {
    pub fn new(base_url: &str, secret_key: &str, currency: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !secret_key.is_empty(),
            "FAIRGATE_STRIPE_SECRET_KEY is required with the stripe provider"
        );
        Ok(Stripe {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()?,
            base_url: base_url.trim_end_matches('/').to_owned(),
            secret_key: secret_key.to_owned(),
            currency: currency.to_lowercase(),
        })
    }
}

#[derive(Debug, Deserialize)]
struct PaymentIntent {
    id: String,
    status: String,
    #[serde(default)]
    last_payment_error: Option<StripeError>,
}

#[derive(Debug, Deserialize)]
struct StripeError {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    decline_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: StripeError,
}

#[derive(Debug, Deserialize)]
struct SearchResult {
    data: Vec<PaymentIntent>,
}

fn declined(error: &StripeError) -> ChargeOutcome {
    let reason = error.decline_code.as_deref().or(error.code.as_deref());
    let code = match reason {
        Some("insufficient_funds") => "insufficient_funds",
        Some("expired_card") => "expired_card",
        Some("incorrect_cvc") => "incorrect_cvc",
        Some("authentication_required") => "authentication_required",
        _ => "card_declined",
    };
    ChargeOutcome::Declined {
        code,
        message: error
            .message
            .clone()
            .unwrap_or_else(|| "the card was declined".into()),
    }
}

fn intent_outcome(intent: PaymentIntent) -> Option<ChargeOutcome> {
    match intent.status.as_str() {
        "succeeded" => Some(ChargeOutcome::Succeeded {
            reference: intent.id,
        }),
        "requires_action" => Some(ChargeOutcome::Declined {
            code: "authentication_required",
            message: "the card needs the cardholder's authentication".into(),
        }),
        "requires_payment_method" | "canceled" => Some(match &intent.last_payment_error {
            Some(error) => declined(error),
            None => ChargeOutcome::Declined {
                code: "card_declined",
                message: "the card was declined".into(),
            },
        }),
        // processing, requires_confirmation, requires_capture: not settled yet.
        _ => None,
    }
}

fn unavailable(e: impl std::fmt::Display) -> PaymentError {
    PaymentError::Unavailable(e.to_string())
}

#[async_trait]
impl PaymentProvider for Stripe {
    fn name(&self) -> &'static str {
        "stripe"
    }

    fn accepts(&self, token: &str) -> bool {
        token.starts_with("pm_")
            && token.len() <= 255
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    }

    async fn charge(
        &self,
        key: &str,
        amount_cents: i64,
        token: &str,
    ) -> Result<ChargeOutcome, PaymentError> {
        let amount = amount_cents.to_string();
        let form = [
            ("amount", amount.as_str()),
            ("currency", self.currency.as_str()),
            ("payment_method", token),
            ("payment_method_types[]", "card"),
            ("confirm", "true"),
            ("metadata[fairgate_key]", key),
        ];
        let response = self
            .http
            .post(format!("{}/v1/payment_intents", self.base_url))
            .bearer_auth(&self.secret_key)
            .header("Idempotency-Key", key)
            .form(&form)
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status();
        if status.is_success() {
            let intent: PaymentIntent = response.json().await.map_err(unavailable)?;
            return intent_outcome(intent).ok_or_else(|| {
                PaymentError::Unavailable("the payment is still processing at Stripe".into())
            });
        }
        if status == StatusCode::PAYMENT_REQUIRED {
            let body: ErrorBody = response.json().await.map_err(unavailable)?;
            if body.error.kind == "card_error" {
                return Ok(declined(&body.error));
            }
        }
        Err(PaymentError::Unavailable(format!(
            "Stripe answered {status}"
        )))
    }

    async fn lookup(&self, key: &str) -> Result<Option<ChargeOutcome>, PaymentError> {
        let query = format!("metadata['fairgate_key']:'{}'", key.replace('\'', "\\'"));
        let response = self
            .http
            .get(format!("{}/v1/payment_intents/search", self.base_url))
            .bearer_auth(&self.secret_key)
            .query(&[("query", query.as_str())])
            .send()
            .await
            .map_err(unavailable)?;
        if !response.status().is_success() {
            return Err(PaymentError::Unavailable(format!(
                "Stripe search answered {}",
                response.status()
            )));
        }
        let found: SearchResult = response.json().await.map_err(unavailable)?;
        Ok(found.data.into_iter().next().and_then(intent_outcome))
    }

    async fn refund(&self, reference: &str) -> Result<(), PaymentError> {
        let response = self
            .http
            .post(format!("{}/v1/refunds", self.base_url))
            .bearer_auth(&self.secret_key)
            .header("Idempotency-Key", format!("refund:{reference}"))
            .form(&[("payment_intent", reference)])
            .send()
            .await
            .map_err(unavailable)?;
        if response.status().is_success() {
            return Ok(());
        }
        // Refunding what is already refunded is done.
        if response.status() == StatusCode::BAD_REQUEST {
            let body: Option<ErrorBody> = response.json().await.ok();
            if body.is_some_and(|b| b.error.code.as_deref() == Some("charge_already_refunded")) {
                return Ok(());
            }
            return Err(PaymentError::Unavailable(
                "Stripe refused the refund".into(),
            ));
        }
        Err(PaymentError::Unavailable(format!(
            "Stripe refund answered {}",
            response.status()
        )))
    }
}

/// How old a webhook's signature timestamp may be.
const WEBHOOK_TOLERANCE_SECS: i64 = 300;

/// Checks a `Stripe-Signature` header (`t=…,v1=…[,v1=…]`) over `body`.
pub fn verify_signature(header: &str, body: &[u8], secret: &str, now: i64) -> Result<(), String> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v)) => signatures.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or("no timestamp in Stripe-Signature")?;
    if (now - timestamp).abs() > WEBHOOK_TOLERANCE_SECS {
        return Err("the signature's timestamp is too old or in the future".into());
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    if signatures
        .iter()
        .any(|s| ring::hmac::verify(&key, &signed, s).is_ok())
    {
        Ok(())
    } else {
        Err("no v1 signature matches".into())
    }
}

#[derive(Deserialize)]
struct WebhookEvent {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    data: WebhookData,
}

#[derive(Deserialize)]
struct WebhookData {
    object: serde_json::Value,
}

#[derive(serde::Serialize)]
struct Received {
    received: bool,
    duplicate: bool,
}

async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Json<Received>, ApiError> {
    let Some(secret) = state.config.stripe_webhook_secret.as_deref() else {
        return Err(ApiError::NotFound(
            "webhook_not_configured",
            "this deployment takes no Stripe webhooks".into(),
        ));
    };
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::Unauthorized(
                "signature_missing",
                "a Stripe webhook needs its Stripe-Signature header".into(),
            )
        })?;
    verify_signature(header, &body, secret, chrono::Utc::now().timestamp())
        .map_err(|why| ApiError::Unauthorized("signature_invalid", why))?;
    if shared::extract::json_has_nul(&body) {
        return Err(ApiError::Unprocessable(
            "invalid_body",
            "a webhook event must not contain the NUL character (\\u0000)".into(),
        ));
    }
    let event: WebhookEvent = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest("malformed_json", e.to_string()))?;
    if !(1..=255).contains(&event.id.chars().count()) {
        return Err(ApiError::Unprocessable(
            "invalid_field",
            "id: a webhook event's id must be 1 to 255 characters".into(),
        ));
    }
    let stored = sqlx::query(
        "INSERT INTO provider_events (provider, event_id, kind, payload)
         VALUES ('stripe', $1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(&event.id)
    .bind(&event.kind)
    .bind(&event.data.object)
    .execute(&state.pg)
    .await?
    .rows_affected()
        == 1;
    if stored && event.kind == "payment_intent.succeeded" {
        let key = event.data.object["metadata"]["fairgate_key"].as_str();
        let reference = event.data.object["id"].as_str();
        if let (Some(key), Some(reference)) = (key, reference) {
            sqlx::query(
                "UPDATE payments SET provider_ref = $2
                 WHERE idempotency_key = $1 AND provider_ref IS NULL",
            )
            .bind(key)
            .bind(reference)
            .execute(&state.pg)
            .await?;
        }
    }
    tracing::info!(kind = %event.kind, duplicate = !stored, "stripe webhook");
    Ok(Json(Received {
        received: true,
        duplicate: !stored,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, t: i64, body: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let mut signed = format!("{t}.").into_bytes();
        signed.extend_from_slice(body);
        hex::encode(ring::hmac::sign(&key, &signed).as_ref())
    }

    #[test]
    fn webhook_signatures_are_checked_like_stripe_does() {
        let body = br#"{"id":"evt_1"}"#;
        let now = 1_700_000_000;
        let good = format!("t={now},v1={}", sign("whsec_test", now, body));
        assert!(verify_signature(&good, body, "whsec_test", now + 10).is_ok());
        // Rotated secrets: any v1 may match.
        let two = format!(
            "t={now},v1={},v1={}",
            sign("old", now, body),
            sign("whsec_test", now, body)
        );
        assert!(verify_signature(&two, body, "whsec_test", now).is_ok());
        assert!(verify_signature(&good, b"{\"id\":\"evt_2\"}", "whsec_test", now).is_err());
        assert!(verify_signature(&good, body, "another", now).is_err());
        assert!(verify_signature(&good, body, "whsec_test", now + 301).is_err());
        assert!(verify_signature("v1=00", body, "whsec_test", now).is_err());
        assert!(verify_signature("", body, "whsec_test", now).is_err());
    }

    #[test]
    fn intents_map_to_outcomes() {
        let intent = |status: &str, error: Option<&str>| PaymentIntent {
            id: "pi_1".into(),
            status: status.into(),
            last_payment_error: error.map(|d| StripeError {
                kind: "card_error".into(),
                code: Some("card_declined".into()),
                decline_code: Some(d.into()),
                message: None,
            }),
        };
        assert_eq!(
            intent_outcome(intent("succeeded", None)),
            Some(ChargeOutcome::Succeeded {
                reference: "pi_1".into()
            })
        );
        assert!(matches!(
            intent_outcome(intent(
                "requires_payment_method",
                Some("insufficient_funds")
            )),
            Some(ChargeOutcome::Declined {
                code: "insufficient_funds",
                ..
            })
        ));
        assert!(matches!(
            intent_outcome(intent("requires_action", None)),
            Some(ChargeOutcome::Declined {
                code: "authentication_required",
                ..
            })
        ));
        assert_eq!(intent_outcome(intent("processing", None)), None);
    }
}
