//! The pass gate: every fan endpoint takes a [`Pass`], verified locally against the queue's
//! published keys (fetched from its JWKS, refreshed when a pass names an unknown `kid`, at most
//! once per [`REFRESH_EVERY`]) and checked to be for the event in the path.

use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use shared::extract::bearer;
use shared::ids::EventId;
use shared::token::{Jwks, PassClaims, TokenError, TokenKind, Verifier};
use shared::ApiError;
use std::sync::Arc;
use tokio::sync::Mutex;

use crate::AppState;

const REFRESH_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct PassKeys {
    verifier: Verifier,
    url: String,
    http: reqwest::Client,
    last_refresh: Arc<Mutex<Option<Instant>>>,
}

impl PassKeys {
    pub fn new(url: String, issuer: String) -> anyhow::Result<Self> {
        Ok(PassKeys {
            verifier: Verifier::new(issuer),
            url,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()?,
            last_refresh: Arc::default(),
        })
    }

    pub async fn refresh(&self) -> anyhow::Result<usize> {
        let jwks: Jwks = self
            .http
            .get(&self.url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let added = self.verifier.add_jwks(&jwks)?;
        tracing::info!(keys = added, "pass keys refreshed");
        Ok(added)
    }

    /// Verifies a pass, fetching the key set again if the pass names a key we do not know.
    pub async fn verify(&self, token: &str, event: EventId) -> Result<PassClaims, TokenError> {
        if let Some(kid) = Verifier::kid_of(token) {
            if !self.verifier.knows(&kid) {
                let mut last = self.last_refresh.lock().await;
                if last.is_none_or(|t| t.elapsed() >= REFRESH_EVERY) {
                    *last = Some(Instant::now());
                    if let Err(e) = self.refresh().await {
                        tracing::warn!(error = %e, "cannot refresh pass keys");
                    }
                }
            }
        }
        self.verifier.verify_pass(token, event)
    }
}

/// A verified pass for the event named by the path's `{id}`.
pub struct Pass {
    pub claims: PassClaims,
    pub event: EventId,
}

impl FromRequestParts<AppState> for Pass {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest("bad_path", e.body_text()))?;
        let event = params
            .iter()
            .find(|(name, _)| *name == "id")
            .and_then(|(_, raw)| raw.parse::<i64>().ok())
            .and_then(EventId::new)
            .ok_or_else(|| ApiError::NotFound("event_not_found", "no such event".into()))?;
        let token = bearer(parts).ok_or_else(|| TokenError::Missing.into_api(TokenKind::Pass))?;
        let claims = state
            .passes
            .verify(token, event)
            .await
            .map_err(|e| e.into_api(TokenKind::Pass))?;
        Ok(Pass { claims, event })
    }
}
