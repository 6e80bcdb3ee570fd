//! A fan's, and an organizer's, view of fairgate over the wire: plain HTTP and websocket calls
//! against the three services, with the JSON shapes the services document. The crowd and the
//! end-to-end tests both speak through this, so they exercise exactly what a browser would.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// Where the three services are.
#[derive(Clone, Debug)]
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

/// What the waiting room said to a fan before the pass came.
#[derive(Clone, Debug, Default)]
pub struct Wait {
    pub statuses: Vec<Value>,
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
        Ok(Client {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(64)
                .build()?,
            endpoints,
        })
    }

    /// Creates an event with a seat map; returns its id.
    pub async fn create_event(
        &self,
        organizer_token: &str,
        spec: &SaleSpec,
    ) -> anyhow::Result<i64> {
        let body = json!({
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
        let ws_base = self.endpoints.queue.replacen("http", "ws", 1);
        let url = format!("{ws_base}/api/v1/events/{event}/ws?ticket={ticket}");
        let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .context("opening the waiting-room websocket")?;
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
                            wait.statuses.push(value);
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
        decode(
            self.http
                .post(format!(
                    "{}/api/v1/events/{event}/holds",
                    self.endpoints.purchase
                ))
                .bearer_auth(pass)
                .json(&json!({ "seat_ids": seat_ids }))
                .send()
                .await?,
        )
        .await
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

/// The waiting room said every seat is sold: the fan's wait ends without a pass.
#[derive(Debug, thiserror::Error)]
#[error("sold out while waiting")]
pub struct SoldOut;
