//! Redis losing the live queue again and again — during the draw's publication, during the
//! rebuilds it causes, and while live joins flow through two buffer instances — never loses an
//! acknowledged place, never gives one place to two tickets, and never leaves a mirror flagged
//! whole with places missing. Postgres decides; Redis catches up.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{assertion, eventually, insert_event_with, redis, start_buffer, wait_for_draw};
use shared::testing::TestEnv;

/// Presale entrants written straight to Postgres: enough that rebuilding takes a while.
const ENTRANTS: i64 = 20_000;
/// Live arrivals sent through the two instances while Redis keeps losing the queue.
const LIVE: usize = 400;

/// Reads, atomically, whether the mirror is flagged whole and how many of the draw's places
/// 1..N it holds.
static WATCH: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::from_lua(
        r#"
return {redis.call('EXISTS', KEYS[2]), redis.call('ZCOUNT', KEYS[1], 1, ARGV[1]),
        tonumber(redis.call('GET', KEYS[3]) or '-1')}
"#,
    )
});

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_losing_the_queue_again_and_again_loses_or_shares_no_place() {
    let env = TestEnv::new().await;
    let pg = env.pool().await;
    let key = hex::encode(shared::token::random_seed());
    let shutdown = CancellationToken::new();
    let buffers = [
        start_buffer(&env, &key, &shutdown).await,
        start_buffer(&env, &key, &shutdown).await,
    ];
    let event = insert_event_with(&pg, chrono::Duration::seconds(4), true).await;
    let http = reqwest::Client::new();

    // Presale: a few fans with a signed ticket (to come back after the draw), many more
    // written straight to Postgres.
    let mut presale_tickets: Vec<(Uuid, String)> = Vec::new();
    for i in 0..20 {
        let body: Value = http
            .post(format!(
                "{}/api/v1/events/{event}/join",
                buffers[i % 2].url()
            ))
            .json(
                &json!({ "identity": assertion(&format!("presale-{i}"), super::IDENTITY_SECRET) }),
            )
            .send()
            .await
            .expect("join")
            .json()
            .await
            .expect("json");
        assert_eq!(body["status"], "buffered", "{body}");
        presale_tickets.push((
            body["ticket_id"]
                .as_str()
                .expect("id")
                .parse()
                .expect("uuid"),
            body["ticket"].as_str().expect("ticket").to_owned(),
        ));
    }
    sqlx::query(
        "INSERT INTO joins (ticket_id, event_id, identity, phase)
         SELECT t, $1, 'anon:' || t::text, 'presale'
         FROM (SELECT gen_random_uuid() AS t FROM generate_series(1, $2)) g",
    )
    .bind(event)
    .bind(ENTRANTS)
    .execute(&pg)
    .await
    .expect("entrants");
    let entrants = ENTRANTS + presale_tickets.len() as i64;

    // From now on Redis forgets the event every few milliseconds (one DEL of all its keys,
    // as a flush or a failover to an empty replica would), through the draw's publication,
    // every rebuild and the live joins; a watcher reads the mirror atomically all along.
    let client = redis(&env).await;
    let prefix = format!("{}:{{evt:{event}}}", env.redis_prefix);
    let keys = shared::redis::EventKeys::new(
        &env.redis_prefix,
        shared::ids::EventId::new(event).expect("id"),
    )
    .every();
    let chaos = CancellationToken::new();
    let losses = Arc::new(AtomicU64::new(0));
    let forgetter = {
        let (client, keys, chaos, losses) =
            (client.clone(), keys.clone(), chaos.clone(), losses.clone());
        tokio::spawn(async move {
            let mut i: u64 = 0;
            while !chaos.is_cancelled() {
                let _: i64 = client.del(keys.clone()).await.expect("del");
                losses.fetch_add(1, Ordering::Relaxed);
                i += 1;
                // Mostly a few milliseconds apart, sometimes a breather long enough to
                // finish a rebuild.
                let pause = if i.is_multiple_of(25) { 300 } else { 3 + i % 7 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        })
    };
    let whole_seen = Arc::new(AtomicU64::new(0));
    let broken_flag = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (client, chaos) = (client.clone(), chaos.clone());
        let (whole_seen, broken_flag) = (whole_seen.clone(), broken_flag.clone());
        let watched = vec![
            format!("{prefix}:queue"),
            format!("{prefix}:drawn"),
            format!("{prefix}:tail"),
        ];
        tokio::spawn(async move {
            while !chaos.is_cancelled() {
                let (flag, drawn, _tail): (i64, i64, i64) = WATCH
                    .evalsha_with_reload(&client, watched.clone(), vec![entrants])
                    .await
                    .expect("watch");
                if flag == 1 {
                    whole_seen.fetch_add(1, Ordering::Relaxed);
                    if drawn < entrants {
                        broken_flag.store(true, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    wait_for_draw(&pg, event).await;

    // Live arrivals through both instances, twenty at a time, while the losses go on.
    let answers: Vec<Value> = futures::future::join_all((0..LIVE).map(|i| {
        let url = format!("{}/api/v1/events/{event}/join", buffers[i % 2].url());
        let http = http.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(8 * i as u64)).await;
            let response = http
                .post(url)
                .json(&json!({}))
                .send()
                .await
                .expect("request");
            assert_eq!(response.status(), 201, "a live join was refused");
            response.json::<Value>().await.expect("json")
        }
    }))
    .await;
    // A presale fan coming back with their ticket after the draw learns the draw's place.
    let mut came_back: Vec<(Uuid, i64)> = Vec::new();
    for (i, (ticket, token)) in presale_tickets.iter().enumerate() {
        let response = http
            .post(format!(
                "{}/api/v1/events/{event}/join",
                buffers[i % 2].url()
            ))
            .json(&json!({ "ticket": token }))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["status"], "queued", "{body}");
        assert_eq!(body["resumed"], true);
        came_back.push((
            *ticket,
            body["position"].as_i64().expect("a drawn position"),
        ));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    chaos.cancel();
    forgetter.await.expect("forgetter");
    watcher.await.expect("watcher");
    let lost = losses.load(Ordering::Relaxed);
    assert!(lost > 100, "Redis lost the queue {lost} times");
    assert!(
        !broken_flag.load(Ordering::Relaxed),
        "the mirror was flagged whole while some of the draw's places were missing"
    );

    // Every live arrival got its own place, at the back, in Postgres as it was told.
    let told: HashMap<Uuid, i64> = answers
        .iter()
        .map(|a| {
            assert_eq!(a["status"], "queued", "{a}");
            (
                a["ticket_id"].as_str().expect("id").parse().expect("uuid"),
                a["position"].as_i64().expect("position"),
            )
        })
        .collect();
    let mut positions: Vec<i64> = told.values().copied().collect();
    positions.sort_unstable();
    assert_eq!(
        positions,
        (entrants + 1..=entrants + LIVE as i64).collect::<Vec<_>>(),
        "live places dense, unique and after the draw's"
    );
    let stored: HashMap<Uuid, i64> = sqlx::query_as::<_, (Uuid, i64)>(
        "SELECT ticket_id, position FROM joins WHERE event_id = $1 AND phase = 'live'",
    )
    .bind(event)
    .fetch_all(&pg)
    .await
    .expect("live joins")
    .into_iter()
    .collect();
    assert_eq!(stored, told, "Postgres holds every place as it was told");

    // The draw's places as published, and the fans who came back were told theirs.
    let published: Value = http
        .get(format!("{}/api/v1/events/{event}/draw", buffers[0].url()))
        .send()
        .await
        .expect("draw")
        .json()
        .await
        .expect("json");
    let order: Vec<Uuid> = serde_json::from_value(published["order"].clone()).expect("order");
    assert_eq!(order.len() as i64, entrants);
    let drawn: HashMap<Uuid, i64> = order
        .iter()
        .enumerate()
        .map(|(i, t)| (*t, i as i64 + 1))
        .collect();
    for (ticket, position) in &came_back {
        assert_eq!(drawn.get(ticket), Some(position), "{ticket} came back");
    }

    // Once Redis stops losing data, the mirror becomes whole by itself and equals Postgres.
    let queue = format!("{prefix}:queue");
    let total = entrants + LIVE as i64;
    eventually("a whole mirror", || async {
        let flag: i64 = client
            .exists(format!("{prefix}:drawn"))
            .await
            .expect("exists");
        let size: i64 = client.zcard(&queue).await.expect("zcard");
        flag == 1 && size == total
    })
    .await;
    let mirrored: Vec<(String, f64)> = client
        .zrange(&queue, 0, -1, None, false, None, true)
        .await
        .expect("zrange");
    let mut seen_positions = HashSet::new();
    for (ticket, score) in &mirrored {
        let ticket: Uuid = ticket.parse().expect("uuid");
        let position = score.round() as i64;
        let expected = drawn.get(&ticket).or_else(|| told.get(&ticket));
        assert_eq!(expected, Some(&position), "{ticket} in the mirror");
        assert!(seen_positions.insert(position), "position {position} twice");
    }
    let tail: i64 = client.get(format!("{prefix}:tail")).await.expect("tail");
    assert_eq!(tail, total);

    let _ = client.quit().await;
    pg.close().await;
    for app in buffers {
        app.stop().await.expect("clean stop");
    }
    env.cleanup().await;
}
