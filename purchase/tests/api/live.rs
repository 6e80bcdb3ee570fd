//! The live stream: seat changes reach every fan watching the event; order notices (from the
//! transactional outbox) reach only their fan, and replay after a reconnect.

use std::time::Duration;

use serde_json::{json, Value};
use shared::ids::{EventId, TicketId};
use shared::testing::TestEnv;
use shared::token::{PassClaims, Signer, SigningKey, TokenKind};
use uuid::Uuid;

use crate::{create_event_with, in_process, ORGANIZER};

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
struct Sse {
    id: Option<String>,
    event: String,
    data: Value,
}

/// Reads a server-sent-events response one event at a time.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    async fn open(
        http: &reqwest::Client,
        url: &str,
        pass: Option<&str>,
        last: Option<&str>,
    ) -> reqwest::Response {
        let mut request = http.get(url);
        if let Some(pass) = pass {
            request = request.bearer_auth(pass);
        }
        if let Some(last) = last {
            request = request.header("Last-Event-ID", last);
        }
        request.send().await.expect("request")
    }

    fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), 200);
        SseReader {
            response,
            buffer: String::new(),
        }
    }

    /// The next event that is not a keep-alive, or `None` within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Sse {
                    id: None,
                    event: "message".into(),
                    data: Value::Null,
                };
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        event.id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event.event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                event.data = serde_json::from_str(&data).unwrap_or(Value::String(data));
                return Some(event);
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .ok()?
                .expect("stream")?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// The next event of `kind`, skipping others.
    async fn next_of(&mut self, kind: &str) -> Sse {
        loop {
            let event = self
                .next(Duration::from_secs(10))
                .await
                .unwrap_or_else(|| panic!("no {kind} event arrived"));
            if event.event == kind {
                return event;
            }
        }
    }
}

