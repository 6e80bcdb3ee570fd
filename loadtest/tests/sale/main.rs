//! End to end through the three real services (HTTP and websocket) against real Postgres and
//! Redis: an organizer creates an event, fans join in presale, the draw orders them, the queue
//! admits them with signed passes, and they hold seats and check out.

use std::time::Duration;

use chrono::Utc;
use clap::Parser;
use fairgate_loadtest::client::{refused, Client, Endpoints, SaleSpec};
use fairgate_loadtest::crowd::verify_draw;
use fairgate_loadtest::invariants;
use serde_json::{json, Value};
use shared::server::RunningApp;
use shared::testing::TestEnv;
use tokio_util::sync::CancellationToken;

mod autotune;
mod cluster;
mod redis_loss;

const ORGANIZER: &str = "test-organizer-token";
const OPERATOR: &str = "alice-operator-token-0123";
const SUPPORT: &str = "sam-support-token-0123456";

struct Stack {
    env: TestEnv,
    apps: Vec<RunningApp>,
    client: Client,
    queue_config: queue::Config,
}

impl Stack {
    async fn start() -> Stack {
        Stack::start_on(TestEnv::new().await).await
    }

    /// The three services on `env` (e.g. with a Redis of the test's own).
    async fn start_on(env: TestEnv) -> Stack {
        Stack::start_tuned(env, |_, _| {}).await
    }

    /// The three services on `env`, the queue's and the purchase's settings changed by `tune`.
    async fn start_tuned(
        env: TestEnv,
        tune: impl FnOnce(&mut queue::Config, &mut purchase::Config),
    ) -> Stack {
        shared::telemetry::init_tracing(shared::config::LogFormat::Human);
        let key = hex::encode(shared::token::random_seed());
        let shutdown = CancellationToken::new();

        let mut buffer_config = buffer::Config::parse_from(["buffer"]);
        buffer_config.bind = "127.0.0.1:0".parse().expect("addr");
        buffer_config.signing.signing_key = Some(key.clone());
        buffer_config.draw_tick_ms = 100;
        buffer_config.join_limit_per_ip = 0;
        buffer_config.common = env.common_config();
        let buffer = buffer::start(buffer_config, shutdown.child_token())
            .await
            .expect("buffer starts");

        let mut queue_config = queue::Config::parse_from(["queue"]);
        queue_config.bind = "127.0.0.1:0".parse().expect("addr");
        queue_config.signing.signing_key = Some(key);
        queue_config.admission_tick_ms = 50;
        queue_config.refresh_ms = 200;
        queue_config.operator_tokens = Some(format!("alice:{OPERATOR}"));
        queue_config.organizer_token = Some(ORGANIZER.into());
        queue_config.next_page_url = Some("http://shop.example/e/{event}/seats</script>".into());
        queue_config.common = env.common_config();
        let mut purchase_config = purchase::Config::parse_from(["purchase"]);
        tune(&mut queue_config, &mut purchase_config);
        let queue = queue::start(queue_config.clone(), shutdown.child_token())
            .await
            .expect("queue starts");

        purchase_config.bind = "127.0.0.1:0".parse().expect("addr");
        purchase_config.jwks_url = format!("{}/.well-known/jwks.json", queue.url());
        purchase_config.organizer_token = Some(ORGANIZER.into());
        purchase_config.support_tokens = Some(format!("sam:{SUPPORT}"));
        purchase_config.common = env.common_config();
        let purchase = purchase::start(purchase_config, shutdown.child_token())
            .await
            .expect("purchase starts");

        let client = Client::new(Endpoints {
            buffer: buffer.url(),
            queue: queue.url(),
            purchase: purchase.url(),
        })
        .expect("client");
        Stack {
            env,
            apps: vec![buffer, queue, purchase],
            client,
            queue_config,
        }
    }

    /// An event whose presale is open and whose draw is `draw_in` from now.
    async fn event(&self, seats: i64, draw_in: chrono::Duration) -> i64 {
        self.create(spec("Skeleton Live", seats, draw_in)).await
    }

    async fn create(&self, spec: SaleSpec) -> i64 {
        self.client
            .create_event(ORGANIZER, &spec)
            .await
            .expect("event created")
    }

    /// Pauses or resumes admissions through the operator API.
    async fn pause(&self, event: i64, paused: bool) {
        let answer = self
            .client
            .http
            .patch(format!(
                "{}/api/v1/operator/events/{event}/controls",
                self.client.endpoints.queue
            ))
            .bearer_auth(OPERATOR)
            .json(&json!({ "paused": paused }))
            .send()
            .await
            .expect("controls");
        assert_eq!(answer.status(), 200);
    }

    /// Every fan waits on the waiting-room websocket for their pass, concurrently.
    fn wait_all(
        &self,
        event: i64,
        fans: &[fairgate_loadtest::client::Joined],
        limit: Duration,
    ) -> tokio::task::JoinSet<
        anyhow::Result<(
            fairgate_loadtest::client::IssuedPass,
            fairgate_loadtest::client::Wait,
        )>,
    > {
        let mut waiting = tokio::task::JoinSet::new();
        for fan in fans {
            let (c, ticket) = (self.client.clone(), fan.ticket.clone());
            waiting.spawn(async move { c.wait_for_pass(event, &ticket, limit).await });
        }
        waiting
    }

    /// `n` anonymous fans join at once.
    async fn join_many(&self, event: i64, n: usize) -> Vec<fairgate_loadtest::client::Joined> {
        futures::future::join_all((0..n).map(|_| self.client.join(event, None)))
            .await
            .into_iter()
            .map(|f| f.expect("join"))
            .collect()
    }

    async fn stop(self) {
        for app in self.apps {
            app.stop().await.expect("clean shutdown");
        }
        self.env.cleanup().await;
    }
}

/// A sale whose presale is open now and whose draw is `draw_in` from now, admitting fast.
fn spec(name: &str, seats: i64, draw_in: chrono::Duration) -> SaleSpec {
    let now = Utc::now();
    SaleSpec {
        name: name.into(),
        seats,
        seats_per_row: 10,
        price_cents: 5_000,
        presale_opens_at: now - chrono::Duration::seconds(1),
        sale_starts_at: now + draw_in,
        sale_ends_at: now + chrono::Duration::hours(1),
        rate_per_minute: 6_000,
        max_active: 1_000,
        seats_per_fan: 2,
    }
}

/// Sends a websocket upgrade request as a browser would, to see how it is refused.
async fn upgrade(request: reqwest::RequestBuilder) -> reqwest::Response {
    request
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("request")
}

