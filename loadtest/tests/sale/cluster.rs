//! fairgate on a real Redis Cluster (3 masters, 3 replicas, started by
//! `scripts/redis-cluster.sh` on ports of the test's own): every key of an event lives in one
//! slot, so each multi-key script runs there; and killing the master that owns a running sale's
//! slot — its replica takes over, missing whatever replication had not carried yet — loses no
//! acknowledged join and gives no place twice.

use std::collections::HashMap;
use std::time::Duration;

use fred::prelude::*;
use serde_json::Value;
use shared::testing::TestEnv;

use super::{spec, SaleSpec, Stack};

/// A Redis Cluster of the test's own, stopped when dropped.
struct PrivateCluster {
    port: u16,
    dir: std::path::PathBuf,
    url: String,
}

impl PrivateCluster {
    fn script() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/redis-cluster.sh")
    }

    fn start() -> PrivateCluster {
        // Six ports and their cluster-bus ports (+10000), all below the ephemeral range.
        let port = (0..200)
            .map(|_| 12_000 + rand::random_range(0..9_990u16))
            .find(|base| {
                (0..6).all(|i| {
                    [base + i, base + i + 10_000]
                        .iter()
                        .all(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
                })
            })
            .expect("six free ports");
        let dir = std::env::temp_dir().join(format!("fg-cluster-{port}"));
        let out = std::process::Command::new(Self::script())
            .args(["start", &port.to_string()])
            .arg(&dir)
            .output()
            .expect("scripts/redis-cluster.sh");
        assert!(
            out.status.success(),
            "the cluster did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        PrivateCluster { port, dir, url }
    }

    /// The port of the master serving `slot` now (asked of the first node that answers).
    async fn master_of(&self, slot: i64) -> u16 {
        let mut nodes = String::new();
        for i in 0..6 {
            let url = format!("redis://127.0.0.1:{}", self.port + i);
            let Ok(node) = Builder::from_config(Config::from_url(&url).expect("url"))
                .with_connection_config(|c| c.connection_timeout = Duration::from_millis(500))
                .build()
            else {
                continue;
            };
            if node.init().await.is_err() {
                continue;
            }
            let answer: Result<String, _> = node.custom(fred::cmd!("CLUSTER"), vec!["NODES"]).await;
            let _ = node.quit().await;
            if let Ok(answer) = answer {
                nodes = answer;
                break;
            }
        }
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (low, high) = range.split_once('-').unwrap_or((range, range));
                matches!((low.parse::<i64>(), high.parse::<i64>()), (Ok(l), Ok(h)) if (l..=h).contains(&slot))
            });
            if serves {
                let addr = fields[1].split('@').next().expect("addr");
                return addr
                    .rsplit(':')
                    .next()
                    .expect("port")
                    .parse()
                    .expect("port");
            }
        }
        panic!("no master serves slot {slot}: {nodes}");
    }

    /// SIGKILLs the node on `port` (its pid file is in the cluster's directory).
    fn kill(&self, port: u16) {
        let pid = std::fs::read_to_string(self.dir.join(port.to_string()).join("redis.pid"))
            .expect("pid file");
        let status = std::process::Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new(Self::script())
            .args(["stop", &self.port.to_string()])
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client of the cluster that reconnects and re-learns the cluster's layout after a node
/// dies, as the services' clients do.
async fn cluster_client(url: &str) -> Client {
    let client = shared::redis::builder(url, Duration::from_secs(2))
        .expect("url")
        .build()
        .expect("client");
    client.init().await.expect("cluster");
    client
}

async fn slot_of(client: &Client, key: &str) -> i64 {
    client
        .custom(
            fred::cmd!("CLUSTER"),
            vec!["KEYSLOT".to_owned(), key.to_owned()],
        )
        .await
        .expect("keyslot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_of_an_event_maps_to_one_cluster_slot() {
    let cluster = PrivateCluster::start();
    let client = cluster_client(&cluster.url).await;
    for event in [1, 42, 1_000_003] {
        let keys =
            shared::redis::EventKeys::new("fg", shared::ids::EventId::new(event).expect("id"));
        let mut all = keys.every();
        all.push(keys.sockets(&uuid::Uuid::now_v7().to_string()));
        let mut slots = Vec::new();
        for key in &all {
            slots.push(slot_of(&client, key).await);
        }
        slots.dedup();
        assert_eq!(slots.len(), 1, "event {event}: {all:?} in slots {slots:?}");
    }
    let _ = client.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_master_of_a_sales_slot_loses_no_acknowledged_join() {
    let cluster = PrivateCluster::start();
    let mut env = TestEnv::new().await;
    env.redis_url = cluster.url.clone();
    let stack = Stack::start_on(env).await;
    let event = stack
        .create(SaleSpec {
            rate_per_minute: 600,
            max_active: 1_000,
            ..spec("Failover", 500, chrono::Duration::seconds(2))
        })
        .await;
    let presale = stack.join_many(event, 60).await;
    let client = cluster_client(&cluster.url).await;
    let keys = shared::redis::EventKeys::new(
        &stack.env.redis_prefix,
        shared::ids::EventId::new(event).expect("id"),
    );
    for _ in 0..100 {
        let whole: i64 = client.exists(keys.drawn()).await.unwrap_or(0);
        if whole == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Live arrivals, patient as a page is, for six seconds; the master holding the sale's slot
    // is killed in the middle of them.
    let patient = stack.client.clone().patient(Duration::from_secs(30));
    let arrivals = tokio::spawn({
        let patient = patient.clone();
        async move {
            let mut told = Vec::new();
            for i in 0..120 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                match patient.join(event, None).await {
                    Ok(joined) => told.push((joined.ticket_id, joined.position)),
                    Err(e) => panic!("live join {i} failed: {e:#}"),
                }
            }
            told
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let slot = slot_of(&client, &keys.queue()).await;
    let master = cluster.master_of(slot).await;
    cluster.kill(master);
    let told = arrivals.await.expect("arrivals");

    // The replica took the slot over; the line there is whole again, as Postgres has it.
    let pg = stack.env.pool().await;
    let tail: i64 = sqlx::query_scalar("SELECT tail FROM draws WHERE event_id = $1")
        .bind(event)
        .fetch_one(&pg)
        .await
        .expect("tail");
    assert_eq!(tail, 60 + 120, "every acknowledged join has its place");
    let mut whole = false;
    for _ in 0..300 {
        let flag: i64 = client.exists(keys.drawn()).await.unwrap_or(0);
        let size: i64 = client.zcard(keys.queue()).await.unwrap_or(0);
        if flag == 1 && size == tail {
            whole = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(whole, "the mirror is whole on the new master");
    let new_master = cluster.master_of(slot).await;
    assert_ne!(new_master, master, "the replica took over the slot");

    let stored: HashMap<uuid::Uuid, i64> = sqlx::query_as::<_, (uuid::Uuid, i64)>(
        "SELECT ticket_id, position FROM joins WHERE event_id = $1 AND phase = 'live'",
    )
    .bind(event)
    .fetch_all(&pg)
    .await
    .expect("joins")
    .into_iter()
    .collect();
    for (ticket, position) in &told {
        assert_eq!(
            stored.get(ticket),
            position.as_ref(),
            "{ticket} kept its place"
        );
    }
    let mirrored: Vec<(String, f64)> = client
        .zrange(keys.queue(), 0, -1, None, false, None, true)
        .await
        .expect("zrange");
    let draw: Value = stack.client.draw(event).await.expect("draw");
    let order: Vec<uuid::Uuid> = serde_json::from_value(draw["order"].clone()).expect("order");
    let mut positions = std::collections::HashSet::new();
    for (ticket, score) in mirrored {
        let ticket: uuid::Uuid = ticket.parse().expect("uuid");
        let position = score as i64;
        let expected = order
            .iter()
            .position(|t| *t == ticket)
            .map(|i| i as i64 + 1)
            .or_else(|| stored.get(&ticket).copied());
        assert_eq!(expected, Some(position), "{ticket} in the mirror");
        assert!(positions.insert(position), "position {position} twice");
    }
    // The presale fans still get their passes in turn.
    let pass = patient
        .wait_for_pass(event, &presale[0].ticket, Duration::from_secs(60))
        .await;
    assert!(pass.is_ok(), "{:?}", pass.err());
    let _ = client.quit().await;
    pg.close().await;
    stack.stop().await;
}
