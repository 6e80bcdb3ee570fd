//! Role tokens for the organizer, operator and support APIs: a bearer token compared in
//! constant time against the configured one. A role whose token is not configured is closed.

use axum::http::request::Parts;
use sha2::Digest;

use crate::extract::bearer;
use crate::ApiError;

#[derive(Clone)]
pub struct RoleToken {
    role: &'static str,
    digest: Option<[u8; 32]>,
}

impl RoleToken {
    pub fn new(role: &'static str, token: Option<&str>) -> Self {
        let digest = token
            .filter(|t| !t.is_empty())
            .map(|t| sha2::Sha256::digest(t.as_bytes()).into());
        RoleToken { role, digest }
    }

    /// 401 without a bearer token or with a wrong one; 403 if this role is not enabled.
    pub fn check(&self, parts: &Parts) -> Result<(), ApiError> {
        let Some(expected) = &self.digest else {
            return Err(ApiError::Forbidden(
                "role_disabled",
                format!("the {} API is not enabled on this deployment", self.role),
            ));
        };
        let presented = bearer(parts).ok_or_else(|| {
            ApiError::Unauthorized(
                "credentials_missing",
                format!("the {} API needs an Authorization: Bearer token", self.role),
            )
        })?;
        let digest: [u8; 32] = sha2::Sha256::digest(presented.as_bytes()).into();
        // Comparing digests in constant time: no timing signal about the token.
        let equal = digest
            .iter()
            .zip(expected.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        if equal {
            Ok(())
        } else {
            Err(ApiError::Unauthorized(
                "credentials_invalid",
                format!("that is not a valid {} token", self.role),
            ))
        }
    }
}