fn status_of(e: &anyhow::Error) -> (u16, String) {
    let r = refused(e).unwrap_or_else(|| panic!("expected a refusal, got {e:#}"));
    (r.status, r.code.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_sale_walks_from_join_to_order() {
    let stack = Stack::start().await;
    let c = &stack.client;
    let event = stack.event(20, chrono::Duration::seconds(3)).await;

    // Presale: five fans join and are buffered, not yet placed.
    let mut fans = Vec::new();
    for _ in 0..5 {
        let joined = c.join(event, None).await.expect("join");
        assert_eq!(joined.status, "buffered");
        assert_eq!(joined.position, None);
        assert!(!joined.resumed);
        fans.push(joined);
    }
    // The same ticket joining again (a second tab) gets the same place, not a second one.
    let again = c.join(event, Some(&fans[0].ticket)).await.expect("rejoin");
    assert_eq!(again.ticket_id, fans[0].ticket_id);
    assert!(again.resumed);

    // Every fan waits on the websocket; the draw places them and the queue admits them.
    let waits = futures::future::join_all(
        fans.iter()
            .map(|f| c.wait_for_pass(event, &f.ticket, Duration::from_secs(30))),
    )
    .await;
    let mut passes = Vec::new();
    let mut positions = Vec::new();
    for wait in waits {
        let (pass, seen) = wait.expect("a pass over the websocket");
        let first = seen.first_status.clone().unwrap_or_default();
        assert!(
            seen.statuses > 0
                && (first["phase"] == "waiting_for_draw" || first["phase"] == "queued"),
            "the waiting room showed a status before the pass: {first:?}"
        );
        positions.extend(seen.first_position);
        passes.push(pass);
    }
    positions.sort_unstable();
    positions.dedup();
    assert!(
        positions.iter().all(|p| (1..=5).contains(p)),
        "{positions:?}"
    );

    // The waiting page moves an admitted fan on to the configured next page (safely quoted).
    let page = c
        .http
        .get(format!("{}/e/{event}", c.endpoints.queue))
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("html");
    assert!(
        page.contains(r#""next":"http://shop.example/e/{event}/seats\u003c/script>""#),
        "the next page is injected as a JS string"
    );

    // Every page is served by its service with the shared assets; a bad event id in a page's
    // path gets a JSON 4xx like any endpoint.
    for url in [
        format!("{}/e/{event}", c.endpoints.purchase),
        format!("{}/e/{event}/seats", c.endpoints.purchase),
        format!("{}/organizer", c.endpoints.purchase),
        format!("{}/operator/e/{event}", c.endpoints.queue),
        format!("{}/e/{event}/receipt", c.endpoints.buffer),
        format!("{}/assets/fairgate.css", c.endpoints.buffer),
        format!("{}/assets/charts.js", c.endpoints.queue),
    ] {
        let r = c.http.get(&url).send().await.expect("page");
        assert_eq!(r.status(), 200, "{url}");
    }
    for (url, status) in [
        (format!("{}/e/not-a-number", c.endpoints.purchase), 400),
        (format!("{}/e/0/seats", c.endpoints.purchase), 404),
        (format!("{}/operator/e/-1", c.endpoints.queue), 404),
        (
            format!("{}/e/99999999999999999999/receipt", c.endpoints.buffer),
            400,
        ),
    ] {
        let r = c.http.get(&url).send().await.expect("page");
        assert_eq!(r.status().as_u16(), status, "{url}");
        let body: Value = r.json().await.expect("a JSON error");
        assert!(
            body["error"].is_string() && body["message"].is_string(),
            "{body}"
        );
    }

    // Claiming over HTTP (a fan who went offline) yields the very same pass, not a second one.
    let claimed: Value = c
        .http
        .post(format!("{}/api/v1/events/{event}/pass", c.endpoints.queue))
        .json(&json!({ "ticket": fans[0].ticket }))
        .send()
        .await
        .expect("claim")
        .json()
        .await
        .expect("json");
    let ws_pass = passes
        .iter()
        .find(|p| claimed["jti"] == p.jti.to_string())
        .expect("the claimed pass is the one the websocket delivered");
    assert_eq!(claimed["pass"], ws_pass.pass);

    // The published draw recomputes from its seed to the same order.
    assert!(verify_draw(c, event).await.expect("draw published"));
    let draw = c.draw(event).await.expect("draw");
    assert_eq!(draw["entrants"], 5);
    // The `verify` command agrees, and finds a fan's signed join receipt in the draw.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_verify"))
        .args(["--event", &event.to_string()])
        .args(["--buffer-url", &c.endpoints.buffer])
        .args([
            "--jwks-url",
            &format!("{}/.well-known/jwks.json", c.endpoints.queue),
        ])
        .args(["--receipt", &fans[2].receipt])
        .output()
        .await
        .expect("verify runs");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "verify failed: {printed} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(printed.contains("MATCH:"), "{printed}");
    assert!(
        printed.contains(&format!(
            "ticket {}) is in the draw at position",
            fans[2].ticket_id
        )),
        "{printed}"
    );

    // A fan arriving after the draw goes to the back, in arrival order.
    let late = c.join(event, None).await.expect("late join");
    assert_eq!((late.status.as_str(), late.position), ("queued", Some(6)));

    // The first fan holds two seats and checks out.
    let pass = &passes[0].pass;
    let seats = c.seats(event, pass).await.expect("seat map");
    assert_eq!(seats.len(), 20);
    let hold = c
        .hold(event, pass, &[seats[0].id, seats[1].id])
        .await
        .expect("hold");
    let order = c
        .checkout(event, pass, hold.hold_id, "key-1", "tok_visa")
        .await
        .expect("checkout");
    assert_eq!(order.tickets.len(), 2);
    assert_eq!(order.total_cents, 10_000);
    // A retry with the same key answers the same order and charges nothing more.
    let retry = c
        .checkout(event, pass, hold.hold_id, "key-1", "tok_visa")
        .await
        .expect("replayed checkout");
    assert_eq!(retry.order_id, order.order_id);

    // Another fan cannot hold a sold seat.
    let taken = c
        .hold(event, &passes[1].pass, &[seats[0].id])
        .await
        .expect_err("sold seat");
    assert_eq!(status_of(&taken), (409, "seat_unavailable".into()));

    // No pass, or a tampered one: 401.
    let purchase = &c.endpoints.purchase;
    let bare = c
        .http
        .get(format!("{purchase}/api/v1/events/{event}/seats"))
        .send()
        .await
        .expect("request");
    assert_eq!(bare.status(), 401);
    let body: Value = bare.json().await.expect("json error");
    assert_eq!(body["error"], "pass_missing");
    let mut tampered = passes[1].pass.clone();
    let i = tampered.find('.').expect("jwt") + 10;
    let c2 = if &tampered[i..=i] == "x" { "y" } else { "x" };
    tampered.replace_range(i..=i, c2);
    let forged = c
        .hold(event, &tampered, &[seats[5].id])
        .await
        .expect_err("tampered");
    assert_eq!(status_of(&forged).0, 401);
    // A ticket is not a pass.
    let wrong_kind = c
        .hold(event, &fans[1].ticket, &[seats[5].id])
        .await
        .expect_err("ticket");
    assert_eq!(status_of(&wrong_kind), (401, "pass_wrong_type".into()));

    // The order is in Postgres, and every invariant holds.
    let pg = stack.env.pool().await;
    let (orders, sold): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders WHERE event_id = $1),
                (SELECT count(*) FROM seats WHERE event_id = $1 AND status = 'sold')",
    )
    .bind(event)
    .fetch_one(&pg)
    .await
    .expect("query");
    assert_eq!((orders, sold), (1, 2));
    let checks = invariants::check(&pg, event).await.expect("invariants");
    assert!(checks.values().all(|v| *v), "{checks:?}");
    pg.close().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_buyers_never_oversell() {
    let stack = Stack::start().await;
    let c = &stack.client;
    // Places for every fan (admission is sized to the places left), two of them fought over.
    let event = stack.event(40, chrono::Duration::seconds(2)).await;
    let fans = futures::future::join_all((0..30).map(|_| c.join(event, None))).await;
    let fans: Vec<_> = fans.into_iter().map(|f| f.expect("join")).collect();
    let passes = futures::future::join_all(
        fans.iter()
            .map(|f| c.wait_for_pass(event, &f.ticket, Duration::from_secs(30))),
    )
    .await;
    let passes: Vec<String> = passes
        .into_iter()
        .map(|p| p.expect("pass").0.pass)
        .collect();
    let seats = c.seats(event, &passes[0]).await.expect("seats");
    let wanted = [seats[1].id, seats[2].id];

    // Thirty fans grab the same two seats at once: exactly one hold wins.
    let holds = futures::future::join_all(passes.iter().map(|p| c.hold(event, p, &wanted))).await;
    let winners: Vec<_> = holds
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.as_ref().ok().map(|h| (i, h.hold_id)))
        .collect();
    assert_eq!(winners.len(), 1, "exactly one hold of the same seats");
    for h in holds.iter().filter_map(|h| h.as_ref().err()) {
        assert_eq!(status_of(h), (409, "seat_unavailable".into()));
    }

    // The winner checks out ten times at once with one key and five more with fresh keys:
    // one order, one charge.
    let (i, hold_id) = winners[0];
    let pass = &passes[i];
    let attempts = futures::future::join_all((0..15).map(|n| {
        let key = if n < 10 {
            "same-key".to_string()
        } else {
            format!("key-{n}")
        };
        async move { c.checkout(event, pass, hold_id, &key, "tok_visa").await }
    }))
    .await;
    let orders: std::collections::HashSet<_> = attempts
        .iter()
        .filter_map(|a| a.as_ref().ok().map(|o| o.order_id))
        .collect();
    assert_eq!(orders.len(), 1, "one pass buys once: {attempts:?}");
    for e in attempts.iter().filter_map(|a| a.as_ref().err()) {
        let (status, code) = status_of(e);
        assert!(
            status == 409
                && ["checkout_in_progress", "pass_used", "hold_not_active"]
                    .contains(&code.as_str()),
            "unexpected refusal {status} {code}"
        );
    }

    let pg = stack.env.pool().await;
    let checks = invariants::check(&pg, event).await.expect("invariants");
    assert!(checks.values().all(|v| *v), "{checks:?}");
    let charged: i64 =
        sqlx::query_scalar("SELECT count(*) FROM payments WHERE status = 'succeeded'")
            .fetch_one(&pg)
            .await
            .expect("payments");
    assert_eq!(charged, 1, "one charge for one order");
    pg.close().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_precise_json_errors_and_changes_nothing() {
    let stack = Stack::start().await;
    let c = &stack.client;
    let http = &c.http;
    let (buffer, queue, purchase) = (
        c.endpoints.buffer.clone(),
        c.endpoints.queue.clone(),
        c.endpoints.purchase.clone(),
    );
    let event = stack.event(10, chrono::Duration::seconds(60)).await;

    async fn expect(response: reqwest::Response, status: u16, code: &str) {
        assert_eq!(response.status().as_u16(), status, "status for {code}");
        let body: Value = response.json().await.expect("a JSON error body");
        assert_eq!(body["error"], code, "{body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    // Buffer.
    let join = format!("{buffer}/api/v1/events/{event}/join");
    expect(
        http.post(&join)
            .header("content-type", "application/json")
            .body("{nope")
            .send()
            .await
            .expect("req"),
        400,
        "malformed_json",
    )
    .await;
    expect(
        http.post(&join)
            .json(&json!({ "ticket": 5 }))
            .send()
            .await
            .expect("req"),
        422,
        "invalid_body",
    )
    .await;
    expect(
        http.post(&join)
            .json(&json!({ "ticket": "not.a.jwt" }))
            .send()
            .await
            .expect("req"),
        401,
        "ticket_malformed",
    )
    .await;
    expect(
        http.post(&join)
            .header("content-type", "application/json")
            .body(vec![b' '; 70 * 1024])
            .send()
            .await
            .expect("req"),
        413,
        "body_too_large",
    )
    .await;
    expect(
        http.post(format!("{buffer}/api/v1/events/999999/join"))
            .header("content-type", "application/json")
            .send()
            .await
            .expect("req"),
        404,
        "event_not_found",
    )
    .await;
    // A join is JSON: a form or text/plain post (a cross-site "simple" request) is refused.
    for (content_type, body) in [
        ("text/plain", "{}"),
        ("application/x-www-form-urlencoded", "a=b"),
    ] {
        expect(
            http.post(&join)
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .expect("req"),
            415,
            "unsupported_media_type",
        )
        .await;
    }
    expect(
        http.post(&join).send().await.expect("req"),
        415,
        "unsupported_media_type",
    )
    .await;
    expect(
        http.post(format!("{buffer}/api/v1/events/abc/join"))
            .send()
            .await
            .expect("req"),
        400,
        "bad_path",
    )
    .await;
    expect(
        http.get(&join).send().await.expect("req"),
        405,
        "method_not_allowed",
    )
    .await;
    expect(
        http.get(format!("{buffer}/nope"))
            .send()
            .await
            .expect("req"),
        404,
        "not_found",
    )
    .await;

    // A presale that has not opened yet: 425 with the opening time.
    let now = Utc::now();
    let later = c
        .create_event(
            ORGANIZER,
            &SaleSpec {
                name: "Later".into(),
                seats: 5,
                seats_per_row: 5,
                price_cents: 100,
                presale_opens_at: now + chrono::Duration::hours(1),
                sale_starts_at: now + chrono::Duration::hours(2),
                sale_ends_at: now + chrono::Duration::hours(3),
                rate_per_minute: 60,
                max_active: 10,
                seats_per_fan: 1,
            },
        )
        .await
        .expect("event");
    let early = c.join(later, None).await.expect_err("too early");
    assert_eq!(status_of(&early), (425, "presale_not_open".into()));

    // Queue: a websocket without a valid ticket, a claim before the draw, a foreign origin.
    let joined = c.join(event, None).await.expect("join");
    // The websocket route asked without an upgrade, or with a version we do not speak.
    let ws_url = format!("{queue}/api/v1/events/{event}/ws?ticket={}", joined.ticket);
    expect(
        http.get(&ws_url).send().await.expect("req"),
        400,
        "websocket_upgrade_required",
    )
    .await;
    expect(
        http.get(&ws_url)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "8")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
            .await
            .expect("req"),
        400,
        "websocket_version_unsupported",
    )
    .await;
    expect(
        upgrade(http.get(format!("{queue}/api/v1/events/{event}/ws?ticket=forged"))).await,
        401,
        "ticket_malformed",
    )
    .await;
    expect(
        upgrade(
            http.get(format!(
                "{queue}/api/v1/events/{event}/ws?ticket={}",
                joined.ticket
            ))
            .header("origin", "https://evil.example"),
        )
        .await,
        403,
        "origin_not_allowed",
    )
    .await;
    expect(
        http.post(format!("{queue}/api/v1/events/{event}/pass"))
            .json(&json!({ "ticket": joined.ticket }))
            .send()
            .await
            .expect("req"),
        409,
        "not_in_queue_yet",
    )
    .await;
    expect(
        http.post(format!("{queue}/api/v1/events/{later}/pass"))
            .json(&json!({ "ticket": joined.ticket }))
            .send()
            .await
            .expect("req"),
        403,
        "ticket_wrong_event",
    )
    .await;

    // Purchase: organizer API without or with a wrong token, an invalid window.
    let create = format!("{purchase}/api/v1/organizer/events");
    let body = json!({
        "name": "Bad window", "starts_at": now + chrono::Duration::days(3),
        "sale": {
            "presale_opens_at": now + chrono::Duration::hours(2),
            "sale_starts_at": now + chrono::Duration::hours(1),
            "sale_ends_at": now + chrono::Duration::hours(3),
            "rate_per_minute": 60, "max_active": 10
        },
        "seat_map": { "sections": [{ "name": "A", "rows": 1, "seats_per_row": 1, "price_cents": 1 }] }
    });
    expect(
        http.post(&create).json(&body).send().await.expect("req"),
        401,
        "credentials_missing",
    )
    .await;
    expect(
        http.post(&create)
            .bearer_auth("wrong")
            .json(&body)
            .send()
            .await
            .expect("req"),
        401,
        "credentials_invalid",
    )
    .await;
    let refused_window = http
        .post(&create)
        .bearer_auth(ORGANIZER)
        .json(&body)
        .send()
        .await
        .expect("req");
    assert_eq!(refused_window.status(), 422);
    let err: Value = refused_window.json().await.expect("json");
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("sale.presale_opens_at")),
        "{err}"
    );

    // Nothing above changed anything: one join (the valid one), two events.
    let pg = stack.env.pool().await;
    let (joins, events): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM joins), (SELECT count(*) FROM events)")
            .fetch_one(&pg)
            .await
            .expect("counts");
    assert_eq!((joins, events), (1, 2));
    pg.close().await;

    // Operational endpoints.
    for base in [&buffer, &queue, &purchase] {
        assert_eq!(
            http.get(format!("{base}/healthz"))
                .send()
                .await
                .expect("req")
                .status(),
            200
        );
        let ready = http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .expect("req");
        assert_eq!(ready.status(), 200, "{:?}", ready.text().await);
        let metrics = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("req");
        assert!(metrics
            .text()
            .await
            .expect("text")
            .contains("http_requests_total"));
    }
    stack.stop().await;
}

