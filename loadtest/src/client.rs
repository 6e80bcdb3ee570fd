//! A fan's, and an organizer's, view of fairgate over the wire: plain HTTP and websocket calls
//! against the three services, with the JSON shapes the services document. The crowd and the
//! end-to-end tests both speak through this, so they exercise exactly what a browser would.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// Where the three services are. Each may list several instances, comma-separated: the client
/// spreads its calls over them and, when one is out of reach, moves on to the next (as a load
/// balancer would).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Endpoints {
    pub buffer: String,
    pub queue: String,
    pub purchase: String,
}

/// One of the three services.
#[derive(Clone, Copy, Debug)]
enum Service {
    Buffer,
    Queue,
    Purchase,
}

impl Endpoints {
    fn list(&self, service: Service) -> &str {
        match service {
            Service::Buffer => &self.buffer,
            Service::Queue => &self.queue,
            Service::Purchase => &self.purchase,
        }
    }

    /// The `n`-th instance of `service` (round the list).
    fn pick(&self, service: Service, n: usize) -> &str {
        let all: Vec<&str> = self
            .list(service)
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        all.get(n % all.len().max(1)).copied().unwrap_or_default()
    }
}

/// What the client does about a refusal that says "try again" (503, 429) and about a service
/// out of reach: nothing (tests that expect precise errors), or retry for a while as a real
/// fan's page does.
#[derive(Clone, Debug, Default)]
struct Patience {
    /// How long one call keeps retrying; zero: never.
    window: Duration,
    /// Retries made, over every clone of the client.
    retries: Arc<AtomicU64>,
    /// Which instance of each service comes next.
    turn: Arc<AtomicUsize>,
}

