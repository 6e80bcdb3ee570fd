//! `crowd`: floods a real fairgate sale with simulated fans and reports what happened.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
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
    /// Share of fans who take the best available seats, the front rows (0.0–1.0): they all
    /// want the same seats.
    #[arg(long, default_value_t = 0.4)]
    best_share: f64,
    /// Share of the places sold as a standing area bought by quantity, and of the fans buying
    /// there (0.0–1.0). The other fans pick specific seats at random.
    #[arg(long, default_value_t = 0.2)]
    general_share: f64,
    /// Share of fans who give up while waiting and never claim their pass (0.0–1.0): their
    /// slot goes to the next fan once the claim window lapses.
    #[arg(long, default_value_t = 0.03)]
    no_claim_share: f64,
    /// Share of fans who hold seats and never pay (0.0–1.0): the seats come back when the hold
    /// expires (the purchase service's FAIRGATE_HOLD_TTL_SECS).
    #[arg(long, default_value_t = 0.02)]
    abandon_share: f64,
    /// Share of fans who send their checkout twice at once and once more afterwards with the
    /// same Idempotency-Key (0.0–1.0): checked to give one order and one charge.
    #[arg(long, default_value_t = 0.05)]
    retry_share: f64,
    /// Seconds an admitted fan has to claim the pass (the event's claim window).
    #[arg(long, default_value_t = 20)]
    claim_window_secs: i64,
    /// Seconds a pass lasts (the event's pass lifetime): a shopper who walks away without
    /// buying keeps a slot under `--max-active` this long.
    #[arg(long, default_value_t = 900)]
    pass_ttl_secs: i64,
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
    organizer_token: Option<String>,
    /// Worker processes the fans are spread over (default: one per 10,000 fans). One process
    /// may hold only ~19,900 open files here, and each waiting fan holds a socket; with more
    /// than one, each worker's connections come from its own loopback address (127.0.0.2, .3,
    /// …), past the ~28,000 ports one address has towards one service. Their figures are
    /// merged into one report.
    #[arg(long)]
    workers: Option<usize>,
    /// (Internal) run as a worker process from this spec file.
    #[arg(long, hide = true)]
    worker: Option<PathBuf>,
    /// The organizer site's identity secret (the buffer's FAIRGATE_IDENTITY_SECRET): each fan
    /// then joins under an identity of its own, so a retried join keeps its place.
    #[arg(long, env = "FAIRGATE_IDENTITY_SECRET", hide_env_values = true)]
    identity_secret: Option<String>,
    /// Seconds a fan's page keeps retrying what says "try again" (503 and 429 after their
    /// Retry-After), a service out of reach (on the next instance of a comma-separated
    /// list) and a dropped waiting-room socket; 0: never (every such answer is an error).
    #[arg(long, default_value_t = 30)]
    patience_secs: u64,
    /// Create the event with autotune on: admission follows the shop's measured health,
    /// starting from `--rate-per-minute` and `--max-active`, within the bounds below.
    #[arg(long)]
    autotune: bool,
    /// Autotune's target: hold and checkout p99 at most this many milliseconds.
    #[arg(long, default_value_t = 500)]
    autotune_target_ms: i32,
    /// Autotune's target share of failed (5xx) pass holders' requests.
    #[arg(long, default_value_t = 0.001)]
    autotune_error_rate: f64,
    /// Autotune's floor for the cap on active shoppers.
    #[arg(long, default_value_t = 50)]
    autotune_cap_floor: i32,
    /// Autotune's ceiling for the cap (default: the starting cap).
    #[arg(long)]
    autotune_cap_ceiling: Option<i32>,
    /// Autotune's floor for the admission rate per minute.
    #[arg(long, default_value_t = 60)]
    autotune_rate_floor: i32,
    /// Autotune's ceiling for the rate (default: the starting rate).
    #[arg(long)]
    autotune_rate_ceiling: Option<i32>,
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
    if let Some(spec) = &args.worker {
        return workers::work(spec).await;
    }
    anyhow::ensure!(args.fans > 0, "--fans must be positive");
    anyhow::ensure!(args.seats > 0, "--seats must be positive");
    let organizer_token = args
        .organizer_token
        .clone()
        .context("--organizer-token (or FAIRGATE_ORGANIZER_TOKEN) is required")?;
    let workers = args
        .workers
        .unwrap_or_else(|| args.fans.div_ceil(10_000))
        .clamp(1, 200);
    let config = CrowdConfig {
        endpoints: Endpoints {
            buffer: args.buffer_url.trim_end_matches('/').to_owned(),
            queue: args.queue_url.trim_end_matches('/').to_owned(),
            purchase: args.purchase_url.trim_end_matches('/').to_owned(),
        },
        organizer_token,
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
        best_share: args.best_share.clamp(0.0, 1.0),
        general_share: args.general_share.clamp(0.0, 0.9),
        no_claim_share: args.no_claim_share.clamp(0.0, 1.0),
        abandon_share: args.abandon_share.clamp(0.0, 1.0),
        retry_share: args.retry_share.clamp(0.0, 1.0),
        claim_window_secs: args.claim_window_secs.clamp(10, 86_400),
        pass_ttl_secs: args.pass_ttl_secs.clamp(60, 86_400),
        fan_timeout: Duration::from_secs(args.fan_timeout_secs),
        progress: !args.quiet,
        identity_secret: args.identity_secret,
        patience: Duration::from_secs(args.patience_secs),
        autotune: None,
    };
    let mut config = config;
    if args.autotune {
        let ceiling = |v: i64| v.clamp(1, 1_000_000) as i32;
        let cap_ceiling = args
            .autotune_cap_ceiling
            .unwrap_or(ceiling(config.max_active));
        let rate_ceiling = args
            .autotune_rate_ceiling
            .unwrap_or(ceiling(config.rate_per_minute));
        config.autotune = Some(fairgate_loadtest::crowd::AutotuneSpec {
            target_p99_ms: args.autotune_target_ms,
            target_error_rate: args.autotune_error_rate,
            rate_floor: args.autotune_rate_floor.min(rate_ceiling),
            rate_ceiling,
            cap_floor: args.autotune_cap_floor.min(cap_ceiling),
            cap_ceiling,
        });
    }
    let endpoints = config.endpoints.clone();
    let report = if workers > 1 {
        workers::run(config, workers).await?
    } else {
        crowd::run(config).await?
    };
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

