//! The buffer service against real Postgres and Redis: several instances racing the draw while
//! joins arrive around the sale start, and a lost Redis queue rebuilt from Postgres.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Parser;
use fred::prelude::*;
use serde_json::Value;
use shared::server::RunningApp;
use shared::testing::TestEnv;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

mod mirror;

const IDENTITY_SECRET: &str = "organizer-site-shared-secret-0123456789";
const ORGANIZER: &str = "organizer-token-for-tests";

async fn start_buffer(env: &TestEnv, key: &str, shutdown: &CancellationToken) -> RunningApp {
    let mut config = buffer::Config::parse_from(["buffer"]);
    config.identity_secret = Some(IDENTITY_SECRET.into());
    config.organizer_token = Some(ORGANIZER.into());
    config.bind = "127.0.0.1:0".parse().expect("addr");
    config.signing.signing_key = Some(key.to_owned());
    config.draw_tick_ms = 50;
    config.join_limit_per_ip = 0;
    config.common = env.common_config();
    buffer::start(config, shutdown.clone())
        .await
        .expect("buffer starts")
}

async fn insert_event(pg: &sqlx::PgPool, draw_in: chrono::Duration) -> i64 {
    insert_event_with(pg, draw_in, true).await
}

async fn insert_event_with(pg: &sqlx::PgPool, draw_in: chrono::Duration, anonymous: bool) -> i64 {
    let now = Utc::now();
    sqlx::query_scalar(
        "INSERT INTO events (name, starts_at, presale_opens_at, sale_starts_at, sale_ends_at,
             rate_per_minute, max_active, pass_ttl_secs, claim_window_secs, seats_per_fan,
             anonymous_allowed)
         VALUES ('Race', $1, $2, $3, $4, 60, 10, 600, 60, 2, $5) RETURNING id",
    )
    .bind(now + chrono::Duration::days(1))
    .bind(now - chrono::Duration::seconds(1))
    .bind(now + draw_in)
    .bind(now + chrono::Duration::hours(1))
    .bind(anonymous)
    .fetch_one(pg)
    .await
    .expect("event")
}

/// Redis holds exactly these positions for these tickets.
async fn assert_queue_is(redis: &Client, queue: &str, rows: &[(Uuid, i64)]) {
    for (ticket, position) in rows {
        let score: Option<f64> = redis
            .zscore(queue, ticket.to_string())
            .await
            .expect("zscore");
        assert_eq!(score.map(|s| s as i64), Some(*position), "ticket {ticket}");
    }
}

