//! `GET /api/v1/events/{id}/ws?ticket=…`: the waiting room's websocket. On connect and on every
//! change of the event's queue state the fan gets a JSON status (phase, position, fans ahead,
//! serving head, rate, ETA with a range); at their turn, the pass; pings keep the line alive.
//! The socket's numbers come from the instance's `watch` channel: no Redis call per update.
//!
//! Position updates are paced by how far back the fan is (`Config::update_interval`): the front
//! of the line hears every move within half a second, a fan 100,000 places back every minute. With
//! 200,000 waiters and a head that moves several times a second, an update to everyone on every
//! move would be millions of messages a second; paced, a few thousand. The pass, sold
//! out, the draw, a pause, an operator's message and a new rate go out at once. A waiter far
//! back does not even wake on a move (`Config::quiet_for`): it sleeps until its next update,
//! listening only to the event's notices.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{Html, Response};
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use shared::event::SaleEvent;
use shared::extract::{Path, Query};
use shared::ids::{EventId, Position};
use shared::token::TicketClaims;
use shared::ApiError;
use tracing::instrument;

use crate::hub::{Notice, QueueState, SocketGuard, SocketRefused};
use crate::pass::{self, IssuedPass};
use crate::AppState;

/// Websocket buffers: small, because a waiter only receives short JSON messages and 200,000 of
/// them must fit in memory (the 128 KiB default would cost ~138 KB per idle socket).
const WS_BUFFER: usize = 4 * 1024;
const WS_MAX_MESSAGE: usize = 4 * 1024;
/// How soon a waiter's lookup or pass is asked again after Redis or Postgres failed it.
const RETRY: Duration = Duration::from_secs(1);

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/events/{id}/ws", get(upgrade))
        .route("/e/{id}", get(waiting_page))
}

/// The waiting page: plain HTML, CSS and JS in one file, no external assets. An admitted fan is
/// moved on to `FAIRGATE_NEXT_PAGE_URL` (default: the purchase service's seat page), the pass in
/// the URL's fragment (never sent to a server, so never in a log).
async fn waiting_page(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Html<String>, ApiError> {
    EventId::from_path(id)?;
    Ok(state.config.common.web.page(
        include_str!("waiting.html"),
        json!({ "next": state.config.next_page() }),
    ))
}

#[derive(Deserialize)]
struct WsQuery {
    ticket: String,
}

/// What the waiting page shows.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Status {
        /// "waiting_for_draw", "queued", or "catching_up" (the room lost its fast store for a
        /// moment: the place is kept and numbers resume by themselves).
        phase: String,
        position: Option<i64>,
        ahead: Option<i64>,
        serving_head: i64,
        queue_length: i64,
        rate_per_minute: i64,
        eta_secs: Option<i64>,
        eta_low_secs: Option<i64>,
        eta_high_secs: Option<i64>,
        sale_starts_at: DateTime<Utc>,
        /// Admissions are paused by the operators (the ETA is unknown meanwhile).
        paused: bool,
        /// The operators' message, if any.
        message: Option<String>,
        /// Places left, given only when fewer remain than fans ahead of this one: the page
        /// says so ("about 300 places left, 2,000 fans ahead of you").
        #[serde(default, skip_serializing_if = "Option::is_none")]
        places_left: Option<i64>,
    },
    /// Every seat is sold; the line is over.
    SoldOut,
    Pass(IssuedPass),
    /// The fan's turn came and went (e.g. the admission lapsed while they were away).
    Refused {
        error: String,
        message: String,
    },
}

