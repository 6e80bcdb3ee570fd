//! `chaos`: a real crowd sale while faults hit fairgate, then the proof that nothing
//! acknowledged was lost or given twice.
//!
//! It starts its own Redis (keeping nothing on disk, so a restart is empty) and the services as
//! processes of their own — two buffers, two queue instances, one purchase — on a database of
//! its own, points a patient crowd (fans with identities whose pages retry 503s, move to the
//! other instance and reopen dropped sockets) at both instances of each, and injects on a
//! schedule around the draw, then at random:
//!
//! * an event's Redis keys deleted again and again during the draw's publication, during the
//!   rebuild after a Redis restart, and under live joins through both buffers;
//! * a buffer SIGKILLed a moment after the draw's start (restarted a little later);
//! * Redis SIGKILLed and restarted empty, twice in a row (a restart, then a failover);
//! * the admission leader SIGSTOPped past its lease, then woken;
//! * Postgres restarted in immediate mode while fans check out (`--pg-restart-command`, e.g. a
//!   private instance's `pg_ctl restart -m immediate`, as `scripts/chaos.sh` gives it).
//!
//! Meanwhile it watches Postgres and Redis every 50 ms, and at the end checks the crowd's
//! invariants plus its own against both; any failure makes the exit status non-zero.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Parser;
use fairgate_loadtest::client::{Client, Endpoints};
use fairgate_loadtest::crowd::{self, CrowdConfig, Progress};
use fred::prelude::*;
use fred::types::scripts::Script;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Run a crowd sale under injected faults and check every invariant afterwards.
#[derive(Debug, Parser)]
#[command(name = "chaos", version)]
struct Args {
    /// Simulated fans.
    #[arg(long, default_value_t = 2_000)]
    fans: usize,
    /// Places for sale.
    #[arg(long, default_value_t = 1_000)]
    seats: i64,
    /// Seconds of presale before the draw.
    #[arg(long, default_value_t = 12)]
    presale_secs: u64,
    /// Seconds after the draw over which late fans (a quarter of the crowd) arrive.
    #[arg(long, default_value_t = 12)]
    late_secs: u64,
    /// Admissions per minute.
    #[arg(long, default_value_t = 3_000)]
    rate_per_minute: i64,
    /// Most shoppers at once.
    #[arg(long, default_value_t = 150)]
    max_active: i64,
    /// Faults at random moments after the scheduled ones.
    #[arg(long, default_value_t = 4)]
    random_faults: usize,
    /// Seed of the random faults (printed, to replay a run).
    #[arg(long)]
    seed: Option<u64>,
    /// A small, short run (the test suite's smoke): 300 fans, 150 places, no random faults.
    #[arg(long)]
    smoke: bool,
    /// Where the service binaries are (`cargo build --release` puts them in target/release).
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Postgres server to use (a database of the run's own is created on it and dropped after).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Shell command restarting that Postgres in immediate mode (no restart fault without it).
    #[arg(long)]
    pg_restart_command: Option<String>,
    /// Port of the run's own Redis.
    #[arg(long, default_value_t = 16390)]
    redis_port: u16,
    /// First of the five ports the services listen on.
    #[arg(long, default_value_t = 18180)]
    base_port: u16,
    /// Directory for the services' logs and the report.
    #[arg(long, default_value = "loadtest/out/chaos")]
    out: PathBuf,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Reads the mirror atomically: whole flag, members at positions 1..N, members in all.
static WATCH: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::from_lua(
        r#"
return {redis.call('EXISTS', KEYS[2]), redis.call('ZCOUNT', KEYS[1], 1, ARGV[1]),
        redis.call('ZCARD', KEYS[1])}
"#,
    )
});