fn assertion(sub: &str, secret: &str) -> String {
    let claims = serde_json::json!({
        "sub": sub,
        "aud": buffer::identity::AUDIENCE,
        "exp": Utc::now().timestamp() + 600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

async fn join_count(pg: &sqlx::PgPool, event: i64) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM joins WHERE event_id = $1")
        .bind(event)
        .fetch_one(pg)
        .await
        .expect("count")
}

async fn redis(env: &TestEnv) -> Client {
    let client = Builder::from_config(Config::from_url(&env.redis_url).expect("url"))
        .build()
        .expect("client");
    client.init().await.expect("redis");
    client
}

/// Waits until `event`'s draw has committed.
async fn wait_for_draw(pg: &sqlx::PgPool, event: i64) {
    eventually("the draw", || async {
        sqlx::query_scalar::<_, bool>("SELECT drawn_at IS NOT NULL FROM draws WHERE event_id = $1")
            .bind(event)
            .fetch_optional(pg)
            .await
            .expect("query")
            == Some(true)
    })
    .await;
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_instances_draw_once_and_lose_no_join() {
    shared::telemetry::init_tracing(shared::config::LogFormat::Human);
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let key = hex::encode(shared::token::random_seed());
    let shutdown = CancellationToken::new();
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(start_buffer(&env, &key, &shutdown).await);
    }
    let event = insert_event(&pg, chrono::Duration::milliseconds(1500)).await;
    let http = reqwest::Client::new();

    // 240 fans join over ~3 s through all three instances: the draw happens in the middle.
    let joins = futures::future::join_all((0..240).map(|i| {
        let url = format!("{}/api/v1/events/{event}/join", instances[i % 3].url());
        let http = http.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(12 * i as u64)).await;
            let response = http
                .post(url)
                .header("content-type", "application/json")
                .send()
                .await
                .expect("request");
            assert!(
                response.status().is_success(),
                "join refused: {}",
                response.status()
            );
            response.json::<Value>().await.expect("json")
        }
    }))
    .await;
    let acknowledged: HashSet<Uuid> = joins
        .iter()
        .map(|j| {
            j["ticket_id"]
                .as_str()
                .expect("ticket id")
                .parse()
                .expect("uuid")
        })
        .collect();
    assert_eq!(acknowledged.len(), 240, "every join got its own ticket");
    // Each answer tells the join's stored time and phase (the receipt signs that time).
    let stored: HashMap<Uuid, (DateTime<Utc>, String)> =
        sqlx::query_as::<_, (Uuid, DateTime<Utc>, String)>(
            "SELECT ticket_id, joined_at, phase FROM joins WHERE event_id = $1",
        )
        .bind(event)
        .fetch_all(&pg)
        .await
        .expect("joins")
        .into_iter()
        .map(|(t, at, phase)| (t, (at, phase)))
        .collect();
    for j in &joins {
        let ticket: Uuid = j["ticket_id"].as_str().expect("id").parse().expect("uuid");
        let answered: DateTime<Utc> = j["joined_at"]
            .as_str()
            .expect("time")
            .parse()
            .expect("time");
        let (at, phase) = &stored[&ticket];
        assert_eq!(&answered, at, "joined_at of {ticket}");
        assert_eq!(j["status"] == "buffered", phase == "presale", "{j}");
    }

    wait_for_draw(&pg, event).await;
    // Late joiners get their position at once; presale joiners theirs from the published draw.
    let published: Value = http
        .get(format!("{}/api/v1/events/{event}/draw", instances[1].url()))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    let order: Vec<Uuid> = serde_json::from_value(published["order"].clone()).expect("order");
    assert_eq!(
        published["next_offset"],
        Value::Null,
        "one page holds it all"
    );
    // Paged, the same order comes back piece by piece.
    let mut paged: Vec<Uuid> = Vec::new();
    let mut offset = Some(0);
    while let Some(at) = offset {
        let page: Value = http
            .get(format!(
                "{}/api/v1/events/{event}/draw?offset={at}&limit=50",
                instances[0].url()
            ))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        assert_eq!(page["offset"], at);
        paged.extend(serde_json::from_value::<Vec<Uuid>>(page["order"].clone()).expect("page"));
        offset = page["next_offset"].as_u64();
    }
    assert_eq!(paged, order, "the pages add up to the order");
    for bad in ["limit=0", "limit=100001", "offset=-1", "limit=x", "page=2"] {
        let response = http
            .get(format!(
                "{}/api/v1/events/{event}/draw?{bad}",
                instances[0].url()
            ))
            .send()
            .await
            .expect("request");
        assert!(
            matches!(response.status().as_u16(), 400 | 422),
            "{bad}: {}",
            response.status()
        );
    }
    let joined: Vec<(Uuid, String, Option<i64>)> =
        sqlx::query_as("SELECT ticket_id, phase, position FROM joins WHERE event_id = $1")
            .bind(event)
            .fetch_all(&pg)
            .await
            .expect("joins");
    assert_eq!(joined.len(), 240, "no acknowledged join lost");
    let stored: HashSet<Uuid> = joined.iter().map(|r| r.0).collect();
    assert_eq!(stored, acknowledged);
    let presale: HashSet<Uuid> = joined
        .iter()
        .filter(|r| r.1 == "presale")
        .map(|r| r.0)
        .collect();
    assert_eq!(
        order.iter().copied().collect::<HashSet<_>>(),
        presale,
        "the draw ordered exactly the presale joins"
    );
    assert_eq!(published["entrants"], presale.len());
    assert!(
        !presale.is_empty() && presale.len() < 240,
        "the joins straddled the draw ({} presale)",
        presale.len()
    );
    let rows: Vec<(Uuid, i64)> = joined
        .iter()
        .map(|(ticket, phase, position)| {
            let position = if phase == "presale" {
                order.iter().position(|t| t == ticket).expect("drawn") as i64 + 1
            } else {
                position.expect("a live join is placed at once")
            };
            (*ticket, position)
        })
        .collect();
    let mut positions: Vec<i64> = rows.iter().map(|r| r.1).collect();
    positions.sort_unstable();
    assert_eq!(
        positions,
        (1..=240).collect::<Vec<_>>(),
        "positions dense and unique"
    );

    // Redis holds the same queue as Postgres.
    let redis = redis(&env).await;
    let queue = format!("{}:{{evt:{event}}}:queue", env.redis_prefix);
    let size: i64 = redis.zcard(&queue).await.expect("zcard");
    assert_eq!(size, 240);
    assert_queue_is(&redis, &queue, &rows).await;

    // Redis loses the queue: the scheduler rebuilds it from Postgres.
    let keys: Vec<String> = ["queue", "tail", "drawn"]
        .iter()
        .map(|k| format!("{}:{{evt:{event}}}:{k}", env.redis_prefix))
        .collect();
    let _: i64 = redis.del(keys).await.expect("del");
    eventually("the rebuilt queue", || async {
        redis.zcard::<i64, _>(&queue).await.expect("zcard") == 240
    })
    .await;
    assert_queue_is(&redis, &queue, &rows).await;
    // And a new arrival still goes to the back, after everyone.
    let late: Value = http
        .post(format!("{}/api/v1/events/{event}/join", instances[0].url()))
        .header("content-type", "application/json")
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(late["position"], 241);

    let _ = redis.quit().await;
    pg.close().await;
    for app in instances {
        app.stop().await.expect("clean stop");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_identity_gets_one_place_even_from_20_concurrent_joins() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let key = hex::encode(shared::token::random_seed());
    let shutdown = CancellationToken::new();
    let app = start_buffer(&env, &key, &shutdown).await;
    let event = insert_event_with(&pg, chrono::Duration::seconds(60), false).await;
    let url = format!("{}/api/v1/events/{event}/join", app.url());
    let http = reqwest::Client::new();
    let me = assertion("fan-1", IDENTITY_SECRET);

    // Twenty tabs at once: one place.
    let answers = futures::future::join_all((0..20).map(|_| {
        http.post(&url)
            .json(&serde_json::json!({ "identity": me }))
            .send()
    }))
    .await;
    let mut tickets = HashSet::new();
    let mut held_ticket = None;
    let mut created = 0;
    for answer in answers {
        let answer = answer.expect("request");
        if answer.status() == 201 {
            created += 1;
        }
        assert!(answer.status().is_success(), "{}", answer.status());
        let body: Value = answer.json().await.expect("json");
        tickets.insert(body["ticket_id"].as_str().expect("id").to_owned());
        held_ticket = body["ticket"].as_str().map(str::to_owned);
    }
    assert_eq!((tickets.len(), created), (1, 1), "one ticket, created once");
    assert_eq!(join_count(&pg, event).await, 1);

    // Someone else gets their own place; anonymous fans and forged assertions are refused.
    let other: Value = http
        .post(&url)
        .json(&serde_json::json!({ "identity": assertion("fan-2", IDENTITY_SECRET) }))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert!(!tickets.contains(other["ticket_id"].as_str().expect("id")));
    let refusals = [
        (serde_json::json!({}), 401, "identity_required"),
        (
            serde_json::json!({ "identity": assertion("fan-3", "not-the-organizers-secret-000000") }),
            401,
            "identity_invalid",
        ),
    ];
    for (body, status, code) in refusals {
        let answer = http.post(&url).json(&body).send().await.expect("request");
        assert_eq!(answer.status().as_u16(), status);
        let error: Value = answer.json().await.expect("json");
        assert_eq!(error["error"], code);
    }

    // An edited ticket is refused: its signature no longer matches.
    let mut edited = held_ticket.clone().expect("a ticket from the tabs");
    let i = edited.find('.').expect("jwt") + 8;
    let swap = if &edited[i..=i] == "A" { "B" } else { "A" };
    edited.replace_range(i..=i, swap);
    let answer = http
        .post(&url)
        .json(&serde_json::json!({ "ticket": edited }))
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status(), 401);

    // The same identity hammering the endpoint is slowed down with Retry-After.
    let mut limited = None;
    for _ in 0..40 {
        let answer = http
            .post(&url)
            .json(&serde_json::json!({ "identity": me }))
            .send()
            .await
            .expect("request");
        if answer.status() == 429 {
            limited = Some(answer);
            break;
        }
    }
    let limited = limited.expect("the per-identity limit answered 429");
    assert!(limited.headers().contains_key("retry-after"));
    assert_eq!(
        join_count(&pg, event).await,
        2,
        "refused joins changed nothing"
    );

    pg.close().await;
    app.stop().await.expect("stop");
    env.cleanup().await;
}