#[instrument(skip_all, fields(event = id))]
async fn upgrade(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Query(query): Query<WsQuery>,
    headers: HeaderMap,
    shared::extract::Upgrade(upgrade): shared::extract::Upgrade,
) -> Result<Response, ApiError> {
    check_origin(&state, &headers)?;
    let (event_id, ticket) = pass::ticket_for(&state, id, &query.ticket)?;
    let event = SaleEvent::load(&state.pg, event_id).await?;
    let guard = state
        .hub
        .open_socket(
            event_id,
            ticket.tkt,
            state.config.max_sockets_per_ticket,
            state.config.max_websockets,
        )
        .await
        .map_err(|refused| match refused {
            SocketRefused::TicketFull => ApiError::RateLimited {
                retry_after_secs: 5,
                message: "too many open waiting-room connections for this ticket".into(),
            },
            SocketRefused::InstanceFull => ApiError::Unavailable(
                "waiting_room_full",
                "this waiting-room server is full; retry (another instance may take you)".into(),
            ),
        })?;
    Ok(upgrade
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(WS_BUFFER)
        .max_message_size(WS_MAX_MESSAGE)
        .max_frame_size(WS_MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            if let Err(e) = wait(state, event, ticket, socket, guard).await {
                tracing::debug!(error = %e, "waiting-room socket ended with an error");
            }
        }))
}

fn check_origin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or_default();
    let own = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|host| [format!("http://{host}"), format!("https://{host}")]);
    let same = own.is_some_and(|o| o.iter().any(|x| x == origin));
    if same || state.config.allowed_origins.iter().any(|a| a == origin) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "origin_not_allowed",
            format!("websocket connections from origin {origin} are not allowed"),
        ))
    }
}