/// A process the run starts, kills, stops and restarts.
struct Proc {
    name: String,
    command: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.command[0]))?;
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal("-CONT");
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            for _ in 0..50 {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Everything the run started.
struct Rig {
    redis: Proc,
    buffers: Vec<Proc>,
    queues: Vec<Proc>,
    purchase: Proc,
    pg_restart: Option<String>,
}

/// What happened, when (seconds from the draw), for the report.
#[derive(Clone, Debug, Serialize)]
struct Fault {
    at_secs: f64,
    what: String,
}

/// What the watcher saw going wrong while the run went on.
#[derive(Default, Debug, Serialize)]
struct Watched {
    samples: u64,
    highest_head: i64,
    highest_active: i64,
    head_went_back: Vec<String>,
    cap_exceeded: Vec<String>,
    whole_flag_over_missing_places: Vec<String>,
}

#[derive(Serialize)]
struct ChaosReport {
    seed: u64,
    event_id: i64,
    faults: Vec<Fault>,
    watched: Watched,
    checks: std::collections::BTreeMap<String, bool>,
    crowd: crowd::Report,
    ok: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.fans = 300;
        args.seats = 150;
        args.presale_secs = 6;
        args.late_secs = 10;
        args.rate_per_minute = 3_000;
        args.max_active = 60;
        args.random_faults = 0;
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    std::fs::create_dir_all(&args.out)?;
    let tag = format!("chaos{}", Utc::now().timestamp_millis());
    let admin = args.database_url.clone();
    let database_url = create_database(&admin, &tag).await?;
    let outcome = run(&args, seed, &tag, &database_url).await;
    drop_database(&admin, &tag).await;
    let report = outcome?;
    print(&report);
    let json = serde_json::to_vec_pretty(&report)?;
    std::fs::write(args.out.join("report.json"), &json)?;
    if let Some(path) = &args.json {
        std::fs::write(path, &json)?;
    }
    if !report.ok {
        anyhow::bail!("chaos: invariants FAILED (see above)");
    }
    Ok(())
}

async fn run(args: &Args, seed: u64, tag: &str, database_url: &str) -> anyhow::Result<ChaosReport> {
    let rig = Arc::new(tokio::sync::Mutex::new(start_rig(args, tag, database_url)?));
    let http = reqwest::Client::new();
    for (i, port) in (1..=5).map(|i| (i, args.base_port + i)) {
        let url = format!("http://127.0.0.1:{port}/readyz");
        fairgate_loadtest::bench::wait_ready(&http, &url)
            .await
            .with_context(|| format!("service {i} (logs in {})", args.out.display()))?;
    }
    let url = |i: u16| format!("http://127.0.0.1:{}", args.base_port + i);
    let endpoints = Endpoints {
        buffer: format!("{},{}", url(1), url(2)),
        queue: format!("{},{}", url(3), url(4)),
        purchase: url(5),
    };
    let config = CrowdConfig {
        endpoints: endpoints.clone(),
        organizer_token: ORGANIZER.into(),
        database_url: Some(database_url.to_owned()),
        fans: args.fans,
        seats: args.seats,
        presale_secs: args.presale_secs,
        rate_per_minute: args.rate_per_minute,
        max_active: args.max_active,
        seats_per_fan: 2,
        decline_share: 0.05,
        late_share: 0.25,
        late_secs: args.late_secs,
        leave_share: 0.02,
        misbehave_share: 0.03,
        best_share: 0.3,
        general_share: 0.2,
        no_claim_share: 0.03,
        abandon_share: 0.02,
        retry_share: 0.05,
        claim_window_secs: 60,
        pass_ttl_secs: 300,
        fan_timeout: Duration::from_secs(600),
        progress: false,
        identity_secret: Some(IDENTITY_SECRET.into()),
        patience: Duration::from_secs(90),
        autotune: None,
    };
    let client = Client::new(endpoints)?.patient(config.patience);
    let event = crowd::create(&client, &config).await?;
    let pg = shared::db::connect_url(database_url, 3).await?;
    let draw_at: DateTime<Utc> =
        sqlx::query_scalar("SELECT sale_starts_at FROM events WHERE id = $1")
            .bind(event)
            .fetch_one(&pg)
            .await?;
    let draw = Instant::now() + (draw_at - Utc::now()).to_std().unwrap_or_default();
    let redis = redis_client(args.redis_port).await?;
    let keys = shared::redis::EventKeys::new(tag, shared::ids::EventId::new(event).context("id")?);
    let stop = CancellationToken::new();
    let watched = Arc::new(Mutex::new(Watched::default()));
    let watcher = tokio::spawn(watch(
        pg.clone(),
        redis.clone(),
        keys.clone(),
        event,
        watched.clone(),
        stop.clone(),
    ));

    let start = crowd::epoch_ms();
    let progress = Arc::new(Progress::default());
    let faults: Arc<Mutex<Vec<Fault>>> = Arc::default();
    let injector = tokio::spawn(
        Injector {
            rig: rig.clone(),
            redis: redis.clone(),
            keys: keys.clone(),
            draw,
            faults: faults.clone(),
            stop: stop.clone(),
        }
        .run(args.random_faults, seed),
    );
    let results = crowd::run_fans(&client, &config, event, 0..config.fans, start, &progress).await;
    stop.cancel();
    let _ = injector.await;
    {
        // Whatever the faults left stopped or dead is brought back for the checks.
        let mut rig = rig.lock().await;
        heal(&mut rig).await;
    }
    let _ = watcher.await;
    let results = results?;
    let wall_secs = crowd::instant_of(start).elapsed().as_secs_f64();

    // Redis catches up once the faults stop: wait for a whole mirror, then compare.
    let mut checks = std::collections::BTreeMap::new();
    let whole = wait_whole(&pg, &redis, &keys, event).await;
    checks.insert("mirror_whole_again_after_the_faults".to_owned(), whole);
    let told: Vec<(Uuid, i64)> = results
        .iter()
        .filter_map(|r| Some((r.ticket_id?, r.told_position?)))
        .collect();
    let places = places(&pg, &client, event).await?;
    checks.insert(
        "every_acknowledged_join_at_the_place_it_was_told".to_owned(),
        told.iter().all(|(t, p)| places.get(t) == Some(p)),
    );
    checks.insert(
        "redis_mirror_equals_postgres".to_owned(),
        mirror_equals(&redis, &keys, &places).await?,
    );
    for (name, sql) in CHECKS {
        let violations: i64 = sqlx::query_scalar(sql).bind(event).fetch_one(&pg).await?;
        checks.insert((*name).to_owned(), violations == 0);
    }
    let (max_active, most_at_once): (i64, i64) =
        sqlx::query_as(CAP_SWEEP).bind(event).fetch_one(&pg).await?;
    checks.insert(
        "cap_never_exceeded_over_the_whole_sale".to_owned(),
        most_at_once <= max_active,
    );
    let watched = std::mem::take(&mut *watched.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    checks.insert(
        "head_never_moved_back".to_owned(),
        watched.head_went_back.is_empty(),
    );
    checks.insert(
        "cap_never_exceeded_while_watched".to_owned(),
        watched.cap_exceeded.is_empty(),
    );
    checks.insert(
        "mirror_never_flagged_whole_with_places_missing".to_owned(),
        watched.whole_flag_over_missing_places.is_empty(),
    );
    let crowd = crowd::report(&client, &config, event, results, wall_secs).await?;
    let ok = crowd.ok && checks.values().all(|v| *v);
    let faults = faults
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let _ = redis.quit().await;
    pg.close().await;
    drop(rig);
    Ok(ChaosReport {
        seed,
        event_id: event,
        faults,
        watched,
        checks,
        crowd,
        ok,
    })
}

const ORGANIZER: &str = "chaos-organizer-token-0123456789";
const IDENTITY_SECRET: &str = "chaos-organizer-site-identity-secret-0123";

/// Checks against Postgres: each counts violations of a rule (zero: it holds). `$1`: the event.
const CHECKS: &[(&str, &str)] = &[
    (
        "no_place_admitted_twice",
        "SELECT count(*) - count(DISTINCT position) FROM admissions WHERE event_id = $1",
    ),
    (
        "no_ticket_with_two_passes_or_places",
        "SELECT (SELECT count(*) - count(DISTINCT ticket_id) FROM passes WHERE event_id = $1)
              + (SELECT count(position) - count(DISTINCT position) FROM passes
                 WHERE event_id = $1)",
    ),
    (
        "every_pass_backed_by_an_admission_of_its_place",
        "SELECT count(*) FROM passes p WHERE p.event_id = $1 AND NOT EXISTS (
           SELECT 1 FROM admissions a WHERE a.event_id = p.event_id
             AND a.position = p.position AND a.ticket_id = p.ticket_id)",
    ),
    (
        "no_place_given_up_was_admitted",
        "SELECT count(*) FROM admissions a JOIN joins j
           ON j.event_id = a.event_id AND j.left_position = a.position
         WHERE a.event_id = $1",
    ),
    (
        "no_position_held_by_two_tickets",
        "SELECT count(position) - count(DISTINCT position) FROM joins WHERE event_id = $1",
    ),
    (
        "live_places_dense_after_the_draw",
        "SELECT CASE WHEN count(*) = max(d.tail) - max(d.entrants)
                      AND COALESCE(min(j.position), max(d.entrants) + 1) = max(d.entrants) + 1
                      AND COALESCE(max(j.position), max(d.tail)) = max(d.tail)
                 THEN 0 ELSE 1 END::bigint
         FROM draws d LEFT JOIN joins j ON j.event_id = d.event_id AND j.phase = 'live'
         WHERE d.event_id = $1",
    ),
];

/// The most slots taken at any one moment, from every admission's lifetime
/// [`admitted_at`, `slot_until`), next to the cap.
const CAP_SWEEP: &str = "
    WITH moments AS (
        SELECT admitted_at AS t, 1 AS d FROM admissions WHERE event_id = $1
        UNION ALL SELECT slot_until, -1 FROM admissions WHERE event_id = $1)
    SELECT (SELECT max_active::bigint FROM events WHERE id = $1),
           COALESCE(max(running), 0)::bigint
    FROM (SELECT sum(d) OVER (ORDER BY t, d ROWS UNBOUNDED PRECEDING) AS running
          FROM moments) x";

fn start_rig(args: &Args, tag: &str, database_url: &str) -> anyhow::Result<Rig> {
    let redis_dir = args.out.join("redis");
    std::fs::create_dir_all(&redis_dir)?;
    let mut redis = Proc {
        name: "redis".into(),
        command: [
            "redis-server",
            "--port",
            &args.redis_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory-policy",
            "noeviction",
            "--dir",
            &redis_dir.display().to_string(),
        ]
        .map(String::from)
        .to_vec(),
        env: vec![],
        log: args.out.join("redis.log"),
        child: None,
    };
    redis.start()?;
    wait_port(args.redis_port)?;
    let port = |i: u16| args.base_port + i;
    let common: Vec<(String, String)> = [
        ("DATABASE_URL", database_url.to_owned()),
        (
            "REDIS_URL",
            format!("redis://127.0.0.1:{}", args.redis_port),
        ),
        ("FAIRGATE_REDIS_PREFIX", tag.to_owned()),
        ("FAIRGATE_REDIS_COMMAND_TIMEOUT_MS", "1000".to_owned()),
        (
            "FAIRGATE_SIGNING_KEY",
            hex::encode(shared::token::random_seed()),
        ),
        ("FAIRGATE_ORGANIZER_TOKEN", ORGANIZER.to_owned()),
        ("FAIRGATE_IDENTITY_SECRET", IDENTITY_SECRET.to_owned()),
        (
            "FAIRGATE_ORDER_SECRET",
            hex::encode(shared::token::random_seed()),
        ),
        ("FAIRGATE_JOIN_LIMIT_PER_IP", "0".to_owned()),
        ("FAIRGATE_JOIN_LIMIT_PER_IDENTITY", "0".to_owned()),
        ("FAIRGATE_HOLD_TTL_SECS", "60".to_owned()),
        ("FAIRGATE_DB_MAX_CONNECTIONS", "8".to_owned()),
        (
            "FAIRGATE_JWKS_URL",
            format!("http://127.0.0.1:{}/.well-known/jwks.json", port(3)),
        ),
        ("LOG_FORMAT", "json".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let service = |name: &str, n: u16, bind_var: &str| -> Proc {
        let mut env = common.clone();
        env.push((bind_var.to_owned(), format!("127.0.0.1:{}", port(n))));
        Proc {
            name: format!("{name}-{n}"),
            command: vec![args.bin_dir.join(name).display().to_string()],
            env,
            log: args.out.join(format!("{name}-{n}.log")),
            child: None,
        }
    };
    let mut rig = Rig {
        redis,
        buffers: vec![
            service("buffer", 1, "FAIRGATE_BUFFER_BIND"),
            service("buffer", 2, "FAIRGATE_BUFFER_BIND"),
        ],
        queues: vec![
            service("queue", 3, "FAIRGATE_QUEUE_BIND"),
            service("queue", 4, "FAIRGATE_QUEUE_BIND"),
        ],
        purchase: service("purchase", 5, "FAIRGATE_PURCHASE_BIND"),
        pg_restart: args.pg_restart_command.clone(),
    };
    for p in rig
        .buffers
        .iter_mut()
        .chain(rig.queues.iter_mut())
        .chain(std::iter::once(&mut rig.purchase))
    {
        p.start()?;
    }
    Ok(rig)
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("nothing listens on {port}")
}

async fn redis_client(port: u16) -> anyhow::Result<fred::prelude::Client> {
    let url = format!("redis://127.0.0.1:{port}");
    let client = shared::redis::builder(&url, Duration::from_secs(1))?.build()?;
    client.init().await?;
    Ok(client)
}

/// Seconds from `draw` to now (negative before it).
fn since(draw: Instant) -> f64 {
    let now = Instant::now();
    if now >= draw {
        (now - draw).as_secs_f64()
    } else {
        -(draw - now).as_secs_f64()
    }
}

/// What the faults act on, and where they are written down.
struct Injector {
    rig: Arc<tokio::sync::Mutex<Rig>>,
    redis: fred::prelude::Client,
    keys: shared::redis::EventKeys,
    draw: Instant,
    faults: Arc<Mutex<Vec<Fault>>>,
    stop: CancellationToken,
}

impl Injector {
    fn log(&self, what: String) {
        let at_secs = since(self.draw);
        eprintln!("[chaos {at_secs:+7.2} s] {what}");
        if let Ok(mut f) = self.faults.lock() {
            f.push(Fault { at_secs, what });
        }
    }

    /// The moment `secs` from the draw.
    fn at(&self, secs: f64) -> Instant {
        if secs >= 0.0 {
            self.draw + Duration::from_secs_f64(secs)
        } else {
            self.draw
                .checked_sub(Duration::from_secs_f64(-secs))
                .unwrap_or_else(Instant::now)
        }
    }

    /// Sleeps until `t`; false if the run is over first.
    async fn until(&self, t: Instant) -> bool {
        tokio::select! {
            _ = tokio::time::sleep_until(t) => true,
            _ = self.stop.cancelled() => false,
        }
    }

    /// Deletes every key of the event, in one command (as a flush or a failover would lose
    /// them together), every `pause` ms (a range) until `until`.
    async fn delete_keys(&self, until: Instant, pause: (u64, u64), seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let all = self.keys.every();
        while Instant::now() < until && !self.stop.is_cancelled() {
            let _: Result<i64, _> = self.redis.del(all.clone()).await;
            tokio::time::sleep(Duration::from_millis(rng.random_range(pause.0..=pause.1))).await;
        }
    }

    /// The schedule around the draw, then `random` more faults at random moments.
    async fn run(self, random: usize, seed: u64) {
        // Around the draw: its publication under repeated losses, and a buffer killed
        // mid-draw.
        if !self.until(self.at(-0.5)).await {
            return;
        }
        self.log("deleting the event's keys every 5-30 ms (draw publication)".into());
        let deleting = self.delete_keys(self.at(2.5), (5, 30), seed);
        let killing = async {
            if !self.until(self.at(0.03)).await {
                return;
            }
            self.rig.lock().await.buffers[0].kill9();
            self.log("SIGKILL buffer-1 mid-draw".into());
            if !self.until(self.at(1.5)).await {
                return;
            }
            let restarted = self.rig.lock().await.buffers[0].start();
            self.log(format!("buffer-1 restarted: {restarted:?}"));
        };
        tokio::join!(deleting, killing);

        // Redis lost twice in a row, then losses again during the rebuild it causes.
        if !self.until(self.at(4.0)).await {
            return;
        }
        self.restart_redis("SIGKILL redis, restarted empty").await;
        if !self.until(self.at(4.4)).await {
            return;
        }
        self.restart_redis("SIGKILL redis again, restarted empty (failover)")
            .await;
        self.log("deleting the event's keys every 5-15 ms (rebuild)".into());
        self.delete_keys(self.at(6.0), (5, 15), seed + 1).await;

        // Live joins through both buffers while the queue keeps disappearing.
        if !self.until(self.at(7.0)).await {
            return;
        }
        self.log("deleting the event's keys every 20-50 ms (live joins)".into());
        self.delete_keys(self.at(10.0), (20, 50), seed + 2).await;

        // The admission leader stops past its lease; Postgres restarts during checkouts.
        if !self.until(self.at(11.0)).await {
            return;
        }
        self.stop_leader().await;
        if !self.until(self.at(18.0)).await {
            return;
        }
        self.restart_postgres().await;

        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for n in 0..random {
            let wait = Duration::from_secs_f64(rng.random_range(3.0..12.0));
            if !self.until(Instant::now() + wait).await {
                return;
            }
            match rng.random_range(0..5) {
                0 => {
                    self.restart_redis("random: SIGKILL redis, restarted empty")
                        .await
                }
                1 => {
                    self.log("random: deleting the event's keys every 5-40 ms for 2 s".into());
                    let until = Instant::now() + Duration::from_secs(2);
                    self.delete_keys(until, (5, 40), seed + 10 + n as u64).await;
                }
                2 => {
                    let which = rng.random_range(0..2);
                    self.rig.lock().await.buffers[which].kill9();
                    self.log(format!("random: SIGKILL buffer-{}", which + 1));
                    if !self.until(Instant::now() + Duration::from_secs(1)).await {
                        return;
                    }
                    let restarted = self.rig.lock().await.buffers[which].start();
                    self.log(format!(
                        "random: buffer-{} restarted: {restarted:?}",
                        which + 1
                    ));
                }
                3 => self.stop_leader().await,
                _ => self.restart_postgres().await,
            }
        }
    }

    async fn restart_redis(&self, what: &str) {
        let restarted = {
            let mut rig = self.rig.lock().await;
            rig.redis.kill9();
            rig.redis.start()
        };
        self.log(match restarted {
            Ok(()) => what.to_owned(),
            Err(e) => format!("{what}: restart failed: {e:#}"),
        });
    }

    /// SIGSTOPs the queue instance holding the event's admission lease past the lease (3 s),
    /// then SIGCONTs it.
    async fn stop_leader(&self) {
        let (rig, log, stop) = (&self.rig, |w: String| self.log(w), &self.stop);
        let leader: Option<String> = self.redis.get(self.keys.leader()).await.ok().flatten();
        let pid: Option<u32> = leader
            .as_deref()
            .and_then(|l| l.split('-').next())
            .and_then(|p| p.parse().ok());
        let which = {
            let rig = rig.lock().await;
            rig.queues
                .iter()
                .position(|q| q.pid() == pid && pid.is_some())
        };
        let Some(which) = which else {
            log(format!("no admission leader to stop (lease {leader:?})"));
            return;
        };
        rig.lock().await.queues[which].signal("-STOP");
        log(format!(
            "SIGSTOP queue-{} (the admission leader) for 5 s",
            which + 3
        ));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.cancelled() => {}
        }
        rig.lock().await.queues[which].signal("-CONT");
        log(format!("SIGCONT queue-{}", which + 3));
    }

    async fn restart_postgres(&self) {
        let log = |w: String| self.log(w);
        let command = self.rig.lock().await.pg_restart.clone();
        let Some(command) = command else {
            log("postgres restart skipped (no --pg-restart-command)".into());
            return;
        };
        log("restarting postgres (immediate)".into());
        let status = tokio::process::Command::new("sh")
            .args(["-c", &command])
            .stdout(Stdio::null())
            .status()
            .await;
        log(format!("postgres restart: {status:?}"));
    }
}

/// Brings back whatever the faults left dead or stopped.
async fn heal(rig: &mut Rig) {
    if !rig.redis.running() {
        let _ = rig.redis.start();
    }
    for p in rig
        .buffers
        .iter_mut()
        .chain(rig.queues.iter_mut())
        .chain(std::iter::once(&mut rig.purchase))
    {
        p.signal("-CONT");
        if !p.running() {
            let _ = p.start();
        }
    }
}

/// Watches Postgres and Redis every 50 ms until `stop`.
async fn watch(
    pg: sqlx::PgPool,
    redis: fred::prelude::Client,
    keys: shared::redis::EventKeys,
    event: i64,
    watched: Arc<Mutex<Watched>>,
    stop: CancellationToken,
) {
    let mut highest_redis_head = 0;
    while !stop.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let line: Result<(Option<i64>, i64, i64, Option<i64>), _> = sqlx::query_as(
            "SELECT (SELECT head FROM admission_state WHERE event_id = $1),
                    (SELECT count(*) FROM admissions WHERE event_id = $1 AND slot_until > now()),
                    (SELECT max_active::bigint FROM events WHERE id = $1),
                    (SELECT entrants FROM draws WHERE event_id = $1 AND drawn_at IS NOT NULL)",
        )
        .bind(event)
        .fetch_one(&pg)
        .await;
        let Ok((head, active, cap, entrants)) = line else {
            continue; // Postgres restarting
        };
        let mirror: Option<(i64, i64, i64)> = match entrants {
            Some(n) => WATCH
                .evalsha_with_reload(&redis, vec![keys.queue(), keys.drawn()], vec![n])
                .await
                .ok(),
            None => None,
        };
        let redis_head: Option<i64> = redis.get(keys.head()).await.ok().flatten();
        let Ok(mut w) = watched.lock() else { return };
        w.samples += 1;
        let head = head.unwrap_or(0);
        if head < w.highest_head {
            let seen = format!("postgres head {} -> {head}", w.highest_head);
            w.head_went_back.push(seen);
        }
        w.highest_head = w.highest_head.max(head);
        if let Some(r) = redis_head {
            if r < highest_redis_head {
                w.head_went_back
                    .push(format!("redis head {highest_redis_head} -> {r}"));
            }
            highest_redis_head = highest_redis_head.max(r);
        }
        w.highest_active = w.highest_active.max(active);
        if active > cap {
            w.cap_exceeded.push(format!("{active} active > cap {cap}"));
        }
        if let (Some((1, drawn, _)), Some(n)) = (mirror, entrants) {
            if drawn < n {
                w.whole_flag_over_missing_places
                    .push(format!("flagged whole with {drawn} of {n} drawn places"));
            }
        }
    }
}

/// Waits (up to a minute) until Redis holds the whole line again: flagged and every place.
async fn wait_whole(
    pg: &sqlx::PgPool,
    redis: &fred::prelude::Client,
    keys: &shared::redis::EventKeys,
    event: i64,
) -> bool {
    for _ in 0..600 {
        let tail: Option<i64> = sqlx::query_scalar("SELECT tail FROM draws WHERE event_id = $1")
            .bind(event)
            .fetch_optional(pg)
            .await
            .ok()
            .flatten();
        let flag: i64 = redis.exists(keys.drawn()).await.unwrap_or(0);
        let size: i64 = redis.zcard(keys.queue()).await.unwrap_or(-1);
        if flag == 1 && Some(size) == tail {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Every ticket's place as Postgres decides it: the published draw's order, then live arrivals.
async fn places(
    pg: &sqlx::PgPool,
    client: &Client,
    event: i64,
) -> anyhow::Result<HashMap<Uuid, i64>> {
    let draw = client.draw(event).await?;
    let order: Vec<Uuid> = serde_json::from_value(draw["order"].clone())?;
    let mut places: HashMap<Uuid, i64> = order
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as i64 + 1))
        .collect();
    let live: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT ticket_id, position FROM joins
         WHERE event_id = $1 AND phase = 'live' AND position IS NOT NULL",
    )
    .bind(event)
    .fetch_all(pg)
    .await?;
    places.extend(live);
    Ok(places)
}

/// Redis holds exactly Postgres's places: every ticket at its position, no other member, no
/// position twice.
async fn mirror_equals(
    redis: &fred::prelude::Client,
    keys: &shared::redis::EventKeys,
    places: &HashMap<Uuid, i64>,
) -> anyhow::Result<bool> {
    let members: Vec<(String, f64)> = redis
        .zrange(keys.queue(), 0, -1, None, false, None, true)
        .await?;
    let mut positions = HashSet::new();
    let mut ok = members.len() == places.len();
    for (ticket, score) in members {
        let position = score.round() as i64;
        let expected = ticket.parse::<Uuid>().ok().and_then(|t| places.get(&t));
        ok &= expected == Some(&position) && positions.insert(position);
    }
    Ok(ok)
}

async fn create_database(admin: &str, tag: &str) -> anyhow::Result<String> {
    let pg = shared::db::connect_url(admin, 1).await?;
    sqlx::query(&format!("CREATE DATABASE {tag}"))
        .execute(&pg)
        .await?;
    pg.close().await;
    let (base, query) = admin.split_once('?').unwrap_or((admin, ""));
    let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
    let url = format!("{base}/{tag}");
    let url = if query.is_empty() {
        url
    } else {
        format!("{url}?{query}")
    };
    // The services migrate at start; doing it once here first keeps five of them from racing.
    let fresh = shared::db::connect_url(&url, 1).await?;
    shared::db::migrate(&fresh).await?;
    fresh.close().await;
    Ok(url)
}

async fn drop_database(admin: &str, tag: &str) {
    if let Ok(pg) = shared::db::connect_url(admin, 1).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {tag} WITH (FORCE)"))
            .execute(&pg)
            .await;
        pg.close().await;
    }
}

