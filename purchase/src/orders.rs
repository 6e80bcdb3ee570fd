//! A fan's order after the sale: the pass that bought it expires within minutes, so a completed
//! checkout also answers a `manage_token`, with which the fan views the order
//! (`GET /api/v1/orders/{order_id}`) and refunds it within the event's rule
//! (`POST /api/v1/orders/{order_id}/refund`: offered by the organizer via
//! `fan_refund_cutoff_hours`, and asked before that many hours ahead of the event).
//!
//! The token is HMAC-SHA256 of the order id under `FAIRGATE_ORDER_SECRET`: every instance
//! derives the same one, nothing about it is stored, and it is compared in constant time.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use shared::extract::{Json, Path};
use shared::ApiError;
use tracing::instrument;
use uuid::Uuid;

use crate::checkout::{load_order, OrderView};
use crate::refunds::{refund_order, Refunded, Refunder};
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/orders/{order_id}", get(view))
        .route("/api/v1/orders/{order_id}/refund", post(refund))
}

/// The key of manage tokens.
#[derive(Clone)]
pub struct OrderKeys {
    key: ring::hmac::Key,
}

impl OrderKeys {
    /// From the configured secret (32+ characters); without one, a random secret for this
    /// process only (tokens then stop working at restart and on other instances).
    pub fn new(secret: Option<&str>) -> anyhow::Result<Self> {
        let secret = match secret {
            Some(s) if s.len() >= 32 => s.as_bytes().to_vec(),
            Some(_) => anyhow::bail!("FAIRGATE_ORDER_SECRET must be at least 32 characters"),
            None => {
                tracing::warn!(
                    "FAIRGATE_ORDER_SECRET is not set: order manage tokens last until restart"
                );
                shared::token::random_seed().to_vec()
            }
        };
        Ok(OrderKeys {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
        })
    }

    pub fn manage_token(&self, order: Uuid) -> String {
        let tag = ring::hmac::sign(&self.key, order.as_bytes());
        format!("om_{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    fn verify(&self, order: Uuid, token: &str) -> bool {
        token
            .strip_prefix("om_")
            .and_then(|t| URL_SAFE_NO_PAD.decode(t).ok())
            .is_some_and(|tag| ring::hmac::verify(&self.key, order.as_bytes(), &tag).is_ok())
    }
}

/// The order named by the path, proven by its manage token.
pub struct OrderOwner(pub Uuid);

impl FromRequestParts<AppState> for OrderOwner {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Path(order) = Path::<Uuid>::from_request_parts(parts, state).await?;
        let token = shared::extract::bearer(parts).ok_or_else(|| {
            ApiError::Unauthorized(
                "manage_token_missing",
                "send the order's manage_token as a bearer token".into(),
            )
        })?;
        if !state.orders.verify(order, token) {
            return Err(ApiError::Unauthorized(
                "manage_token_invalid",
                "this is not the manage token of that order".into(),
            ));
        }
        Ok(OrderOwner(order))
    }
}

#[instrument(skip_all, fields(order = %order))]
async fn view(
    State(state): State<AppState>,
    OrderOwner(order): OrderOwner,
) -> Result<Json<OrderView>, ApiError> {
    let (view, _) = load_order(&state.pg, order)
        .await?
        .ok_or_else(|| ApiError::NotFound("order_not_found", "no such order".into()))?;
    Ok(Json(view))
}

#[instrument(skip_all, fields(order = %order))]
async fn refund(
    State(state): State<AppState>,
    OrderOwner(order): OrderOwner,
) -> Result<Json<Refunded>, ApiError> {
    Ok(Json(refund_order(&state, order, Refunder::Fan).await?))
}
