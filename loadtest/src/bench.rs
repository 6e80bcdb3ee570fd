//! What the `bench-*` binaries share: child processes that die with the bench, waiting for a
//! service to be ready, and latency figures from HdrHistogram.

use std::process::Child;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Kills a child process when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `url` until it answers 2xx (10 s at most).
pub async fn wait_ready(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("{url} never became ready")
}

/// A histogram of latencies in microseconds, 1 µs to 60 s.
pub fn latencies() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// The `q` quantile of a microsecond histogram, in milliseconds.
pub fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Where the benchmarks find Postgres and Redis.
#[derive(clap::Args, Clone, Debug)]
pub struct Backends {
    /// Postgres URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/fairgate"
    )]
    pub database_url: String,
    /// Redis URL.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
}

impl Backends {
    /// A small pool on the bench database, created when missing (a fresh machine has only
    /// `postgres`), with every migration applied.
    pub async fn database(&self) -> anyhow::Result<sqlx::PgPool> {
        use sqlx::migrate::MigrateDatabase;
        if !sqlx::Postgres::database_exists(&self.database_url).await? {
            sqlx::Postgres::create_database(&self.database_url)
                .await
                .or_else(|e| match e.as_database_error().and_then(|d| d.code()) {
                    // Another bench created it at the same moment.
                    Some(code) if code == "42P04" => Ok(()),
                    _ => Err(e),
                })?;
        }
        let pg = shared::db::connect_url(&self.database_url, 2).await?;
        shared::db::migrate(&pg).await?;
        Ok(pg)
    }
}
