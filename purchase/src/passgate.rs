//! The pass gate: every fan endpoint takes a [`Pass`], verified locally against the queue's
//! published keys and checked to be for the event in the path.
//!
//! The key set is the queue's JWKS as last fetched, *replaced* on every fetch: fetched at
//! start, every `FAIRGATE_JWKS_REFRESH_SECS` ([`run_refresher`]), and when a pass names an
//! unknown `kid` (at most once per [`REFRESH_EVERY`]). A key the queue stops publishing stops
//! being trusted at the next fetch, so a leaked key is revoked everywhere within one refresh
//! period (a failed fetch keeps the previous set).
//!
//! A fan presents the same pass on every request of a purchase (seat map, hold, checkout, live
//! stream), and its Ed25519 check was 17% of the service's CPU in `bench-checkout`. Passes that
//! verified are remembered by the SHA-256 of their exact bytes ([`VERIFIED_PASSES`] at most),
//! with the key that signed them: the same token again skips the signature, not the checks
//! that can change — its key still trusted, its event and its expiry. A refresh forgets the
//! passes of every key that left the set.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sha2::Digest;

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use shared::extract::bearer;
use shared::ids::EventId;
use shared::token::{Jwks, PassClaims, TokenError, TokenKind, Verifier, LEEWAY_SECS};
use shared::ApiError;
use std::sync::Arc;
use tokio::sync::Mutex;

use crate::AppState;

const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// Verified passes remembered at most (~250 bytes each); when full, the memory starts over.
const VERIFIED_PASSES: usize = 20_000;

#[derive(Clone)]
pub struct PassKeys {
    verifier: Verifier,
    url: String,
    http: reqwest::Client,
    last_refresh: Arc<Mutex<Option<Instant>>>,
    verified: Arc<std::sync::Mutex<HashMap<[u8; 32], Remembered>>>,
}

