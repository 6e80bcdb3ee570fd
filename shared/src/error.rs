//! The error contract of every endpoint: `{"error": "<stable_code>", "message": "<sentence>"}`
//! with the status the brief assigns. Database and Redis failures are logged once, here, and
//! never sent to the client; a refused request changes nothing because handlers return these
//! errors before (or instead of) committing.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// A refused or failed request. Client errors carry a stable machine code and a human sentence.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{1}")]
    BadRequest(&'static str, String),
    #[error("{1}")]
    Unauthorized(&'static str, String),
    #[error("{1}")]
    PaymentRequired(&'static str, String),
    #[error("{1}")]
    Forbidden(&'static str, String),
    #[error("{1}")]
    NotFound(&'static str, String),
    #[error("{1}")]
    MethodNotAllowed(&'static str, String),
    #[error("{1}")]
    Conflict(&'static str, String),
    #[error("{1}")]
    Gone(&'static str, String),
    #[error("{1}")]
    PayloadTooLarge(&'static str, String),
    #[error("{1}")]
    UnsupportedMediaType(&'static str, String),
    #[error("{1}")]
    Unprocessable(&'static str, String),
    #[error("{1}")]
    TooEarly(&'static str, String),
    /// A dependency outside fairgate (the payment provider) is down: retry later.
    #[error("{1}")]
    Unavailable(&'static str, String),
    #[error("{message}")]
    RateLimited {
        retry_after_secs: u64,
        message: String,
    },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("redis error: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
}

impl ApiError {
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        ApiError::Internal(detail.to_string())
    }

    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            BadRequest(..) => StatusCode::BAD_REQUEST,
            Unauthorized(..) => StatusCode::UNAUTHORIZED,
            PaymentRequired(..) => StatusCode::PAYMENT_REQUIRED,
            Forbidden(..) => StatusCode::FORBIDDEN,
            NotFound(..) => StatusCode::NOT_FOUND,
            MethodNotAllowed(..) => StatusCode::METHOD_NOT_ALLOWED,
            Conflict(..) => StatusCode::CONFLICT,
            Gone(..) => StatusCode::GONE,
            PayloadTooLarge(..) => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedMediaType(..) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Unprocessable(..) => StatusCode::UNPROCESSABLE_ENTITY,
            TooEarly(..) => StatusCode::TOO_EARLY,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Unavailable(..) => StatusCode::SERVICE_UNAVAILABLE,
            Database(e) if is_unavailable_db(e) => StatusCode::SERVICE_UNAVAILABLE,
            Redis(_) => StatusCode::SERVICE_UNAVAILABLE,
            Database(_) | Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            BadRequest(c, _)
            | Unauthorized(c, _)
            | PaymentRequired(c, _)
            | Forbidden(c, _)
            | NotFound(c, _)
            | MethodNotAllowed(c, _)
            | Conflict(c, _)
            | Gone(c, _)
            | PayloadTooLarge(c, _)
            | UnsupportedMediaType(c, _)
            | Unprocessable(c, _)
            | TooEarly(c, _)
            | Unavailable(c, _) => c,
            RateLimited { .. } => "rate_limited",
            Database(e) if is_unavailable_db(e) => "unavailable",
            Redis(_) => "unavailable",
            Database(_) | Internal(_) => "internal",
        }
    }

    /// The sentence sent to the client: server-side detail stays in the log.
    fn public_message(&self) -> String {
        if let ApiError::Unavailable(_, message) = self {
            return message.clone();
        }
        match self.status() {
            StatusCode::SERVICE_UNAVAILABLE => {
                "a backing store is unavailable; retry shortly".to_string()
            }
            StatusCode::INTERNAL_SERVER_ERROR => "internal error".to_string(),
            _ => self.to_string(),
        }
    }
}

/// Whether a database error means Postgres is out of reach or overloaded (retry later), not
/// that the request was wrong or the code broken.
pub fn is_unavailable_db(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, code = self.code(), "request failed");
        }
        let body = ErrorBody {
            error: self.code(),
            message: self.public_message(),
        };
        let mut response = (status, axum::Json(body)).into_response();
        if let ApiError::RateLimited {
            retry_after_secs, ..
        } = &self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// The name of the Postgres constraint a statement violated, if that is why it failed.
pub fn violated_constraint(err: &sqlx::Error) -> Option<&str> {
    match err {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
