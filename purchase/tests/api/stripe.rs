//! The Stripe provider against a local fake speaking Stripe's wire format (form-encoded requests,
//! `Idempotency-Key`, `402` card errors, search by metadata, refunds), through the real service;
//! and its webhook's signature check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use purchase::payments::{ChargeOutcome, PaymentProvider};
use serde_json::{json, Value};
use shared::testing::TestEnv;
use shared::token::{Signer, SigningKey};

use crate::{create_event_with, in_process, pass, ORGANIZER};

const SECRET_KEY: &str = "sk_test_fairgate_fake";
const WEBHOOK_SECRET: &str = "whsec_fairgate_test";

#[derive(Default)]
struct Books {
    /// Answers already given, by idempotency key.
    answered: HashMap<String, (u16, Value)>,
    intents: Vec<Value>,
    refunded: Vec<String>,
}

type Fake = Arc<Mutex<Books>>;

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {SECRET_KEY}"))
}

fn card_error(decline: &str, message: &str) -> (u16, Value) {
    (
        402,
        json!({ "error": { "type": "card_error", "code": "card_declined",
                           "decline_code": decline, "message": message } }),
    )
}

async fn create_intent(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    if !authorized(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": { "type": "invalid_request_error" } })),
        )
            .into_response();
    }
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut books = fake.lock().expect("books");
    if let Some((status, body)) = books.answered.get(&key) {
        return (
            StatusCode::from_u16(*status).expect("status"),
            Json(body.clone()),
        )
            .into_response();
    }
    let id = format!("pi_fake_{}", books.intents.len() + 1);
    let (status, body) = match field("payment_method").as_str() {
        "pm_card_visa" => {
            let intent = json!({
                "id": id, "object": "payment_intent", "status": "succeeded",
                "amount": field("amount").parse::<i64>().unwrap_or(-1),
                "currency": field("currency"),
                "metadata": { "fairgate_key": field("metadata[fairgate_key]") },
            });
            books.intents.push(intent.clone());
            (200, intent)
        }
        "pm_card_chargeDeclinedInsufficientFunds" => {
            card_error("insufficient_funds", "Your card has insufficient funds.")
        }
        _ => card_error("generic_decline", "Your card was declined."),
    };
    books.answered.insert(key, (status, body.clone()));
    (StatusCode::from_u16(status).expect("status"), Json(body)).into_response()
}

async fn search(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    // metadata['fairgate_key']:'KEY'
    let wanted = query
        .get("query")
        .and_then(|q| q.split_once(":'"))
        .map(|(_, rest)| rest.trim_end_matches('\'').to_owned())
        .unwrap_or_default();
    let books = fake.lock().expect("books");
    let data: Vec<Value> = books
        .intents
        .iter()
        .filter(|i| i["metadata"]["fairgate_key"] == wanted.as_str())
        .cloned()
        .collect();
    Json(json!({ "object": "search_result", "data": data })).into_response()
}

async fn refund(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let intent = form.get("payment_intent").cloned().unwrap_or_default();
    let mut books = fake.lock().expect("books");
    if books.refunded.contains(&intent) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": { "type": "invalid_request_error", "code": "charge_already_refunded" } })),
        )
            .into_response();
    }
    books.refunded.push(intent.clone());
    Json(json!({ "id": format!("re_{intent}"), "status": "succeeded" })).into_response()
}

async fn serve_fake() -> (String, Fake) {
    let fake = Fake::default();
    let app = axum::Router::new()
        .route("/v1/payment_intents", post(create_intent))
        .route("/v1/payment_intents/search", get(search))
        .route("/v1/refunds", post(refund))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), fake)
}

