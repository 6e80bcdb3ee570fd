//! Money and limits at the edges of time (issue 18), each against the real service and
//! Postgres with a payment provider the test controls: the reconciler never judges a live
//! retry, a charge that backs an order is never refunded, a key's answer is the same bytes on
//! every path, a pass never holds more than its limit, a revoked signing key stops working,
//! and refusals keep the error contract (NUL text, a body left unread on a kept-alive
//! connection, an oversized webhook).

use reqwest::Client;
use serde_json::{json, Value};
use shared::ids::{EventId, TicketId};
use shared::testing::TestEnv;
use shared::token::{PassClaims, Signer, SigningKey, TokenKind};
use uuid::Uuid;

use crate::provider::{Charge, Gate, Scripted};
use crate::{create_event_with, in_process_with, ORGANIZER};

/// A pass for `event` with a seat limit of 2, and its `jti`.
pub(crate) fn pass_of(signer: &Signer, event: i64) -> (String, Uuid) {
    let now = chrono::Utc::now().timestamp();
    let jti = Uuid::new_v4();
    let claims = PassClaims {
        iss: "fairgate".into(),
        aud: TokenKind::Pass.audience().into(),
        sub: format!("site:fan-{}", Uuid::new_v4().simple()),
        evt: EventId::new(event).expect("id"),
        tkt: TicketId::mint(),
        jti,
        iat: now,
        nbf: now,
        exp: now + 3_600,
        lim: 2,
    };
    (signer.sign(TokenKind::Pass, &claims).expect("sign"), jti)
}

/// Time passes for every payment and checkout request: `secs` into the past (the lease of
/// each attempt included, where the schema has one).
pub(crate) async fn age_payments(pg: &sqlx::PgPool, secs: i64) {
    let leases: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                        WHERE table_name = 'payments' AND column_name = 'attempt_at')",
    )
    .fetch_one(pg)
    .await
    .expect("schema");
    sqlx::query("UPDATE payments SET created_at = created_at - make_interval(secs => $1)")
        .bind(secs as f64)
        .execute(pg)
        .await
        .expect("age payments");
    if leases {
        sqlx::query("UPDATE payments SET attempt_at = attempt_at - make_interval(secs => $1)")
            .bind(secs as f64)
            .execute(pg)
            .await
            .expect("age leases");
    }
}

/// A response as the client got it: status, and the body's exact bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    pub async fn of(response: reqwest::Response) -> Answer {
        let status = response.status().as_u16();
        let body = response.bytes().await.expect("body").to_vec();
        Answer { status, body }
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON answer")
    }
}

pub(crate) async fn hold(
    http: &Client,
    url: &str,
    event: i64,
    pass: &str,
    seats: &[i64],
) -> Answer {
    Answer::of(
        http.post(format!("{url}/api/v1/events/{event}/holds"))
            .bearer_auth(pass)
            .json(&json!({ "seat_ids": seats }))
            .send()
            .await
            .expect("hold"),
    )
    .await
}

pub(crate) async fn pay(
    http: &Client,
    url: &str,
    event: i64,
    pass: &str,
    key: &str,
    hold: &str,
    card: &str,
) -> Answer {
    Answer::of(
        http.post(format!("{url}/api/v1/events/{event}/checkout"))
            .bearer_auth(pass)
            .header("Idempotency-Key", key)
            .json(&json!({ "hold_id": hold, "payment_token": card }))
            .send()
            .await
            .expect("checkout"),
    )
    .await
}

/// The same checkout, started in a task of its own (it may wait at the provider's gate).
fn pay_later(
    http: &Client,
    url: &str,
    event: i64,
    pass: &str,
    key: &str,
    hold: &str,
) -> tokio::task::JoinHandle<Answer> {
    let (http, url, pass, key, hold) = (
        http.clone(),
        url.to_owned(),
        pass.to_owned(),
        key.to_owned(),
        hold.to_owned(),
    );
    tokio::spawn(async move { pay(&http, &url, event, &pass, &key, &hold, "tok_visa").await })
}