/// A pass that verified, and the key id it was verified with.
#[derive(Clone)]
struct Remembered {
    claims: PassClaims,
    kid: String,
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
            verified: Arc::default(),
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
        let kids = self.verifier.replace_jwks(&jwks)?;
        if let Ok(mut verified) = self.verified.lock() {
            verified.retain(|_, pass| kids.contains(&pass.kid));
        }
        if kids.is_empty() {
            tracing::warn!(url = %self.url, "the pass key set is empty: every pass is refused");
        }
        tracing::debug!(keys = kids.len(), "pass keys refreshed");
        Ok(kids.len())
    }

    /// Verifies a pass, fetching the key set again if the pass names a key we do not know.
    pub async fn verify(&self, token: &str, event: EventId) -> Result<PassClaims, TokenError> {
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        if let Some(Remembered { claims, kid }) = self.remembered(&digest) {
            if !self.verifier.knows(&kid) {
                // Its key left the set since (a refresh forgets such passes; this closes the
                // moment in between): checked in full, and refused.
                self.forget(&digest);
                return self.verify_signed(token, event).await;
            }
            // As the verifier would decide (`LEEWAY_SECS` of clock skew on `exp`); `nbf` was
            // passed when the signature was checked, and time only moves on.
            let now = chrono::Utc::now().timestamp();
            if now > claims.exp.saturating_add(LEEWAY_SECS as i64) {
                self.forget(&digest);
                return Err(TokenError::Expired);
            }
            if claims.evt != event {
                return Err(TokenError::WrongEvent);
            }
            return Ok(claims);
        }
        let claims = self.verify_signed(token, event).await?;
        if let Some(kid) = Verifier::kid_of(token) {
            self.remember(digest, &claims, kid);
        }
        Ok(claims)
    }

    fn remembered(&self, digest: &[u8; 32]) -> Option<Remembered> {
        self.verified.lock().ok()?.get(digest).cloned()
    }

    fn forget(&self, digest: &[u8; 32]) {
        if let Ok(mut verified) = self.verified.lock() {
            verified.remove(digest);
        }
    }

    fn remember(&self, digest: [u8; 32], claims: &PassClaims, kid: String) {
        if let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= VERIFIED_PASSES {
                verified.clear();
            }
            verified.insert(
                digest,
                Remembered {
                    claims: claims.clone(),
                    kid,
                },
            );
        }
    }

    /// The full check: signature, issuer, audience, expiry, not-before, event.
    async fn verify_signed(&self, token: &str, event: EventId) -> Result<PassClaims, TokenError> {
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

/// Fetches the pass keys every `every` until `shutdown` (a failed fetch keeps the last set).
pub async fn run_refresher(
    passes: PassKeys,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        if let Err(e) = passes.refresh().await {
            tracing::warn!(error = %e, "cannot refresh pass keys; keeping the last set");
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use shared::ids::TicketId;
    use shared::token::{Signer, SigningKey};

    fn event(id: i64) -> EventId {
        EventId::new(id).expect("positive")
    }

    fn sign(signer: &Signer, evt: i64, exp_offset: i64) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = PassClaims {
            iss: "fairgate".into(),
            aud: TokenKind::Pass.audience().into(),
            sub: "site:fan".into(),
            evt: event(evt),
            tkt: TicketId::mint(),
            jti: uuid::Uuid::new_v4(),
            iat: now,
            nbf: now,
            exp: now + exp_offset,
            lim: 2,
        };
        signer.sign(TokenKind::Pass, &claims).expect("sign")
    }

    fn keys(signer: &Signer) -> PassKeys {
        let keys =
            PassKeys::new("http://127.0.0.1:9/jwks".into(), "fairgate".into()).expect("keys");
        keys.verifier.add_jwks(&signer.jwks()).expect("jwks");
        keys
    }

    /// Serves a JWKS that the test can change; returns its URL.
    async fn jwks_server(published: Arc<std::sync::Mutex<shared::token::Jwks>>) -> String {
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let jwks = published.lock().expect("jwks").clone();
                async move { axum::Json(jwks) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/jwks")
    }

    #[tokio::test]
    async fn a_refresh_replaces_the_key_set_and_forgets_passes_of_keys_that_left() {
        let old = Signer::new(SigningKey::generate().expect("key"), "fairgate");
        let new = Signer::new(SigningKey::generate().expect("key"), "fairgate");
        let published = Arc::new(std::sync::Mutex::new(old.jwks()));
        let keys =
            PassKeys::new(jwks_server(published.clone()).await, "fairgate".into()).expect("keys");
        assert_eq!(keys.refresh().await.expect("refresh"), 1);
        let leaked = sign(&old, 7, 600);
        keys.verify(&leaked, event(7)).await.expect("trusted");
        assert_eq!(keys.verified.lock().expect("lock").len(), 1, "remembered");

        *published.lock().expect("jwks") = new.jwks();
        assert_eq!(keys.refresh().await.expect("refresh"), 1);
        assert!(
            keys.verified.lock().expect("lock").is_empty(),
            "the passes of the key that left are forgotten"
        );
        assert_eq!(
            keys.verify(&leaked, event(7)).await,
            Err(TokenError::UnknownKey),
            "a key no longer published is no longer trusted"
        );
        keys.verify(&sign(&new, 7, 600), event(7))
            .await
            .expect("the new key is");
    }

    #[tokio::test]
    async fn a_remembered_pass_still_gets_its_event_and_expiry_checked() {
        let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
        let keys = keys(&signer);
        let pass = sign(&signer, 7, 600);
        let first = keys.verify(&pass, event(7)).await.expect("valid");
        assert_eq!(keys.verified.lock().expect("lock").len(), 1, "remembered");
        assert_eq!(keys.verify(&pass, event(7)).await.expect("again"), first);
        assert_eq!(
            keys.verify(&pass, event(8)).await,
            Err(TokenError::WrongEvent),
            "a remembered pass is still for its own event only"
        );

        // An edited pass is other bytes: checked in full, and refused.
        let mut edited = pass.clone().into_bytes();
        let last = edited.len() - 2;
        edited[last] = if edited[last] == b'A' { b'B' } else { b'A' };
        let edited = String::from_utf8(edited).expect("ascii");
        assert_eq!(
            keys.verify(&edited, event(7)).await,
            Err(TokenError::BadSignature)
        );

        // A pass that expires while remembered is refused from then on.
        let short = sign(&signer, 7, -(LEEWAY_SECS as i64) + 1);
        keys.verify(&short, event(7))
            .await
            .expect("valid for a second");
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        assert_eq!(
            keys.verify(&short, event(7)).await,
            Err(TokenError::Expired)
        );
        assert_eq!(keys.verified.lock().expect("lock").len(), 1, "forgotten");
    }
}
