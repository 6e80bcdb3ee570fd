//! A fan's, and an organizer's, view of fairgate over the wire: plain HTTP and websocket calls
//! against the three services, with the JSON shapes the services document. The crowd and the
//! end-to-end tests both speak through this, so they exercise exactly what a browser would.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// Where the three services are.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Endpoints {
    pub buffer: String,
    pub queue: String,
    pub purchase: String,
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
}

pub type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A websocket to `url` (`ws://host:port/…`) from `source`, with small buffers (as a browser's
/// would be).
pub async fn open_ws(url: &str, source: Option<Ipv4Addr>) -> anyhow::Result<Socket> {
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
    let (socket, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
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
        })
    }

    async fn waiting_room(&self, event: i64, ticket: &str) -> anyhow::Result<Socket> {
        let ws_base = self.endpoints.queue.replacen("http", "ws", 1);
        open_ws(
            &format!("{ws_base}/api/v1/events/{event}/ws?ticket={ticket}"),
            self.source,
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
            self.http
                .post(format!(
                    "{}/api/v1/organizer/events",
                    self.endpoints.purchase
                ))
                .bearer_auth(organizer_token)
                .json(&body)
                .send()
                .await?,
        )
        .await?;
        created["id"]
            .as_i64()
            .ok_or_else(|| anyhow!("no id in {created}"))
    }

    pub async fn join(&self, event: i64, ticket: Option<&str>) -> anyhow::Result<Joined> {
        let body = match ticket {
            Some(t) => json!({ "ticket": t }),
            None => json!({}),
        };
        decode(
            self.http
                .post(format!(
                    "{}/api/v1/events/{event}/join",
                    self.endpoints.buffer
                ))
                .json(&body)
                .send()
                .await?,
        )
        .await
    }

    /// Gives up the ticket's place in the line.
    pub async fn leave(&self, event: i64, ticket: &str) -> anyhow::Result<Value> {
        decode(
            self.http
                .post(format!(
                    "{}/api/v1/events/{event}/leave",
                    self.endpoints.queue
                ))
                .json(&json!({ "ticket": ticket }))
                .send()
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
            self.http
                .get(format!(
                    "{}/api/v1/events/{event}/draw?offset={offset}",
                    self.endpoints.buffer
                ))
                .send()
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
        let mut socket = self.waiting_room(event, ticket).await?;
        let mut wait = Wait::default();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let message = tokio::time::timeout_at(deadline, socket.next())
                .await
                .map_err(|_| anyhow!("no pass within {limit:?}"))?;
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
                            return Ok((pass, wait));
                        }
                        Some("status") => {
                            if wait.first_position.is_none() {
                                wait.first_position = value["position"].as_i64();
                            }
                            wait.statuses += 1;
                            if wait.first_status.is_none() {
                                wait.first_status = Some(value);
                            } else {
                                wait.last_status = Some(value);
                            }
                        }
                        Some("sold_out") => return Err(SoldOut.into()),
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
            self.http
                .get(format!(
                    "{}/api/v1/events/{event}/seats",
                    self.endpoints.purchase
                ))
                .bearer_auth(pass)
                .send()
                .await?,
        )
        .await
    }

    pub async fn hold(&self, event: i64, pass: &str, seat_ids: &[i64]) -> anyhow::Result<Hold> {
        self.post_hold(event, pass, json!({ "seat_ids": seat_ids }))
            .await
    }

    async fn post_hold(&self, event: i64, pass: &str, body: Value) -> anyhow::Result<Hold> {
        decode(
            self.http
                .post(format!(
                    "{}/api/v1/events/{event}/holds",
                    self.endpoints.purchase
                ))
                .bearer_auth(pass)
                .json(&body)
                .send()
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
        decode(
            self.http
                .post(format!(
                    "{}/api/v1/events/{event}/checkout",
                    self.endpoints.purchase
                ))
                .bearer_auth(pass)
                .header("Idempotency-Key", idempotency_key)
                .json(&json!({ "hold_id": hold, "payment_token": card }))
                .send()
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

/// The waiting room said every seat is sold: the fan's wait ends without a pass.
#[derive(Debug, thiserror::Error)]
#[error("sold out while waiting")]
pub struct SoldOut;