fn fan_pass(signer: &Signer, event: i64, fan: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = PassClaims {
        iss: "fairgate".into(),
        aud: TokenKind::Pass.audience().into(),
        sub: fan.into(),
        evt: EventId::new(event).expect("id"),
        tkt: TicketId::mint(),
        jti: Uuid::new_v4(),
        iat: now,
        nbf: now,
        exp: now + 900,
        lim: 2,
    };
    signer.sign(TokenKind::Pass, &claims).expect("sign")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_stream_pushes_seat_changes_to_all_and_notices_to_their_fan() {
    let env = TestEnv::new().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let app = in_process(&env, &signer, |c| c.outbox_relay_ms = 50).await;
    let url = app.url();
    let http = reqwest::Client::new();
    let event = create_event_with(&http, &url, 1, 4).await;
    let other_event = create_event_with(&http, &url, 1, 1).await;
    let alice = fan_pass(&signer, event, "site:alice");
    let bob = fan_pass(&signer, event, "site:bob");
    let live = format!("{url}/api/v1/events/{event}/live");

    // Refusals: no pass, a pass of another event, a forged one.
    for (pass, status) in [
        (None, 401),
        (Some(fan_pass(&signer, other_event, "site:alice")), 403),
        (Some(format!("{alice}x")), 401),
    ] {
        let response = SseReader::open(&http, &live, pass.as_deref(), None).await;
        assert_eq!(response.status(), status);
        let error: Value = response.json().await.expect("json");
        assert!(error["error"]
            .as_str()
            .is_some_and(|c| c.starts_with("pass_")));
    }

    let mut alice_live = SseReader::new(SseReader::open(&http, &live, Some(&alice), None).await);
    // Bob's browser passes the pass in the query, as EventSource cannot send headers.
    let mut bob_live =
        SseReader::new(SseReader::open(&http, &format!("{live}?pass={bob}"), None, None).await);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let seats: Vec<i64> = crate::seat_map(&http, &url, event, &bob)
        .await
        .iter()
        .filter_map(|s| s["id"].as_i64())
        .collect();
    let hold = |pass: String, seat: i64| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.post(format!("{url}/api/v1/events/{event}/holds"))
                .bearer_auth(pass)
                .json(&json!({ "seat_ids": [seat] }))
                .send()
                .await
                .expect("hold")
                .json::<Value>()
                .await
                .expect("json")
        }
    };

    // Bob holds a seat: Alice sees it taken.
    hold(bob.clone(), seats[0]).await;
    let change = alice_live.next_of("seats").await;
    assert_eq!(change.data["seat_ids"], json!([seats[0]]));
    assert_eq!(change.data["status"], "held");

    // Alice buys another: both see it sold; only Alice gets her confirmation.
    let held = hold(alice.clone(), seats[1]).await;
    let order: Value = http
        .post(format!("{url}/api/v1/events/{event}/checkout"))
        .bearer_auth(&alice)
        .header("Idempotency-Key", "live-1")
        .json(&json!({ "hold_id": held["hold_id"], "payment_token": "tok_visa" }))
        .send()
        .await
        .expect("checkout")
        .json()
        .await
        .expect("json");
    let confirmed = alice_live.next_of("order_confirmed").await;
    assert_eq!(confirmed.data["order_id"], order["order_id"]);
    assert_eq!(confirmed.data["tickets"], order["tickets"]);
    let sold = bob_live.next_of("seats").await;
    assert_eq!(
        sold.data["status"], "held",
        "first Bob hears of his own hold"
    );
    let mut heard = Vec::new();
    while let Some(event) = bob_live.next(Duration::from_millis(800)).await {
        heard.push(event);
    }
    assert!(
        heard
            .iter()
            .any(|e| e.event == "seats" && e.data["status"] == "sold"),
        "{heard:?}"
    );
    assert!(
        heard.iter().all(|e| e.event == "seats"),
        "Bob hears no notice of Alice's: {heard:?}"
    );

    // Support refunds Alice: her stream says so, and the seat is back for everyone.
    let order_id = order["order_id"].as_str().expect("order id");
    let refunded = http
        .post(format!("{url}/api/v1/support/orders/{order_id}/refund"))
        .bearer_auth(ORGANIZER)
        .send()
        .await
        .expect("refund");
    assert_eq!(refunded.status(), 200);
    let notice = alice_live.next_of("order_refunded").await;
    assert_eq!(notice.data["order_id"], order["order_id"]);
    assert_eq!(notice.data["seats_returned"], json!([seats[1]]));
    let back = bob_live.next_of("seats").await;
    assert_eq!(
        (back.data["seat_ids"].clone(), back.data["status"].clone()),
        (json!([seats[1]]), json!("available"))
    );

    // A reconnect replays what came after the last notice seen, and nothing before it.
    drop(alice_live);
    let mut again =
        SseReader::new(SseReader::open(&http, &live, Some(&alice), confirmed.id.as_deref()).await);
    let replayed = again.next(Duration::from_secs(5)).await.expect("replay");
    assert_eq!(replayed.event, "order_refunded");
    assert_eq!(replayed.id, notice.id);
    let mut from_start = SseReader::new(SseReader::open(&http, &live, Some(&alice), None).await);
    assert_eq!(from_start.next_of("order_confirmed").await.id, confirmed.id);
    assert_eq!(from_start.next_of("order_refunded").await.id, notice.id);

    // Notifiers read the outbox with the organizer's token.
    let feed = format!("{url}/api/v1/organizer/outbox?after=0");
    assert_eq!(http.get(&feed).send().await.expect("feed").status(), 401);
    let feed: Value = http
        .get(&feed)
        .bearer_auth(ORGANIZER)
        .send()
        .await
        .expect("feed")
        .json()
        .await
        .expect("json");
    let kinds: Vec<&str> = feed["notices"]
        .as_array()
        .expect("notices")
        .iter()
        .map(|n| n["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["order_confirmed", "order_refunded"]);
    assert_eq!(feed["notices"][0]["identity"], "site:alice");

    // The fan's seat page is served whole: no external scripts, styles or fonts.
    let page = http
        .get(format!("{url}/e/{event}/seats"))
        .send()
        .await
        .expect("page");
    assert_eq!(page.status(), 200);
    let html = page.text().await.expect("html");
    assert!(html.contains("EventSource") && html.contains("/holds"));
    for external in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(!html.contains(external), "external asset: {external}");
    }
    let bad = http
        .get(format!("{url}/e/zero/seats"))
        .send()
        .await
        .expect("page");
    assert!(bad.status().is_client_error());

    drop((bob_live, again, from_start));
    app.stop().await.expect("stop");
    env.cleanup().await;
}