/// Orders of the event and whether each one's charge is live at the provider for its total.
async fn orders_are_paid(pg: &sqlx::PgPool, provider: &Scripted) -> usize {
    let orders: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT payment_ref, total_cents, status FROM orders")
            .fetch_all(pg)
            .await
            .expect("orders");
    let charges = provider.charges();
    for (reference, total, status) in &orders {
        if status != "paid" {
            continue;
        }
        let live: Vec<_> = charges
            .values()
            .filter(|c| &c.reference == reference && c.succeeded && !c.refunded)
            .collect();
        assert_eq!(
            live.len(),
            1,
            "the paid order's charge {reference} is live: {charges:?}"
        );
        assert_eq!(live[0].amount_cents, *total, "for the order's total");
    }
    orders.len()
}

/// Issue 18, first defect, as reported: a checkout fails in a provider outage; the fan retries
/// the same key much later; while that retry is at the provider, reconciliation runs, and a
/// duplicate of the request arrives. The retry's lease is fresh, so reconciliation leaves it
/// alone, the duplicate is told the checkout is running, one order is paid by one live charge,
/// and every final answer for the key is the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_at_the_provider_is_never_reconciled_nor_refunded_under_its_order() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let provider = Scripted::new();
    let (app, state) = in_process_with(&env, &signer, &provider, |_| {}).await;
    let (url, http) = (app.url(), Client::new());
    let event = create_event_with(&http, &url, 1, 4).await;
    let seats = crate::seat_ids(&pg, event).await;
    let (fan, jti) = pass_of(&signer, event);
    let held = hold(&http, &url, event, &fan, &seats[..2]).await;
    assert_eq!(held.status, 201);
    let hold_id = held.json()["hold_id"].as_str().expect("id").to_owned();
    let payment_key = format!("{jti}:K");

    provider.plan(&payment_key, Charge::Outage);
    let first = pay(&http, &url, event, &fan, "K", &hold_id, "tok_visa").await;
    assert_eq!(first.status, 503, "the outage: retry later");

    // The fan comes back after the grace period; the retry waits at the provider.
    age_payments(&pg, 120).await;
    provider.plan(&payment_key, Charge::Slow);
    let retry = pay_later(&http, &url, event, &fan, "K", &hold_id);
    provider.until_waiting(&payment_key).await;

    purchase::reconcile::reconcile_once(&state)
        .await
        .expect("reconcile");
    provider.plan(&payment_key, Charge::Answer);
    let duplicate = pay(&http, &url, event, &fan, "K", &hold_id, "tok_visa").await;
    provider.release(&payment_key, Gate::Answer);
    let retry = retry.await.expect("retry");
    assert_eq!(
        retry.status,
        201,
        "{:?}",
        String::from_utf8_lossy(&retry.body)
    );
    assert!(
        duplicate == retry
            || (duplicate.status == 409 && duplicate.json()["error"] == "checkout_in_progress"),
        "the duplicate is told to wait, or gets the order: {:?}",
        String::from_utf8_lossy(&duplicate.body)
    );
    let again = pay(&http, &url, event, &fan, "K", &hold_id, "tok_visa").await;
    assert_eq!(again, retry, "the key's answer, byte for byte");
    assert_eq!(orders_are_paid(&pg, &provider).await, 1);
    assert_eq!(provider.refunds(), 0, "nothing was refunded");

    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}

