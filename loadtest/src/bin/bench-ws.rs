//! `bench-ws`: many idle waiters on the waiting room's websockets (default 200,000), the memory
//! each costs the queue service, and how long one serving-head update takes to reach all of
//! them — next to a bare tokio-tungstenite broadcast server measured in the same run.
//!
//! One process may hold only 20,000 open files here, so both sides are spread: `--instances`
//! queue processes share one port with SO_REUSEPORT (the kernel spreads connections over them;
//! they share the event through Redis, as in production), and `--workers` client processes each
//! open their share from their own loopback source address (127.0.0.2, .3, …), past the
//! ephemeral-port limit of one address. The bench writes the event's queue straight into
//! Redis (waiters at positions 1,001…) and signs their tickets itself; it moves the serving
//! head as the admission controller does (the Redis key, then one `PUBLISH`) while nobody is
//! admitted, and each worker records when every socket saw the new head. Latency is measured
//! from just before the publish to the receipt, on one machine's clock.
//!
//! Modes: the parent (default); `--worker` (a client process, driven over stdin); and
//! `--serve-bare` (the bare broadcast server, driven over stdin).

use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use chrono::Utc;
use clap::Parser;
use fairgate_loadtest::bench::{free_port, latencies, ms};
use fred::prelude::*;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use shared::ids::{EventId, TicketId};
use shared::token::{Signer, SigningKey, TicketClaims, TokenKind};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// Idle waiters on the waiting room, broadcast latency and memory per connection.
#[derive(Parser, Clone)]
#[command(name = "bench-ws", version)]
struct Args {
    /// Waiters (websocket connections).
    #[arg(long, default_value_t = 200_000)]
    waiters: usize,
    /// Queue service processes sharing the port (each under the open-files limit).
    #[arg(long, default_value_t = 12)]
    instances: usize,
    /// Client processes (each from its own loopback address).
    #[arg(long, default_value_t = 12)]
    workers: usize,
    /// Serving-head updates to time.
    #[arg(long, default_value_t = 5)]
    rounds: i64,
    #[command(flatten)]
    backends: fairgate_loadtest::bench::Backends,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Internal: run as client worker number N.
    #[arg(long, hide = true)]
    worker: Option<usize>,
    /// Internal (worker): the websocket URL prefix; the ticket is appended.
    #[arg(long, hide = true)]
    target: Option<String>,
    /// Internal (worker): first waiter index and count.
    #[arg(long, hide = true, default_value_t = 0)]
    first: usize,
    #[arg(long, hide = true, default_value_t = 0)]
    count: usize,
    /// Internal (worker): signing key (hex) and event of the tickets.
    #[arg(long, hide = true)]
    key: Option<String>,
    #[arg(long, hide = true, default_value_t = 0)]
    event: i64,
    /// Internal: serve the bare broadcast on this address.
    #[arg(long, hide = true)]
    serve_bare: Option<SocketAddr>,
}

/// The ticket id of waiter `i` (deterministic, so workers need not be told them).
fn ticket_id(i: usize) -> Uuid {
    Uuid::from_u128(0x6667_0000_0000_4000_8000_0000_0000_0000 | i as u128)
}

/// Waiters stand from this position on, so moving the head by a few admits nobody.
const FIRST_POSITION: i64 = 1_001;

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if let Some(addr) = args.serve_bare {
        return runtime.block_on(serve_bare(addr));
    }
    if let Some(index) = args.worker {
        return runtime.block_on(worker(args.clone(), index));
    }
    runtime.block_on(parent(args))
}

// ---------------------------------------------------------------------------------------------
// Worker: opens its share of sockets, then answers commands on stdin.

#[derive(Serialize, Deserialize)]
struct Report {
    connected: usize,
    failed: usize,
    /// Milliseconds from the round's start to each socket's receipt.
    latencies_ms: Vec<f32>,
    missing: usize,
}