/// Migration 0015 keeps anonymous identities out of the identity index: the database itself
/// still refuses an `anon:` identity that is not its own row's ticket (so no anonymous identity
/// can be queued twice), and deleting an event still deletes its joins (a trigger, as the
/// foreign key's cascade did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_identities_are_their_tickets_and_an_events_joins_go_with_it() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let key = hex::encode(shared::token::random_seed());
    let shutdown = CancellationToken::new();
    let app = start_buffer(&env, &key, &shutdown).await;
    let event = insert_event(&pg, chrono::Duration::seconds(60)).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/events/{event}/join", app.url());
    let mut tickets = Vec::new();
    for _ in 0..3 {
        let answer = http
            .post(&url)
            .header("content-type", "application/json")
            .send()
            .await
            .expect("request");
        assert_eq!(answer.status(), 201);
        let body: Value = answer.json().await.expect("json");
        tickets.push(Uuid::parse_str(body["ticket_id"].as_str().expect("id")).expect("uuid"));
    }
    assert_eq!(join_count(&pg, event).await, 3);

    // Another row claiming a joined fan's anonymous identity, or an `anon:` identity that is not
    // its own ticket, is refused by the database.
    let insert = |ticket: Uuid, identity: String| {
        sqlx::query("INSERT INTO joins (ticket_id, event_id, identity, phase) VALUES ($1, $2, $3, 'presale')")
            .bind(ticket)
            .bind(event)
            .bind(identity)
            .execute(&pg)
    };
    let error = insert(Uuid::new_v4(), format!("anon:{}", tickets[0]))
        .await
        .expect_err("a second row with a fan's anonymous identity");
    assert_eq!(
        shared::error::violated_constraint(&error),
        Some("joins_anonymous_is_its_ticket")
    );
    let error = insert(tickets[1], format!("anon:{}", tickets[1]))
        .await
        .expect_err("the same ticket twice");
    assert_eq!(
        shared::error::violated_constraint(&error),
        Some("joins_pkey")
    );
    let own = Uuid::new_v4();
    insert(own, format!("anon:{own}"))
        .await
        .expect("an anonymous row of its own ticket");
    assert_eq!(join_count(&pg, event).await, 4);

    // Deleting the event deletes its joins; a join for it is then 404 and records nothing.
    sqlx::query("DELETE FROM events WHERE id = $1")
        .bind(event)
        .execute(&pg)
        .await
        .expect("delete the event");
    assert_eq!(join_count(&pg, event).await, 0);
    let answer = http
        .post(&url)
        .header("content-type", "application/json")
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status(), 404);
    assert_eq!(join_count(&pg, event).await, 0);

    pg.close().await;
    app.stop().await.expect("stop");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sale_window_api_validates_values_and_guards_a_running_sale() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let key = hex::encode(shared::token::random_seed());
    let shutdown = CancellationToken::new();
    let app = start_buffer(&env, &key, &shutdown).await;
    let event = insert_event(&pg, chrono::Duration::seconds(2)).await;
    let url = format!("{}/api/v1/organizer/events/{event}/sale", app.url());
    let http = reqwest::Client::new();

    assert_eq!(http.get(&url).send().await.expect("request").status(), 401);
    let current: Value = http
        .get(&url)
        .bearer_auth(ORGANIZER)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");

    // A value that breaks a rule: 422 naming the field; nothing changes.
    let mut bad = current.clone();
    bad["seats_per_fan"] = serde_json::json!(0);
    let answer = http
        .put(&url)
        .bearer_auth(ORGANIZER)
        .json(&bad)
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status(), 422);
    let error: Value = answer.json().await.expect("json");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("seats_per_fan")),
        "{error}"
    );

    // Presale is open: its opening can no longer move (409); the rate can.
    let mut moved = current.clone();
    moved["presale_opens_at"] = serde_json::json!(Utc::now() + chrono::Duration::seconds(1));
    let answer = http
        .put(&url)
        .bearer_auth(ORGANIZER)
        .json(&moved)
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status(), 409);
    let mut faster = current.clone();
    faster["rate_per_minute"] = serde_json::json!(120);
    let answer = http
        .put(&url)
        .bearer_auth(ORGANIZER)
        .json(&faster)
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status(), 200);

    // After the draw, the sale's start is history.
    wait_for_draw(&pg, event).await;
    let mut later = faster.clone();
    later["sale_starts_at"] = serde_json::json!(Utc::now() + chrono::Duration::minutes(5));
    let answer = http
        .put(&url)
        .bearer_auth(ORGANIZER)
        .json(&later)
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status(), 409);
    let error: Value = answer.json().await.expect("json");
    assert_eq!(error["error"], "draw_done");

    // A fan holds two seats: the limit cannot drop below that (409), nor the end into the past.
    sqlx::query(
        "INSERT INTO holds (id, event_id, jti, seat_ids, expires_at)
         VALUES ($1, $2, $3, ARRAY[1, 2]::bigint[], now() + interval '5 minutes')",
    )
    .bind(Uuid::new_v4())
    .bind(event)
    .bind(Uuid::new_v4())
    .execute(&pg)
    .await
    .expect("hold");
    let mut fewer = faster.clone();
    fewer["seats_per_fan"] = serde_json::json!(1);
    let answer = http
        .put(&url)
        .bearer_auth(ORGANIZER)
        .json(&fewer)
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status(), 409);
    let error: Value = answer.json().await.expect("json");
    assert_eq!(error["error"], "below_sold", "{error}");
    let mut ended = faster.clone();
    ended["sale_ends_at"] = serde_json::json!(Utc::now() - chrono::Duration::seconds(1));
    let answer = http
        .put(&url)
        .bearer_auth(ORGANIZER)
        .json(&ended)
        .send()
        .await
        .expect("request");
    assert_eq!(answer.status(), 422);

    let stored: Value = http
        .get(&url)
        .bearer_auth(ORGANIZER)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(stored["rate_per_minute"], 120);
    assert_eq!(stored["seats_per_fan"], 2);
    assert_eq!(stored["sale_starts_at"], current["sale_starts_at"]);

    pg.close().await;
    app.stop().await.expect("stop");
    env.cleanup().await;
}
