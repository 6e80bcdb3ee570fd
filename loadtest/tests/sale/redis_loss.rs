//! Redis losing what it holds — once, again and again, or for seconds — while a sale runs
//! through the real services: nothing acknowledged is lost or given twice, the serving head
//! never moves back, admitted fans can still claim, waiters keep their sockets, and the limits
//! kept in Redis hold across instances.

use std::time::Duration;

use serde_json::Value;
use shared::testing::TestEnv;
use tokio_util::sync::CancellationToken;

use super::{eventually_count, passes_issued, redis_client, refused, spec, SaleSpec, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sale_survives_losing_its_redis_state() {
    use fred::prelude::*;

    let stack = Stack::start().await;
    let event = stack
        .create(SaleSpec {
            rate_per_minute: 60_000,
            max_active: 2,
            ..spec("Amnesia", 10, chrono::Duration::seconds(1))
        })
        .await;
    let fans = stack.join_many(event, 4).await;
    let mut waiting = stack.wait_all(event, &fans, Duration::from_secs(60));
    let pg = stack.env.pool().await;
    eventually_count(&pg, event, 2).await;

    // Redis forgets the whole event: queue, head, tail, the whole-mirror flag, lease.
    let redis = redis_client(&stack.env).await;
    let keys = shared::redis::EventKeys::new(
        &stack.env.redis_prefix,
        shared::ids::EventId::new(event).expect("id"),
    );
    let all = keys.every();
    let _: i64 = redis.del(all).await.expect("del");

    // The buffer rebuilds it from Postgres: the same queue and the head after the admitted
    // fans; the cap of two (counted in Postgres) still holds nobody else in.
    let mut head = 0;
    for _ in 0..100 {
        let whole: i64 = redis.exists(keys.drawn()).await.expect("exists");
        head = redis
            .get::<Option<i64>, _>(keys.head())
            .await
            .expect("head")
            .unwrap_or(0);
        if whole == 1 && head > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        head, 2,
        "the serving head resumed after the fans already admitted"
    );
    let queued: i64 = redis.zcard(keys.queue()).await.expect("zcard");
    assert_eq!(queued, 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        passes_issued(&pg, event).await,
        2,
        "the cap survived: nobody else was let in"
    );
    // The admissions are the pass holders' own, not fresh re-admissions of their places.
    let admissions: Vec<(i64, bool)> = sqlx::query_as(
        "SELECT position, ticket_id IS NOT NULL FROM admissions WHERE event_id = $1
         ORDER BY position",
    )
    .bind(event)
    .fetch_all(&pg)
    .await
    .expect("admissions");
    assert_eq!(admissions, [(1, true), (2, true)]);
    let _ = redis.quit().await;
    waiting.abort_all();
    pg.close().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_lost_again_and_again_during_admissions_moves_no_head_back_and_refuses_no_admitted_fan(
) {
    use fred::prelude::*;

    let stack = Stack::start().await;
    let event = stack
        .create(SaleSpec {
            rate_per_minute: 1_200,
            max_active: 1_000,
            ..spec("Flapping", 100, chrono::Duration::seconds(1))
        })
        .await;
    let fans = stack.join_many(event, 80).await;
    let pg = stack.env.pool().await;
    let head_pg = || async {
        sqlx::query_scalar::<_, i64>("SELECT head FROM admission_state WHERE event_id = $1")
            .bind(event)
            .fetch_optional(&pg)
            .await
            .expect("head")
            .unwrap_or(0)
    };
    for _ in 0..200 {
        if head_pg().await >= 15 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Nobody has claimed yet: every admitted place exists only as an admission. Redis forgets
    // the event ten times, 80 ms apart, while the controller keeps admitting; the serving head
    // (Postgres's, and Redis's whenever it has one) never moves back.
    let redis = redis_client(&stack.env).await;
    let keys = shared::redis::EventKeys::new(
        &stack.env.redis_prefix,
        shared::ids::EventId::new(event).expect("id"),
    );
    let all = keys.every();
    let (mut max_pg, mut max_redis) = (0, 0);
    for round in 0..10 {
        let _: i64 = redis.del(all.clone()).await.expect("del");
        for _ in 0..8 {
            let pg_head = head_pg().await;
            assert!(
                pg_head >= max_pg,
                "round {round}: head {max_pg} -> {pg_head}"
            );
            max_pg = pg_head;
            if let Some(r) = redis.get::<Option<i64>, _>(keys.head()).await.expect("get") {
                assert!(
                    r >= max_redis,
                    "round {round}: redis head {max_redis} -> {r}"
                );
                max_redis = r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // Every fan whose turn has come claims now, inside the claim window: each gets a pass.
    let head = head_pg().await;
    let order: Vec<uuid::Uuid> =
        serde_json::from_value(stack.client.draw(event).await.expect("draw")["order"].clone())
            .expect("order");
    let mut claimed = 0;
    for fan in &fans {
        let position = order
            .iter()
            .position(|t| *t == fan.ticket_id)
            .expect("drawn") as i64
            + 1;
        if position > head {
            continue;
        }
        let pass = stack.client.claim_pass(event, &fan.ticket).await;
        assert!(
            pass.is_ok(),
            "the fan at {position} (head {head}) was refused: {:?}",
            pass.err()
        );
        claimed += 1;
    }
    assert!(claimed >= 15, "{claimed} fans claimed");
    // No place was admitted twice: one admission per place up to the head, no more.
    // (One snapshot: a tick commits its admissions and its head together.)
    let (admissions, distinct, head): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT position),
                (SELECT head FROM admission_state WHERE event_id = $1)
         FROM admissions WHERE event_id = $1",
    )
    .bind(event)
    .fetch_one(&pg)
    .await
    .expect("admissions");
    assert_eq!((admissions, distinct), (head, head));
    let _ = redis.quit().await;
    pg.close().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tickets_socket_limit_holds_across_queue_instances() {
    use futures::StreamExt;

    let stack = Stack::start_tuned(TestEnv::new().await, |q, _| q.socket_renew_ms = 300).await;
    let event = stack.event(10, chrono::Duration::seconds(30)).await;
    let fan = stack.join_many(event, 1).await.remove(0);
    let mut other = stack.queue_config.clone();
    other.bind = "127.0.0.1:0".parse().expect("addr");
    let second = queue::start(other, CancellationToken::new())
        .await
        .expect("second queue");
    let limit = stack.queue_config.max_sockets_per_ticket;
    let url = |base: &str| {
        format!(
            "{}/api/v1/events/{event}/ws?ticket={}",
            base.replacen("http", "ws", 1),
            fan.ticket
        )
    };
    let (first, other_url) = (url(&stack.client.endpoints.queue), url(&second.url()));

    // The limit's worth of tabs, spread over both instances, all open; one more is refused
    // wherever it goes.
    let mut open = Vec::new();
    for i in 0..limit {
        let target = if i % 2 == 0 { &first } else { &other_url };
        let (socket, _) = tokio_tungstenite::connect_async(target.as_str())
            .await
            .unwrap_or_else(|e| panic!("tab {i}: {e}"));
        open.push(socket);
    }
    for target in [&first, &other_url] {
        match tokio_tungstenite::connect_async(target.as_str()).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 429, "{target}");
                assert!(response.headers().contains_key("retry-after"));
            }
            other => panic!("one tab too many was not refused: {:?}", other.map(|_| ())),
        }
    }
    // A tab closed on one instance frees a place on the other.
    let mut closing = open.remove(0);
    closing.close(None).await.expect("close");
    drop(closing);
    let mut reopened = false;
    for _ in 0..50 {
        if tokio_tungstenite::connect_async(other_url.as_str())
            .await
            .map(|(s, _)| open.push(s))
            .is_ok()
        {
            reopened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reopened, "the closed tab's place came back");

    // Redis loses the count: as many tabs again open, and the renewal closes the newest ones
    // until the limit holds again across both instances.
    let keys = shared::redis::EventKeys::new(
        &stack.env.redis_prefix,
        shared::ids::EventId::new(event).expect("id"),
    );
    let redis = redis_client(&stack.env).await;
    let _: i64 =
        fred::prelude::KeysInterface::del(&redis, keys.sockets(&fan.ticket_id.to_string()))
            .await
            .expect("del");
    let mut extra = Vec::new();
    for i in 0..limit {
        let target = if i % 2 == 0 { &first } else { &other_url };
        let (socket, _) = tokio_tungstenite::connect_async(target.as_str())
            .await
            .unwrap_or_else(|e| panic!("extra tab {i}: {e}"));
        extra.push(socket);
    }
    let mut closed = 0;
    for socket in extra.iter_mut() {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
                Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame)))) => {
                    assert_eq!(frame.map(|f| u16::from(f.code)), Some(1008));
                    closed += 1;
                    break;
                }
                Ok(Some(Ok(_))) => continue,
                _ => break,
            }
        }
    }
    assert_eq!(closed, limit, "the tabs opened over the limit were closed");
    drop(extra);
    drop(open);
    second.stop().await.expect("stop");
    stack.stop().await;
}

