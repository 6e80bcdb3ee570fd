//! The purchase service's web pages: the fan's event page (join the line from here), the seat
//! page an admitted fan lands on, and the organizer's console. Plain HTML, CSS and JS served by
//! the service itself, no external assets; each page reads the other services' public addresses
//! and the currency from the links object filled in when it is served.

use axum::extract::State;
use axum::response::Html;
use axum::routing::get;
use axum::Router;
use serde_json::json;
use shared::extract::Path;
use shared::ids::EventId;
use shared::ApiError;

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/e/{id}", get(event_page))
        .route("/e/{id}/seats", get(seat_page))
        .route("/organizer", get(organizer_page))
}

fn page(state: &AppState, template: &str) -> Html<String> {
    state
        .config
        .common
        .web
        .page(template, json!({ "currency": state.config.currency }))
}

async fn event_page(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Html<String>, ApiError> {
    EventId::from_path(id)?;
    Ok(page(&state, include_str!("pages/event.html")))
}

async fn seat_page(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Html<String>, ApiError> {
    EventId::from_path(id)?;
    Ok(page(&state, include_str!("pages/seats.html")))
}

async fn organizer_page(State(state): State<AppState>) -> Html<String> {
    page(&state, include_str!("pages/organizer.html"))
}
