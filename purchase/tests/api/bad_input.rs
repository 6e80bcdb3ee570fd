//! Every bad hold, release and checkout gets its precise 4xx JSON error and changes nothing:
//! unknown seats, seats of another event, more than the pass's limit, a seat named twice,
//! negative or huge quantities, a seat someone else holds, someone else's hold, malformed and
//! oversized bodies, missing or invalid idempotency keys, a key reused with another body.

use reqwest::{Client, RequestBuilder};
use serde_json::{json, Value};
use shared::testing::TestEnv;
use shared::token::{Signer, SigningKey};

use crate::{create_event, in_process, pass, seat_map};

/// Sends `request` and checks the status and the error code; returns the message.
async fn refused(request: RequestBuilder, status: u16, code: &str) -> String {
    let response = request.send().await.expect("request");
    let got = response.status().as_u16();
    let body: Value = response.json().await.expect("a JSON error");
    assert_eq!(
        (got, body["error"].as_str()),
        (status, Some(code)),
        "{body}"
    );
    body["message"].as_str().expect("a message").to_owned()
}

/// Everything a refused request could have touched.
async fn state(pg: &sqlx::PgPool) -> Value {
    sqlx::query_scalar(
        "SELECT json_build_object(
           'seats', (SELECT json_agg(json_build_array(id, status, hold_id) ORDER BY id) FROM seats),
           'holds', (SELECT json_agg(json_build_array(id, status, seat_ids) ORDER BY id) FROM holds),
           'orders', (SELECT count(*) FROM orders),
           'payments', (SELECT json_agg(json_build_array(idempotency_key, status)
                                        ORDER BY idempotency_key) FROM payments),
           'keys', (SELECT json_agg(json_build_array(idempotency_key, state)
                                    ORDER BY idempotency_key) FROM checkout_requests),
           'charges', (SELECT count(*) FROM sandbox_charges))::jsonb",
    )
    .fetch_one(pg)
    .await
    .expect("state")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_holds_and_checkouts_are_refused_precisely_and_change_nothing() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let app = in_process(&env, &signer, |_| {}).await;
    let url = app.url();
    let http = Client::new();
    let event = create_event(&http, &url).await;
    let other_event = create_event(&http, &url).await;
    let (fan, rival) = (pass(&signer, event), pass(&signer, event));
    let seats: Vec<i64> = seat_map(&http, &url, event, &fan)
        .await
        .iter()
        .map(|s| s["id"].as_i64().expect("id"))
        .collect();
    let elsewhere = seat_map(&http, &url, other_event, &pass(&signer, other_event)).await[0]["id"]
        .as_i64()
        .expect("id");
    let holds = format!("{url}/api/v1/events/{event}/holds");
    let checkout = format!("{url}/api/v1/events/{event}/checkout");
    let hold = |who: &str, body: Value| http.post(&holds).bearer_auth(who).json(&body);

    // The rival holds seat 0; the fan holds seat 1.
    let held: Value = hold(&rival, json!({ "seat_ids": [seats[0]] }))
        .send()
        .await
        .expect("hold")
        .json()
        .await
        .expect("json");
    let rival_hold = held["hold_id"].as_str().expect("hold id").to_owned();
    let held: Value = hold(&fan, json!({ "seat_ids": [seats[1]] }))
        .send()
        .await
        .expect("hold")
        .json()
        .await
        .expect("json");
    let fan_hold = held["hold_id"].as_str().expect("hold id").to_owned();
    assert_eq!(held["total_cents"], 2500);
    let before = state(&pg).await;

    let message = refused(
        hold(&fan, json!({ "seat_ids": [seats[2], 999_999_999] })),
        404,
        "seat_not_found",
    )
    .await;
    assert!(message.contains("999999999"), "{message}");
    refused(
        hold(&fan, json!({ "seat_ids": [elsewhere] })),
        404,
        "seat_not_found",
    )
    .await;
    refused(
        hold(&fan, json!({ "seat_ids": [seats[2], seats[3], seats[1]] })),
        422,
        "invalid_field",
    )
    .await;
    refused(
        hold(&fan, json!({ "seat_ids": [seats[2], seats[2]] })),
        422,
        "invalid_field",
    )
    .await;
    refused(hold(&fan, json!({ "seat_ids": [] })), 422, "invalid_field").await;
    for quantity in [json!(-1), json!(0), json!(1_000_000_000_000_i64)] {
        refused(
            hold(&fan, json!({ "ticket_type": "A", "quantity": quantity })),
            422,
            "invalid_field",
        )
        .await;
    }
    refused(
        hold(
            &fan,
            json!({ "seat_ids": [seats[2]], "ticket_type": "A", "quantity": 1 }),
        ),
        422,
        "invalid_field",
    )
    .await;
    // Seated places are held by id, not by quantity.
    refused(
        hold(&fan, json!({ "ticket_type": "A", "quantity": 1 })),
        404,
        "ticket_type_not_found",
    )
    .await;
    let message = refused(
        hold(&fan, json!({ "seat_ids": [seats[0], seats[2]] })),
        409,
        "seat_unavailable",
    )
    .await;
    assert!(message.contains(&seats[0].to_string()), "{message}");
    refused(
        hold(&fan, json!({ "seat_ids": [seats[2]], "extra": true })),
        422,
        "invalid_body",
    )
    .await;
    refused(
        http.post(&holds)
            .bearer_auth(&fan)
            .header("content-type", "application/json")
            .body("{\"seat_ids\": [1,"),
        400,
        "malformed_json",
    )
    .await;
    refused(
        http.post(&holds)
            .bearer_auth(&fan)
            .header("content-type", "application/json")
            .body(format!("{{\"seat_ids\": [{}]}}", "1,".repeat(40_000) + "1")),
        413,
        "body_too_large",
    )
    .await;
    refused(
        http.post(&holds).json(&json!({ "seat_ids": [seats[2]] })),
        401,
        "pass_missing",
    )
    .await;
    refused(
        http.post(&holds)
            .bearer_auth(pass(&signer, other_event))
            .json(&json!({ "seat_ids": [seats[2]] })),
        403,
        "pass_wrong_event",
    )
    .await;
    // Someone else's hold can be neither released nor bought.
    refused(
        http.delete(format!("{holds}/{rival_hold}"))
            .bearer_auth(&fan),
        404,
        "hold_not_found",
    )
    .await;
    let pay = |who: &str, key: Option<&str>, body: Value| {
        let request = http.post(&checkout).bearer_auth(who).json(&body);
        match key {
            Some(key) => request.header("Idempotency-Key", key),
            None => request,
        }
    };
    let body = json!({ "hold_id": fan_hold, "payment_token": "tok_visa" });
    refused(
        pay(
            &fan,
            Some("k-1"),
            json!({ "hold_id": rival_hold, "payment_token": "tok_visa" }),
        ),
        404,
        "hold_not_found",
    )
    .await;
    refused(
        pay(
            &fan,
            Some("k-1"),
            json!({ "hold_id": uuid::Uuid::new_v4(), "payment_token": "tok_visa" }),
        ),
        404,
        "hold_not_found",
    )
    .await;
    refused(
        pay(&fan, None, body.clone()),
        400,
        "idempotency_key_missing",
    )
    .await;
    refused(
        pay(&fan, Some(&"k".repeat(201)), body.clone()),
        400,
        "idempotency_key_invalid",
    )
    .await;
    refused(
        pay(
            &fan,
            Some("k-1"),
            json!({ "hold_id": fan_hold, "payment_token": "4242424242424242" }),
        ),
        422,
        "invalid_field",
    )
    .await;
    refused(
        pay(
            &fan,
            Some("k-1"),
            json!({ "hold_id": "not-a-uuid", "payment_token": "tok_visa" }),
        ),
        422,
        "invalid_body",
    )
    .await;
    assert_eq!(
        state(&pg).await,
        before,
        "the refused requests changed nothing"
    );

    // A real checkout, then its key again: the same body gets the same order, another body 422.
    let first = pay(&fan, Some("k-1"), body.clone())
        .send()
        .await
        .expect("checkout");
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.expect("json");
    let after = state(&pg).await;
    let again = pay(&fan, Some("k-1"), body.clone())
        .send()
        .await
        .expect("retry");
    assert_eq!(again.status(), 201);
    let again: Value = again.json().await.expect("json");
    assert_eq!(again, first, "a retry gets the stored answer");
    refused(
        pay(
            &fan,
            Some("k-1"),
            json!({ "hold_id": fan_hold, "payment_token": "tok_chargeDeclined" }),
        ),
        422,
        "idempotency_key_reused",
    )
    .await;
    // The pass has bought: a new key, a new hold, the rival's seat freed, all refused.
    refused(pay(&fan, Some("k-2"), body.clone()), 409, "pass_used").await;
    refused(
        hold(&fan, json!({ "seat_ids": [seats[2]] })),
        409,
        "pass_used",
    )
    .await;
    // The rival cannot buy with the fan's bought hold either.
    refused(
        pay(&rival, Some("r-1"), body.clone()),
        404,
        "hold_not_found",
    )
    .await;
    assert_eq!(state(&pg).await, after, "nothing changed after the order");
    assert_eq!(
        first["tickets"][0]["seat_id"], seats[1],
        "the order is for the fan's seat"
    );

    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}

