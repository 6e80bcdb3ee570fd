//! Test support (feature `testing`): a fresh Postgres database and a unique Redis key prefix per
//! test, so tests run in parallel beside each other and beside other data.

use fred::prelude::*;
use futures::StreamExt;
use sqlx::{Connection, Executor, PgConnection};
use uuid::Uuid;

use crate::config::{CommonConfig, LogFormat};

/// One test's private database and Redis prefix. Call [`TestEnv::cleanup`] at the end; the
/// test script also drops leftover `fgtest_*` databases before a run.
pub struct TestEnv {
    pub admin_url: String,
    pub database_url: String,
    pub db_name: String,
    pub redis_url: String,
    pub redis_prefix: String,
}

impl TestEnv {
    pub async fn new() -> Self {
        let admin_url = std::env::var("FAIRGATE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let redis_url = std::env::var("FAIRGATE_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let tag = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let db_name = format!("fgtest_{tag}");
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("connect to the test Postgres (FAIRGATE_TEST_DATABASE_URL)");
        admin
            .execute(format!("CREATE DATABASE {db_name}").as_str())
            .await
            .expect("create test database");
        let _ = admin.close().await;
        let database_url = replace_db(&admin_url, &db_name);
        let pool = crate::db::connect_url(&database_url, 2)
            .await
            .expect("connect to test database");
        crate::db::migrate(&pool)
            .await
            .expect("migrate test database");
        pool.close().await;
        TestEnv {
            admin_url,
            database_url,
            db_name,
            redis_url,
            redis_prefix: format!("fgtest:{tag}"),
        }
    }

    /// Configuration pointing at this test's database and Redis prefix.
    pub fn common_config(&self) -> CommonConfig {
        CommonConfig {
            database_url: self.database_url.clone(),
            // Connection budget: a Postgres allows 100 connections by default; a test runs up to
            // three services (plus a test pool of 5) and scripts/test.sh runs 4 tests at once:
            // 4 × (3 × 5 + 5) = 80.
            db_max_connections: 5,
            db_plan_cache_mode: "force_generic_plan".into(),
            reuse_port: false,
            migrate: false,
            redis_url: self.redis_url.clone(),
            redis_prefix: self.redis_prefix.clone(),
            redis_pool_size: 2,
            redis_command_timeout_ms: 5000,
            log_format: LogFormat::Human,
            body_limit_bytes: 64 * 1024,
            request_timeout_ms: 10_000,
            max_concurrent_requests: 1024,
            issuer: "fairgate".into(),
            web: crate::web::WebConfig::default(),
        }
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        crate::db::connect_url(&self.database_url, 5)
            .await
            .expect("connect to test database")
    }

    /// Drops the database and deletes every Redis key under the prefix.
    pub async fn cleanup(self) {
        if let Ok(mut admin) = PgConnection::connect(&self.admin_url).await {
            let _ = admin
                .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db_name).as_str())
                .await;
        }
        if let Ok(config) = Config::from_url(&self.redis_url) {
            if let Ok(client) = Builder::from_config(config).build() {
                if client.init().await.is_ok() {
                    // On a Redis Cluster the keys live on every master: scan them all.
                    let pattern = format!("{}:*", self.redis_prefix);
                    let keys: Vec<Key> = if client.client_config().server.is_clustered() {
                        client
                            .scan_cluster_buffered(pattern, Some(500), None)
                            .filter_map(|k| async move { k.ok() })
                            .collect()
                            .await
                    } else {
                        client
                            .scan_buffered(pattern, Some(500), None)
                            .filter_map(|k| async move { k.ok() })
                            .collect()
                            .await
                    };
                    // One key per command: keys of different events sit in different slots.
                    futures::stream::iter(keys)
                        .for_each_concurrent(32, |key| {
                            let client = client.clone();
                            async move {
                                let _: Result<i64, _> = client.del(key).await;
                            }
                        })
                        .await;
                    let _ = client.quit().await;
                }
            }
        }
    }
}

fn replace_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}