async fn worker(args: Args, index: usize) -> anyhow::Result<()> {
    let target = args.target.clone().context("--target")?;
    let source = Ipv4Addr::new(127, 0, 0, 2 + index as u8);
    let signer = args
        .key
        .as_deref()
        .map(|k| SigningKey::from_hex(k).map(|key| Signer::new(key, "fairgate")))
        .transpose()?;
    let event = EventId::new(args.event.max(1)).context("event")?;
    let wanted = Arc::new(AtomicI64::new(i64::MAX));
    let received: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.count).map(|_| AtomicU64::new(0)).collect());
    let connected = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    for slot in 0..args.count {
        let i = args.first + slot;
        let ticket = match &signer {
            Some(signer) => {
                let now = Utc::now().timestamp();
                let claims = TicketClaims {
                    iss: "fairgate".into(),
                    aud: TokenKind::Ticket.audience().into(),
                    sub: format!("anon:{}", ticket_id(i)),
                    evt: event,
                    tkt: TicketId(ticket_id(i)),
                    iat: now,
                    nbf: now,
                    exp: now + 86_400,
                };
                signer.sign(TokenKind::Ticket, &claims)?
            }
            None => String::new(),
        };
        let url = format!("{target}{ticket}");
        let (wanted, received, connected, failed, gate) = (
            wanted.clone(),
            received.clone(),
            connected.clone(),
            failed.clone(),
            gate.clone(),
        );
        tasks.spawn(async move {
            let Ok(stream) = ({
                let _permit = gate.acquire().await;
                open(&url, source).await
            }) else {
                failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            connected.fetch_add(1, Ordering::Relaxed);
            let (_sink, mut stream) = stream.split();
            while let Some(Ok(message)) = stream.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let head = serde_json::from_str::<serde_json::Value>(text.as_str())
                    .ok()
                    .and_then(|v| v["serving_head"].as_i64());
                if head.is_some_and(|h| h >= wanted.load(Ordering::Relaxed)) {
                    let _ = received[slot].compare_exchange(
                        0,
                        now_micros(),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
            }
        });
    }
    // Wait until every socket is open or refused.
    while connected.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < args.count {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "connected {} {}",
        connected.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["arm", head] => {
                for r in received.iter() {
                    r.store(0, Ordering::Relaxed);
                }
                wanted.store(head.parse()?, Ordering::Relaxed);
                println!("armed");
            }
            ["report", t0] => {
                let t0: u64 = t0.parse()?;
                let mut report = Report {
                    connected: connected.load(Ordering::Relaxed),
                    failed: failed.load(Ordering::Relaxed),
                    latencies_ms: Vec::with_capacity(received.len()),
                    missing: 0,
                };
                for r in received.iter() {
                    match r.load(Ordering::Relaxed) {
                        0 => report.missing += 1,
                        t => report
                            .latencies_ms
                            .push(t.saturating_sub(t0) as f32 / 1000.0),
                    }
                }
                report.missing = report.missing.saturating_sub(report.failed);
                println!("{}", serde_json::to_string(&report)?);
            }
            ["quit"] => break,
            _ => {}
        }
        std::io::stdout().flush()?;
    }
    tasks.abort_all();
    Ok(())
}

use fairgate_loadtest::client::Socket;

/// A websocket to `url` from `source`, with small buffers (as a browser's would be).
async fn open(url: &str, source: Ipv4Addr) -> anyhow::Result<Socket> {
    fairgate_loadtest::client::open_ws(url, Some(source)).await
}

// ---------------------------------------------------------------------------------------------
// The bare broadcast server: accepts websockets, sends `{"serving_head": N}` to all on "go N".

