//! The buffer's web page: a fan checks a join receipt in the browser against fairgate's
//! published keys and the published draw. Plain HTML and JS, no external assets.

use axum::extract::State;
use axum::response::Html;
use axum::routing::get;
use axum::Router;
use shared::extract::Path;
use shared::ids::EventId;
use shared::ApiError;

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/e/{id}/receipt", get(receipt_page))
}

async fn receipt_page(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Html<String>, ApiError> {
    EventId::from_path(id)?;
    Ok(state
        .config
        .common
        .web
        .page(include_str!("pages/receipt.html"), serde_json::json!({})))
}