mod workers {
    //! The crowd spread over worker processes: the parent creates the event and starts one
    //! worker per share of the fans (this same binary, `--worker SPEC`), each from its own
    //! loopback address; workers write their progress every half second and their fans'
    //! outcomes at the end; the parent shows the summed progress and reports on all of them.

    use std::net::Ipv4Addr;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::Context;
    use fairgate_loadtest::client::Client;
    use fairgate_loadtest::crowd::{self, CrowdConfig, FanResult, Progress, ProgressCounts};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    struct Spec {
        config: CrowdConfig,
        event: i64,
        first: usize,
        end: usize,
        start_ms: u64,
        source: Option<Ipv4Addr>,
    }

    fn with_ext(spec: &Path, ext: &str) -> PathBuf {
        spec.with_extension(ext)
    }

    /// Writes `value` as JSON to `path` atomically (the parent may be reading it).
    fn publish<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
        let partial = path.with_extension("partial");
        std::fs::write(&partial, serde_json::to_vec(value)?)?;
        std::fs::rename(&partial, path)?;
        Ok(())
    }

    pub async fn run(config: CrowdConfig, workers: usize) -> anyhow::Result<crowd::Report> {
        let client = Client::new(config.endpoints.clone())?.patient(config.patience);
        let event = crowd::create(&client, &config).await?;
        let start_ms = crowd::epoch_ms();
        let dir =
            std::env::temp_dir().join(format!("fairgate-crowd-{}-{event}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let per = config.fans.div_ceil(workers);
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        let mut specs = Vec::new();
        for w in 0..workers {
            let (first, end) = (w * per, ((w + 1) * per).min(config.fans));
            if first >= end {
                break;
            }
            let mut worker_config = config.clone();
            worker_config.organizer_token = String::new();
            worker_config.database_url = None;
            worker_config.progress = false;
            let spec = Spec {
                config: worker_config,
                event,
                first,
                end,
                start_ms,
                source: Some(Ipv4Addr::new(127, 0, 0, 2 + w as u8)),
            };
            let path = dir.join(format!("worker-{w}.json"));
            std::fs::write(&path, serde_json::to_vec(&spec)?)?;
            let child = tokio::process::Command::new(&exe)
                .arg("--worker")
                .arg(&path)
                .env_remove("FAIRGATE_ORGANIZER_TOKEN")
                .env_remove("DATABASE_URL")
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting worker {w}"))?;
            children.push(child);
            specs.push(path);
        }
        let bar = crowd::progress_bar(&config);
        let mut running = children.len();
        let mut failed = Vec::new();
        while running > 0 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            running = 0;
            for (w, child) in children.iter_mut().enumerate() {
                match child.try_wait()? {
                    None => running += 1,
                    Some(status) if !status.success() && !failed.contains(&w) => failed.push(w),
                    Some(_) => {}
                }
            }
            let total = specs
                .iter()
                .filter_map(|s| std::fs::read(with_ext(s, "progress")).ok())
                .filter_map(|b| serde_json::from_slice::<ProgressCounts>(&b).ok())
                .fold(ProgressCounts::default(), ProgressCounts::plus);
            bar.set_position(total.done as u64);
            bar.set_message(format!(
                "{} · workers running {running}",
                total.line(config.seats)
            ));
        }
        bar.finish_and_clear();
        anyhow::ensure!(
            failed.is_empty(),
            "worker(s) {failed:?} failed (see their errors above)"
        );
        let mut results: Vec<FanResult> = Vec::with_capacity(config.fans);
        for spec in &specs {
            let bytes = std::fs::read(with_ext(spec, "results"))
                .with_context(|| format!("reading {}", with_ext(spec, "results").display()))?;
            results.extend(serde_json::from_slice::<Vec<FanResult>>(&bytes)?);
        }
        let _ = std::fs::remove_dir_all(&dir);
        let wall_secs = crowd::instant_of(start_ms).elapsed().as_secs_f64();
        crowd::report(&client, &config, event, results, wall_secs).await
    }

    /// A worker: runs its share of the fans, publishing progress, then writes their outcomes.
    pub async fn work(spec_path: &Path) -> anyhow::Result<()> {
        let spec: Spec = serde_json::from_slice(&std::fs::read(spec_path)?)?;
        let client = Client::from_source(spec.config.endpoints.clone(), spec.source)?
            .patient(spec.config.patience);
        let progress = Arc::new(Progress::default());
        let reporter = {
            let (progress, path) = (progress.clone(), with_ext(spec_path, "progress"));
            tokio::spawn(async move {
                loop {
                    let _ = publish(&path, &progress.snapshot());
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        };
        let results = crowd::run_fans(
            &client,
            &spec.config,
            spec.event,
            spec.first..spec.end,
            spec.start_ms,
            &progress,
        )
        .await?;
        reporter.abort();
        publish(&with_ext(spec_path, "progress"), &progress.snapshot())?;
        publish(&with_ext(spec_path, "results"), &results)
    }
}

fn print_summary(r: &crowd::Report) {
    println!("== crowd report: event {} ==", r.event_id);
    println!(
        "fans {}  joined {}  admitted {}  bought {}  declined {}  sold-out {}  errors {}",
        r.fans, r.joined, r.admitted, r.bought, r.declined, r.sold_out, r.errors
    );
    println!("seats {}  sold {}", r.seats, r.seats_sold);
    println!(
        "retries absorbed by the fans' pages {}  catching-up statuses {}  told places were short {} (gave up {})",
        r.transient_retries, r.catching_up_statuses, r.told_places_short, r.gave_up_places_short
    );
    println!(
        "joined after the draw {}  left the line {}  misbehaving {}",
        r.live_arrivals, r.left, r.misbehaving
    );
    println!(
        "bought best available {}  specific seats {}  standing {}",
        r.bought_best_available, r.bought_specific, r.bought_standing
    );
    println!(
        "never claimed their pass {}  let their hold expire {}  retried checkout {}",
        r.no_shows, r.abandoned_holds, r.retried_checkouts
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