async fn serve_bare(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = shared::server::bind(addr, true)?;
    let (sender, _) = tokio::sync::broadcast::channel::<Arc<str>>(16);
    let accept_sender = sender.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let mut updates = accept_sender.subscribe();
            tokio::spawn(async move {
                let config = WebSocketConfig::default()
                    .read_buffer_size(4096)
                    .write_buffer_size(0);
                let Ok(socket) =
                    tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
                else {
                    return;
                };
                let (mut sink, mut stream) = socket.split();
                loop {
                    tokio::select! {
                        update = updates.recv() => match update {
                            Ok(text) => {
                                if sink.send(Message::text(text.as_ref())).await.is_err() {
                                    return;
                                }
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(_) => return,
                        },
                        incoming = stream.next() => if !matches!(incoming, Some(Ok(_))) {
                            return;
                        },
                    }
                }
            });
        }
    });
    println!("ready");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if let Some(head) = line.strip_prefix("go ") {
            let _ = sender.send(format!("{{\"serving_head\":{}}}", head.trim()).into());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Parent.

struct Proc {
    child: Child,
    stdin: ChildStdin,
    stdout: std::io::BufReader<ChildStdout>,
}

impl Proc {
    fn spawn(mut command: Command) -> anyhow::Result<Self> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Proc {
            child,
            stdin,
            stdout,
        })
    }

    fn send(&mut self, line: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(())
    }

    fn read(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        anyhow::ensure!(
            self.stdout.read_line(&mut line)? > 0,
            "a child process ended"
        );
        Ok(line.trim().to_owned())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Serialize)]
struct Round {
    received: usize,
    missing: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// Starts `workers` client processes against `target`, and waits for their connections.
fn start_workers(
    args: &Args,
    target: &str,
    key: Option<&str>,
    event: i64,
) -> anyhow::Result<(Vec<Proc>, usize, usize, Duration)> {
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let per = args.waiters.div_ceil(args.workers);
    let mut workers = Vec::new();
    for w in 0..args.workers {
        let first = w * per;
        let count = per.min(args.waiters.saturating_sub(first));
        let mut command = Command::new(&exe);
        command
            .args(["--worker", &w.to_string(), "--target", target])
            .args(["--first", &first.to_string(), "--count", &count.to_string()])
            .args(["--event", &event.to_string()]);
        if let Some(key) = key {
            command.args(["--key", key]);
        }
        workers.push(Proc::spawn(command)?);
    }
    let (mut connected, mut failed) = (0, 0);
    for worker in &mut workers {
        let line = worker.read()?;
        let mut words = line.split_whitespace().skip(1);
        connected += words
            .next()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        failed += words
            .next()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
    }
    Ok((workers, connected, failed, started.elapsed()))
}

/// Times one broadcast: arm the workers, call `publish`, collect every socket's receipt.
async fn time_round<F, Fut>(workers: &mut [Proc], head: i64, publish: F) -> anyhow::Result<Round>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for worker in workers.iter_mut() {
        worker.send(&format!("arm {head}"))?;
    }
    for worker in workers.iter_mut() {
        anyhow::ensure!(worker.read()? == "armed", "a worker did not arm");
    }
    let t0 = now_micros();
    publish().await?;
    // Everyone should have it well within this; stragglers count as missing.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut histogram = latencies();
    let (mut received, mut missing) = (0, 0);
    for worker in workers.iter_mut() {
        worker.send(&format!("report {t0}"))?;
        let report: Report = serde_json::from_str(&worker.read()?)?;
        for l in &report.latencies_ms {
            let _ = histogram.record((*l as f64 * 1000.0).max(1.0) as u64);
        }
        received += report.latencies_ms.len();
        missing += report.missing;
    }
    Ok(Round {
        received,
        missing,
        p50_ms: ms(&histogram, 0.5),
        p99_ms: ms(&histogram, 0.99),
        max_ms: ms(&histogram, 1.0),
    })
}