fn print(r: &ChaosReport) {
    println!("== chaos: event {} (seed {}) ==", r.event_id, r.seed);
    for f in &r.faults {
        println!("  {:+7.2} s  {}", f.at_secs, f.what);
    }
    let c = &r.crowd;
    println!(
        "fans {}  joined {}  admitted {}  bought {}  seats sold {}/{}  errors {}  retries absorbed {}  catching-up statuses {}",
        c.fans,
        c.joined,
        c.admitted,
        c.bought,
        c.seats_sold,
        c.seats,
        c.errors,
        c.transient_retries,
        c.catching_up_statuses
    );
    for sample in &c.error_samples {
        println!("  error sample: {sample}");
    }
    for (step, p) in &c.latency_ms {
        println!(
            "{step:>9}: n={:<6} p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms",
            p.count, p.p50, p.p99, p.max
        );
    }
    println!(
        "watched {} samples: highest head {}, most active {}",
        r.watched.samples, r.watched.highest_head, r.watched.highest_active
    );
    for v in r
        .watched
        .head_went_back
        .iter()
        .chain(&r.watched.cap_exceeded)
        .chain(&r.watched.whole_flag_over_missing_places)
        .take(10)
    {
        println!("  seen: {v}");
    }
    for (name, holds) in c.invariants.iter().chain(&r.checks) {
        println!("  [{}] {name}", if *holds { "ok" } else { "FAILED" });
    }
    println!("overall {}", if r.ok { "OK" } else { "FAILED" });
}
