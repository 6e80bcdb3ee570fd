//! The purchase service as a real process against real Postgres and Redis, killed between the
//! card charge and the order, then restarted: reconciliation must finish the sale (or refund it
//! when the seats were lost meanwhile), never leaving a charged-but-unsold or sold-but-uncharged
//! checkout, and a retry with the same Idempotency-Key must get the settled answer.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use shared::ids::{EventId, TicketId};
use shared::testing::TestEnv;
use shared::token::{PassClaims, Signer, SigningKey, TokenKind};
use uuid::Uuid;

mod bad_input;
mod begin_batches;
mod catalog;
mod fan_refunds;
mod hold_batches;
mod live;
mod model;
mod money_edges;
mod order_batches;
mod plans;
mod provider;
mod sandbox;
mod stripe;
mod sweeper;

const ORGANIZER: &str = "organizer-token-for-reconcile";

struct Purchase {
    child: Child,
    url: String,
}

impl Drop for Purchase {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn start(env: &TestEnv, jwks: &str, crash_after_charge: bool, hold_ttl: u64) -> Purchase {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_purchase"))
        .env("DATABASE_URL", &env.database_url)
        .env("REDIS_URL", &env.redis_url)
        .env("FAIRGATE_REDIS_PREFIX", &env.redis_prefix)
        .env("FAIRGATE_DB_MAX_CONNECTIONS", "5")
        .env("FAIRGATE_MIGRATE", "false")
        .env("FAIRGATE_PURCHASE_BIND", format!("127.0.0.1:{port}"))
        .env("FAIRGATE_JWKS_URL", jwks)
        .env("FAIRGATE_ORGANIZER_TOKEN", ORGANIZER)
        .env("FAIRGATE_RECONCILE_MS", "200")
        .env("FAIRGATE_RECONCILE_GRACE_SECS", "1")
        .env("FAIRGATE_HOLD_TTL_SECS", hold_ttl.to_string())
        .env(
            "FAIRGATE_FAULT_CRASH_AFTER_CHARGE",
            crash_after_charge.to_string(),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("purchase starts");
    let purchase = Purchase {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if http
            .get(format!("{}/readyz", purchase.url))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return purchase;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("purchase did not become ready");
}

/// Serves the pass keys the way the queue service does.
async fn serve_jwks(signer: &Signer) -> String {
    let jwks = signer.jwks();
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/.well-known/jwks.json")
}

/// The purchase service in this process, trusting `signer`'s passes; `tune` adjusts its config.
async fn in_process(
    env: &TestEnv,
    signer: &Signer,
    tune: impl FnOnce(&mut purchase::Config),
) -> shared::server::RunningApp {
    use clap::Parser;
    let mut config = purchase::Config::parse_from(["purchase"]);
    config.bind = "127.0.0.1:0".parse().expect("addr");
    config.jwks_url = serve_jwks(signer).await;
    config.organizer_token = Some(ORGANIZER.into());
    config.common = env.common_config();
    tune(&mut config);
    purchase::start(config, tokio_util::sync::CancellationToken::new())
        .await
        .expect("purchase starts")
}

/// The purchase service in this process with the test's payment provider; also its state (to
/// run reconciliation and the sweeper by hand: their own tasks wait an hour between runs).
async fn in_process_with(
    env: &TestEnv,
    signer: &Signer,
    provider: &provider::Scripted,
    tune: impl FnOnce(&mut purchase::Config),
) -> (shared::server::RunningApp, purchase::AppState) {
    in_process_on(env.common_config(), signer, provider, tune).await
}

/// [`in_process_with`] on the given database and Redis settings.
async fn in_process_on(
    common: shared::config::CommonConfig,
    signer: &Signer,
    provider: &provider::Scripted,
    tune: impl FnOnce(&mut purchase::Config),
) -> (shared::server::RunningApp, purchase::AppState) {
    use clap::Parser;
    let mut config = purchase::Config::parse_from(["purchase"]);
    config.bind = "127.0.0.1:0".parse().expect("addr");
    config.jwks_url = serve_jwks(signer).await;
    config.organizer_token = Some(ORGANIZER.into());
    config.support_tokens = Some(format!("support:{SUPPORT}"));
    config.order_secret = Some("an order secret of the tests, 32+ characters".into());
    config.reconcile_ms = 3_600_000;
    config.hold_sweep_ms = 3_600_000;
    config.reconcile_grace_secs = 60;
    config.common = common;
    tune(&mut config);
    purchase::start_with(
        config,
        tokio_util::sync::CancellationToken::new(),
        Some(provider.provider()),
    )
    .await
    .expect("purchase starts")
}

const SUPPORT: &str = "support-token-of-the-tests";

fn pass(signer: &Signer, event: i64) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = PassClaims {
        iss: "fairgate".into(),
        aud: TokenKind::Pass.audience().into(),
        sub: format!("site:fan-{}", Uuid::new_v4().simple()),
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

async fn create_event(http: &reqwest::Client, url: &str) -> i64 {
    create_event_with(http, url, 1, 4).await
}

async fn create_event_with(http: &reqwest::Client, url: &str, rows: i32, per_row: i32) -> i64 {
    let now = chrono::Utc::now();
    let created: Value = http
        .post(format!("{url}/api/v1/organizer/events"))
        .bearer_auth(ORGANIZER)
        .json(&json!({
            "name": "Crash test", "starts_at": now + chrono::Duration::days(3),
            "sale": {
                "presale_opens_at": now - chrono::Duration::hours(2),
                "sale_starts_at": now - chrono::Duration::hours(1),
                "sale_ends_at": now + chrono::Duration::hours(3),
                "rate_per_minute": 60, "max_active": 10
            },
            "seat_map": { "sections": [{ "name": "A", "rows": rows, "seats_per_row": per_row, "price_cents": 2500 }] }
        }))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    created["id"].as_i64().expect("event id")
}

/// A hold of `seats` for `jti`, straight through `fg_hold`; returns the hold id.
pub(crate) async fn fg_hold(
    pg: &sqlx::PgPool,
    event: i64,
    seats: &[i64],
    jti: uuid::Uuid,
) -> uuid::Uuid {
    let hold_id = uuid::Uuid::now_v7();
    let (code,): (String,) =
        sqlx::query_as("SELECT code FROM fg_hold($1, $2, $3, NULL, NULL, $4, $5)")
            .bind(event)
            .bind(jti)
            .bind(seats)
            .bind(hold_id)
            .bind(chrono::Utc::now() + chrono::Duration::minutes(5))
            .fetch_one(pg)
            .await
            .expect("fg_hold");
    assert_eq!(code, "held");
    hold_id
}

/// Hands `items` to `writer` all at once, in a task of their own; the answers, in order.
fn submit_all<B: purchase::rounds::Batched>(
    writer: &purchase::rounds::RoundWriter<B>,
    items: Vec<B::Item>,
) -> tokio::task::JoinHandle<Vec<Result<B::Answer, sqlx::Error>>> {
    let writer = writer.clone();
    tokio::spawn(async move {
        futures::future::join_all(items.into_iter().map(|item| writer.submit(item))).await
    })
}

/// What the batch-writer tests start from: the purchase service in this process and one event
/// of `seats` seats in one row (ids in order).
pub(crate) struct Sale {
    env: TestEnv,
    pub pg: sqlx::PgPool,
    pub app: shared::server::RunningApp,
    pub http: reqwest::Client,
    pub event: i64,
    pub seats: Vec<i64>,
}

impl Sale {
    pub async fn start(seats: i32) -> Sale {
        let env = TestEnv::new().await;
        let pg = env.pool().await;
        let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
        let app = in_process(&env, &signer, |_| {}).await;
        let http = reqwest::Client::new();
        let event = create_event_with(&http, &app.url(), 1, seats).await;
        let seats = seat_ids(&pg, event).await;
        Sale {
            env,
            pg,
            app,
            http,
            event,
            seats,
        }
    }

    pub async fn stop(self) {
        self.app.stop().await.expect("stop");
        self.pg.close().await;
        self.env.cleanup().await;
    }
}

/// The ids of the event's seats, in order.
async fn seat_ids(pg: &sqlx::PgPool, event: i64) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM seats WHERE event_id = $1 ORDER BY id")
        .bind(event)
        .fetch_all(pg)
        .await
        .expect("seats")
}

/// The event's seat map as the pass holder sees it.
async fn seat_map(http: &reqwest::Client, url: &str, event: i64, pass: &str) -> Vec<Value> {
    http.get(format!("{url}/api/v1/events/{event}/seats"))
        .bearer_auth(pass)
        .send()
        .await
        .expect("seats")
        .json()
        .await
        .expect("json")
}

async fn hold_one(http: &reqwest::Client, url: &str, event: i64, pass: &str) -> (i64, String) {
    let seats: Vec<Value> = crate::seat_map(http, url, event, pass).await;
    let free = seats
        .iter()
        .find(|s| s["status"] == "available")
        .expect("a free seat")["id"]
        .as_i64()
        .expect("id");
    let hold: Value = http
        .post(format!("{url}/api/v1/events/{event}/holds"))
        .bearer_auth(pass)
        .json(&json!({ "seat_ids": [free] }))
        .send()
        .await
        .expect("hold")
        .json()
        .await
        .expect("json");
    (free, hold["hold_id"].as_str().expect("hold id").to_owned())
}

async fn checkout(
    http: &reqwest::Client,
    url: &str,
    event: i64,
    pass: &str,
    hold: &str,
) -> reqwest::Result<reqwest::Response> {
    http.post(format!("{url}/api/v1/events/{event}/checkout"))
        .bearer_auth(pass)
        .header("Idempotency-Key", "crash-key")
        .json(&json!({ "hold_id": hold, "payment_token": "tok_visa" }))
        .send()
        .await
}

async fn settled(pg: &sqlx::PgPool) -> (String, bool) {
    for _ in 0..150 {
        let row: Option<(String, bool)> = sqlx::query_as(
            "SELECT status, settled_at IS NOT NULL FROM payments ORDER BY created_at DESC LIMIT 1",
        )
        .fetch_optional(pg)
        .await
        .expect("payments");
        if let Some((status, true)) = row {
            return (status, true);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the payment was never settled");
}

/// No place on two valid tickets; sold places exactly those with a valid ticket; one charge per
/// order (across the test's database); no active hold missing one of its places.
async fn assert_never_oversold(pg: &sqlx::PgPool, event: i64) {
    let violations: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT
           (SELECT count(*) FROM (SELECT seat_id FROM tickets WHERE status = 'valid'
                                  GROUP BY seat_id HAVING count(*) > 1) AS d),
           (SELECT count(*) FROM seats s WHERE s.event_id = $1 AND (s.status = 'sold') <>
                 EXISTS (SELECT 1 FROM tickets t WHERE t.seat_id = s.id AND t.status = 'valid')),
           (SELECT abs((SELECT count(*) FROM orders)
                     - (SELECT count(*) FROM sandbox_charges WHERE outcome = 'succeeded'))),
           (SELECT count(*) FROM holds h WHERE h.status = 'active' AND EXISTS (
                 SELECT 1 FROM unnest(h.seat_ids) AS sid JOIN seats s ON s.id = sid
                 WHERE s.hold_id IS DISTINCT FROM h.id AND s.status <> 'sold'))",
    )
    .bind(event)
    .fetch_one(pg)
    .await
    .expect("checks");
    assert_eq!(
        violations,
        (0, 0, 0, 0),
        "(seats on two valid tickets, sold seats without a ticket or vice versa, \
         orders vs charges, partially held holds)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_charge_and_order_is_reconciled_into_a_sale_or_a_refund() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let jwks = serve_jwks(&signer).await;
    let http = reqwest::Client::new();

    // 1. The process dies right after charging; restarted, it completes the sale.
    let crashing = start(&env, &jwks, true, 300).await;
    let event = create_event(&http, &crashing.url).await;
    let fan = pass(&signer, event);
    let (seat, hold) = hold_one(&http, &crashing.url, event, &fan).await;
    if let Ok(response) = checkout(&http, &crashing.url, event, &fan, &hold).await {
        panic!(
            "the process should have died mid-checkout, but answered {} {:?}",
            response.status(),
            response.text().await
        );
    }
    drop(crashing);
    let (orders, charged): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders),
                (SELECT count(*) FROM sandbox_charges WHERE outcome = 'succeeded')",
    )
    .fetch_one(&pg)
    .await
    .expect("counts");
    assert_eq!(
        (orders, charged),
        (0, 1),
        "charged but not sold: the state to repair"
    );

    let restarted = start(&env, &jwks, false, 300).await;
    assert_eq!(settled(&pg).await.0, "succeeded");
    let sold: String = sqlx::query_scalar("SELECT status FROM seats WHERE id = $1")
        .bind(seat)
        .fetch_one(&pg)
        .await
        .expect("seat");
    assert_eq!(sold, "sold", "the charge became a sale");
    let retry = checkout(&http, &restarted.url, event, &fan, &hold)
        .await
        .expect("retry");
    assert_eq!(retry.status(), 201, "the retry gets the settled order");
    let order: Value = retry.json().await.expect("json");
    let (order_id, paid_charges): (Uuid, i64) = sqlx::query_as(
        "SELECT (SELECT id FROM orders), (SELECT count(*) FROM sandbox_charges
                                          WHERE outcome = 'succeeded' AND NOT refunded)",
    )
    .fetch_one(&pg)
    .await
    .expect("order");
    assert_eq!(order["order_id"], order_id.to_string());
    assert_eq!(paid_charges, 1, "charged exactly once");
    drop(restarted);

    // 2. The process dies after charging and the hold expires before it is back: refunded.
    let crashing = start(&env, &jwks, true, 1).await;
    let other = pass(&signer, event);
    let (seat, hold) = hold_one(&http, &crashing.url, event, &other).await;
    assert!(checkout(&http, &crashing.url, event, &other, &hold)
        .await
        .is_err());
    drop(crashing);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let restarted = start(&env, &jwks, false, 1).await;
    assert_eq!(settled(&pg).await.0, "refunded");
    let (refunded, orders): (bool, i64) = sqlx::query_as(
        "SELECT (SELECT refunded FROM sandbox_charges ORDER BY created_at DESC LIMIT 1),
                (SELECT count(*) FROM orders)",
    )
    .fetch_one(&pg)
    .await
    .expect("refund");
    assert_eq!(
        (refunded, orders),
        (true, 1),
        "refunded, and no second order"
    );
    let retry = checkout(&http, &restarted.url, event, &other, &hold)
        .await
        .expect("retry");
    assert_eq!(retry.status(), 409);
    let body: Value = retry.json().await.expect("json");
    assert_eq!(body["error"], "hold_expired");
    let status: String = sqlx::query_scalar("SELECT status FROM seats WHERE id = $1")
        .bind(seat)
        .fetch_one(&pg)
        .await
        .expect("seat");
    assert_ne!(status, "sold", "a refunded seat is not sold");
    drop(restarted);
    pg.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_buyers_on_ten_seats_never_oversell() {
    use rand::seq::IndexedRandom;

    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let app = in_process(&env, &signer, |_| {}).await;
    let url = app.url();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1000)
        .build()
        .expect("client");
    let event = create_event_with(&http, &url, 1, 10).await;
    let probe = pass(&signer, event);
    let seats: Vec<i64> = crate::seat_map(&http, &url, event, &probe)
        .await
        .iter()
        .filter_map(|s| s["id"].as_i64())
        .collect();
    assert_eq!(seats.len(), 10);

    // A thousand fans at once: half want one seat, half two overlapping ones; each holds and,
    // if it got its seats, pays.
    let outcomes = futures::future::join_all((0..1000).map(|i| {
        let (http, url, signer, seats) = (http.clone(), url.clone(), &signer, &seats);
        async move {
            let fan = pass(signer, event);
            let want: Vec<i64> = seats
                .choose_multiple(&mut rand::rng(), 1 + i % 2)
                .copied()
                .collect();
            let hold = http
                .post(format!("{url}/api/v1/events/{event}/holds"))
                .bearer_auth(&fan)
                .json(&json!({ "seat_ids": want }))
                .send()
                .await
                .expect("hold");
            match hold.status().as_u16() {
                201 => {}
                409 => return (409, 0),
                other => panic!("hold answered {other}: {:?}", hold.text().await),
            }
            let hold: Value = hold.json().await.expect("json");
            let paid = http
                .post(format!("{url}/api/v1/events/{event}/checkout"))
                .bearer_auth(&fan)
                .header("Idempotency-Key", format!("k-{i}"))
                .json(&json!({ "hold_id": hold["hold_id"], "payment_token": "tok_visa" }))
                .send()
                .await
                .expect("checkout");
            let status = paid.status().as_u16();
            assert_eq!(
                status,
                201,
                "a held seat could not be paid: {:?}",
                paid.text().await
            );
            (201, want.len())
        }
    }))
    .await;
    let bought: usize = outcomes.iter().map(|(_, n)| n).sum();
    let buyers = outcomes.iter().filter(|(s, _)| *s == 201).count();
    let refused = outcomes.iter().filter(|(s, _)| *s == 409).count();
    assert!((1..=10).contains(&bought), "{bought} seats bought");
    assert_eq!(
        buyers + refused,
        1000,
        "every fan either bought or was told the seat was taken"
    );

    assert_never_oversold(&pg, event).await;
    let sold: i64 = sqlx::query_scalar("SELECT count(*) FROM seats WHERE status = 'sold'")
        .fetch_one(&pg)
        .await
        .expect("sold");
    assert_eq!(sold as usize, bought, "every seat bought is sold, once");
    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_expiring_while_the_card_is_charged_is_refunded_not_sold() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    // The provider takes longer than the hold lives.
    let app = in_process(&env, &signer, |c| {
        c.hold_ttl_secs = 1;
        c.sandbox_latency_ms = 1_500;
    })
    .await;
    let url = app.url();
    let http = reqwest::Client::new();
    let event = create_event(&http, &url).await;
    let fan = pass(&signer, event);
    let (seat, hold) = hold_one(&http, &url, event, &fan).await;
    let answer = checkout(&http, &url, event, &fan, &hold)
        .await
        .expect("checkout");
    assert_eq!(answer.status(), 409);
    let body: Value = answer.json().await.expect("json");
    assert_eq!(body["error"], "hold_expired");
    let (orders, refunded, payment, seat_status): (i64, bool, String, String) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders),
                (SELECT refunded FROM sandbox_charges),
                (SELECT status FROM payments),
                (SELECT status FROM seats WHERE id = $1)",
    )
    .bind(seat)
    .fetch_one(&pg)
    .await
    .expect("state");
    assert_eq!(orders, 0, "no order for an expired hold");
    assert!(refunded, "the charge was refunded");
    assert_eq!(payment, "refunded");
    assert_ne!(seat_status, "sold");
    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_outliving_the_request_timeout_answers_json_and_still_finishes() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    // The provider takes longer than a request may.
    let app = in_process(&env, &signer, |c| {
        c.sandbox_latency_ms = 1_500;
        c.common.request_timeout_ms = 500;
    })
    .await;
    let url = app.url();
    let http = reqwest::Client::new();
    let event = create_event(&http, &url).await;
    let fan = pass(&signer, event);
    let (seat, hold) = hold_one(&http, &url, event, &fan).await;
    let answer = checkout(&http, &url, event, &fan, &hold)
        .await
        .expect("checkout");
    assert_eq!(answer.status(), 503);
    assert_eq!(
        answer
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: Value = answer.json().await.expect("a JSON answer");
    assert_eq!(body["error"], "request_timeout");
    // The charge and the order ran on: a retry with the key gets the order.
    let mut order = None;
    for _ in 0..100 {
        let retry = checkout(&http, &url, event, &fan, &hold)
            .await
            .expect("retry");
        if retry.status() == 201 {
            order = Some(retry.json::<Value>().await.expect("json"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let order = order.expect("the retry found the order");
    assert_eq!(order["status"], "paid");
    let (orders, charges, refunded, seat_status): (i64, i64, i64, String) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM sandbox_charges),
                (SELECT count(*) FROM sandbox_charges WHERE refunded),
                (SELECT status FROM seats WHERE id = $1)",
    )
    .bind(seat)
    .fetch_one(&pg)
    .await
    .expect("state");
    assert_eq!((orders, charges, refunded), (1, 1, 0));
    assert_eq!(seat_status, "sold");
    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_parallel_checkouts_with_one_pass_buy_once() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let app = in_process(&env, &signer, |c| c.sandbox_latency_ms = 20).await;
    let url = app.url();
    let http = reqwest::Client::new();
    let event = create_event(&http, &url).await;
    let fan = pass(&signer, event);
    let (_, hold) = hold_one(&http, &url, event, &fan).await;
    let answers = futures::future::join_all((0..50).map(|i| {
        let (http, url, fan, hold) = (http.clone(), url.clone(), fan.clone(), hold.clone());
        async move {
            // A third reuse one key, the rest bring their own.
            let key = if i % 3 == 0 {
                "shared".to_owned()
            } else {
                format!("k{i}")
            };
            let answer = http
                .post(format!("{url}/api/v1/events/{event}/checkout"))
                .bearer_auth(&fan)
                .header("Idempotency-Key", key)
                .json(&json!({ "hold_id": hold, "payment_token": "tok_visa" }))
                .send()
                .await
                .expect("checkout");
            let status = answer.status().as_u16();
            let body: Value = answer.json().await.expect("json");
            (status, body)
        }
    }))
    .await;
    let orders: std::collections::HashSet<String> = answers
        .iter()
        .filter(|(s, _)| *s == 201)
        .filter_map(|(_, b)| b["order_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(orders.len(), 1, "one order, however many checkouts");
    for (status, body) in &answers {
        assert!(
            *status == 201 || *status == 409,
            "only the order or a conflict: {status} {body}"
        );
    }
    let (db_orders, charges): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders),
                (SELECT count(*) FROM sandbox_charges WHERE outcome = 'succeeded' AND NOT refunded)",
    )
    .fetch_one(&pg)
    .await
    .expect("counts");
    assert_eq!((db_orders, charges), (1, 1), "one order, one charge");
    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}

/// Migration 0017 replaced the sale rows' foreign keys to their event with a delete trigger:
/// deleting an event deletes its orders (with their tickets), holds, payments and notices, also
/// while fans are taking holds on it, and a hold after the delete finds nothing to hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_an_event_deletes_its_sales_also_while_fans_hold_seats() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let app = in_process(&env, &signer, |_| {}).await;
    let url = app.url();
    let http = reqwest::Client::new();
    let event = create_event_with(&http, &url, 4, 25).await;
    let other = create_event(&http, &url).await;

    // A sale on each event: an order (tickets, payment, notice) and an active hold.
    for id in [event, other] {
        let buyer = pass(&signer, id);
        let (_, hold) = hold_one(&http, &url, id, &buyer).await;
        let bought = checkout(&http, &url, id, &buyer, &hold)
            .await
            .expect("checkout");
        assert_eq!(bought.status(), 201);
        hold_one(&http, &url, id, &pass(&signer, id)).await;
    }
    let seats: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM seats WHERE event_id = $1 AND status = 'available' ORDER BY id",
    )
    .bind(event)
    .fetch_all(&pg)
    .await
    .expect("seats");

    // Forty fans hold seats while the event is deleted.
    let holds = futures::future::join_all(seats.iter().take(40).map(|seat| {
        let (http, url, fan) = (http.clone(), url.clone(), pass(&signer, event));
        let seat = *seat;
        async move {
            let answer = http
                .post(format!("{url}/api/v1/events/{event}/holds"))
                .bearer_auth(&fan)
                .json(&json!({ "seat_ids": [seat] }))
                .send()
                .await
                .expect("hold");
            let status = answer.status().as_u16();
            let body: Value = answer.json().await.expect("json");
            (status, body)
        }
    }));
    let delete = async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        sqlx::query("DELETE FROM events WHERE id = $1")
            .bind(event)
            .execute(&pg)
            .await
            .expect("delete the event")
    };
    let (answers, _) = tokio::join!(holds, delete);
    for (status, body) in &answers {
        assert!(
            *status == 201
                || (*status == 409 && body["error"] == "seat_unavailable")
                || (*status == 404 && body["error"] == "seat_not_found"),
            "a hold before the delete, its seat locked by it, or no seat after it: {status} {body}"
        );
    }

