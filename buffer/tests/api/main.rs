//! The buffer service against real Postgres and Redis: several instances racing the draw while
//! joins arrive around the sale start, and a lost Redis queue rebuilt from Postgres.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use clap::Parser;
use fred::prelude::*;
use serde_json::Value;
use shared::server::RunningApp;
use shared::testing::TestEnv;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn start_buffer(env: &TestEnv, key: &str, shutdown: &CancellationToken) -> RunningApp {
    let mut config = buffer::Config::parse_from(["buffer"]);
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
    let now = Utc::now();
    sqlx::query_scalar(
        "INSERT INTO events (name, starts_at, presale_opens_at, sale_starts_at, sale_ends_at,
             rate_per_minute, max_active, pass_ttl_secs, claim_window_secs, seats_per_fan)
         VALUES ('Race', $1, $2, $3, $4, 60, 10, 600, 60, 2) RETURNING id",
    )
    .bind(now + chrono::Duration::days(1))
    .bind(now - chrono::Duration::seconds(1))
    .bind(now + draw_in)
    .bind(now + chrono::Duration::hours(1))
    .fetch_one(pg)
    .await
    .expect("event")
}

async fn redis(env: &TestEnv) -> Client {
    let client = Builder::from_config(Config::from_url(&env.redis_url).expect("url"))
        .build()
        .expect("client");
    client.init().await.expect("redis");
    client
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
            let response = http.post(url).send().await.expect("request");
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

    eventually("the draw", || async {
        sqlx::query_scalar::<_, bool>("SELECT drawn_at IS NOT NULL FROM draws WHERE event_id = $1")
            .bind(event)
            .fetch_optional(&pg)
            .await
            .expect("query")
            == Some(true)
    })
    .await;
    // Late joiners get their position at once; everyone is placed.
    let rows: Vec<(Uuid, String, Option<i64>)> =
        sqlx::query_as("SELECT ticket_id, phase, position FROM joins WHERE event_id = $1")
            .bind(event)
            .fetch_all(&pg)
            .await
            .expect("joins");
    assert_eq!(rows.len(), 240, "no acknowledged join lost");
    let stored: HashSet<Uuid> = rows.iter().map(|r| r.0).collect();
    assert_eq!(stored, acknowledged);
    let mut positions: Vec<i64> = rows.iter().map(|r| r.2.expect("placed")).collect();
    positions.sort_unstable();
    assert_eq!(
        positions,
        (1..=240).collect::<Vec<_>>(),
        "positions dense and unique"
    );

    let presale = rows.iter().filter(|r| r.1 == "presale").count() as i64;
    let entrants: i64 = sqlx::query_scalar("SELECT entrants FROM draws WHERE event_id = $1")
        .bind(event)
        .fetch_one(&pg)
        .await
        .expect("draw");
    assert_eq!(
        entrants, presale,
        "the draw ordered exactly the presale joins"
    );
    assert!(rows
        .iter()
        .filter(|r| r.1 == "presale")
        .all(|r| r.2 <= Some(presale)));
    assert!(
        presale > 0 && presale < 240,
        "the joins straddled the draw ({presale} presale)"
    );

    // Redis holds the same queue as Postgres.
    let redis = redis(&env).await;
    let queue = format!("{}:{{evt:{event}}}:queue", env.redis_prefix);
    let size: i64 = redis.zcard(&queue).await.expect("zcard");
    assert_eq!(size, 240);
    for (ticket, _, position) in &rows {
        let score: Option<f64> = redis
            .zscore(&queue, ticket.to_string())
            .await
            .expect("zscore");
        assert_eq!(score.map(|s| s as i64), *position);
    }

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
    for (ticket, _, position) in &rows {
        let score: Option<f64> = redis
            .zscore(&queue, ticket.to_string())
            .await
            .expect("zscore");
        assert_eq!(score.map(|s| s as i64), *position);
    }
    // And a new arrival still goes to the back, after everyone.
    let late: Value = http
        .post(format!("{}/api/v1/events/{event}/join", instances[0].url()))
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
