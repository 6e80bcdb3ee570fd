//! A fan refunds their own order with its manage token, within the organizer's rule.

use serde_json::{json, Value};
use shared::testing::TestEnv;
use shared::token::{Signer, SigningKey};

use crate::catalog::{create, event_body};
use crate::{assert_never_oversold, in_process, pass, ORGANIZER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fans_refund_their_own_order_with_its_manage_token_within_the_rule() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let signer = Signer::new(SigningKey::generate().expect("key"), "fairgate");
    let app = in_process(&env, &signer, |c| {
        c.order_secret = Some("an order secret of at least 32 characters".into());
    })
    .await;
    let url = app.url();
    let http = reqwest::Client::new();
    // Starts in 10 days; fans may refund until 24 hours before.
    let mut body = event_body("Refundable", "Rome", "Pop", 10, 1000);
    body["fan_refund_cutoff_hours"] = json!(24);
    let event = create(&http, &url, &body).await["id"].as_i64().expect("id");
    let rigid = create(
        &http,
        &url,
        &event_body("Final sale", "Rome", "Pop", 10, 1000),
    )
    .await["id"]
        .as_i64()
        .expect("id");

    let buy = |event: i64, key: &'static str| {
        let (http, url, fan) = (http.clone(), url.clone(), pass(&signer, event));
        async move {
            let (_, hold_id) = crate::hold_one(&http, &url, event, &fan).await;
            let checkout = || {
                http.post(format!("{url}/api/v1/events/{event}/checkout"))
                    .bearer_auth(&fan)
                    .header("Idempotency-Key", key)
                    .json(&json!({ "hold_id": hold_id, "payment_token": "tok_visa" }))
                    .send()
            };
            let first: Value = checkout()
                .await
                .expect("checkout")
                .json()
                .await
                .expect("json");
            let again: Value = checkout().await.expect("retry").json().await.expect("json");
            assert_eq!(
                first, again,
                "a retry answers the same, manage token included"
            );
            first
        }
    };
    let order = buy(event, "refund-1").await;
    let order_id = order["order_id"].as_str().expect("order id").to_owned();
    let token = order["manage_token"]
        .as_str()
        .expect("manage token")
        .to_owned();
    let stored: String = sqlx::query_scalar("SELECT response::text FROM checkout_requests")
        .fetch_one(&pg)
        .await
        .expect("stored answer");
    assert!(
        !stored.contains(&token),
        "the token is derived, never stored"
    );

    // Viewing needs the order's own token.
    let view_url = format!("{url}/api/v1/orders/{order_id}");
    let other = buy(rigid, "refund-2").await;
    for (token, code) in [
        (None, "manage_token_missing"),
        (Some(format!("{token}x")), "manage_token_invalid"),
        (
            other["manage_token"].as_str().map(str::to_owned),
            "manage_token_invalid",
        ),
        (Some(ORGANIZER.to_owned()), "manage_token_invalid"),
    ] {
        let mut request = http.get(&view_url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("view");
        assert_eq!(response.status(), 401);
        assert_eq!(response.json::<Value>().await.expect("json")["error"], code);
    }
    let view: Value = http
        .get(&view_url)
        .bearer_auth(&token)
        .send()
        .await
        .expect("view")
        .json()
        .await
        .expect("json");
    assert_eq!(view["tickets"], order["tickets"]);

    // The rigid event offers no fan refunds.
    let refused = http
        .post(format!(
            "{url}/api/v1/orders/{}/refund",
            other["order_id"].as_str().expect("id")
        ))
        .bearer_auth(other["manage_token"].as_str().expect("token"))
        .send()
        .await
        .expect("refund");
    assert_eq!(refused.status(), 403);
    assert_eq!(
        refused.json::<Value>().await.expect("json")["error"],
        "refunds_not_offered"
    );

    // The organizer moves the cut-off past today: closed.
    let patch = |cutoff: i64| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.patch(format!("{url}/api/v1/organizer/events/{event}"))
                .bearer_auth(ORGANIZER)
                .json(&json!({ "fan_refund_cutoff_hours": cutoff }))
                .send()
                .await
                .expect("patch")
                .status()
        }
    };
    assert_eq!(patch(24 * 11).await, 200);
    let refund = || {
        http.post(format!("{url}/api/v1/orders/{order_id}/refund"))
            .bearer_auth(&token)
            .send()
    };
    let closed = refund().await.expect("refund");
    assert_eq!(closed.status(), 409);
    assert_eq!(
        closed.json::<Value>().await.expect("json")["error"],
        "refund_window_closed"
    );
    assert_eq!(patch(100_000).await, 422);

    // Back within the rule: refunded, seat on sale again, once.
    assert_eq!(patch(24).await, 200);
    let refunded = refund().await.expect("refund");
    assert_eq!(refunded.status(), 200);
    let refunded: Value = refunded.json().await.expect("json");
    assert_eq!(
        refunded["seats_returned"],
        json!([order["tickets"][0]["seat_id"]])
    );
    let again = refund().await.expect("refund");
    assert_eq!(again.status(), 409);
    assert_eq!(
        again.json::<Value>().await.expect("json")["error"],
        "already_refunded"
    );
    let (status, by): (String, Option<String>) =
        sqlx::query_as("SELECT status, refunded_by FROM orders WHERE id = $1::uuid")
            .bind(&order_id)
            .fetch_one(&pg)
            .await
            .expect("order");
    assert_eq!((status.as_str(), by.as_deref()), ("refunded", Some("fan")));
    let seat: String = sqlx::query_scalar("SELECT status FROM seats WHERE id = $1")
        .bind(order["tickets"][0]["seat_id"].as_i64().expect("seat"))
        .fetch_one(&pg)
        .await
        .expect("seat");
    assert_eq!(seat, "available");
    assert_never_oversold(&pg, event).await;

    app.stop().await.expect("stop");
    pg.close().await;
    env.cleanup().await;
}