/// Reconciliation caught mid-way: it has looked at a payment (its attempt stale) and asks the
/// provider, and meanwhile the fan's retry claims the key and goes to the provider too. The
/// provider has no charge when reconciliation asks, but the payment is no longer its to
/// abandon: the retry's order stands, its answer is stored, and a later retry of the key gets
/// it again instead of charging and refunding once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_acts_only_while_its_lease_is_current() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let provider = Scripted::new();
    let (app, state) = in_process_with(&env, &signer, &provider, |_| {}).await;
    let (url, http) = (app.url(), Client::new());
    let event = create_event_with(&http, &url, 1, 4).await;
    let seats = crate::seat_ids(&pg, event).await;
    let (fan, jti) = pass_of(&signer, event);
    let held = hold(&http, &url, event, &fan, &seats[..1]).await;
    let hold_id = held.json()["hold_id"].as_str().expect("id").to_owned();
    let payment_key = format!("{jti}:K");

    provider.plan(&payment_key, Charge::Outage);
    assert_eq!(
        pay(&http, &url, event, &fan, "K", &hold_id, "tok_visa")
            .await
            .status,
        503
    );
    age_payments(&pg, 120).await;

    provider.hold_lookups();
    let reconciling = {
        let state = state.clone();
        tokio::spawn(async move { purchase::reconcile::reconcile_once(&state).await })
    };
    provider.until_lookup_waits().await;
    provider.plan(&payment_key, Charge::Slow);
    let retry = pay_later(&http, &url, event, &fan, "K", &hold_id);
    provider.until_waiting(&payment_key).await;
    provider.release_lookups();
    reconciling.await.expect("task").expect("reconcile");
    provider.release(&payment_key, Gate::Answer);
    let retry = retry.await.expect("retry");
    assert_eq!(
        retry.status,
        201,
        "{:?}",
        String::from_utf8_lossy(&retry.body)
    );

    let (request, hold_status, payment): (String, String, String) = sqlx::query_as(
        "SELECT (SELECT state FROM checkout_requests WHERE jti = $1 AND idempotency_key = 'K'),
                (SELECT status FROM holds WHERE jti = $1),
                (SELECT status FROM payments WHERE jti = $1)",
    )
    .bind(jti)
    .fetch_one(&pg)
    .await
    .expect("state");
    assert_eq!(
        (request.as_str(), hold_status.as_str(), payment.as_str()),
        ("done", "purchased", "succeeded")
    );
    provider.plan(&payment_key, Charge::Answer);
    let again = pay(&http, &url, event, &fan, "K", &hold_id, "tok_visa").await;
    assert_eq!(again, retry, "the stored answer, byte for byte");
    assert_eq!(orders_are_paid(&pg, &provider).await, 1);
    assert_eq!(
        provider.refunds(),
        0,
        "the order's charge was never refunded"
    );

    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}

/// Seats a pass holds over its holds that are active or being paid for.
async fn held_by(pg: &sqlx::PgPool, jti: Uuid) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), COALESCE(sum(cardinality(seat_ids)), 0)::BIGINT FROM holds
         WHERE jti = $1 AND status IN ('active', 'paying')",
    )
    .bind(jti)
    .fetch_one(pg)
    .await
    .expect("holds")
}

/// Issue 18, second defect: a hold being paid for is not replaced by a new hold, and went back
/// to active when the card was declined, next to the new one. Now the new hold is refused while
/// the checkout runs, so a pass never holds more than its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_never_holds_more_than_its_limit_through_holds_being_paid_for() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let provider = Scripted::new();
    let (app, _state) = in_process_with(&env, &signer, &provider, |_| {}).await;
    let (url, http) = (app.url(), Client::new());
    let event = create_event_with(&http, &url, 1, 12).await;
    let seats = crate::seat_ids(&pg, event).await;
    let (fan, jti) = pass_of(&signer, event);

    for round in 0..3 {
        let first = &seats[4 * round..4 * round + 2];
        let held = hold(&http, &url, event, &fan, first).await;
        assert_eq!(
            held.status,
            201,
            "{:?}",
            String::from_utf8_lossy(&held.body)
        );
        let hold_id = held.json()["hold_id"].as_str().expect("id").to_owned();
        let key = format!("declined-{round}");
        provider.plan(&format!("{jti}:{key}"), Charge::Slow);
        let declined = {
            let (http, url, fan, key, hold_id) = (
                http.clone(),
                url.clone(),
                fan.clone(),
                key.clone(),
                hold_id.clone(),
            );
            tokio::spawn(async move {
                pay(
                    &http,
                    &url,
                    event,
                    &fan,
                    &key,
                    &hold_id,
                    "tok_chargeDeclined",
                )
                .await
            })
        };
        provider.until_waiting(&format!("{jti}:{key}")).await;
        let more = hold(
            &http,
            &url,
            event,
            &fan,
            &seats[4 * round + 2..4 * round + 4],
        )
        .await;
        assert_eq!(
            (more.status, more.json()["error"].as_str()),
            (409, Some("checkout_in_progress")),
            "no new hold while one is being paid for"
        );
        assert!(held_by(&pg, jti).await.1 <= 2);
        provider.release(&format!("{jti}:{key}"), Gate::Answer);
        assert_eq!(declined.await.expect("task").status, 402);
        let (holds, held_seats) = held_by(&pg, jti).await;
        assert!(
            holds <= 1 && held_seats <= 2,
            "{holds} holds of {held_seats} seats"
        );
    }
    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}