async fn wait(
    state: AppState,
    event: SaleEvent,
    ticket: TicketClaims,
    socket: WebSocket,
    guard: SocketGuard,
) -> anyhow::Result<()> {
    let (mut sink, mut stream) = socket.split();
    let mut queue = state.hub.watch(event.event_id()).await;
    let mut position: Option<Position> = None;
    let mut ping = tokio::time::interval(Duration::from_secs(state.config.ws_ping_secs.max(1)));
    ping.tick().await;
    let mut dirty = true;
    // A status goes out now whatever the interval: a quiet waiter's sleep is over.
    let mut force = false;
    // The last status sent, and whether a newer one waits for the waiter's update interval.
    let mut sent: Option<(tokio::time::Instant, QueueState)> = None;
    let mut deferred = false;
    // After a failed lookup or pass issue (Redis or Postgres out of reach): when to try again.
    let mut retry: Option<tokio::time::Instant> = None;
    loop {
        if dirty {
            dirty = false;
            let mut snapshot = queue.state.borrow_and_update().clone();
            queue.notices.mark_unchanged();
            if position.is_none() && snapshot.drawn && !snapshot.catching_up {
                // Once per socket, when the draw has placed the fan (or at connect).
                match state.positions.of(event.event_id(), ticket.tkt).await {
                    Ok(found) => position = found,
                    Err(e) if e.status().is_server_error() => {
                        snapshot.catching_up = true;
                        retry = Some(tokio::time::Instant::now() + RETRY);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let admitted = position.is_some_and(|p| p.get() <= snapshot.head);
            if snapshot.sold_out && !admitted {
                sink.send(text(&ServerMessage::SoldOut)?).await?;
                sink.send(close(1000, "sold out")).await?;
                return Ok(());
            }
            if let Some(p) = position.filter(|p| p.get() <= snapshot.head) {
                match pass::issue(&state, &event, &ticket, p).await {
                    Ok(issued) => {
                        sink.send(text(&ServerMessage::Pass(issued))?).await?;
                        sink.send(close(1000, "admitted")).await?;
                        return Ok(());
                    }
                    Err(refused) if refused.status().is_client_error() => {
                        sink.send(text(&ServerMessage::Refused {
                            error: refused.code().to_owned(),
                            message: refused.to_string(),
                        })?)
                        .await?;
                        sink.send(close(1000, "admission lapsed")).await?;
                        return Ok(());
                    }
                    // Postgres out of reach for a moment: the pass is not lost, the fan keeps
                    // the socket and it is asked again.
                    Err(e) => {
                        tracing::debug!(error = %e, "pass issue failed; retrying");
                        snapshot.catching_up = true;
                        retry = Some(tokio::time::Instant::now() + RETRY);
                    }
                }
            }
            let now = tokio::time::Instant::now();
            let due = match &sent {
                None => true,
                Some((at, last)) => {
                    std::mem::take(&mut force)
                        || noticeable(last, &snapshot)
                        || now >= *at + state.config.update_interval(&snapshot, position)
                }
            };
            deferred = !due;
            if due {
                sink.send(text(&status(&event, &snapshot, position))?)
                    .await?;
                sent = Some((now, snapshot));
            }
        }
        // Far back, a waiter sleeps until its next update and hears only notices; near the
        // front it follows every change of the line, its updates paced.
        let (next_update, follow) = match &sent {
            Some((at, last)) => match state.config.quiet_for(last, position) {
                Some(quiet) => (Some(*at + quiet), false),
                None => (
                    deferred.then(|| *at + state.config.update_interval(last, position)),
                    true,
                ),
            },
            None => (None, true),
        };
        tokio::select! {
            _ = sleep_until(retry), if retry.is_some() => {
                retry = None;
                dirty = true;
            }
            _ = sleep_until(next_update), if next_update.is_some() => {
                dirty = true;
                force = !follow;
            }
            _ = state.shutdown.cancelled() => {
                let _ = sink.send(close(1001, "server shutting down; reconnect")).await;
                return Ok(());
            }
            _ = guard.evicted() => {
                // Opened while the instances could not count together: one too many tabs.
                let _ = sink.send(close(1008, "too many open tabs for this ticket")).await;
                return Ok(());
            }
            changed = async {
                if follow {
                    queue.state.changed().await
                } else {
                    queue.notices.changed().await
                }
            } => {
                if changed.is_err() {
                    let _ = sink.send(close(1011, "queue state unavailable; reconnect")).await;
                    return Ok(());
                }
                dirty = true;
            }
            incoming = stream.next() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(()),
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => sink.send(Message::Ping(Default::default())).await?,
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

/// A change every waiter must see at once, whatever their update interval: the draw, a pause or
/// resume, an operator's message, a new rate or sold out.
fn noticeable(last: &QueueState, now: &QueueState) -> bool {
    Notice::of(last) != Notice::of(now)
}

fn text(message: &ServerMessage) -> anyhow::Result<Message> {
    Ok(Message::Text(serde_json::to_string(message)?.into()))
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// A waiter's numbers from the shared queue state: O(1), no I/O.
pub fn status(event: &SaleEvent, queue: &QueueState, position: Option<Position>) -> ServerMessage {
    let rate = queue.rate_per_minute.max(1);
    let (phase, ahead, eta) = match position {
        _ if !queue.drawn => ("waiting_for_draw", None, None),
        None if queue.catching_up => ("catching_up", None, None),
        None => ("queued", None, None),
        Some(p) if queue.catching_up => {
            ("catching_up", Some((p.get() - queue.head - 1).max(0)), None)
        }
        Some(p) => {
            let ahead = (p.get() - queue.head - 1).max(0);
            let eta = (!queue.paused).then_some((ahead + 1) * 60 / rate);
            ("queued", Some(ahead), eta)
        }
    };
    ServerMessage::Status {
        phase: phase.to_owned(),
        position: position.map(Position::get),
        ahead,
        serving_head: queue.head,
        queue_length: (queue.tail - queue.head).max(0),
        rate_per_minute: queue.rate_per_minute,
        eta_secs: eta,
        // No-shows and cap stalls make the real wait vary both ways.
        eta_low_secs: eta.map(|e| e * 4 / 5),
        eta_high_secs: eta.map(|e| e * 3 / 2),
        sale_starts_at: event.sale_starts_at,
        paused: queue.paused,
        message: queue.message.clone(),
        places_left: queue
            .places_left
            .filter(|&left| ahead.is_some_and(|ahead| left < ahead)),
    }
}
