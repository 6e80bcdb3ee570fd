//! `crowd`: floods a real fairgate sale with simulated fans and reports what happened.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use fairgate_loadtest::client::Endpoints;
use fairgate_loadtest::crowd::{self, CrowdConfig};

/// Simulate a crowd of fans buying tickets through the three fairgate services, then check
/// that the sale was whole (nothing sold or charged twice) and fair (the draw verifies).
#[derive(Debug, Parser)]
#[command(name = "crowd", version)]
struct Args {
    /// Number of simulated fans.
    #[arg(long, default_value_t = 200)]
    fans: usize,
    /// Seats in the event the crowd creates.
    #[arg(long, default_value_t = 150)]
    seats: i64,
    /// Seconds of presale before the draw; fans arrive during the first 80% of it.
    #[arg(long, default_value_t = 5)]
    presale_secs: u64,
    /// Admission rate per minute (default: the whole crowd in about 20 seconds).
    #[arg(long)]
    rate_per_minute: Option<i64>,
    /// Most active shoppers at once (default: no practical cap).
    #[arg(long)]
    max_active: Option<i64>,
    /// Each fan wants between 1 and this many seats.
    #[arg(long, default_value_t = 2)]
    seats_per_fan: i64,
    /// Share of fans whose card is declined (0.0–1.0).
    #[arg(long, default_value_t = 0.05)]
    decline_share: f64,
    /// Share of fans who arrive after the draw, spread over `--late-secs` (0.0–1.0): they join
    /// the back of the line, and the report checks they were placed in arrival order.
    #[arg(long, default_value_t = 0.1)]
    late_share: f64,
    /// Seconds after the draw over which late fans arrive.
    #[arg(long, default_value_t = 4)]
    late_secs: u64,
    /// Share of fans who leave the line right after joining (0.0–1.0).
    #[arg(long, default_value_t = 0.02)]
    leave_share: f64,
    /// Share of misbehaving fans (0.0–1.0): each joins again from two more tabs at once (must
    /// get the same place) and presents a forged pass (must be refused).
    #[arg(long, default_value_t = 0.05)]
    misbehave_share: f64,
    /// Give up on a fan that has not finished after this many seconds.
    #[arg(long, default_value_t = 300)]
    fan_timeout_secs: u64,
    /// Buffer service URL.
    #[arg(
        long,
        env = "FAIRGATE_BUFFER_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    buffer_url: String,
    /// Queue service URL.
    #[arg(
        long,
        env = "FAIRGATE_QUEUE_URL",
        default_value = "http://127.0.0.1:8082"
    )]
    queue_url: String,
    /// Purchase service URL.
    #[arg(
        long,
        env = "FAIRGATE_PURCHASE_URL",
        default_value = "http://127.0.0.1:8083"
    )]
    purchase_url: String,
    /// Organizer API token of the purchase service.
    #[arg(long, env = "FAIRGATE_ORGANIZER_TOKEN", hide_env_values = true)]
    organizer_token: String,
    /// Postgres URL, to check the invariants after the sale (skipped if unset).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a self-contained HTML report with charts (queue length, admissions per second,
    /// latencies over time) to this file.
    #[arg(long)]
    html: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// After the sale, join one more fan and print the link to their waiting page.
    #[arg(long)]
    spectator: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.fans > 0, "--fans must be positive");
    anyhow::ensure!(args.seats > 0, "--seats must be positive");
    // One process holds at most ~19,900 sockets here; each waiting fan holds one.
    anyhow::ensure!(
        args.fans <= 15_000,
        "--fans above 15000 needs several worker processes (not supported yet)"
    );
    let config = CrowdConfig {
        endpoints: Endpoints {
            buffer: args.buffer_url.trim_end_matches('/').to_owned(),
            queue: args.queue_url.trim_end_matches('/').to_owned(),
            purchase: args.purchase_url.trim_end_matches('/').to_owned(),
        },
        organizer_token: args.organizer_token,
        database_url: args.database_url,
        fans: args.fans,
        seats: args.seats,
        presale_secs: args.presale_secs.max(1),
        rate_per_minute: args
            .rate_per_minute
            .unwrap_or_else(|| (args.fans as i64 * 3).max(60)),
        max_active: args.max_active.unwrap_or(args.fans as i64 + 1),
        seats_per_fan: args.seats_per_fan.clamp(1, 20),
        decline_share: args.decline_share.clamp(0.0, 1.0),
        late_share: args.late_share.clamp(0.0, 1.0),
        late_secs: args.late_secs,
        leave_share: args.leave_share.clamp(0.0, 1.0),
        misbehave_share: args.misbehave_share.clamp(0.0, 1.0),
        fan_timeout: Duration::from_secs(args.fan_timeout_secs),
        progress: !args.quiet,
    };
    let endpoints = config.endpoints.clone();
    let report = crowd::run(config).await?;
    print_summary(&report);
    if args.spectator {
        let client = fairgate_loadtest::client::Client::new(endpoints.clone())?;
        match client.join(report.event_id, None).await {
            Ok(joined) => println!(
                "your own place in the line: {}/e/{}?ticket={}",
                endpoints.queue, report.event_id, joined.ticket
            ),
            Err(e) => println!("no place left for you to watch: {e:#}"),
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        println!("figures written to {}", path.display());
    }
    if let Some(path) = &args.html {
        std::fs::write(path, fairgate_loadtest::html::render(&report)?)?;
        println!("report written to {}", path.display());
    }
    if !report.ok {
        anyhow::bail!("an invariant failed: see the report above");
    }
    Ok(())
}

fn print_summary(r: &crowd::Report) {
    println!("== crowd report: event {} ==", r.event_id);
    println!(
        "fans {}  joined {}  admitted {}  bought {}  declined {}  sold-out {}  errors {}",
        r.fans, r.joined, r.admitted, r.bought, r.declined, r.sold_out, r.errors
    );
    println!("seats {}  sold {}", r.seats, r.seats_sold);
    println!(
        "joined after the draw {}  left the line {}  misbehaving {}",
        r.live_arrivals, r.left, r.misbehaving
    );
    println!(
        "admission rate: configured {}/min, achieved {:.0}/min",
        r.configured_rate_per_minute, r.achieved_rate_per_minute
    );
    for (step, p) in &r.latency_ms {
        println!(
            "{step:>9}: n={:<6} p50 {:>8.1} ms  p90 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms",
            p.count, p.p50, p.p90, p.p99, p.max
        );
    }
    match r.spearman_presale {
        Some(rho) => println!("fairness: Spearman(presale arrival, position) = {rho:+.3}"),
        None => println!("fairness: too few presale fans to correlate"),
    }
    for sample in &r.error_samples {
        println!("error sample: {sample}");
    }
    for (name, holds) in &r.invariants {
        println!("  [{}] {name}", if *holds { "ok" } else { "FAILED" });
    }
    println!(
        "wall time {:.1} s; overall {}",
        r.wall_secs,
        if r.ok { "OK" } else { "FAILED" }
    );
}
