//! Identities asserted by the organizer's own site: the site already knows its users, so it
//! signs a short-lived token naming one (`sub`) and the fan presents it when joining. One such
//! identity gets one place per event, whatever the number of tabs, devices or retries.
//!
//! The token is a JWT signed with HS256 under a secret shared with the organizer
//! (`FAIRGATE_IDENTITY_SECRET`), audience `fairgate:join`, with `sub` and `exp` required, at
//! most [`shared::token::LEEWAY_SECS`] of clock skew, an optional `iss` pinned by
//! `FAIRGATE_IDENTITY_ISSUER`, and an optional `evt` that must match the event.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use shared::ids::{EventId, Identity};
use shared::token::LEEWAY_SECS;
use shared::ApiError;

pub const AUDIENCE: &str = "fairgate:join";

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    evt: Option<i64>,
}

#[derive(Clone)]
pub struct IdentityVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl IdentityVerifier {
    pub fn new(secret: &str, issuer: Option<&str>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            secret.len() >= 32,
            "FAIRGATE_IDENTITY_SECRET must be at least 32 characters"
        );
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_audience(&[AUDIENCE]);
        let mut required = vec!["exp", "sub", "aud"];
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(IdentityVerifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        })
    }

    /// The fan's identity (`site:<sub>`), or why the assertion is refused.
    pub fn verify(&self, token: &str, event: EventId) -> Result<Identity, ApiError> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => ApiError::Unauthorized(
                    "identity_expired",
                    "the identity assertion has expired; get a fresh one from the site".into(),
                ),
                _ => ApiError::Unauthorized(
                    "identity_invalid",
                    "the identity assertion is not valid for fairgate".into(),
                ),
            })?
            .claims;
        if claims.evt.is_some_and(|e| e != event.get()) {
            return Err(ApiError::Forbidden(
                "identity_wrong_event",
                "the identity assertion is for another event".into(),
            ));
        }
        let sub = Some(claims.sub).filter(|s| !s.trim().is_empty());
        sub.and_then(|sub| Identity::new(format!("site:{sub}")))
            .ok_or_else(|| {
                ApiError::Unprocessable(
                    "identity_invalid",
                    "the identity's sub must be 1 to 195 printable characters".into(),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn token(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("sign")
    }

    fn event() -> EventId {
        EventId::new(7).expect("positive")
    }

    #[test]
    fn a_site_assertion_names_the_fan() {
        let v = IdentityVerifier::new(SECRET, None).expect("verifier");
        let exp = chrono::Utc::now().timestamp() + 300;
        let t = token(
            SECRET,
            serde_json::json!({"sub": "user-42", "aud": AUDIENCE, "exp": exp}),
        );
        assert_eq!(
            v.verify(&t, event()).expect("valid").as_str(),
            "site:user-42"
        );
    }

    #[test]
    fn forged_expired_misdirected_or_incomplete_assertions_are_refused() {
        let v = IdentityVerifier::new(SECRET, Some("tickets.example")).expect("verifier");
        let exp = chrono::Utc::now().timestamp() + 300;
        let good =
            serde_json::json!({"sub": "u", "aud": AUDIENCE, "exp": exp, "iss": "tickets.example"});
        let code = |t: String| v.verify(&t, event()).map(|_| ()).map_err(|e| e.code());
        assert_eq!(code(token(SECRET, good.clone())), Ok(()));
        assert_eq!(
            code(token("another-secret-another-secret-xx", good.clone())),
            Err("identity_invalid")
        );
        let mut expired = good.clone();
        expired["exp"] = serde_json::json!(exp - 3600);
        assert_eq!(code(token(SECRET, expired)), Err("identity_expired"));
        let mut other_event = good.clone();
        other_event["evt"] = serde_json::json!(8);
        assert_eq!(
            code(token(SECRET, other_event)),
            Err("identity_wrong_event")
        );
        let mut no_iss = good.clone();
        no_iss.as_object_mut().expect("object").remove("iss");
        assert_eq!(code(token(SECRET, no_iss)), Err("identity_invalid"));
        for blank in ["", "   "] {
            let mut nobody = good.clone();
            nobody["sub"] = serde_json::json!(blank);
            assert_eq!(code(token(SECRET, nobody)), Err("identity_invalid"));
        }
        let mut wrong_aud = good;
        wrong_aud["aud"] = serde_json::json!("fairgate:purchase");
        assert_eq!(code(token(SECRET, wrong_aud)), Err("identity_invalid"));
        assert!(IdentityVerifier::new("short", None).is_err());
    }
}
