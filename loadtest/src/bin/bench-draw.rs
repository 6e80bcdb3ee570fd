//! `bench-draw`: how long the draw of N buffered fans takes (default 1,000,000), next to the raw
//! primitive measured in the same run: `redis-cli --pipe` writing N ZADDs.
//!
//! The fans are inserted straight into Postgres first (not timed); then the buffer's own
//! `run_draw` runs: lock, read the entrants, commit the draw, shuffle, and mirror the queue to
//! Redis (pipelined ZADDs, then the count that flags it whole). Uses `DATABASE_URL` / `REDIS_URL` and a Redis key
//! prefix of its own; it deletes what it created.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use chrono::Utc;
use clap::Parser;
use fred::prelude::*;
use shared::ids::EventId;

/// Time the draw of N buffered fans against redis-cli --pipe of N ZADDs.
#[derive(Parser)]
#[command(name = "bench-draw", version)]
struct Args {
    /// Fans in the buffer.
    #[arg(long, default_value_t = 1_000_000)]
    fans: u64,
    #[command(flatten)]
    backends: fairgate_loadtest::bench::Backends,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    shared::telemetry::init_tracing(shared::config::LogFormat::Human);
    let prefix = format!("bench:{}", uuid::Uuid::new_v4().simple());

    let mut config = buffer::Config::parse_from(["buffer"]);
    config.common.database_url = args.backends.database_url.clone();
    config.common.redis_url = args.backends.redis_url.clone();
    config.common.redis_prefix = prefix.clone();
    config.signing.signing_key = Some(hex::encode(shared::token::random_seed()));
    args.backends.database().await?.close().await;
    let state = buffer::connect(config, tokio_util::sync::CancellationToken::new()).await?;

    let now = Utc::now();
    let event: i64 = sqlx::query_scalar(
        "INSERT INTO events (name, starts_at, presale_opens_at, sale_starts_at, sale_ends_at,
             rate_per_minute, max_active, pass_ttl_secs, claim_window_secs, seats_per_fan)
         VALUES ('bench-draw', $1, $2, $3, $4, 60, 10, 600, 60, 2) RETURNING id",
    )
    .bind(now + chrono::Duration::days(30))
    .bind(now - chrono::Duration::hours(1))
    .bind(now + chrono::Duration::days(1))
    .bind(now + chrono::Duration::days(2))
    .fetch_one(&state.pg)
    .await?;
    let event_id = EventId::new(event).context("event id")?;
    println!("inserting {} presale joins (not timed)…", args.fans);
    // In chunks: each statement stays well inside the pool's statement timeout.
    const CHUNK: u64 = 100_000;
    for first in (0..args.fans).step_by(CHUNK as usize) {
        let last = (first + CHUNK).min(args.fans);
        sqlx::query(
            "INSERT INTO joins (ticket_id, event_id, identity, phase)
             SELECT gen_random_uuid(), $1, 'bench:' || g, 'presale'
             FROM generate_series($2, $3) AS g",
        )
        .bind(event)
        .bind(first as i64 + 1)
        .bind(last as i64)
        .execute(&state.pg)
        .await?;
    }
    sqlx::query("ANALYZE joins").execute(&state.pg).await?;

    // The raw primitive, same run: N ZADDs through redis-cli --pipe.
    let pipe_key = format!("{prefix}:pipe");
    let pipe_secs = redis_cli_pipe(&args.backends.redis_url, &pipe_key, args.fans)?;

    let started = Instant::now();
    let drawn = buffer::draw::run_draw(&state, event_id)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let draw_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(drawn == Some(args.fans as usize), "drew {drawn:?}");
    let queued: i64 = state
        .redis
        .client()
        .zcard(state.redis.keys(event_id).queue())
        .await?;
    anyhow::ensure!(queued as u64 == args.fans, "queue holds {queued}");

    let ratio = draw_secs / pipe_secs;
    println!("fans                       {}", args.fans);
    println!("redis-cli --pipe, N ZADDs  {pipe_secs:.2} s");
    println!("fairgate draw (end to end) {draw_secs:.2} s");
    println!("ratio                      {ratio:.2}× (target ≤ 2×)");
    if let Some(path) = &args.json {
        let figures = serde_json::json!({
            "fans": args.fans,
            "redis_cli_pipe_secs": pipe_secs,
            "draw_secs": draw_secs,
            "ratio": ratio,
            "target_ratio": 2.0,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&figures)?)?;
    }

    // Clean up what the bench created.
    let keys = state.redis.keys(event_id);
    let _: i64 = state
        .redis
        .client()
        .del(vec![keys.queue(), keys.tail(), keys.drawn(), pipe_key])
        .await?;
    sqlx::query("DELETE FROM events WHERE id = $1")
        .bind(event)
        .execute(&state.pg)
        .await?;
    Ok(())
}

/// Writes N `ZADD key i member` commands in RESP to redis-cli --pipe and times it.
fn redis_cli_pipe(url: &str, key: &str, n: u64) -> anyhow::Result<f64> {
    let mut payload = Vec::with_capacity(n as usize * 90);
    for i in 1..=n {
        let member = uuid::Uuid::new_v4().to_string();
        let score = i.to_string();
        write!(
            payload,
            "*4\r\n$4\r\nZADD\r\n${}\r\n{key}\r\n${}\r\n{score}\r\n${}\r\n{member}\r\n",
            key.len(),
            score.len(),
            member.len()
        )?;
    }
    let started = Instant::now();
    let mut child = Command::new("redis-cli")
        .args(["-u", url, "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running redis-cli (apt-get install redis-tools)")?;
    child
        .stdin
        .take()
        .context("redis-cli stdin")?
        .write_all(&payload)?;
    let output = child.wait_with_output()?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(output.status.success(), "redis-cli --pipe failed");
    Ok(secs)
}