/// A hold never queues behind another transaction's lock on a seat: a seat locked at that moment
/// (being held or bought by someone else) is refused at once as taken, naming it, and nothing
/// changes; once the lock is gone the same hold succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_on_a_seat_locked_by_another_purchase_is_refused_at_once() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let app = in_process(&env, &signer, |_| {}).await;
    let url = app.url();
    let http = Client::new();
    let event = create_event(&http, &url).await;
    let fan = pass(&signer, event);
    let seats: Vec<i64> = seat_map(&http, &url, event, &fan)
        .await
        .iter()
        .map(|s| s["id"].as_i64().expect("id"))
        .collect();
    let (free, locked) = (seats[0], seats[1]);
    let before = state(&pg).await;

    // Another purchase's transaction holds the row lock (and keeps it until we end it).
    let mut other = pg.begin().await.expect("begin");
    sqlx::query("SELECT id FROM seats WHERE id = $1 FOR UPDATE")
        .bind(locked)
        .execute(&mut *other)
        .await
        .expect("lock");
    let hold = http
        .post(format!("{url}/api/v1/events/{event}/holds"))
        .bearer_auth(&fan)
        .json(&json!({ "seat_ids": [free, locked] }));
    // Had the hold waited for the lock, it would wait until the transaction ends, which this
    // test does only after the answer: the bound only turns a hang into a failure.
    let message = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        refused(hold, 409, "seat_unavailable"),
    )
    .await
    .expect("the hold answered while the seat was locked");
    assert!(
        message.contains(&locked.to_string()) && !message.contains(&free.to_string()),
        "names the locked seat only: {message}"
    );
    assert_eq!(state(&pg).await, before, "nothing changed");
    other.rollback().await.expect("rollback");

    let held = http
        .post(format!("{url}/api/v1/events/{event}/holds"))
        .bearer_auth(&fan)
        .json(&json!({ "seat_ids": [free, locked] }))
        .send()
        .await
        .expect("hold");
    assert_eq!(
        held.status().as_u16(),
        201,
        "{}",
        held.text().await.unwrap_or_default()
    );
}