fn signed(body: &str, t: i64) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, WEBHOOK_SECRET.as_bytes());
    let tag = ring::hmac::sign(&key, format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex::encode(tag.as_ref()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stripe_provider_charges_declines_refunds_and_checks_webhooks() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let (stripe_url, fake) = serve_fake().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let base = stripe_url.clone();
    let app = in_process(&env, &signer, move |c| {
        c.payment_provider = "stripe".into();
        c.stripe_base_url = base;
        c.stripe_secret_key = Some(SECRET_KEY.into());
        c.stripe_webhook_secret = Some(WEBHOOK_SECRET.into());
    })
    .await;
    let url = app.url();
    let http = reqwest::Client::new();
    let event = create_event_with(&http, &url, 1, 5).await;

    let buy = |card: &'static str, key: &'static str| {
        let (http, url, fan) = (http.clone(), url.clone(), pass(&signer, event));
        async move {
            let (_, hold_id) = crate::hold_one(&http, &url, event, &fan).await;
            let checkout = || {
                http.post(format!("{url}/api/v1/events/{event}/checkout"))
                    .bearer_auth(&fan)
                    .header("Idempotency-Key", key)
                    .json(&json!({ "hold_id": hold_id, "payment_token": card }))
                    .send()
            };
            let first = checkout().await.expect("checkout");
            let status = first.status().as_u16();
            let body: Value = first.json().await.expect("json");
            let again: Value = checkout().await.expect("retry").json().await.expect("json");
            assert_eq!(body, again, "a retry answers the same");
            (status, body)
        }
    };

    // A sandbox token means nothing to Stripe: refused before anything is stored.
    let (status, error) = buy("tok_visa", "k-0").await;
    assert_eq!(
        (status, error["error"].as_str()),
        (422, Some("invalid_field"))
    );

    let (status, order) = buy("pm_card_visa", "k-1").await;
    assert_eq!(status, 201, "{order}");
    let reference = order["payment_ref"].as_str().expect("reference").to_owned();
    {
        let books = fake.lock().expect("books");
        assert_eq!(
            books.intents.len(),
            1,
            "one payment intent for a retried checkout"
        );
        assert_eq!(books.intents[0]["id"], reference.as_str());
        assert_eq!(books.intents[0]["amount"], 2500);
        assert_eq!(books.intents[0]["currency"], "eur");
    }
    for (card, code) in [
        ("pm_card_chargeDeclined", "card_declined"),
        (
            "pm_card_chargeDeclinedInsufficientFunds",
            "insufficient_funds",
        ),
    ] {
        let key = if code == "card_declined" {
            "k-2"
        } else {
            "k-3"
        };
        let (status, error) = buy(card, key).await;
        assert_eq!(
            (status, error["error"].as_str()),
            (402, Some(code)),
            "{error}"
        );
    }

    // Reconciliation asks Stripe what became of a key: found by its metadata.
    let provider = purchase::stripe::Stripe::new(&stripe_url, SECRET_KEY, "eur").expect("provider");
    let payment_key: String =
        sqlx::query_scalar("SELECT idempotency_key FROM payments WHERE provider_ref = $1")
            .bind(&reference)
            .fetch_one(&pg)
            .await
            .expect("payment");
    assert_eq!(
        provider.lookup(&payment_key).await.expect("lookup"),
        Some(ChargeOutcome::Succeeded {
            reference: reference.clone()
        })
    );
    assert_eq!(
        provider.lookup("never-charged").await.expect("lookup"),
        None
    );

    // Support refunds: Stripe gets the refund, once; asking again is done, not an error.
    let order_id = order["order_id"].as_str().expect("order");
    let refunded = http
        .post(format!("{url}/api/v1/support/orders/{order_id}/refund"))
        .bearer_auth(ORGANIZER)
        .send()
        .await
        .expect("refund");
    assert_eq!(refunded.status(), 200);
    assert_eq!(
        fake.lock().expect("books").refunded,
        vec![reference.clone()]
    );
    provider
        .refund(&reference)
        .await
        .expect("an already refunded charge is done");
    assert_never_oversold_stripe(&pg, event).await;

    // Webhooks: signed ones are taken once; forged, stale or unsigned ones are refused.
    let hook = format!("{url}/api/v1/payments/stripe/webhook");
    let body = json!({ "id": "evt_1", "type": "payment_intent.succeeded",
                       "data": { "object": { "id": reference, "metadata": { "fairgate_key": payment_key } } } })
    .to_string();
    let now = chrono::Utc::now().timestamp();
    let post = |signature: Option<String>, body: String| {
        let (http, hook) = (http.clone(), hook.clone());
        async move {
            let mut request = http.post(hook).body(body);
            if let Some(signature) = signature {
                request = request.header("Stripe-Signature", signature);
            }
            let response = request.send().await.expect("webhook");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("json"))
        }
    };
    let (status, first) = post(Some(signed(&body, now)), body.clone()).await;
    assert_eq!((status, first["duplicate"].clone()), (200, json!(false)));
    let (status, again) = post(Some(signed(&body, now)), body.clone()).await;
    assert_eq!((status, again["duplicate"].clone()), (200, json!(true)));
    for (signature, sent) in [
        (None, body.clone()),
        (Some(signed(&body, now - 600)), body.clone()),
        (Some(signed(&body, now)), body.replace("evt_1", "evt_2")),
        (Some("t=1,v1=zz".to_owned()), body.clone()),
    ] {
        let (status, error) = post(signature, sent).await;
        assert_eq!(status, 401, "{error}");
    }
    // Signed, but with an id the store cannot take: refused, not a 500.
    for id in [String::new(), "e".repeat(256)] {
        let odd = body.replace("evt_1", &id);
        let (status, error) = post(Some(signed(&odd, now)), odd).await;
        assert_eq!(
            (status, error["error"].clone()),
            (422, json!("invalid_field")),
            "{error}"
        );
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM provider_events")
        .fetch_one(&pg)
        .await
        .expect("events");
    assert_eq!(stored, 1);

    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}

/// No seat on two valid tickets; sold seats are exactly the ticketed ones (charges are counted
/// by the fake's books above, not the sandbox's table).
async fn assert_never_oversold_stripe(pg: &sqlx::PgPool, event: i64) {
    let (doubled, mismatched): (i64, i64) = sqlx::query_as(
        "SELECT
           (SELECT count(*) FROM (SELECT seat_id FROM tickets WHERE status = 'valid'
                                  GROUP BY seat_id HAVING count(*) > 1) AS d),
           (SELECT count(*) FROM seats s WHERE s.event_id = $1 AND (s.status = 'sold') <>
                 EXISTS (SELECT 1 FROM tickets t WHERE t.seat_id = s.id AND t.status = 'valid'))",
    )
    .bind(event)
    .fetch_one(pg)
    .await
    .expect("checks");
    assert_eq!((doubled, mismatched), (0, 0));
}
