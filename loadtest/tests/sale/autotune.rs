//! Autotune and admission sized to what is left, through the real services: the purchase
//! service reports its health per event through Redis, the queue's leader moves the controls by
//! the control law and records why; an operator's change wins; a silent purchase instance
//! counts as unhealthy; waiters learn when places run short.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use shared::testing::TestEnv;

use super::{spec, Stack, OPERATOR, ORGANIZER};

/// Autotune's settings with this target and these bounds.
fn tune(target_p99_ms: i32, cap: (i32, i32), rate: (i32, i32)) -> Value {
    json!({
        "enabled": true, "target_p99_ms": target_p99_ms, "target_error_rate": 0.05,
        "cap_floor": cap.0, "cap_ceiling": cap.1, "rate_floor": rate.0, "rate_ceiling": rate.1,
    })
}

/// The services with a fast steering pass and fast health reports.
async fn quick_stack(sandbox_latency_ms: u64) -> Stack {
    Stack::start_tuned(TestEnv::new().await, |q, p| {
        q.steer_ms = 200;
        p.health_report_ms = 200;
        p.sandbox_latency_ms = sandbox_latency_ms;
    })
    .await
}

async fn drawn(stack: &Stack, event: i64) {
    for _ in 0..100 {
        if stack.client.draw(event).await.expect("draw")["status"] == "drawn" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the draw did not run");
}

async fn get(stack: &Stack, path: &str, token: &str) -> (u16, Value) {
    let answer = stack
        .client
        .http
        .get(format!("{}{path}", stack.client.endpoints.queue))
        .bearer_auth(token)
        .send()
        .await
        .expect("req");
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

async fn put_tune(stack: &Stack, event: i64, token: Option<&str>, body: &Value) -> (u16, Value) {
    let mut request = stack.client.http.put(format!(
        "{}/api/v1/operator/events/{event}/autotune",
        stack.client.endpoints.queue
    ));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let answer = request.json(body).send().await.expect("req");
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

/// Autotune's changes to the event, oldest first: (reason, after).
async fn auto_changes(pg: &sqlx::PgPool, event: i64) -> Vec<(String, Value)> {
    sqlx::query_as(
        "SELECT reason, after FROM operator_audit
         WHERE event_id = $1 AND actor = 'autotune' AND action = 'auto' ORDER BY id",
    )
    .bind(event)
    .fetch_all(pg)
    .await
    .expect("audit")
}

/// Autotune's first change, waited for (up to 10 s).
async fn first_change(pg: &sqlx::PgPool, event: i64) -> (String, Value) {
    for _ in 0..100 {
        if let Some(first) = auto_changes(pg, event).await.into_iter().next() {
            return first;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("autotune did not change the controls");
}

async fn max_active(pg: &sqlx::PgPool, event: i64) -> i32 {
    sqlx::query_scalar("SELECT max_active FROM events WHERE id = $1")
        .bind(event)
        .fetch_one(pg)
        .await
        .expect("event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_checkouts_lower_a_generous_cap_with_a_reason_and_a_manual_change_wins() {
    // Every charge takes 600 ms: checkout p99 is over a 300 ms target.
    let stack = quick_stack(600).await;
    let c = stack.client.clone();
    let pg = stack.env.pool().await;
    let event = stack
        .create(fairgate_loadtest::client::SaleSpec {
            rate_per_minute: 6_000,
            max_active: 1_000,
            seats_per_fan: 1,
            ..spec("Tuned", 200, chrono::Duration::seconds(2))
        })
        .await;
    let (status, body) = put_tune(
        &stack,
        event,
        Some(ORGANIZER),
        &tune(300, (5, 1_000), (60, 6_000)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["settings"]["enabled"], true);

    let fans = stack.join_many(event, 60).await;
    drawn(&stack, event).await;
    // Each fan buys as soon as their pass comes: seat i for fan i.
    let mut buying = tokio::task::JoinSet::new();
    for (i, fan) in fans.iter().enumerate() {
        let (c, ticket) = (c.clone(), fan.ticket.clone());
        buying.spawn(async move {
            let (pass, _) = c
                .wait_for_pass(event, &ticket, Duration::from_secs(60))
                .await?;
            let seats = c.seats(event, &pass.pass).await?;
            let hold = c.hold(event, &pass.pass, &[seats[i].id]).await?;
            c.checkout(
                event,
                &pass.pass,
                hold.hold_id,
                &format!("k-{i}"),
                "tok_visa",
            )
            .await
        });
    }
    while let Some(done) = buying.join_next().await {
        done.expect("task").expect("bought");
    }

    let (reason, after) = first_change(&pg, event).await;
    assert!(
        reason.starts_with("auto: cap 1000 → ")
            && reason.contains("checkout p99")
            && reason.contains("> 300 ms"),
        "{reason}"
    );
    let lowered = after["max_active"].as_i64().expect("cap");
    assert!((5..1_000).contains(&lowered), "{after}");
    assert!(max_active(&pg, event).await < 1_000);

    let (status, view) = get(
        &stack,
        &format!("/api/v1/operator/events/{event}/autotune"),
        OPERATOR,
    )
    .await;
    assert_eq!(status, 200);
    assert_ne!(view["state"], "off", "{view}");
    assert!(view["changes"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["actor"] == "autotune")));
    let (_, stats) = get(
        &stack,
        &format!("/api/v1/operator/events/{event}/stats"),
        OPERATOR,
    )
    .await;
    assert_ne!(stats["autotune"], "off", "{stats}");

    // The operator sets the cap by hand: it holds, and autotune is off until switched on again.
    let manual = c
        .http
        .patch(format!(
            "{}/api/v1/operator/events/{event}/controls",
            c.endpoints.queue
        ))
        .bearer_auth(OPERATOR)
        .json(&json!({ "max_active": 700 }))
        .send()
        .await
        .expect("req");
    assert_eq!(manual.status(), 200);
    let (_, view) = get(
        &stack,
        &format!("/api/v1/operator/events/{event}/autotune"),
        OPERATOR,
    )
    .await;
    assert_eq!(view["state"], "off", "{view}");
    assert_eq!(view["settings"]["enabled"], false);
    let changes_then = auto_changes(&pg, event).await.len();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(max_active(&pg, event).await, 700);
    assert_eq!(auto_changes(&pg, event).await.len(), changes_then);
    let (status, trail) = get(
        &stack,
        &format!("/api/v1/operator/events/{event}/audit"),
        OPERATOR,
    )
    .await;
    assert_eq!(status, 200);
    let trail = trail.as_array().expect("rows").clone();
    assert_eq!(trail[0]["actor"], "alice");
    assert_eq!(trail[0]["action"], "autotune");
    assert_eq!(trail[0]["reason"], "manual change of the controls");
    assert!(trail.iter().any(|r| r["action"] == "auto"
        && r["reason"]
            .as_str()
            .is_some_and(|r| r.contains("checkout p99"))));
    assert!(trail
        .iter()
        .any(|r| r["actor"] == "organizer" && r["action"] == "autotune"));

    // The sale's figures, labelled by event.
    let event_label = format!("event=\"{event}\"");
    let http = c.http.clone();
    let metrics = |base: String| {
        let http = http.clone();
        async move {
            http.get(format!("{base}/metrics"))
                .send()
                .await
                .expect("req")
                .text()
                .await
                .expect("text")
        }
    };
    let queue_metrics = metrics(c.endpoints.queue.clone()).await;
    for name in [
        "fairgate_line_active_shoppers",
        "fairgate_places_sold",
        "fairgate_autotune_state",
        "fairgate_admission_rate_achieved",
    ] {
        assert!(
            queue_metrics
                .lines()
                .any(|l| l.starts_with(name) && l.contains(&event_label)),
            "{name} for the event in the queue's metrics"
        );
    }
    let purchase_metrics = metrics(c.endpoints.purchase.clone()).await;
    for name in [
        "fairgate_orders_total",
        "fairgate_revenue_cents_total",
        "fairgate_payments_total",
    ] {
        assert!(
            purchase_metrics
                .lines()
                .any(|l| l.starts_with(name) && l.contains(&event_label)),
            "{name} for the event in the purchase's metrics"
        );
    }
    pg.close().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autotune_settings_are_checked_field_by_field_and_a_refusal_changes_nothing() {
    let stack = quick_stack(0).await;
    let event = stack.event(10, chrono::Duration::minutes(30)).await;
    let good = tune(500, (10, 100), (60, 600));
    let cases = [
        (json!({"cap_floor": 200}), "cap_floor"),
        (json!({"rate_floor": 6_000}), "rate_floor"),
        (json!({"target_p99_ms": 5}), "target_p99_ms"),
        (json!({"target_error_rate": 0.9}), "target_error_rate"),
        (json!({"cap_ceiling": 0}), "cap_ceiling"),
        (json!({"rate_ceiling": 2_000_000}), "rate_ceiling"),
    ];
    for (change, field) in cases {
        let mut body = good.clone();
        for (k, v) in change.as_object().expect("object") {
            body[k] = v.clone();
        }
        let (status, answer) = put_tune(&stack, event, Some(OPERATOR), &body).await;
        assert_eq!(status, 422, "{body} → {answer}");
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains(field)),
            "{body} → {answer}"
        );
    }
    // Fields by position, past their names and checks: refused.
    let (status, answer) = put_tune(
        &stack,
        event,
        Some(OPERATOR),
        &json!([true, 500, 0.001, 10, 100, 5, 50]),
    )
    .await;
    assert_eq!(
        (status, answer["error"].clone()),
        (422, json!("invalid_body"))
    );
    let mut unknown = good.clone();
    unknown["burst"] = json!(true);
    assert_eq!(
        put_tune(&stack, event, Some(OPERATOR), &unknown).await.0,
        422
    );
    assert_eq!(put_tune(&stack, event, None, &good).await.0, 401);
    assert_eq!(
        put_tune(&stack, event, Some("mallory-guessing-token"), &good)
            .await
            .0,
        401
    );
    assert_eq!(
        put_tune(&stack, 999_999, Some(OPERATOR), &good).await.0,
        404
    );
    let (status, view) = get(
        &stack,
        &format!("/api/v1/operator/events/{event}/autotune"),
        OPERATOR,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(view["settings"], Value::Null, "nothing was stored: {view}");
    assert_eq!(view["state"], "off");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purchase_instance_that_stops_reporting_counts_as_unhealthy() {
    let mut stack = quick_stack(0).await;
    let pg = stack.env.pool().await;
    let event = stack
        .create(fairgate_loadtest::client::SaleSpec {
            rate_per_minute: 6_000,
            max_active: 1_000,
            ..spec("Silent", 100, chrono::Duration::seconds(2))
        })
        .await;
    let (status, _) = put_tune(
        &stack,
        event,
        Some(OPERATOR),
        &tune(500, (2, 1_000), (60, 6_000)),
    )
    .await;
    assert_eq!(status, 200);
    let fans = stack.join_many(event, 20).await;
    drawn(&stack, event).await;
    // Admitted, not claiming yet: shoppers the shop must serve.
    for _ in 0..100 {
        let active: i64 = sqlx::query_scalar("SELECT count(*) FROM admissions WHERE event_id = $1")
            .bind(event)
            .fetch_one(&pg)
            .await
            .expect("count");
        if active == fans.len() as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A reporting shop with no requests yet: nothing to judge, nothing changes.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(auto_changes(&pg, event).await.is_empty());
    assert_eq!(max_active(&pg, event).await, 1_000);

    // A second purchase instance that crashed: its last report, written 10 s ago (on Redis's
    // clock, as reports are), never renewed.
    let redis = super::redis_client(&stack.env).await;
    let keys = shared::redis::EventKeys::new(
        &stack.env.redis_prefix,
        shared::ids::EventId::new(event).expect("id"),
    );
    let now: i64 = fred::prelude::LuaInterface::eval(
        &redis,
        "local t = redis.call('TIME') return t[1] * 1000 + math.floor(t[2] / 1000)",
        vec![keys.health()],
        Vec::<String>::new(),
    )
    .await
    .expect("redis time");
    let stamp = now - 10_000;
    let stale = format!(
        "{stamp}|{}",
        serde_json::to_string(&shared::health::Report::default()).expect("json")
    );
    let _: i64 = fred::prelude::HashesInterface::hset(
        &redis,
        keys.health(),
        ("purchase-crashed", stale.as_str()),
    )
    .await
    .expect("hset");
    let (reason, _) = first_change(&pg, event).await;
    assert!(
        reason.contains("1 purchase instance stopped reporting"),
        "{reason}"
    );
    let lowered = max_active(&pg, event).await;
    assert!(lowered < 1_000);

    // The crashed one forgotten, the live one shut down gracefully (its report withdrawn):
    // with shoppers active and nobody reporting, still unhealthy.
    let _: i64 = fred::prelude::HashesInterface::hdel(&redis, keys.health(), "purchase-crashed")
        .await
        .expect("hdel");
    let purchase = stack.apps.pop().expect("purchase");
    purchase.stop().await.expect("purchase stops");
    // (Cooling: the shoppers already in are above the lowered cap, so it says why and waits.)
    let mut view = Value::Null;
    for _ in 0..100 {
        view = get(
            &stack,
            &format!("/api/v1/operator/events/{event}/autotune"),
            OPERATOR,
        )
        .await
        .1;
        if view["why"]
            .as_str()
            .is_some_and(|w| w.contains("no purchase instance reports"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        view["why"]
            .as_str()
            .is_some_and(|w| w.contains("no purchase instance reports")),
        "{view}"
    );
    pg.close().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_few_places_left_few_are_admitted_and_waiters_are_told() {
    let stack = quick_stack(0).await;
    let pg = stack.env.pool().await;
    let event = stack
        .create(fairgate_loadtest::client::SaleSpec {
            rate_per_minute: 6_000,
            max_active: 1_000,
            ..spec("Last places", 4, chrono::Duration::seconds(2))
        })
        .await;
    let fans = stack.join_many(event, 40).await;
    drawn(&stack, event).await;
    // Fans' sockets in turn until one far enough back (the draw's order is random): it is told
    // how few places are left.
    let mut told = None;
    for fan in &fans {
        let url = format!(
            "{}/api/v1/events/{event}/ws?ticket={}",
            stack.client.endpoints.queue.replacen("http", "ws", 1),
            fan.ticket
        );
        let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("ws");
        let mut far_back = false;
        for _ in 0..200 {
            let Ok(Some(Ok(message))) =
                tokio::time::timeout(Duration::from_secs(5), socket.next()).await
            else {
                break;
            };
            let Ok(status) = serde_json::from_str::<Value>(message.to_text().unwrap_or_default())
            else {
                continue;
            };
            if status["type"] == "pass" {
                break;
            }
            far_back |= status["ahead"].as_i64().is_some_and(|a| a > 4);
            if status["places_left"].is_i64() {
                told = Some(status);
                break;
            }
        }
        if told.is_some() {
            break;
        }
        assert!(!far_back, "a fan far back was not told places run short");
    }
    let admitted = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM admissions WHERE event_id = $1")
            .bind(event)
            .fetch_one(&pg)
            .await
            .expect("count")
    };
    for _ in 0..50 {
        if admitted().await >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // At 100 a second the whole line would be in within a second; it stays at five.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    // Four places, one each at first, a quarter more: five shoppers at once, not 40.
    assert_eq!(admitted().await, 5);
    let status = told.expect("the last in line was told places run short");
    assert_eq!(status["places_left"], 4);
    let ahead = status["ahead"].as_i64().expect("ahead");
    assert!(ahead > 4, "{status}");
    assert_eq!(
        status["position"].as_i64(),
        Some(ahead + status["serving_head"].as_i64().expect("head") + 1)
    );
    pg.close().await;
    stack.stop().await;
}