async fn passes_issued(pg: &sqlx::PgPool, event: i64) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM passes WHERE event_id = $1")
        .bind(event)
        .fetch_one(pg)
        .await
        .expect("passes")
}

async fn eventually_count(pg: &sqlx::PgPool, event: i64, want: i64) {
    for _ in 0..400 {
        if passes_issued(pg, event).await >= want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never reached {want} passes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cap_on_active_shoppers_is_never_exceeded() {
    let stack = Stack::start().await;
    let c = &stack.client;
    let event = stack
        .create(SaleSpec {
            rate_per_minute: 60_000,
            max_active: 2,
            seats_per_fan: 1,
            ..spec("Capped", 10, chrono::Duration::seconds(1))
        })
        .await;
    let fans = stack.join_many(event, 5).await;
    let mut waiting = stack.wait_all(event, &fans, Duration::from_secs(60));

    let pg = stack.env.pool().await;
    eventually_count(&pg, event, 2).await;
    // At 1,000 admissions a second, 40 admission ticks pass here: the cap must hold them all.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        passes_issued(&pg, event).await,
        2,
        "cap of 2 active shoppers exceeded"
    );
    let mut admitted: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT ticket_id FROM passes WHERE event_id = $1")
            .bind(event)
            .fetch_all(&pg)
            .await
            .expect("passes");
    admitted.sort();
    let order: Vec<uuid::Uuid> =
        serde_json::from_value(c.draw(event).await.expect("draw")["order"].clone()).expect("order");
    let mut first_two = order[..2].to_vec();
    first_two.sort();
    assert_eq!(
        admitted, first_two,
        "the first two in line were admitted first"
    );

    // One of them buys: exactly one more fan is let in.
    let (pass, _) = waiting
        .join_next()
        .await
        .expect("a waiter")
        .expect("task")
        .expect("pass");
    let seats = c.seats(event, &pass.pass).await.expect("seats");
    let hold = c
        .hold(event, &pass.pass, &[seats[0].id])
        .await
        .expect("hold");
    c.checkout(event, &pass.pass, hold.hold_id, "k", "tok_visa")
        .await
        .expect("checkout");
    eventually_count(&pg, event, 3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        passes_issued(&pg, event).await,
        3,
        "one finished shopper frees one slot"
    );
    waiting.abort_all();
    pg.close().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_closes_waiting_room_sockets_with_a_close_frame() {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::Message;

    let stack = Stack::start().await;
    let c = &stack.client;
    let event = stack.event(5, chrono::Duration::seconds(600)).await;
    let fan = c.join(event, None).await.expect("join");
    let url = format!(
        "{}/api/v1/events/{event}/ws?ticket={}",
        c.endpoints.queue.replacen("http", "ws", 1),
        fan.ticket
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("websocket");
    let first = socket.next().await.expect("a message").expect("ok");
    let status: Value = serde_json::from_str(first.to_text().expect("text")).expect("json");
    assert_eq!(status["phase"], "waiting_for_draw");

    let stopping = tokio::spawn(stack.stop());
    let mut close = None;
    while let Some(message) = socket.next().await {
        if let Ok(Message::Close(frame)) = message {
            close = frame;
            break;
        }
    }
    let frame = close.expect("a close frame before the socket ended");
    assert_eq!(frame.code, CloseCode::Away);
    stopping.await.expect("stack stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_line_closes_with_410_once_every_seat_is_sold() {
    use futures::StreamExt;

    let stack = Stack::start().await;
    let c = &stack.client;
    let event = stack
        .create(SaleSpec {
            rate_per_minute: 60_000,
            max_active: 1,
            seats_per_fan: 2,
            ..spec("Tiny", 2, chrono::Duration::seconds(1))
        })
        .await;
    let first = c.join(event, None).await.expect("join");
    let second = c.join(event, None).await.expect("join");
    // Whoever the draw puts first is admitted; the other waits behind the cap of one.
    let a = c.wait_for_pass(event, &first.ticket, Duration::from_secs(3));
    let b = c.wait_for_pass(event, &second.ticket, Duration::from_secs(3));
    let (pass, waiter) = tokio::select! {
        Ok((p, _)) = a => (p, second),
        Ok((p, _)) = b => (p, first),
    };
    let url = format!(
        "{}/api/v1/events/{event}/ws?ticket={}",
        c.endpoints.queue.replacen("http", "ws", 1),
        waiter.ticket
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("ws");
    let seats = c.seats(event, &pass.pass).await.expect("seats");
    let hold = c
        .hold(event, &pass.pass, &[seats[0].id, seats[1].id])
        .await
        .expect("hold");
    c.checkout(event, &pass.pass, hold.hold_id, "last", "tok_visa")
        .await
        .expect("checkout");
    // Joins see the event's settings within a second.
    let mut refusal = None;
    for _ in 0..40 {
        match c.join(event, None).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => {
                refusal = Some(status_of(&e));
                break;
            }
        }
    }
    assert_eq!(refusal, Some((410, "sold_out".into())));
    // The fan still waiting is told the line is over.
    let mut told = false;
    while let Some(Ok(message)) = socket.next().await {
        if let Ok(text) = message.to_text() {
            if serde_json::from_str::<Value>(text).is_ok_and(|v| v["type"] == "sold_out") {
                told = true;
                break;
            }
        }
    }
    assert!(told, "the waiting fan was told the event sold out");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unclaimed_admission_lapses_and_its_slot_passes_on() {
    let stack = Stack::start().await;
    let c = &stack.client;
    let event = stack
        .create(SaleSpec {
            rate_per_minute: 60_000,
            max_active: 1,
            seats_per_fan: 1,
            ..spec("No-show", 10, chrono::Duration::seconds(2))
        })
        .await;
    let pg = stack.env.pool().await;
    sqlx::query("UPDATE events SET claim_window_secs = 10 WHERE id = $1")
        .bind(event)
        .execute(&pg)
        .await
        .expect("claim window");
    let a = c.join(event, None).await.expect("join");
    let b = c.join(event, None).await.expect("join");
    let mut order = Vec::new();
    for _ in 0..100 {
        let draw = c.draw(event).await.expect("draw");
        if draw["status"] == "drawn" {
            order = serde_json::from_value(draw["order"].clone()).expect("order");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (no_show, waiter) = if order.first() == Some(&a.ticket_id) {
        (a, b)
    } else {
        (b, a)
    };

    // The first in line never comes; the second waits and is let in once the first's claim
    // window has lapsed: not before.
    let started = std::time::Instant::now();
    let (pass, _) = c
        .wait_for_pass(event, &waiter.ticket, Duration::from_secs(40))
        .await
        .expect("the second fan is admitted after the lapse");
    assert!(
        started.elapsed() >= Duration::from_secs(7),
        "admitted after {:?}: the cap of 1 was not held while the first fan's window ran",
        started.elapsed()
    );
    assert!(!pass.pass.is_empty());

    // The no-show comes back too late.
    let late = c
        .http
        .post(format!("{}/api/v1/events/{event}/pass", c.endpoints.queue))
        .json(&json!({ "ticket": no_show.ticket }))
        .send()
        .await
        .expect("claim");
    assert_eq!(late.status(), 410);
    let body: Value = late.json().await.expect("json");
    assert_eq!(body["error"], "admission_lapsed");
    let passes: i64 = sqlx::query_scalar("SELECT count(*) FROM passes WHERE event_id = $1")
        .bind(event)
        .fetch_one(&pg)
        .await
        .expect("passes");
    assert_eq!(passes, 1, "no pass for a lapsed admission");
    pg.close().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_pause_message_and_resume_a_live_sale_with_an_audit_trail() {
    use futures::StreamExt;

    let stack = Stack::start().await;
    let c = &stack.client;
    let queue = c.endpoints.queue.clone();
    let event = stack.event(20, chrono::Duration::seconds(2)).await;
    let controls = format!("{queue}/api/v1/operator/events/{event}/controls");

    // Refusals first: they change nothing.
    let no_token = c
        .http
        .patch(&controls)
        .json(&json!({"paused": true}))
        .send()
        .await
        .expect("req");
    assert_eq!(no_token.status(), 401);
    let wrong = c
        .http
        .patch(&controls)
        .bearer_auth("mallory-guessing-token")
        .json(&json!({"paused": true}))
        .send()
        .await
        .expect("req");
    assert_eq!(wrong.status(), 401);
    let zero = c
        .http
        .patch(&controls)
        .bearer_auth(OPERATOR)
        .json(&json!({"rate_per_minute": 0}))
        .send()
        .await
        .expect("req");
    assert_eq!(zero.status(), 422);
    let unknown = c
        .http
        .patch(format!("{queue}/api/v1/operator/events/999999/controls"))
        .bearer_auth(OPERATOR)
        .json(&json!({"paused": true}))
        .send()
        .await
        .expect("req");
    assert_eq!(unknown.status(), 404);

    stack.pause(event, true).await;
    let fans = stack.join_many(event, 5).await;

    // A waiter sees the pause and the operators' message.
    let url = format!(
        "{}/api/v1/events/{event}/ws?ticket={}",
        queue.replacen("http", "ws", 1),
        fans[0].ticket
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("ws");
    let said = c
        .http
        .put(format!("{queue}/api/v1/operator/events/{event}/message"))
        .bearer_auth(OPERATOR)
        .json(&json!({"text": "Back in five minutes"}))
        .send()
        .await
        .expect("req");
    assert_eq!(said.status(), 200);
    let mut seen_pause = false;
    for _ in 0..50 {
        let Some(Ok(message)) = socket.next().await else {
            break;
        };
        let Ok(text) = message.to_text() else {
            continue;
        };
        let status: Value = serde_json::from_str(text).expect("json");
        if status["paused"] == true && status["message"] == "Back in five minutes" {
            seen_pause = true;
            break;
        }
    }
    assert!(seen_pause, "the waiter saw the pause and the message");
    drop(socket);

    // While paused, the draw happens but nobody is admitted.
    let pg = stack.env.pool().await;
    for _ in 0..100 {
        if c.draw(event).await.expect("draw")["status"] == "drawn" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut waiting = stack.wait_all(event, &fans, Duration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        passes_issued(&pg, event).await,
        0,
        "nobody admitted while paused"
    );

    let resumed = c
        .http
        .patch(&controls)
        .bearer_auth(OPERATOR)
        .json(&json!({"paused": false, "rate_per_minute": 3000}))
        .send()
        .await
        .expect("req");
    let resumed: Value = resumed.json().await.expect("json");
    assert_eq!(
        resumed,
        json!({"rate_per_minute": 3000, "max_active": 1000, "paused": false})
    );
    while let Some(done) = waiting.join_next().await {
        done.expect("task").expect("admitted after resuming");
    }

    let stats: Value = c
        .http
        .get(format!("{queue}/api/v1/operator/events/{event}/stats"))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .expect("req")
        .json()
        .await
        .expect("json");
    assert_eq!(stats["admitted"], 5);
    assert_eq!(stats["passes_issued"], 5);
    assert_eq!(stats["waiting"], 0);
    assert_eq!(stats["rate_per_minute"], 3000);

    let audit: Vec<(String, String)> =
        sqlx::query_as("SELECT actor, action FROM operator_audit WHERE event_id = $1 ORDER BY id")
            .bind(event)
            .fetch_all(&pg)
            .await
            .expect("audit");
    let alice = |a: &str| ("alice".to_owned(), a.to_owned());
    assert_eq!(
        audit,
        vec![alice("controls"), alice("message"), alice("controls")]
    );
    pg.close().await;
    stack.stop().await;
}

async fn redis_client(env: &TestEnv) -> fred::prelude::Client {
    use fred::prelude::*;
    let client = Builder::from_config(Config::from_url(&env.redis_url).expect("url"))
        .build()
        .expect("client");
    client.init().await.expect("redis");
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_admit_at_the_configured_rate_through_a_leader_handover() {
    use fred::prelude::*;

    let mut stack = Stack::start().await;
    let c = stack.client.clone();
    let event = stack
        .create(SaleSpec {
            rate_per_minute: 1_200,
            max_active: 100_000,
            seats_per_fan: 1,
            ..spec("Steady", 600, chrono::Duration::seconds(3))
        })
        .await;
    for chunk in 0..10 {
        let joins = futures::future::join_all((0..50).map(|_| c.join(event, None))).await;
        assert!(joins.iter().all(Result::is_ok), "chunk {chunk} joined");
    }
    let redis = redis_client(&stack.env).await;
    let keys = shared::redis::EventKeys::new(
        &stack.env.redis_prefix,
        shared::ids::EventId::new(event).expect("id"),
    );
    let head = || async {
        redis
            .get::<Option<i64>, _>(keys.head())
            .await
            .expect("head")
            .unwrap_or(0)
    };
    // The first instance leads once the draw has run; then a second instance joins in.
    for _ in 0..200 {
        if head().await > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_leader: Option<String> = redis.get(keys.leader()).await.expect("leader");
    let mut second_config = stack.queue_config.clone();
    second_config.bind = "127.0.0.1:0".parse().expect("addr");
    let second = queue::start(second_config, CancellationToken::new())
        .await
        .expect("second queue");

    let (h0, t0) = (head().await, std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(7)).await;
    // The leader stops; the other instance must take over without a gap or a double admission.
    let leader_app = stack.apps.remove(1);
    leader_app.stop().await.expect("leader stops");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (h1, t1) = (head().await, std::time::Instant::now());
    let new_leader: Option<String> = redis.get(keys.leader()).await.expect("leader");
    assert!(
        first_leader.is_some() && new_leader.is_some() && new_leader != first_leader,
        "leadership moved: {first_leader:?} -> {new_leader:?}"
    );

    let rate = (h1 - h0) as f64 / (t1 - t0).as_secs_f64() * 60.0;
    eprintln!(
        "admitted {rate:.1}/min over {:?} (configured 1200/min)",
        t1 - t0
    );
    assert!(
        (rate - 1200.0).abs() <= 1200.0 * 0.02,
        "admitted {rate:.0}/min against 1200/min configured ({} admissions in {:?})",
        h1 - h0,
        t1 - t0
    );
    let _ = redis.quit().await;
    second.stop().await.expect("second stops");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fans_who_leave_are_skipped_and_the_draw_still_verifies() {
    let stack = Stack::start().await;
    let c = &stack.client;
    let queue = c.endpoints.queue.clone();
    let event = stack.event(10, chrono::Duration::seconds(2)).await;
    stack.pause(event, true).await;
    let fans = stack.join_many(event, 4).await;
    let leave = |ticket: &str| {
        c.http
            .post(format!("{queue}/api/v1/events/{event}/leave"))
            .json(&json!({ "ticket": ticket }))
            .send()
    };
    // One fan leaves before the draw: they are not among its entrants.
    let early: Value = leave(&fans[3].ticket)
        .await
        .expect("leave")
        .json()
        .await
        .expect("json");
    assert_eq!(early, json!({"left": true, "before_draw": true}));

    let mut order: Vec<uuid::Uuid> = Vec::new();
    for _ in 0..100 {
        let draw = c.draw(event).await.expect("draw");
        if draw["status"] == "drawn" {
            order = serde_json::from_value(draw["order"].clone()).expect("order");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(order.len(), 3, "three entrants");
    assert!(!order.contains(&fans[3].ticket_id));
    assert!(
        verify_draw(c, event).await.expect("verify"),
        "the draw still verifies"
    );

    // The first in line leaves after the draw: the line skips them.
    let first = fans
        .iter()
        .find(|f| f.ticket_id == order[0])
        .expect("first");
    // The draw is published before the queue service has built the line from it; until then
    // the leave is answered 409 `not_in_queue_yet`, which a client retries.
    let mut late = Value::Null;
    for _ in 0..100 {
        late = leave(&first.ticket)
            .await
            .expect("leave")
            .json()
            .await
            .expect("json");
        if late["error"] != "not_in_queue_yet" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(late, json!({"left": true, "before_draw": false}));
    stack.pause(event, false).await;
    for ticket in &order[1..] {
        let fan = fans.iter().find(|f| f.ticket_id == *ticket).expect("fan");
        c.wait_for_pass(event, &fan.ticket, Duration::from_secs(30))
            .await
            .expect("the others are admitted");
    }
    let refused = c
        .http
        .post(format!("{queue}/api/v1/events/{event}/pass"))
        .json(&json!({ "ticket": first.ticket }))
        .send()
        .await
        .expect("claim");
    assert_eq!(refused.status(), 410);
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"], "left_queue");
    let stats: Value = c
        .http
        .get(format!("{queue}/api/v1/operator/events/{event}/stats"))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (stats["admitted"].as_i64(), stats["passes_issued"].as_i64()),
        (Some(3), Some(2))
    );
    assert_eq!(stats["active"], 2, "the fan who left holds no slot");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fan_reconnecting_to_another_instance_keeps_their_place() {
    use futures::StreamExt;

    let stack = Stack::start().await;
    let c = &stack.client;
    let event = stack.event(10, chrono::Duration::seconds(1)).await;
    // Paused: nobody moves, so a place seen twice must be the same place.
    stack.pause(event, true).await;
    let fans = stack.join_many(event, 3).await;
    let mut other = stack.queue_config.clone();
    other.bind = "127.0.0.1:0".parse().expect("addr");
    let second = queue::start(other, CancellationToken::new())
        .await
        .expect("second queue");

    async fn place(base: &str, event: i64, ticket: &str) -> i64 {
        let url = format!(
            "{}/api/v1/events/{event}/ws?ticket={ticket}",
            base.replacen("http", "ws", 1)
        );
        let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("ws");
        while let Some(Ok(message)) = socket.next().await {
            let Ok(text) = message.to_text() else {
                continue;
            };
            let status: Value = serde_json::from_str(text).expect("json");
            if let Some(position) = status["position"].as_i64() {
                return position;
            }
        }
        panic!("the socket ended without a position");
    }
    for fan in &fans {
        let here = place(&c.endpoints.queue, event, &fan.ticket).await;
        let there = place(&second.url(), event, &fan.ticket).await;
        assert_eq!(here, there, "the same place on every instance");
    }
    second.stop().await.expect("stop");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_racing_a_purchase_of_the_same_seat_never_sells_it_twice() {
    let stack = Stack::start().await;
    let c = &stack.client;
    let purchase = c.endpoints.purchase.clone();
    let event = stack
        .create(SaleSpec {
            seats_per_fan: 1,
            ..spec("Second chance", 1, chrono::Duration::seconds(1))
        })
        .await;
    let a = c.join(event, None).await.expect("join");
    let b = c.join(event, None).await.expect("join");
    let (pass_a, _) = c
        .wait_for_pass(event, &a.ticket, Duration::from_secs(30))
        .await
        .expect("pass");
    let (pass_b, _) = c
        .wait_for_pass(event, &b.ticket, Duration::from_secs(30))
        .await
        .expect("pass");
    let seat = c.seats(event, &pass_a.pass).await.expect("seats")[0].id;
    let hold = c.hold(event, &pass_a.pass, &[seat]).await.expect("hold");
    let order_a = c
        .checkout(event, &pass_a.pass, hold.hold_id, "a", "tok_visa")
        .await
        .expect("a buys the only seat");

    // B keeps trying for the seat while support refunds A.
    let grab = async {
        for _ in 0..300 {
            match c.hold(event, &pass_b.pass, &[seat]).await {
                Ok(hold) => {
                    return Some(
                        c.checkout(event, &pass_b.pass, hold.hold_id, "b", "tok_visa")
                            .await
                            .expect("b buys the returned seat"),
                    );
                }
                Err(e) => assert_eq!(status_of(&e), (409, "seat_unavailable".into())),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    };
    let refund = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.http
            .post(format!(
                "{purchase}/api/v1/support/orders/{}/refund",
                order_a.order_id
            ))
            .bearer_auth(SUPPORT)
            .send()
            .await
            .expect("refund")
    };
    let (bought, refunded) = tokio::join!(grab, refund);
    assert_eq!(refunded.status(), 200);
    let refunded: Value = refunded.json().await.expect("json");
    assert_eq!(refunded["status"], "refunded");
    assert_eq!(refunded["seats_returned"], json!([seat]));
    let order_b = bought.expect("the refunded seat was bought again");
    assert_eq!(order_b.tickets[0].seat_id, seat);

    // Refusals: twice, unknown, no credentials.
    let again = c
        .http
        .post(format!(
            "{purchase}/api/v1/support/orders/{}/refund",
            order_a.order_id
        ))
        .bearer_auth(SUPPORT)
        .send()
        .await
        .expect("req");
    assert_eq!(again.status(), 409);
    let unknown = c
        .http
        .post(format!(
            "{purchase}/api/v1/support/orders/{}/refund",
            uuid::Uuid::new_v4()
        ))
        .bearer_auth(SUPPORT)
        .send()
        .await
        .expect("req");
    assert_eq!(unknown.status(), 404);
    let anonymous = c
        .http
        .post(format!(
            "{purchase}/api/v1/support/orders/{}/refund",
            order_b.order_id
        ))
        .send()
        .await
        .expect("req");
    assert_eq!(anonymous.status(), 401);

    // Support sees the fan's refunded order and who refunded it; the organizer's report counts
    // the resale once.
    let history: Value = c
        .http
        .get(format!("{purchase}/api/v1/support/orders"))
        .query(&[("identity", format!("anon:{}", a.ticket_id))])
        .bearer_auth(SUPPORT)
        .send()
        .await
        .expect("lookup")
        .json()
        .await
        .expect("json");
    assert_eq!(history[0]["status"], "refunded");
    assert_eq!(history[0]["refunded_by"], "sam");
    let report: Value = c
        .http
        .get(format!("{purchase}/api/v1/organizer/events/{event}/report"))
        .bearer_auth(ORGANIZER)
        .send()
        .await
        .expect("report")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (
            &report["sold"],
            &report["revenue_cents"],
            &report["orders_paid"],
            &report["orders_refunded"]
        ),
        (&json!(1), &json!(5000), &json!(1), &json!(1))
    );

    let pg = stack.env.pool().await;
    let checks = invariants::check(&pg, event).await.expect("invariants");
    assert!(checks.values().all(|v| *v), "{checks:?}");
    let (valid_tickets, refunded_charges, live_charges): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM tickets WHERE seat_id = $1 AND status = 'valid'),
                (SELECT count(*) FROM sandbox_charges WHERE refunded),
                (SELECT count(*) FROM sandbox_charges WHERE outcome = 'succeeded' AND NOT refunded)",
    )
    .bind(seat)
    .fetch_one(&pg)
    .await
    .expect("counts");
    assert_eq!((valid_tickets, refunded_charges, live_charges), (1, 1, 1));
    pg.close().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_crowd_buys_through_the_real_services_and_every_invariant_holds() {
    // Admission is sized to the places left: the sale's last places wait for abandoned holds
    // and passes, which here live 20 s and a minute, within the fans' patience.
    let stack = Stack::start_tuned(TestEnv::new().await, |_, p| p.hold_ttl_secs = 20).await;
    let config = fairgate_loadtest::crowd::CrowdConfig {
        endpoints: stack.client.endpoints.clone(),
        organizer_token: ORGANIZER.into(),
        database_url: Some(stack.env.database_url.clone()),
        fans: 80,
        seats: 60,
        presale_secs: 3,
        rate_per_minute: 1_200,
        // Abandoned holds and declined fans keep their slot until their pass expires: no cap.
        max_active: 100,
        seats_per_fan: 2,
        decline_share: 0.05,
        late_share: 0.2,
        late_secs: 2,
        leave_share: 0.05,
        misbehave_share: 0.1,
        best_share: 0.4,
        general_share: 0.2,
        no_claim_share: 0.05,
        abandon_share: 0.05,
        retry_share: 0.1,
        claim_window_secs: 10,
        pass_ttl_secs: 60,
        fan_timeout: Duration::from_secs(120),
        progress: false,
        identity_secret: None,
        patience: Duration::ZERO,
        autotune: None,
    };
    let report = fairgate_loadtest::crowd::run(config)
        .await
        .expect("the crowd runs");
    assert!(report.ok, "{:?}", report.invariants);
    for name in [
        "no_seat_sold_twice",
        "no_fan_charged_twice",
        "no_identity_queued_twice",
        "no_misbehaving_client_got_through",
        "post_draw_arrivals_in_arrival_order",
        "retried_checkouts_gave_one_order",
        "draw_verified",
    ] {
        assert_eq!(report.invariants.get(name), Some(&true), "{name}");
    }
    assert_eq!(report.errors, 0, "{:?}", report.error_samples);
    assert!(report.live_arrivals > 0 && report.misbehaving > 0 && report.left > 0);
    assert!(
        report.no_shows > 0 && report.abandoned_holds > 0 && report.retried_checkouts > 0,
        "every kind of fan took part: {} no-shows, {} abandoned holds, {} retries",
        report.no_shows,
        report.abandoned_holds,
        report.retried_checkouts
    );
    assert!(
        report.bought_standing > 0 && report.bought_best_available + report.bought_specific > 0,
        "standing places and seats were bought"
    );
    assert!(report.seats_sold > 0 && report.seats_sold <= 60);
    let json = serde_json::to_value(&report).expect("json");
    for field in [
        "fans",
        "seats",
        "seats_sold",
        "admitted",
        "latency_ms",
        "spearman_presale",
        "invariants",
        "ok",
    ] {
        assert!(json.get(field).is_some(), "the JSON names {field}");
    }
    assert!(json["latency_ms"]["join"]["p99"].is_number());
    let html = fairgate_loadtest::html::render(&report).expect("html");
    assert_eq!(html.matches("<svg").count(), 4, "four charts");
    assert!(html.contains("Admission rate against purchase latency"));
    assert!(
        !html.contains("http://") || !html.contains("<script"),
        "no external assets"
    );
    stack.stop().await;
}

/// The `crowd` binary itself, spread over worker processes from their own loopback addresses,
/// merges every worker's fans into one report whose invariants hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_crowd_binary_spreads_fans_over_worker_processes() {
    // Admission is sized to the places left: the sale's last places wait for abandoned holds
    // and passes, which here live 20 s and a minute, within the fans' patience.
    let stack = Stack::start_tuned(TestEnv::new().await, |_, p| p.hold_ttl_secs = 20).await;
    let dir = std::env::temp_dir().join(format!("crowd-workers-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let json_path = dir.join("report.json");
    let endpoints = &stack.client.endpoints;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_crowd"))
        .args([
            "--fans",
            "90",
            "--seats",
            "50",
            "--workers",
            "3",
            "--presale-secs",
            "3",
        ])
        .args(["--late-secs", "2", "--claim-window-secs", "10", "--quiet"])
        .args(["--pass-ttl-secs", "60", "--fan-timeout-secs", "120"])
        .args([
            "--buffer-url",
            &endpoints.buffer,
            "--queue-url",
            &endpoints.queue,
        ])
        .args(["--purchase-url", &endpoints.purchase])
        .arg("--json")
        .arg(&json_path)
        .env("FAIRGATE_ORGANIZER_TOKEN", ORGANIZER)
        .env("DATABASE_URL", &stack.env.database_url)
        .output()
        .await
        .expect("crowd runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "crowd failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(&json_path).expect("report")).expect("json");
    assert_eq!(report["fans"], 90);
    assert_eq!(report["ok"], true, "{stdout}");
    assert_eq!(
        report["joined"], 90,
        "every worker's fans are in the report"
    );
    assert_eq!(report["errors"], 0, "{stdout}");
    assert!(report["invariants"]["no_identity_queued_twice"] == true);
    assert!(report["seats_sold"].as_i64().expect("sold") > 0);
    let _ = std::fs::remove_dir_all(&dir);
    stack.stop().await;
}