async fn parent(args: Args) -> anyhow::Result<()> {
    let pg = args.backends.database().await?;
    let now = Utc::now();
    let event: i64 = sqlx::query_scalar(
        "INSERT INTO events (name, starts_at, presale_opens_at, sale_starts_at, sale_ends_at,
             rate_per_minute, max_active, pass_ttl_secs, claim_window_secs, seats_per_fan, paused)
         VALUES ('bench-ws', $1, $2, $3, $4, 60, 10, 600, 60, 2, true) RETURNING id",
    )
    .bind(now + chrono::Duration::days(30))
    .bind(now - chrono::Duration::hours(2))
    .bind(now - chrono::Duration::hours(1))
    .bind(now + chrono::Duration::hours(3))
    .fetch_one(&pg)
    .await?;
    let event_id = EventId::new(event).context("event id")?;
    let prefix = format!("bench:{}", Uuid::new_v4().simple());
    let redis = {
        #[derive(Parser)]
        struct Common {
            #[command(flatten)]
            common: shared::config::CommonConfig,
        }
        let parsed = Common::try_parse_from([
            "bench-ws",
            "--redis-url",
            &args.backends.redis_url,
            "--redis-prefix",
            &prefix,
        ])?;
        shared::redis::Redis::connect(&parsed.common).await?
    };
    let keys = redis.keys(event_id);
    for chunk in (0..args.waiters).collect::<Vec<_>>().chunks(10_000) {
        let members: Vec<(f64, String)> = chunk
            .iter()
            .map(|i| {
                (
                    (FIRST_POSITION + *i as i64) as f64,
                    ticket_id(*i).to_string(),
                )
            })
            .collect();
        let _: i64 = redis
            .client()
            .zadd(keys.queue(), None, None, false, false, members)
            .await?;
    }
    let tail = FIRST_POSITION + args.waiters as i64 - 1;
    let _: () = redis
        .client()
        .set(keys.tail(), tail, None, None, false)
        .await?;
    let _: () = redis
        .client()
        .set(keys.head(), 0, None, None, false)
        .await?;
    let _: () = redis
        .client()
        .set(keys.drawn(), 1, None, None, false)
        .await?;

    // The queue instances, all on one port.
    let key = hex::encode(shared::token::random_seed());
    let port = free_port()?;
    let exe = std::env::current_exe()?;
    let queue_exe = exe.with_file_name("queue");
    let per_instance = args.waiters.div_ceil(args.instances) + 1_000;
    let mut instances = Vec::new();
    for _ in 0..args.instances {
        instances.push(fairgate_loadtest::bench::Guard(
            Command::new(&queue_exe)
                .env("FAIRGATE_QUEUE_BIND", format!("127.0.0.1:{port}"))
                .env("FAIRGATE_REUSE_PORT", "true")
                .env("DATABASE_URL", &args.backends.database_url)
                .env("REDIS_URL", &args.backends.redis_url)
                .env("FAIRGATE_REDIS_PREFIX", &prefix)
                .env("FAIRGATE_SIGNING_KEY", &key)
                .env("FAIRGATE_MAX_WEBSOCKETS", per_instance.to_string())
                .env("FAIRGATE_DB_MAX_CONNECTIONS", "4")
                // Every head move to every waiter at once: the raw fan-out, not the pacing.
                .env("FAIRGATE_WS_UPDATE_MIN_MS", "0")
                .env("FAIRGATE_WS_UPDATE_MAX_MS", "0")
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", queue_exe.display()))?,
        ));
    }
    let http = reqwest::Client::new();
    let mut ready = 0;
    for _ in 0..300 {
        if http
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            ready += 1;
            if ready >= args.instances * 4 {
                break;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pids: Vec<u32> = instances.iter().map(|g| g.0.id()).collect();
    let rss_before: u64 = pids.iter().map(|p| rss_kib(*p)).sum();

    let target = format!("ws://127.0.0.1:{port}/api/v1/events/{event}/ws?ticket=");
    let (mut workers, connected, failed, connect_time) =
        start_workers(&args, &target, Some(&key), event)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after: u64 = pids.iter().map(|p| rss_kib(*p)).sum();
    let per_connection_kib =
        (rss_after.saturating_sub(rss_before)) as f64 / connected.max(1) as f64;
    println!(
        "fairgate: {connected} waiters connected ({failed} refused) in {:.1} s over {} instances",
        connect_time.as_secs_f64(),
        args.instances
    );
    println!(
        "queue RSS {:.0} MiB → {:.0} MiB: {per_connection_kib:.1} KiB per waiter (target < 16)",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );

    let settings = shared::event::SaleEvent::load(&pg, event_id)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut ours = Vec::new();
    for round in 1..=args.rounds {
        let result = time_round(&mut workers, round, || async {
            let _: () = redis
                .client()
                .set(keys.head(), round, None, None, false)
                .await?;
            let state = queue::hub::QueueState::of(&settings, true, round, tail, 0);
            let _: i64 = redis
                .client()
                .publish(redis.state_channel(), serde_json::to_string(&state)?)
                .await?;
            Ok(())
        })
        .await?;
        println!(
            "  head update {round}: {} received, {} missing, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            result.received, result.missing, result.p50_ms, result.p99_ms, result.max_ms
        );
        ours.push(result);
    }
    for worker in &mut workers {
        let _ = worker.send("quit");
    }
    drop(workers);
    drop(instances);

    // The bare broadcast, same machine, same clients.
    let bare_port = free_port()?;
    let mut bare = Vec::new();
    for _ in 0..args.instances {
        let mut command = Command::new(&exe);
        command.args(["--serve-bare", &format!("127.0.0.1:{bare_port}")]);
        let mut server = Proc::spawn(command)?;
        anyhow::ensure!(server.read()? == "ready", "bare server did not start");
        bare.push(server);
    }
    let bare_target = format!("ws://127.0.0.1:{bare_port}/ws?ticket=");
    let (mut workers, bare_connected, bare_failed, bare_connect_time) =
        start_workers(&args, &bare_target, None, event)?;
    println!(
        "bare:     {bare_connected} connected ({bare_failed} refused) in {:.1} s",
        bare_connect_time.as_secs_f64()
    );
    let mut theirs = Vec::new();
    for round in 1..=args.rounds {
        let result = time_round(&mut workers, round, || {
            let sent: anyhow::Result<()> = bare
                .iter_mut()
                .try_for_each(|server| server.send(&format!("go {round}")));
            async move { sent }
        })
        .await?;
        println!(
            "  broadcast {round}: {} received, {} missing, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            result.received, result.missing, result.p50_ms, result.p99_ms, result.max_ms
        );
        theirs.push(result);
    }
    for worker in &mut workers {
        let _ = worker.send("quit");
    }
    drop(workers);
    drop(bare);

    let median = |rounds: &[Round], f: fn(&Round) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    println!(
        "median over rounds: fairgate p50 {:.0} ms / p99 {:.0} ms; bare p50 {:.0} ms / p99 {:.0} ms",
        median(&ours, |r| r.p50_ms),
        median(&ours, |r| r.p99_ms),
        median(&theirs, |r| r.p50_ms),
        median(&theirs, |r| r.p99_ms),
    );
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&serde_json::json!({
                "waiters": args.waiters,
                "instances": args.instances,
                "workers": args.workers,
                "connected": connected,
                "refused": failed,
                "connect_secs": connect_time.as_secs_f64(),
                "rss_per_waiter_kib": per_connection_kib,
                "rss_before_kib": rss_before,
                "rss_after_kib": rss_after,
                "fairgate_rounds": ours,
                "bare_connected": bare_connected,
                "bare_rounds": theirs,
            }))?,
        )?;
    }
    let _: i64 = redis
        .client()
        .del(vec![keys.queue(), keys.tail(), keys.head(), keys.drawn()])
        .await?;
    sqlx::query("DELETE FROM events WHERE id = $1")
        .bind(event)
        .execute(&pg)
        .await?;
    Ok(())
}
