//! Role tokens for the organizer, operator and support APIs: bearer tokens compared in constant
//! time (as SHA-256 digests) against the configured ones. A role with no token configured is
//! closed (403); a missing or wrong token is a 401.

use axum::http::request::Parts;
use sha2::Digest;

use crate::extract::bearer;
use crate::ApiError;

/// The bearer token of a role with one holder (the organizer API for now).
#[derive(Clone)]
pub struct RoleToken(NamedTokens);

impl RoleToken {
    pub fn new(role: &'static str, token: Option<&str>) -> Self {
        let tokens = token
            .filter(|t| !t.is_empty())
            .map(|t| (role.to_owned(), digest(t)))
            .into_iter()
            .collect();
        RoleToken(NamedTokens { role, tokens })
    }

    /// 401 without a bearer token or with a wrong one; 403 if this role is not enabled.
    pub fn check(&self, parts: &Parts) -> Result<(), ApiError> {
        self.0.check(parts).map(|_| ())
    }
}

/// Several named bearer tokens for one role (`alice:token1,bob:token2`), so an audit trail can
/// say who acted. Compared in constant time like [`RoleToken`].
#[derive(Clone)]
pub struct NamedTokens {
    role: &'static str,
    tokens: Vec<(String, [u8; 32])>,
}

impl NamedTokens {
    /// From `name:token` pairs separated by commas; a bad pair is an error at start-up.
    pub fn parse(role: &'static str, raw: Option<&str>) -> anyhow::Result<Self> {
        let mut tokens = Vec::new();
        for pair in raw
            .unwrap_or_default()
            .split(',')
            .filter(|p| !p.trim().is_empty())
        {
            let (name, token) = pair
                .trim()
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("{role} tokens are name:token pairs"))?;
            anyhow::ensure!(
                !name.is_empty() && token.len() >= 16,
                "{role} token for '{name}' must be at least 16 characters"
            );
            tokens.push((
                name.to_owned(),
                sha2::Sha256::digest(token.as_bytes()).into(),
            ));
        }
        Ok(NamedTokens { role, tokens })
    }

    /// The name of the presented token's holder.
    pub fn check(&self, parts: &Parts) -> Result<String, ApiError> {
        if self.tokens.is_empty() {
            return Err(ApiError::Forbidden(
                "role_disabled",
                format!("the {} API is not enabled on this deployment", self.role),
            ));
        }
        let presented = bearer(parts).ok_or_else(|| {
            ApiError::Unauthorized(
                "credentials_missing",
                format!("the {} API needs an Authorization: Bearer token", self.role),
            )
        })?;
        let presented = digest(presented);
        let mut found = None;
        // Every token is compared, in constant time: no timing signal about any of them.
        for (name, expected) in &self.tokens {
            if constant_time_eq(&presented, expected) {
                found = Some(name.clone());
            }
        }
        found.ok_or_else(|| {
            ApiError::Unauthorized(
                "credentials_invalid",
                format!("that is not a valid {} token", self.role),
            )
        })
    }
}

fn digest(token: &str) -> [u8; 32] {
    sha2::Sha256::digest(token.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}