/// Two holds of one pass at the same moment, one of named seats and one by quantity (two
/// writers, two transactions), never leave the pass with two holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn holds_of_one_pass_at_the_same_moment_never_add_up() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let provider = Scripted::new();
    let (app, _state) = in_process_with(&env, &signer, &provider, |_| {}).await;
    let (url, http) = (app.url(), Client::new());
    let now = chrono::Utc::now();
    let created: Value = http
        .post(format!("{url}/api/v1/organizer/events"))
        .bearer_auth(ORGANIZER)
        .json(&json!({
            "name": "Both kinds", "starts_at": now + chrono::Duration::days(3),
            "sale": {
                "presale_opens_at": now - chrono::Duration::hours(2),
                "sale_starts_at": now - chrono::Duration::hours(1),
                "sale_ends_at": now + chrono::Duration::hours(3),
                "rate_per_minute": 60, "max_active": 10
            },
            "seat_map": { "sections": [{ "name": "A", "rows": 4, "seats_per_row": 25, "price_cents": 2500 }] },
            "ticket_types": [{ "name": "Floor", "capacity": 200, "price_cents": 1500 }]
        }))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let event = created["id"].as_i64().expect("id");
    let seats: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM seats WHERE event_id = $1 AND admission = 'seated' ORDER BY id",
    )
    .bind(event)
    .fetch_all(&pg)
    .await
    .expect("seats");
    let fans: Vec<(String, Uuid)> = (0..40).map(|_| pass_of(&signer, event)).collect();
    futures::future::join_all(fans.iter().enumerate().map(|(i, (fan, _))| {
        let (http, url) = (http.clone(), url.clone());
        let named = [seats[2 * i], seats[2 * i + 1]];
        async move {
            let by_id = http
                .post(format!("{url}/api/v1/events/{event}/holds"))
                .bearer_auth(fan)
                .json(&json!({ "seat_ids": named }))
                .send();
            let by_quantity = http
                .post(format!("{url}/api/v1/events/{event}/holds"))
                .bearer_auth(fan)
                .json(&json!({ "ticket_type": "Floor", "quantity": 2 }))
                .send();
            let (a, b) = tokio::join!(by_id, by_quantity);
            assert_eq!(a.expect("hold").status(), 201);
            assert_eq!(b.expect("hold").status(), 201);
        }
    }))
    .await;
    for (_, jti) in &fans {
        let (holds, held_seats) = held_by(&pg, *jti).await;
        assert_eq!((holds, held_seats), (1, 2), "one hold of two places");
    }
    let held: i64 =
        sqlx::query_scalar("SELECT count(*) FROM seats WHERE event_id = $1 AND status = 'held'")
            .bind(event)
            .fetch_one(&pg)
            .await
            .expect("held");
    assert_eq!(held, 80, "the replaced holds' places are back on sale");
    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}