/// A Redis server of the test's own (killed and restarted by the test), keeping nothing on
/// disk, on a free port.
struct PrivateRedis {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    fn start() -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("fg-redis-{port}"));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut redis = PrivateRedis {
            port,
            dir,
            child: None,
        };
        redis.restart();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (empty) and waits until it answers.
    fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--maxmemory-policy", "noeviction"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on {}", self.port);
    }

    /// SIGKILL: everything it held is gone.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_keep_their_sockets_through_a_redis_outage_and_every_place_survives() {
    use futures::{SinkExt, StreamExt};

    let mut redis = PrivateRedis::start();
    let mut env = TestEnv::new().await;
    env.redis_url = redis.url();
    let stack = Stack::start_on(env).await;
    let event = stack
        .create(SaleSpec {
            rate_per_minute: 300,
            max_active: 1_000,
            ..spec("Outage", 40, chrono::Duration::seconds(1))
        })
        .await;
    let fans = stack.join_many(event, 30).await;
    let pg = stack.env.pool().await;
    eventually_count_admitted(&pg, event, 2).await;

    // Every fan waits on the waiting room, reading everything it says.
    let ws_base = stack.client.endpoints.queue.replacen("http", "ws", 1);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Value)>();
    let mut sockets = tokio::task::JoinSet::new();
    for (i, fan) in fans.iter().enumerate() {
        let url = format!("{ws_base}/api/v1/events/{event}/ws?ticket={}", fan.ticket);
        let tx = tx.clone();
        sockets.spawn(async move {
            let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
                .await
                .expect("ws");
            while let Some(message) = socket.next().await {
                match message.expect("the socket stays up") {
                    tokio_tungstenite::tungstenite::Message::Text(text) => {
                        let value: Value = serde_json::from_str(text.as_str()).expect("json");
                        let done = value["type"] == "pass";
                        let _ = tx.send((i, value));
                        if done {
                            return true;
                        }
                    }
                    tokio_tungstenite::tungstenite::Message::Ping(p) => {
                        socket
                            .send(tokio_tungstenite::tungstenite::Message::Pong(p))
                            .await
                            .expect("pong");
                    }
                    tokio_tungstenite::tungstenite::Message::Close(frame) => {
                        panic!("fan {i}'s socket was closed: {frame:?}")
                    }
                    _ => {}
                }
            }
            false
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Redis dies (SIGKILL, nothing on disk) for two seconds.
    redis.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Meanwhile a new fan still gets a durable place at the back, and a claim is answered
    // precisely: never a 500.
    let late = stack
        .client
        .join(event, None)
        .await
        .expect("a join during the outage");
    assert_eq!(late.status, "queued");
    assert_eq!(late.position, Some(31));
    match stack.client.claim_pass(event, &fans[29].ticket).await {
        Err(e) => {
            let r = refused(&e).unwrap_or_else(|| panic!("{e:#}"));
            assert!(
                r.status == 503 || r.code == "not_admitted_yet",
                "a claim during the outage: {r}"
            );
        }
        // Drawn near the front and admitted before the outage: the place is read from
        // Postgres, and the pass is that admission's.
        Ok(_) => {
            let claimed: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM admissions WHERE event_id = $1 AND ticket_id = $2",
            )
            .bind(event)
            .bind(fans[29].ticket_id)
            .fetch_one(&pg)
            .await
            .expect("admission");
            assert_eq!(claimed, 1, "a pass without its admission");
        }
    }
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    redis.restart();

    // Every waiter gets a pass in the end, on the socket it opened before the outage, and
    // heard the room catching up meanwhile.
    let mut passes = 0;
    let mut caught_up = 0;
    let mut heads: std::collections::HashMap<usize, i64> = Default::default();
    while passes < fans.len() {
        let (i, message) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("waiters keep hearing from the room")
            .expect("message");
        match message["type"].as_str() {
            Some("pass") => passes += 1,
            Some("status") => {
                if message["phase"] == "catching_up" {
                    caught_up += 1;
                }
                let head = message["serving_head"].as_i64().expect("head");
                let seen = heads.entry(i).or_insert(0);
                assert!(
                    head >= *seen,
                    "fan {i}: the head moved back {seen} -> {head}"
                );
                *seen = head;
            }
            other => panic!("fan {i} was told {other:?}: {message}"),
        }
    }
    assert!(caught_up > 0, "nobody was told the room was catching up");
    while let Some(done) = sockets.join_next().await {
        assert!(
            done.expect("socket task"),
            "a socket ended without its pass"
        );
    }
    let passes_issued = passes_issued(&pg, event).await;
    assert_eq!(passes_issued, fans.len() as i64);
    pg.close().await;
    stack.stop().await;
}

async fn eventually_count_admitted(pg: &sqlx::PgPool, event: i64, want: i64) {
    for _ in 0..200 {
        let head: i64 = sqlx::query_scalar(
            "SELECT COALESCE(max(head), 0) FROM admission_state WHERE event_id = $1",
        )
        .bind(event)
        .fetch_one(pg)
        .await
        .expect("head");
        if head >= want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {want} fans admitted");
}

/// A presale fan admitted just before Redis is lost claims the pass during the outage: the
/// draw's place is derived from Postgres (seed and entrants), so an outage longer than the
/// claim window does not cost the place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_presale_fan_admitted_before_redis_is_lost_claims_the_pass_during_the_outage() {
    let mut redis = PrivateRedis::start();
    let mut env = TestEnv::new().await;
    env.redis_url = redis.url();
    let stack = Stack::start_on(env).await;
    let event = stack
        .create(SaleSpec {
            rate_per_minute: 60,
            max_active: 1_000,
            ..spec("Claim in an outage", 40, chrono::Duration::seconds(1))
        })
        .await;
    let fans = stack.join_many(event, 6).await;
    let pg = stack.env.pool().await;
    eventually_count_admitted(&pg, event, 1).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let admitted: Vec<i64> =
        sqlx::query_scalar("SELECT position FROM admissions WHERE event_id = $1 ORDER BY position")
            .bind(event)
            .fetch_all(&pg)
            .await
            .expect("admissions");
    let mut passes = 0;
    for fan in &fans {
        match stack.client.claim_pass(event, &fan.ticket).await {
            Ok(_) => passes += 1,
            Err(e) => {
                let r = refused(&e).unwrap_or_else(|| panic!("{e:#}"));
                assert_eq!(r.code, "not_admitted_yet", "a claim during the outage: {r}");
            }
        }
    }
    assert_eq!(
        passes,
        admitted.len(),
        "every admitted fan got the pass in the outage"
    );
    let issued: Vec<i64> =
        sqlx::query_scalar("SELECT position FROM passes WHERE event_id = $1 ORDER BY position")
            .bind(event)
            .fetch_all(&pg)
            .await
            .expect("passes");
    assert_eq!(issued, admitted, "each pass at its admitted place");
    redis.restart();
    pg.close().await;
    stack.stop().await;
}