    let left: (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM seats WHERE event_id = $1),
                (SELECT count(*) FROM holds WHERE event_id = $1),
                (SELECT count(*) FROM orders WHERE event_id = $1),
                (SELECT count(*) FROM tickets t
                 WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = t.order_id)),
                (SELECT count(*) FROM payments WHERE event_id = $1),
                (SELECT count(*) FROM outbox WHERE event_id = $1)",
    )
    .bind(event)
    .fetch_one(&pg)
    .await
    .expect("what is left");
    assert_eq!(
        left,
        (0, 0, 0, 0, 0, 0),
        "nothing of the deleted event's sale"
    );
    let kept: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM holds WHERE event_id = $1),
                (SELECT count(*) FROM orders WHERE event_id = $1),
                (SELECT count(*) FROM payments WHERE event_id = $1),
                (SELECT count(*) FROM outbox WHERE event_id = $1)",
    )
    .bind(other)
    .fetch_one(&pg)
    .await
    .expect("the other event");
    assert_eq!(kept, (2, 1, 1, 1), "the other event's sale is untouched");

    let late = http
        .post(format!("{url}/api/v1/events/{event}/holds"))
        .bearer_auth(pass(&signer, event))
        .json(&json!({ "seat_ids": [seats[50]] }))
        .send()
        .await
        .expect("hold");
    assert_eq!(late.status(), 404, "no seats left to hold");
    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}