/// Issue 18, third defect: a key that leaves the queue's JWKS stops being trusted at the next
/// periodic refresh, also for a pass verified (and remembered) before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_key_removed_from_the_jwks_stops_being_trusted() {
    let env = TestEnv::new().await;
    let old = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let new = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let published = std::sync::Arc::new(std::sync::Mutex::new(old.jwks()));
    let jwks = {
        let published = published.clone();
        let app = axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get(move || {
                let jwks = published.lock().expect("jwks").clone();
                async move { axum::Json(jwks) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/.well-known/jwks.json")
    };
    let provider = Scripted::new();
    let (app, _state) = in_process_with(&env, &old, &provider, |c| {
        c.jwks_url = jwks;
        c.jwks_refresh_secs = 1;
    })
    .await;
    let (url, http) = (app.url(), Client::new());
    let event = crate::create_event(&http, &url).await;
    let (leaked, _) = pass_of(&old, event);
    let seats = |pass: String| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            Answer::of(
                http.get(format!("{url}/api/v1/events/{event}/seats"))
                    .bearer_auth(pass)
                    .send()
                    .await
                    .expect("seats"),
            )
            .await
        }
    };
    assert_eq!(
        seats(leaked.clone()).await.status,
        200,
        "trusted, and remembered"
    );

    // The old key is revoked: the queue publishes the new one only.
    *published.lock().expect("jwks") = new.jwks();
    let mut refused = None;
    for _ in 0..600 {
        let answer = seats(leaked.clone()).await;
        if answer.status != 200 {
            refused = Some(answer);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let refused = refused.expect("the revoked key's pass is refused after a refresh");
    assert_eq!(
        refused.status,
        401,
        "{:?}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(seats(pass_of(&new, event).0).await.status, 200);
    app.stop().await.expect("stop");
    env.cleanup().await;
}

/// A refusal that leaves the request's body unread says `Connection: close`, and a client
/// keeping connections alive sends its next request on a new one, which then works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_before_the_body_is_read_does_not_break_the_next_request() {
    let env = TestEnv::new().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let provider = Scripted::new();
    let (app, _state) = in_process_with(&env, &signer, &provider, |_| {}).await;
    let url = app.url();
    let http = Client::builder()
        .pool_max_idle_per_host(1)
        .http1_only()
        .build()
        .expect("client");
    let event = crate::create_event(&http, &url).await;
    let body = json!({ "seat_ids": vec![1; 6_000] }).to_string();
    for _ in 0..20 {
        // No pass: refused before the body is read.
        let refused = http
            .post(format!("{url}/api/v1/events/{event}/holds"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("the refusal arrives");
        assert_eq!(refused.status(), 401);
        assert_eq!(
            refused
                .headers()
                .get("connection")
                .and_then(|v| v.to_str().ok()),
            Some("close"),
            "the server says it closes the connection"
        );
        let body: Value = refused.json().await.expect("json");
        assert_eq!(body["error"], "pass_missing");
        // The next request, at once, on whatever connection the client keeps.
        let next = http
            .get(format!("{url}/api/v1/events/{event}"))
            .send()
            .await
            .expect("the next request is not lost");
        assert_eq!(next.status(), 200);
    }
    // The same on the wire, as any keep-alive client sees it: the connection may be closed
    // after a refusal only if the refusal said so.
    let large = json!({ "seat_ids": vec![1; 150_000] }).to_string();
    for body in [&body, &large] {
        let (said_close, kept) = refuse_then_reuse(&app.addr, event, body).await;
        assert!(
            said_close || kept,
            "the server closed a connection it did not say it would close"
        );
        assert!(
            said_close,
            "a refusal leaving the body unread says Connection: close"
        );
    }
    // A request whose body was read keeps its connection.
    let read = http
        .post(format!("{url}/api/v1/events/{event}/holds"))
        .bearer_auth(pass_of(&signer, event).0)
        .json(&json!({ "seat_ids": [] }))
        .send()
        .await
        .expect("refused after reading");
    assert_eq!(read.status(), 422);
    assert!(read.headers().get("connection").is_none());
    app.stop().await.expect("stop");
    env.cleanup().await;
}

/// Issue 18, fourth defect: NUL characters in the public catalog's query and in an event's
/// name or city are refused in the contract, not answered 500; so is an oversized webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_text_and_oversized_webhooks_are_refused_in_the_contract() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let provider = Scripted::new();
    let (app, _state) = in_process_with(&env, &signer, &provider, |_| {}).await;
    let (url, http) = (app.url(), Client::new());
    let event = crate::create_event(&http, &url).await;
    let events_before: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pg)
        .await
        .expect("events");

    // Also on routes that read no query at all.
    for path in [
        "/api/v1/events?q=a%00b".to_owned(),
        "/api/v1/events?category=%00".to_owned(),
        "/api/v1/events?city=x%00".to_owned(),
        format!("/api/v1/events/{event}?x=%00"),
        format!("/api/v1/events/{event}/seats?x=%00"),
        "/healthz?x=%00".to_owned(),
    ] {
        let query = &path;
        let answer = Answer::of(
            http.get(format!("{url}{path}"))
                .send()
                .await
                .expect("catalog"),
        )
        .await;
        assert_eq!(
            (answer.status, answer.json()["error"].as_str()),
            (400, Some("bad_query")),
            "{query}"
        );
    }
    let now = chrono::Utc::now();
    for (field, value) in [("name", "a\u{0}b"), ("city", "\u{0}")] {
        let mut body = json!({
            "name": "NUL test", "city": "Lyon", "starts_at": now + chrono::Duration::days(3),
            "sale": {
                "presale_opens_at": now + chrono::Duration::hours(1),
                "sale_starts_at": now + chrono::Duration::hours(2),
                "sale_ends_at": now + chrono::Duration::hours(3),
                "rate_per_minute": 60, "max_active": 10
            },
            "seat_map": { "sections": [{ "name": "A", "rows": 1, "seats_per_row": 2, "price_cents": 100 }] }
        });
        body[field] = json!(value);
        let created = Answer::of(
            http.post(format!("{url}/api/v1/organizer/events"))
                .bearer_auth(ORGANIZER)
                .json(&body)
                .send()
                .await
                .expect("create"),
        )
        .await;
        assert_eq!(
            (created.status, created.json()["error"].as_str()),
            (422, Some("invalid_body")),
            "create with a NUL in {field}"
        );
        let updated = Answer::of(
            http.patch(format!("{url}/api/v1/organizer/events/{event}"))
                .bearer_auth(ORGANIZER)
                .json(&Value::Object(
                    [(field.to_owned(), json!(value))].into_iter().collect(),
                ))
                .send()
                .await
                .expect("update"),
        )
        .await;
        assert_eq!(
            (updated.status, updated.json()["error"].as_str()),
            (422, Some("invalid_body")),
            "update with a NUL in {field}"
        );
    }
    let events_after: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pg)
        .await
        .expect("events");
    assert_eq!(events_after, events_before, "nothing created");

    let webhook = Answer::of(
        http.post(format!("{url}/api/v1/payments/stripe/webhook"))
            .header("stripe-signature", "t=1,v1=00")
            .body(vec![b'x'; 70 * 1024])
            .send()
            .await
            .expect("webhook"),
    )
    .await;
    assert_eq!(
        (webhook.status, webhook.json()["error"].as_str()),
        (413, Some("body_too_large"))
    );
    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}

/// Issue 18, deliverable 3: a key's answer is the same bytes whatever path gave it — live, a
/// retry after a restart, and the answer reconciliation settled for a checkout that died
/// between the charge and the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_gets_the_same_bytes_live_reconciled_and_after_a_restart() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let provider = Scripted::new();
    let (app, _) = in_process_with(&env, &signer, &provider, |_| {}).await;
    let (url, http) = (app.url(), Client::new());
    let event = create_event_with(&http, &url, 1, 6).await;
    let seats = crate::seat_ids(&pg, event).await;
    let mut fans = Vec::new();
    for (i, card) in ["tok_visa", "tok_chargeDeclined", "tok_visa"]
        .into_iter()
        .enumerate()
    {
        let (fan, jti) = pass_of(&signer, event);
        let held = hold(&http, &url, event, &fan, &seats[2 * i..2 * i + 2]).await;
        let hold_id = held.json()["hold_id"].as_str().expect("id").to_owned();
        fans.push((fan, jti, hold_id, card));
    }
    let bought = pay(&http, &url, event, &fans[0].0, "K", &fans[0].2, "tok_visa").await;
    assert_eq!(bought.status, 201);
    let declined = pay(
        &http,
        &url,
        event,
        &fans[1].0,
        "K",
        &fans[1].2,
        "tok_chargeDeclined",
    )
    .await;
    assert_eq!(declined.status, 402);
    // The third dies between the charge and the order.
    provider.plan(&format!("{}:K", fans[2].1), Charge::DiesAfterCharging);
    let dying = pay_later(&http, &url, event, &fans[2].0, "K", &fans[2].2);
    for _ in 0..1000 {
        if provider.charges().contains_key(&format!("{}:K", fans[2].1)) {
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    dying.abort();
    drop(app);

    // A restart: a new process on the same database (and the same order secret).
    let (app, state) = in_process_with(&env, &signer, &provider, |_| {}).await;
    let url = app.url();
    for (fan, answer) in [(&fans[0], &bought), (&fans[1], &declined)] {
        let replay = pay(&http, &url, event, &fan.0, "K", &fan.2, fan.3).await;
        assert_eq!(
            &replay, answer,
            "the live answer, byte for byte, after a restart"
        );
    }
    age_payments(&pg, 120).await;
    purchase::reconcile::reconcile_once(&state)
        .await
        .expect("reconcile");
    let reconciled = pay(&http, &url, event, &fans[2].0, "K", &fans[2].2, "tok_visa").await;
    assert_eq!(reconciled.status, 201, "the charge became the order");
    let (again_app, _) = in_process_with(&env, &signer, &provider, |_| {}).await;
    let again = pay(
        &http,
        &again_app.url(),
        event,
        &fans[2].0,
        "K",
        &fans[2].2,
        "tok_visa",
    )
    .await;
    assert_eq!(again, reconciled, "the reconciled answer, byte for byte");
    assert_eq!(orders_are_paid(&pg, &provider).await, 2);
    again_app.stop().await.expect("stop");
    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}

/// Sends a hold with a body but no pass on a raw connection, reads the refusal, then sends
/// another request on the same connection. Returns whether the refusal said
/// `Connection: close`, and whether the connection answered the second request.
async fn refuse_then_reuse(addr: &std::net::SocketAddr, event: i64, body: &str) -> (bool, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "POST /api/v1/events/{event}/holds HTTP/1.1\r\nHost: test\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (mut socket, mut writer) = socket.into_split();
    // Written beside the reading: a server that answers first may stop reading.
    let sending = tokio::spawn(async move {
        let _ = writer.write_all(request.as_bytes()).await;
        writer
    });
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        let n = socket.read(&mut buf).await.expect("read the refusal");
        assert!(n > 0, "the refusal arrives");
        seen.extend_from_slice(&buf[..n]);
        if let Some(i) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&seen[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 401"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    while seen.len() < head_end + length {
        let n = socket.read(&mut buf).await.expect("read the body");
        assert!(n > 0, "the refusal's body arrives");
        seen.extend_from_slice(&buf[..n]);
    }
    let said_close = head.lines().any(|l| l.trim() == "connection: close");
    let mut writer = sending.await.expect("writer");
    let next = format!("GET /api/v1/events/{event} HTTP/1.1\r\nHost: test\r\n\r\n");
    if writer.write_all(next.as_bytes()).await.is_err() {
        return (said_close, false);
    }
    let kept = matches!(socket.read(&mut buf).await, Ok(n) if n > 0);
    (said_close, kept)
}

/// Many fans at once, two faults overlapping: every fan's checkout fails in an outage; later,
/// all retry the same key while the provider is slow, each with a duplicate of the request and
/// a checkout under another key beside it, while reconciliation runs three times at once; then
/// the provider answers every charge (some succeed, some time out, some fail). Whatever the
/// interleaving: at most one order per pass, each paid by one live charge for its total, no
/// charge left live without its order once everything is settled, and every key's final
/// answers the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crowd_retrying_through_an_outage_with_duplicates_and_reconciliation() {
    const FANS: usize = 20;
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let provider = Scripted::new();
    let (app, state) = in_process_with(&env, &signer, &provider, |_| {}).await;
    let (url, http) = (app.url(), Client::new());
    let event = create_event_with(&http, &url, 2, FANS as i32).await;
    let seats = crate::seat_ids(&pg, event).await;
    let mut fans = Vec::new();
    for i in 0..FANS {
        let (pass, jti) = pass_of(&signer, event);
        let held = hold(&http, &url, event, &pass, &seats[2 * i..2 * i + 2]).await;
        assert_eq!(held.status, 201);
        let hold_id = held.json()["hold_id"].as_str().expect("id").to_owned();
        provider.plan(&format!("{jti}:K"), Charge::Outage);
        fans.push((pass, jti, hold_id));
    }
    let failed = futures::future::join_all(
        fans.iter()
            .map(|(pass, _, hold_id)| pay(&http, &url, event, pass, "K", hold_id, "tok_visa")),
    )
    .await;
    assert!(failed.iter().all(|a| a.status == 503));
    age_payments(&pg, 120).await;

    for (_, jti, _) in &fans {
        provider.plan(&format!("{jti}:K"), Charge::Slow);
        provider.plan(&format!("{jti}:K2"), Charge::Slow);
    }
    let mut requests = Vec::new();
    for (pass, _, hold_id) in &fans {
        for key in ["K", "K", "K2"] {
            requests.push((key, pay_later(&http, &url, event, pass, key, hold_id)));
        }
    }
    let reconciling: Vec<_> = (0..3)
        .map(|_| {
            let state = state.clone();
            tokio::spawn(async move { purchase::reconcile::reconcile_once(&state).await })
        })
        .collect();
    for run in reconciling {
        run.await.expect("task").expect("reconciliation");
    }
    // Answer every charge that reaches the provider, in a mix of ways, until all requests end.
    let (mut answered, mut idle) = (0usize, 0u32);
    while requests.iter().any(|(_, r)| !r.is_finished()) {
        idle += 1;
        assert!(
            idle < 60_000,
            "a request neither answered nor reached the provider"
        );
        let how = match answered % 5 {
            0..=2 => Gate::Answer,
            3 => Gate::Timeout,
            _ => Gate::Outage,
        };
        if provider.release_oldest(how) {
            answered += 1;
        } else {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    let mut finals: std::collections::HashMap<(usize, &str), Vec<Answer>> = Default::default();
    for (i, (key, request)) in requests.into_iter().enumerate() {
        let answer = request.await.expect("request");
        assert!(
            [201, 402, 409, 503].contains(&answer.status),
            "{} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        let refunded = answer.status == 409
            && answer.json()["message"]
                .as_str()
                .is_some_and(|m| m.contains("refunded"));
        if answer.status == 201 || refunded {
            finals.entry((i / 3, key)).or_default().push(answer);
        }
    }
    for answers in finals.values() {
        assert!(
            answers.windows(2).all(|w| w[0] == w[1]),
            "a key's final answers are the same bytes"
        );
    }
    // Everything settles: leases lapse, reconciliation runs.
    for (_, jti, _) in &fans {
        provider.plan(&format!("{jti}:K"), Charge::Answer);
        provider.plan(&format!("{jti}:K2"), Charge::Answer);
    }
    for _ in 0..3 {
        age_payments(&pg, 120).await;
        purchase::reconcile::reconcile_once(&state)
            .await
            .expect("reconciliation");
    }
    let unsettled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM payments WHERE settled_at IS NULL")
            .fetch_one(&pg)
            .await
            .expect("payments");
    assert_eq!(unsettled, 0, "every payment settled");
    let orders = orders_are_paid(&pg, &provider).await;
    let per_pass: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT jti FROM orders GROUP BY jti HAVING count(*) > 1) d",
    )
    .fetch_one(&pg)
    .await
    .expect("orders");
    assert_eq!(per_pass, 0, "a pass buys once");
    let paid: Vec<String> = sqlx::query_scalar("SELECT payment_ref FROM orders")
        .fetch_all(&pg)
        .await
        .expect("orders");
    for (key, charge) in provider.charges() {
        if charge.succeeded && !charge.refunded {
            assert!(paid.contains(&charge.reference), "{key}: live, no order");
        }
    }
    assert!(orders > 0, "some fans bought");
    // And each key that answered finally answers the same again.
    for ((fan, key), answers) in &finals {
        let (pass, _, hold_id) = &fans[*fan];
        let again = pay(&http, &url, event, pass, key, hold_id, "tok_visa").await;
        assert_eq!(&again, &answers[0], "the stored answer, byte for byte");
    }
    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}