/// A refused HTTP call: status and the service's error code.
#[derive(Debug, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct Refused {
    pub status: u16,
    pub code: String,
    pub message: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Joined {
    pub event_id: i64,
    pub ticket_id: Uuid,
    pub ticket: String,
    pub receipt: String,
    pub status: String,
    pub position: Option<i64>,
    pub joined_at: DateTime<Utc>,
    pub commitment: String,
    pub resumed: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct IssuedPass {
    pub pass: String,
    pub jti: Uuid,
    pub expires_at: DateTime<Utc>,
    pub seat_limit: i32,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Seat {
    pub id: i64,
    pub section: String,
    pub row_label: String,
    pub number: i32,
    pub price_cents: i64,
    pub status: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Hold {
    pub hold_id: Uuid,
    pub seat_ids: Vec<i64>,
    pub expires_at: DateTime<Utc>,
    pub total_cents: i64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct OrderTicket {
    pub code: String,
    pub seat_id: i64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Order {
    pub order_id: Uuid,
    pub event_id: i64,
    pub status: String,
    pub total_cents: i64,
    pub tickets: Vec<OrderTicket>,
}

/// What the waiting room said to a fan before the pass came: the first and the latest status
/// and how many there were (not every one: a long wait brings thousands, and a crowd has
/// thousands of fans waiting).
#[derive(Clone, Debug, Default)]
pub struct Wait {
    pub first_status: Option<Value>,
    pub last_status: Option<Value>,
    pub statuses: usize,
    pub first_position: Option<i64>,
    /// A later status named another position than the first (a place moved).
    pub position_changed: bool,
    /// A later status showed a lower serving head than an earlier one.
    pub head_went_back: bool,
    /// Statuses saying the room was catching up after an interruption.
    pub catching_up: usize,
    /// Times the socket had to be opened again.
    pub reconnects: usize,
    /// Statuses telling the fan fewer places are left than fans ahead of them.
    pub places_short: usize,
}

impl Wait {
    fn heard(&mut self, status: Value) {
        let position = status["position"].as_i64();
        match (self.first_position, position) {
            (None, Some(_)) => self.first_position = position,
            (Some(first), Some(now)) if first != now => self.position_changed = true,
            _ => {}
        }
        let head = |s: &Value| s["serving_head"].as_i64().unwrap_or(0);
        let highest = [&self.first_status, &self.last_status]
            .into_iter()
            .flatten()
            .map(head)
            .max()
            .unwrap_or(0);
        if head(&status) < highest {
            self.head_went_back = true;
        }
        if status["phase"] == "catching_up" {
            self.catching_up += 1;
        }
        if status["places_left"].is_i64() {
            self.places_short += 1;
        }
        self.statuses += 1;
        if self.first_status.is_none() {
            self.first_status = Some(status);
        } else {
            self.last_status = Some(status);
        }
    }
}

/// The sale a crowd or a test sets up.
#[derive(Clone, Debug)]
pub struct SaleSpec {
    pub name: String,
    pub seats: i64,
    pub seats_per_row: i64,
    pub price_cents: i64,
    pub presale_opens_at: DateTime<Utc>,
    pub sale_starts_at: DateTime<Utc>,
    pub sale_ends_at: DateTime<Utc>,
    pub rate_per_minute: i64,
    pub max_active: i64,
    pub seats_per_fan: i64,
}

impl SaleSpec {
    /// Exactly `seats` seats: sections of up to 1000 full rows of `seats_per_row`, and one
    /// last one-row section with the remainder.
    pub fn seat_map(&self) -> Value {
        let per_row = self.seats_per_row.clamp(1, 1000);
        let mut full_rows = self.seats / per_row;
        let remainder = self.seats % per_row;
        let mut sections = Vec::new();
        let section = |n: usize, rows: i64, per_row: i64| {
            json!({
                "name": format!("S{n}"),
                "rows": rows,
                "seats_per_row": per_row,
                "price_cents": self.price_cents,
            })
        };
        while full_rows > 0 {
            let rows = full_rows.min(1000);
            sections.push(section(sections.len() + 1, rows, per_row));
            full_rows -= rows;
        }
        if remainder > 0 {
            sections.push(section(sections.len() + 1, 1, remainder));
        }
        json!({ "sections": sections })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(map: &Value) -> i64 {
        map["sections"]
            .as_array()
            .expect("sections")
            .iter()
            .map(|s| s["rows"].as_i64().unwrap_or(0) * s["seats_per_row"].as_i64().unwrap_or(0))
            .sum()
    }

    #[test]
    fn the_seat_map_has_exactly_the_seats_asked_for() {
        let now = Utc::now();
        for seats in [1, 40, 50, 51, 999, 100_000, 123_457] {
            let spec = SaleSpec {
                name: "x".into(),
                seats,
                seats_per_row: 50,
                price_cents: 1,
                presale_opens_at: now,
                sale_starts_at: now,
                sale_ends_at: now,
                rate_per_minute: 1,
                max_active: 1,
                seats_per_fan: 1,
            };
            assert_eq!(total(&spec.seat_map()), seats);
        }
    }
}

#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub endpoints: Endpoints,
    /// The loopback address this client's connections come from (past the ~28,000 ports one
    /// source address has towards one service).
    pub source: Option<Ipv4Addr>,
    patience: Patience,
    /// Sent as `X-Request-Id` with every request and websocket of this client: one fan's
    /// journey, followed through the three services' logs.
    pub request_id: Option<String>,
}

pub type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A websocket to `url` (`ws://host:port/…`) from `source`, with small buffers (as a browser's
/// would be).
/// The header carrying a request id across the services.
pub const REQUEST_ID: &str = "x-request-id";

pub async fn open_ws(url: &str, source: Option<Ipv4Addr>) -> anyhow::Result<Socket> {
    open_ws_as(url, source, None).await
}

/// [`open_ws`] sending `request_id` as `X-Request-Id`.
pub async fn open_ws_as(
    url: &str,
    source: Option<Ipv4Addr>,
    request_id: Option<&str>,
) -> anyhow::Result<Socket> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let authority = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .context("a ws:// URL")?;
    let addr = tokio::net::lookup_host(authority)
        .await?
        .find(|a| a.is_ipv4())
        .with_context(|| format!("no IPv4 address for {authority}"))?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(source) = source {
        socket.bind((source, 0).into())?;
    }
    let stream = socket.connect(addr).await?;
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(64 * 1024));
    let mut request = url.into_client_request()?;
    if let Some(id) = request_id {
        request
            .headers_mut()
            .insert(REQUEST_ID, reqwest::header::HeaderValue::from_str(id)?);
    }
    let (socket, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
    Ok(socket)
}

async fn decode<T: for<'de> Deserialize<'de>>(response: reqwest::Response) -> anyhow::Result<T> {
    let status = response.status();
    let bytes = response.bytes().await?;
    if status.is_success() {
        return serde_json::from_slice(&bytes)
            .with_context(|| format!("decoding {}", String::from_utf8_lossy(&bytes)));
    }
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Err(Refused {
        status: status.as_u16(),
        code: body["error"].as_str().unwrap_or("?").to_owned(),
        message: body["message"].as_str().unwrap_or_default().to_owned(),
    }
    .into())
}

/// The service's refusal inside an error, if that is what it was.
pub fn refused(e: &anyhow::Error) -> Option<&Refused> {
    e.downcast_ref::<Refused>()
}

impl Client {
    pub fn new(endpoints: Endpoints) -> anyhow::Result<Self> {
        Client::from_source(endpoints, None)
    }

    /// A client whose connections all come from `source`.
    pub fn from_source(endpoints: Endpoints, source: Option<Ipv4Addr>) -> anyhow::Result<Self> {
        Ok(Client {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(64)
                .local_address(source.map(IpAddr::V4))
                .build()?,
            endpoints,
            source,
            patience: Patience::default(),
            request_id: None,
        })
    }

    /// This client, retrying for up to `window` what a fan's page would retry: refusals that
    /// say "try again" (503 and 429, after their `Retry-After`), services out of reach (on the
    /// next instance), and waiting-room sockets that drop (reopened). Only calls that are safe
    /// to repeat are retried after their request may have arrived.
    pub fn patient(mut self, window: Duration) -> Self {
        self.patience.window = window;
        self
    }

    /// A clone counting its own retries (one fan's), with a request id of its own.
    pub fn counting_apart(&self) -> Client {
        let mut apart = self.clone();
        apart.patience.retries = Arc::new(AtomicU64::new(0));
        apart.request_id = Some(format!("fan-{}", Uuid::new_v4().simple()));
        apart
    }

    /// Retries this client (and its clones) have made.
    pub fn retries(&self) -> u64 {
        self.patience.retries.load(Ordering::Relaxed)
    }

    fn next(&self) -> usize {
        self.patience.turn.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends the request `build` makes for an instance of `service`, retrying as
    /// [`Client::patient`] says. `repeatable`: sending it twice does no harm (the same identity,
    /// ticket or idempotency key), so a failure after it was sent may be retried too.
    async fn send(
        &self,
        service: Service,
        repeatable: bool,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        let deadline = tokio::time::Instant::now() + self.patience.window;
        let mut turn = self.next();
        loop {
            let base = self.endpoints.pick(service, turn);
            let mut request = build(base);
            if let Some(id) = &self.request_id {
                request = request.header(REQUEST_ID, id);
            }
            let outcome = request.send().await;
            let patient = tokio::time::Instant::now() < deadline;
            let pause = match &outcome {
                Ok(r) if patient && matches!(r.status().as_u16(), 429 | 503) => r
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map_or(Duration::from_millis(250), |s| {
                        Duration::from_secs(s).min(Duration::from_secs(2))
                    }),
                Err(e) if patient && (e.is_connect() || (repeatable && !e.is_builder())) => {
                    turn += 1;
                    Duration::from_millis(100)
                }
                _ => return Ok(outcome?),
            };
            self.patience.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(pause).await;
        }
    }

    async fn waiting_room(&self, event: i64, ticket: &str) -> anyhow::Result<Socket> {
        let ws_base = self
            .endpoints
            .pick(Service::Queue, self.next())
            .replacen("http", "ws", 1);
        open_ws_as(
            &format!("{ws_base}/api/v1/events/{event}/ws?ticket={ticket}"),
            self.source,
            self.request_id.as_deref(),
        )
        .await
        .context("opening the waiting-room websocket")
    }

    /// Creates an event with a seat map; returns its id.
    pub async fn create_event(
        &self,
        organizer_token: &str,
        spec: &SaleSpec,
    ) -> anyhow::Result<i64> {
        self.create_event_with(organizer_token, spec, json!({}))
            .await
    }

    /// Creates the event of `spec` with `extra` merged into the request (objects key by key:
    /// e.g. `{"ticket_types": […], "sale": {"claim_window_secs": 30}}`).
    pub async fn create_event_with(
        &self,
        organizer_token: &str,
        spec: &SaleSpec,
        extra: Value,
    ) -> anyhow::Result<i64> {
        let mut body = json!({
            "name": spec.name,
            "venue": "Loopback Arena",
            "starts_at": spec.sale_ends_at + chrono::Duration::days(7),
            "sale": {
                "presale_opens_at": spec.presale_opens_at,
                "sale_starts_at": spec.sale_starts_at,
                "sale_ends_at": spec.sale_ends_at,
                "rate_per_minute": spec.rate_per_minute,
                "max_active": spec.max_active,
                "seats_per_fan": spec.seats_per_fan,
            },
            "seat_map": spec.seat_map(),
        });
        merge(&mut body, extra);
        let created: Value = decode(
            self.send(Service::Purchase, false, |base| {
                self.http
                    .post(format!("{base}/api/v1/organizer/events"))
                    .bearer_auth(organizer_token)
                    .json(&body)
            })
            .await?,
        )
        .await?;
        created["id"]
            .as_i64()
            .ok_or_else(|| anyhow!("no id in {created}"))
    }

    /// Sets the event's autotune (`PUT /api/v1/operator/events/{id}/autotune`) as the
    /// organizer; returns the queue's answer.
    pub async fn set_autotune(
        &self,
        organizer_token: &str,
        event: i64,
        body: &Value,
    ) -> anyhow::Result<Value> {
        decode(
            self.send(Service::Queue, false, |base| {
                self.http
                    .put(format!("{base}/api/v1/operator/events/{event}/autotune"))
                    .bearer_auth(organizer_token)
                    .json(body)
            })
            .await?,
        )
        .await
    }

    pub async fn join(&self, event: i64, ticket: Option<&str>) -> anyhow::Result<Joined> {
        let body = match ticket {
            Some(t) => json!({ "ticket": t }),
            None => json!({}),
        };
        // With the ticket it is the same place again; an anonymous join sent twice would
        // take two.
        self.join_with(event, body, ticket.is_some()).await
    }

    /// Joins under an identity assertion signed by the organizer's site: one place per
    /// identity, so a retry gets the same place back.
    pub async fn join_as(&self, event: i64, assertion: &str) -> anyhow::Result<Joined> {
        self.join_with(event, json!({ "identity": assertion }), true)
            .await
    }

    async fn join_with(&self, event: i64, body: Value, repeatable: bool) -> anyhow::Result<Joined> {
        decode(
            self.send(Service::Buffer, repeatable, |base| {
                self.http
                    .post(format!("{base}/api/v1/events/{event}/join"))
                    .json(&body)
            })
            .await?,
        )
        .await
    }

    /// Gives up the ticket's place in the line.
    pub async fn leave(&self, event: i64, ticket: &str) -> anyhow::Result<Value> {
        decode(
            self.send(Service::Queue, true, |base| {
                self.http
                    .post(format!("{base}/api/v1/events/{event}/leave"))
                    .json(&json!({ "ticket": ticket }))
            })
            .await?,
        )
        .await
    }

    /// Claims the pass of an admitted ticket over HTTP (a fan back after their turn came).
    pub async fn claim_pass(&self, event: i64, ticket: &str) -> anyhow::Result<IssuedPass> {
        decode(
            self.send(Service::Queue, true, |base| {
                self.http
                    .post(format!("{base}/api/v1/events/{event}/pass"))
                    .json(&json!({ "ticket": ticket }))
            })
            .await?,
        )
        .await
    }

    /// The published draw, its order gathered from every page.
    pub async fn draw(&self, event: i64) -> anyhow::Result<Value> {
        let mut draw = self.draw_page(event, 0).await?;
        while let Some(offset) = draw["next_offset"].as_u64() {
            let mut page = self.draw_page(event, offset).await?;
            let (Some(order), Some(more)) =
                (draw["order"].as_array_mut(), page["order"].as_array_mut())
            else {
                anyhow::bail!("a page of the draw has no order");
            };
            anyhow::ensure!(!more.is_empty(), "an empty page of the draw at {offset}");
            order.append(more);
            draw["next_offset"] = page["next_offset"].take();
        }
        Ok(draw)
    }

    /// One page of the published draw, from position `offset + 1`.
    pub async fn draw_page(&self, event: i64, offset: u64) -> anyhow::Result<Value> {
        decode(
            self.send(Service::Buffer, true, |base| {
                self.http
                    .get(format!("{base}/api/v1/events/{event}/draw?offset={offset}"))
            })
            .await?,
        )
        .await
    }

    /// Waits on the waiting-room websocket until the pass arrives, [`SoldOut`] comes, or `limit`
    /// passes.
    pub async fn wait_for_pass(
        &self,
        event: i64,
        ticket: &str,
        limit: Duration,
    ) -> anyhow::Result<(IssuedPass, Wait)> {
        let mut wait = Wait::default();
        let deadline = tokio::time::Instant::now() + limit;
        let patient_until = tokio::time::Instant::now() + self.patience.window;
        loop {
            let dropped = match self
                .wait_on_socket(event, ticket, deadline, &mut wait)
                .await
            {
                Ok(pass) => return Ok((pass, wait)),
                Err(e) => e,
            };
            // A page reopens a socket that dropped (a server restarting, a network blip) and
            // keeps its place; anything the room said on purpose ends the wait.
            let final_answer = dropped.downcast_ref::<SoldOut>().is_some()
                || refused(&dropped).is_some_and(|r| r.status != 503 && r.status != 429);
            let now = tokio::time::Instant::now();
            if final_answer || now >= deadline || self.patience.window.is_zero() {
                return Err(dropped);
            }
            if now >= patient_until && wait.statuses == 0 {
                return Err(dropped);
            }
            wait.reconnects += 1;
            self.patience.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// One waiting-room socket, until the pass, a final answer, `deadline`, or the socket
    /// dropping (an error).
    async fn wait_on_socket(
        &self,
        event: i64,
        ticket: &str,
        deadline: tokio::time::Instant,
        wait: &mut Wait,
    ) -> anyhow::Result<IssuedPass> {
        let mut socket = match self.waiting_room(event, ticket).await {
            Ok(socket) => socket,
            Err(e) => return Err(upgrade_refusal(e)),
        };
        loop {
            let message = tokio::time::timeout_at(deadline, socket.next())
                .await
                .map_err(|_| NoPassInTime {
                    told_places_short: wait.places_short > 0,
                })?;
            let message = match message {
                Some(m) => m?,
                None => bail!("the waiting room closed the socket before the pass"),
            };
            match message {
                Message::Text(text) => {
                    let value: Value = serde_json::from_str(text.as_str())?;
                    match value["type"].as_str() {
                        Some("pass") => {
                            let pass: IssuedPass = serde_json::from_value(value)?;
                            let _ = socket.close(None).await;
                            return Ok(pass);
                        }
                        Some("status") => wait.heard(value),
                        Some("sold_out") => return Err(SoldOut.into()),
                        Some("refused") => {
                            return Err(Refused {
                                status: 410,
                                code: value["error"].as_str().unwrap_or("?").to_owned(),
                                message: value["message"].as_str().unwrap_or_default().to_owned(),
                            }
                            .into())
                        }
                        _ => bail!("unexpected waiting-room message {value}"),
                    }
                }
                Message::Ping(payload) => socket.send(Message::Pong(payload)).await?,
                Message::Close(frame) => bail!("waiting room closed the socket: {frame:?}"),
                _ => {}
            }
        }
    }

    pub async fn seats(&self, event: i64, pass: &str) -> anyhow::Result<Vec<Seat>> {
        decode(
            self.send(Service::Purchase, true, |base| {
                self.http
                    .get(format!("{base}/api/v1/events/{event}/seats"))
                    .bearer_auth(pass)
            })
            .await?,
        )
        .await
    }

    pub async fn hold(&self, event: i64, pass: &str, seat_ids: &[i64]) -> anyhow::Result<Hold> {
        self.post_hold(event, pass, json!({ "seat_ids": seat_ids }))
            .await
    }

    async fn post_hold(&self, event: i64, pass: &str, body: Value) -> anyhow::Result<Hold> {
        // A pass's new hold replaces its earlier one: sending it twice holds the seats once.
        decode(
            self.send(Service::Purchase, true, |base| {
                self.http
                    .post(format!("{base}/api/v1/events/{event}/holds"))
                    .bearer_auth(pass)
                    .json(&body)
            })
            .await?,
        )
        .await
    }

    /// Holds `quantity` places of a general-admission ticket type.
    pub async fn hold_general(
        &self,
        event: i64,
        pass: &str,
        ticket_type: &str,
        quantity: i64,
    ) -> anyhow::Result<Hold> {
        self.post_hold(
            event,
            pass,
            json!({ "ticket_type": ticket_type, "quantity": quantity }),
        )
        .await
    }

    /// A fan who gives up: opens the waiting room, reads the first status and goes away for
    /// good, never claiming the pass its place will earn.
    pub async fn look_and_leave(&self, event: i64, ticket: &str) -> anyhow::Result<Value> {
        let mut socket = self.waiting_room(event, ticket).await?;
        let first = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(message) = socket.next().await {
                if let Message::Text(text) = message? {
                    return Ok::<_, anyhow::Error>(serde_json::from_str::<Value>(text.as_str())?);
                }
            }
            bail!("the waiting room closed the socket at once")
        })
        .await
        .map_err(|_| anyhow!("no status within 30 s"))??;
        let _ = socket.close(None).await;
        Ok(first)
    }

    pub async fn checkout(
        &self,
        event: i64,
        pass: &str,
        hold: Uuid,
        idempotency_key: &str,
        card: &str,
    ) -> anyhow::Result<Order> {
        // The same Idempotency-Key: a retry is charged and sold once.
        decode(
            self.send(Service::Purchase, true, |base| {
                self.http
                    .post(format!("{base}/api/v1/events/{event}/checkout"))
                    .bearer_auth(pass)
                    .header("Idempotency-Key", idempotency_key)
                    .json(&json!({ "hold_id": hold, "payment_token": card }))
            })
            .await?,
        )
        .await
    }
}

/// Merges `extra` into `base`: objects key by key, anything else replaced.
fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(base), Value::Object(extra)) => {
            for (k, v) in extra {
                merge(base.entry(k).or_insert(Value::Null), v);
            }
        }
        (base, extra) => *base = extra,
    }
}

/// A refused websocket upgrade as the service's refusal (status and error code), so callers
/// tell "try again" (503, 429) from a final no.
fn upgrade_refusal(e: anyhow::Error) -> anyhow::Error {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let status = match e.downcast_ref::<WsError>() {
        Some(WsError::Http(response)) => response.status().as_u16(),
        _ => return e,
    };
    let body = e
        .downcast_ref::<WsError>()
        .and_then(|w| match w {
            WsError::Http(response) => response.body().as_ref(),
            _ => None,
        })
        .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        .unwrap_or(Value::Null);
    Refused {
        status,
        code: body["error"].as_str().unwrap_or("?").to_owned(),
        message: body["message"].as_str().unwrap_or_default().to_owned(),
    }
    .into()
}

/// The waiting room said every seat is sold: the fan's wait ends without a pass.
#[derive(Debug, thiserror::Error)]
#[error("sold out while waiting")]
pub struct SoldOut;

/// The fan's time ran out before their turn.
#[derive(Debug, thiserror::Error)]
#[error("no pass in time{}", if *.told_places_short { " (told fewer places were left than fans ahead)" } else { "" })]
pub struct NoPassInTime {
    /// The waiting room had said fewer places were left than fans ahead of this one.
    pub told_places_short: bool,
}
