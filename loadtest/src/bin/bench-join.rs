//! `bench-join`: joins per second accepted by a real buffer process (HTTP, Redis, durable record
//! in Postgres), next to two primitives measured in the same run with the same load generator:
//! a bare axum handler doing one Redis call, and `redis-benchmark`'s ZADD. The brief's target:
//! the buffer reaches at least 50% of the bare handler.
//!
//! The buffer and the bare handler run as separate processes (this binary started again with
//! `--serve-bare`), so the load generator does not share their runtime.
//!
//! Each round loads both targets at every `--concurrency` level. The headline ratio compares
//! capacities: the most joins per second the buffer accepted at any level over the most the bare
//! handler served at any level. The two peak at different levels: the bare handler fills both
//! cores with a hundred requests in flight, while a join is answered only after the group commit
//! that holds it, so it needs more joins in flight to fill its batches (at 128 in flight it is
//! bound by commit latency, with CPU to spare). The ratio at each level is printed as well.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use axum::routing::post;
use chrono::Utc;
use clap::Parser;
use fairgate_loadtest::bench::{latencies, ms, wait_ready, Guard};
use fred::prelude::*;

/// Measure join throughput against the raw primitives, same run.
#[derive(Parser)]
#[command(name = "bench-join", version)]
struct Args {
    /// Joins to send to each target.
    #[arg(long, default_value_t = 100_000)]
    requests: u64,
    /// Rounds, each the bare handler then the buffer: the figures are the medians (the
    /// machine's speed drifts by ±10% between runs, so one round can mislead).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Requests in flight at once: each level is measured, for both targets, in every round.
    #[arg(long, value_delimiter = ',', default_values_t = [128, 512])]
    concurrency: Vec<usize>,
    #[command(flatten)]
    backends: fairgate_loadtest::bench::Backends,
    /// Port of the buffer process the bench starts.
    #[arg(long, default_value_t = 18081)]
    buffer_port: u16,
    /// Port of the bare axum handler the bench starts.
    #[arg(long, default_value_t = 18090)]
    bare_port: u16,
    /// Join after the draw (live arrivals, each given its place at the back) instead of during
    /// presale.
    #[arg(long)]
    live: bool,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Internal: serve the bare handler on this address (one Redis INCR per request).
    #[arg(long, hide = true)]
    serve_bare: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(addr) = args.serve_bare {
        return serve_bare(addr, &args.backends.redis_url).await;
    }
    let prefix = format!("bench:{}", uuid::Uuid::new_v4().simple());
    let pg = args.backends.database().await?;
    let now = Utc::now();
    // Live: the sale started a second ago, so the buffer draws it (nobody in presale) at once
    // and every join is a live arrival placed at the back.
    let sale_starts = if args.live {
        now - chrono::Duration::seconds(1)
    } else {
        now + chrono::Duration::days(1)
    };
    let event: i64 = sqlx::query_scalar(
        "INSERT INTO events (name, starts_at, presale_opens_at, sale_starts_at, sale_ends_at,
             rate_per_minute, max_active, pass_ttl_secs, claim_window_secs, seats_per_fan)
         VALUES ('bench-join', $1, $2, $3, $4, 60, 10, 600, 60, 2) RETURNING id",
    )
    .bind(now + chrono::Duration::days(30))
    .bind(now - chrono::Duration::minutes(1))
    .bind(sale_starts)
    .bind(now + chrono::Duration::days(2))
    .fetch_one(&pg)
    .await?;

    let redis_rps = redis_benchmark_zadd(&args.backends.redis_url, args.requests)?;

    let exe = std::env::current_exe()?;
    let bare_addr = format!("127.0.0.1:{}", args.bare_port);
    let bare = Guard(
        Command::new(&exe)
            .args([
                "--serve-bare",
                &bare_addr,
                "--redis-url",
                &args.backends.redis_url,
            ])
            .stdout(Stdio::null())
            .spawn()?,
    );
    let buffer_exe = exe.with_file_name("buffer");
    let buffer_addr = format!("127.0.0.1:{}", args.buffer_port);
    let buffer = Guard(
        Command::new(&buffer_exe)
            .env("FAIRGATE_BUFFER_BIND", &buffer_addr)
            .env("DATABASE_URL", &args.backends.database_url)
            .env("REDIS_URL", &args.backends.redis_url)
            .env("FAIRGATE_REDIS_PREFIX", &prefix)
            .env(
                "FAIRGATE_SIGNING_KEY",
                hex::encode(shared::token::random_seed()),
            )
            .env("FAIRGATE_JOIN_LIMIT_PER_IP", "0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (cargo build --release first)",
                    buffer_exe.display()
                )
            })?,
    );
    anyhow::ensure!(
        !args.concurrency.is_empty() && !args.concurrency.contains(&0),
        "--concurrency needs levels of at least 1"
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency.iter().copied().max().unwrap_or(128))
        .build()?;
    wait_ready(&http, &format!("http://{bare_addr}/healthz")).await?;
    wait_ready(&http, &format!("http://{buffer_addr}/readyz")).await?;
    if args.live {
        let mut drawn = false;
        for _ in 0..200 {
            drawn = sqlx::query_scalar::<_, bool>(
                "SELECT COALESCE((SELECT drawn_at IS NOT NULL FROM draws WHERE event_id = $1), false)",
            )
            .bind(event)
            .fetch_one(&pg)
            .await?;
            if drawn {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        anyhow::ensure!(drawn, "the buffer did not draw the live event");
    }

    let mut rounds: Vec<Round> = Vec::new();
    for _ in 0..args.rounds.max(1) {
        let mut levels = Vec::new();
        for &concurrency in &args.concurrency {
            // Autovacuum visits the joins table after a round of inserts; the next load starts
            // once it is done, so it never runs beside the bare handler only.
            quiet_postgres(&pg).await?;
            let bare_run = load(
                &http,
                &format!("http://{bare_addr}/join"),
                args.requests,
                concurrency,
            )
            .await;
            let join_run = load(
                &http,
                &format!("http://{buffer_addr}/api/v1/events/{event}/join"),
                args.requests,
                concurrency,
            )
            .await;
            println!(
                "round {} at {concurrency:>5} in flight: bare {:>7.0} /s, join {:>7.0} /s, ratio {:.2}",
                rounds.len() + 1,
                bare_run.rps,
                join_run.rps,
                join_run.rps / bare_run.rps
            );
            levels.push(Level {
                concurrency,
                bare: bare_run,
                join: join_run,
            });
        }
        let round = Round { levels };
        println!(
            "round {}: capacity ratio {:.2} (join's best over bare's best)",
            rounds.len() + 1,
            round.capacity_ratio()
        );
        rounds.push(round);
    }
    drop(buffer);
    drop(bare);

    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM joins WHERE event_id = $1")
        .bind(event)
        .fetch_one(&pg)
        .await?;
    let join_errors: u64 = rounds
        .iter()
        .flat_map(|r| &r.levels)
        .map(|l| l.join.errors)
        .sum();
    let ratios: Vec<f64> = rounds.iter().map(Round::capacity_ratio).collect();
    let ratio = median(&ratios);
    let round = median_round(&rounds);
    println!(
        "requests per target        {} per level × {} rounds; figures of the median round",
        args.requests,
        rounds.len(),
    );
    println!("redis-benchmark ZADD       {redis_rps:>9.0} /s");
    for level in &round.levels {
        println!(
            "{:>5} in flight: bare axum + 1 Redis call {:>7.0} /s (p50 {:.2} ms, p99 {:.2} ms, errors {}); \
             join (durable) {:>7.0} /s (p50 {:.2} ms, p99 {:.2} ms, errors {}); ratio {:.2}",
            level.concurrency,
            level.bare.rps,
            level.bare.p50_ms,
            level.bare.p99_ms,
            level.bare.errors,
            level.join.rps,
            level.join.p50_ms,
            level.join.p99_ms,
            level.join.errors,
            level.join.rps / level.bare.rps,
        );
    }
    let (bare_best, join_best) = (round.best(|l| &l.bare), round.best(|l| &l.join));
    println!(
        "capacity: bare {:.0} /s at {} in flight, join {:.0} /s at {} in flight",
        bare_best.bare.rps, bare_best.concurrency, join_best.join.rps, join_best.concurrency
    );
    println!(
        "joins stored in Postgres   {stored}{}",
        if args.live { " (live arrivals)" } else { "" }
    );
    println!(
        "capacity ratio join / bare {ratio:.2} median of {:?} (target ≥ 0.50)",
        ratios
            .iter()
            .map(|r| (r * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&serde_json::json!({
                "requests": args.requests,
                "concurrency": args.concurrency,
                "rounds": rounds.iter().map(|r| serde_json::json!({
                    "capacity_ratio": r.capacity_ratio(),
                    "levels": r.levels.iter().map(|l| serde_json::json!({
                        "concurrency": l.concurrency,
                        "bare_axum_redis_rps": l.bare.rps,
                        "join_rps": l.join.rps,
                        "join_p50_ms": l.join.p50_ms,
                        "join_p99_ms": l.join.p99_ms,
                        "ratio": l.join.rps / l.bare.rps,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "redis_benchmark_zadd_rps": redis_rps,
                "bare_axum_redis_rps": bare_best.bare.rps,
                "join_rps": join_best.join.rps,
                "join_errors": join_errors,
                "joins_stored": stored,
                "ratio": ratio,
                "target_ratio": 0.5,
            }))?,
        )?;
    }
    sqlx::query("DELETE FROM events WHERE id = $1")
        .bind(event)
        .execute(&pg)
        .await?;
    let client = Builder::from_config(Config::from_url(&args.backends.redis_url)?).build()?;
    client.init().await?;
    let _: i64 = client.del("bench:bare:counter").await?;
    anyhow::ensure!(
        stored as u64
            == args.requests * (rounds.len() * args.concurrency.len()) as u64 - join_errors,
        "a join was lost"
    );
    Ok(())
}

/// Waits (at most a minute) until no autovacuum worker is running.
async fn quiet_postgres(pg: &sqlx::PgPool) -> anyhow::Result<()> {
    for _ in 0..600 {
        let busy: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'",
        )
        .fetch_one(pg)
        .await?;
        if busy == 0 {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The round whose capacity ratio is the median one.
fn median_round(rounds: &[Round]) -> &Round {
    let mut order: Vec<&Round> = rounds.iter().collect();
    order.sort_by(|a, b| a.capacity_ratio().total_cmp(&b.capacity_ratio()));
    order[order.len() / 2]
}

/// Both targets at one level of requests in flight.
struct Level {
    concurrency: usize,
    bare: Run,
    join: Run,
}

/// Every level of one round.
struct Round {
    levels: Vec<Level>,
}

impl Round {
    /// The level where `target` served the most requests per second.
    fn best(&self, target: impl Fn(&Level) -> &Run) -> &Level {
        self.levels
            .iter()
            .max_by(|a, b| target(a).rps.total_cmp(&target(b).rps))
            .expect("a round measures at least one level")
    }

    /// The buffer's best over the bare handler's best.
    fn capacity_ratio(&self) -> f64 {
        self.best(|l| &l.join).join.rps / self.best(|l| &l.bare).bare.rps
    }
}

struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

async fn load(http: &reqwest::Client, url: &str, requests: u64, concurrency: usize) -> Run {
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (http, url, next, errors) =
            (http.clone(), url.to_owned(), next.clone(), errors.clone());
        workers.spawn(async move {
            let mut h = latencies();
            while next.fetch_add(1, Ordering::Relaxed) < requests {
                let t = Instant::now();
                let ok = match http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body("{}")
                    .send()
                    .await
                {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                let _ = h.record(t.elapsed().as_micros().max(1) as u64);
            }
            h
        });
    }
    let mut all = latencies();
    while let Some(Ok(h)) = workers.join_next().await {
        let _ = all.add(&h);
    }
    Run {
        rps: requests as f64 / started.elapsed().as_secs_f64(),
        p50_ms: ms(&all, 0.5),
        p99_ms: ms(&all, 0.99),
        errors: errors.load(Ordering::Relaxed),
    }
}

fn redis_benchmark_zadd(url: &str, requests: u64) -> anyhow::Result<f64> {
    let config = Config::from_url(url)?;
    let (host, port) = match &config.server {
        ServerConfig::Centralized { server } => (server.host.to_string(), server.port),
        _ => anyhow::bail!("redis-benchmark needs a single Redis server"),
    };
    let output = Command::new("redis-benchmark")
        .args([
            "-h",
            &host,
            "-p",
            &port.to_string(),
            "-t",
            "zadd",
            "-c",
            "50",
            "-q",
        ])
        .args(["-n", &requests.to_string()])
        .output()
        .context("running redis-benchmark (apt-get install redis-tools)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    // e.g. "ZADD: 123456.79 requests per second, p50=0.199 msec"
    let line = text
        .split(['\r', '\n'])
        .rfind(|l| l.contains("ZADD:"))
        .context("no ZADD line from redis-benchmark")?;
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .context("unreadable redis-benchmark output")
}

async fn serve_bare(addr: std::net::SocketAddr, redis_url: &str) -> anyhow::Result<()> {
    let client = Builder::from_config(Config::from_url(redis_url)?).build_pool(4)?;
    client.init().await?;
    let app = axum::Router::new()
        .route(
            "/join",
            post(move || {
                let client = client.clone();
                async move {
                    let n: i64 = client.incr("bench:bare:counter").await.unwrap_or(0);
                    axum::Json(serde_json::json!({ "n": n }))
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
