//! One simulated sale: create an event, let N fans arrive over the presale window, wait in the
//! waiting room for their pass, pick seats (contending for the same ones), hold and pay; then
//! check the invariants in Postgres and report latencies, fairness and outcomes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::client::{refused, Client, Endpoints, SaleSpec};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CrowdConfig {
    pub endpoints: Endpoints,
    pub organizer_token: String,
    pub database_url: Option<String>,
    pub fans: usize,
    pub seats: i64,
    /// Seconds from event creation to the draw; fans arrive during the first 80% of it.
    pub presale_secs: u64,
    pub rate_per_minute: i64,
    pub max_active: i64,
    /// Each fan wants 1 to this many seats (and the pass allows this many).
    pub seats_per_fan: i64,
    /// Share of fans whose card is declined.
    pub decline_share: f64,
    /// Share of fans who arrive after the draw (over the following `late_secs`), to join the
    /// back of the line in arrival order.
    pub late_share: f64,
    pub late_secs: u64,
    /// Share of fans who leave the line right after joining.
    pub leave_share: f64,
    /// Share of misbehaving fans: they join again with their ticket at once (must get the same
    /// place) and try a forged pass (must be refused).
    pub misbehave_share: f64,
    /// Share of fans who take the best available seats (the front rows, by seat id): every one
    /// of them wants the same seats, the heaviest contention there is.
    pub best_share: f64,
    /// Share of the places sold as one standing area (general admission, bought by quantity),
    /// and the same share of fans buying there.
    pub general_share: f64,
    /// Share of fans who give up while waiting and never claim the pass their place earns.
    pub no_claim_share: f64,
    /// Share of fans who hold seats and never pay (the hold expires and the seats come back).
    pub abandon_share: f64,
    /// Share of fans who send their checkout twice at once and once more afterwards, all with
    /// the same Idempotency-Key: they must be charged once and get one order.
    pub retry_share: f64,
    /// How long an admitted fan has to claim the pass before the slot goes to the next fan.
    pub claim_window_secs: i64,
    /// How long a pass lasts: a shopper who walks away holds a slot under the cap this long.
    pub pass_ttl_secs: i64,
    /// Give up on a fan still waiting after this long.
    pub fan_timeout: Duration,
    pub progress: bool,
    /// The organizer site's identity secret (the buffer's `FAIRGATE_IDENTITY_SECRET`): when
    /// set, each fan joins under an identity of its own, so a retried join gets its place back.
    #[serde(default)]
    pub identity_secret: Option<String>,
    /// How long a fan's page retries what says "try again" (503, 429), a service out of reach
    /// and a dropped waiting-room socket, as a real page does (zero: never).
    #[serde(default)]
    pub patience: Duration,
    /// Switch autotune on for the event with these settings (`crowd --autotune`).
    #[serde(default)]
    pub autotune: Option<AutotuneSpec>,
}

/// Autotune's target and bounds, as the queue's `PUT …/autotune` takes them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutotuneSpec {
    pub target_p99_ms: i32,
    pub target_error_rate: f64,
    pub rate_floor: i32,
    pub rate_ceiling: i32,
    pub cap_floor: i32,
    pub cap_ceiling: i32,
}

/// Latency percentiles of one step, in milliseconds.
#[derive(Debug, Serialize, Clone)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub event_id: i64,
    pub fans: usize,
    pub seats: i64,
    pub joined: usize,
    /// Retries the fans' pages made (503/429 after `Retry-After`, another instance, a socket
    /// reopened): absorbed, not errors, but counted.
    pub transient_retries: u64,
    /// Fans told by the waiting room, after a first place, another place (must be zero).
    pub places_changed: usize,
    /// Fans who saw the serving head move backwards (must be zero).
    pub heads_went_back: usize,
    /// Waiting-room statuses saying the room was catching up after an interruption.
    pub catching_up_statuses: usize,
    /// Fans told, while waiting, that fewer places were left than fans ahead of them.
    #[serde(default)]
    pub told_places_short: usize,
    /// Of them, fans who gave up at their time limit without a pass.
    #[serde(default)]
    pub gave_up_places_short: usize,
    pub admitted: usize,
    pub bought: usize,
    pub seats_sold: i64,
    pub declined: usize,
    pub sold_out: usize,
    pub errors: usize,
    pub error_samples: Vec<String>,
    pub configured_rate_per_minute: i64,
    pub achieved_rate_per_minute: f64,
    pub wall_secs: f64,
    pub latency_ms: BTreeMap<String, Percentiles>,
    /// Spearman correlation of presale arrival order with queue position (≈ 0 when fair).
    pub spearman_presale: Option<f64>,
    pub draw_verified: bool,
    /// Fans who joined after the draw (checked for arrival order).
    pub live_arrivals: usize,
    /// Fans who left the line on purpose, and misbehaving fans.
    pub left: usize,
    pub misbehaving: usize,
    /// Fans who gave up waiting and never claimed their pass.
    pub no_shows: usize,
    /// Fans who held seats and let the hold expire.
    pub abandoned_holds: usize,
    /// Fans who retried their checkout with the same key.
    pub retried_checkouts: usize,
    /// Fans who bought by seat choice: best available, specific seats, standing places.
    pub bought_best_available: usize,
    pub bought_specific: usize,
    pub bought_standing: usize,
    /// Per second since the start: fans waiting in line, and fans admitted in that second.
    pub timeline: Timeline,
    pub invariants: BTreeMap<String, bool>,
    pub ok: bool,
}

/// What the HTML report charts, per second since the crowd started.
#[derive(Debug, Serialize, Clone, Default)]
pub struct Timeline {
    pub queue_length: Vec<(u32, usize)>,
    pub admissions_per_second: Vec<(u32, usize)>,
    /// (seconds since start, latency in ms) of every join, hold and checkout.
    pub join_ms: Vec<(f32, f32)>,
    pub hold_ms: Vec<(f32, f32)>,
    pub checkout_ms: Vec<(f32, f32)>,
}

/// One fan's outcome (what a worker process hands back to the parent).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FanResult {
    /// When the join was sent and answered, since the crowd started.
    join_sent: Option<Duration>,
    join_answered: Option<Duration>,
    admitted_after: Option<Duration>,
    hold_done: Option<Duration>,
    checkout_done: Option<Duration>,
    left: bool,
    misbehaving: bool,
    /// A misbehaving fan got something it must not have (a second place, a forged pass taken).
    got_through: bool,
    joined_at: Option<DateTime<Utc>>,
    /// The fan's ticket, and the place they were told (at the join, or by the waiting room).
    pub ticket_id: Option<Uuid>,
    pub told_position: Option<i64>,
    pub place_changed: bool,
    pub head_went_back: bool,
    catching_up: usize,
    places_short: bool,
    /// Gave up waiting after being told places were short.
    gave_up: bool,
    /// The fan's claim or wait was refused as lapsed although they were waiting for it.
    pub lapsed_while_waiting: bool,
    /// Retries the fan's page made.
    retries: u64,
    position: Option<i64>,
    presale: bool,
    join_ms: Option<f64>,
    wait_ms: Option<f64>,
    hold_ms: Option<f64>,
    checkout_ms: Option<f64>,
    bought_seats: usize,
    choice: Option<Choice>,
    no_show: bool,
    abandoned: bool,
    retried: bool,
    /// A retried checkout got two different orders (or none while one was charged).
    retry_split: bool,
    declined: bool,
    sold_out: bool,
    error: Option<String>,
}

pub async fn run(config: CrowdConfig) -> anyhow::Result<Report> {
    let client = Client::new(config.endpoints.clone())?.patient(config.patience);
    let event = create(&client, &config).await?;
    let start = epoch_ms();
    let progress = Arc::new(Progress::default());
    let bar = progress_bar(&config);
    let ticker = {
        let (bar, progress, seats) = (bar.clone(), progress.clone(), config.seats);
        tokio::spawn(async move {
            loop {
                let p = progress.snapshot();
                bar.set_position(p.done as u64);
                bar.set_message(p.line(seats));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let results = run_fans(&client, &config, event, 0..config.fans, start, &progress).await?;
    ticker.abort();
    bar.finish_and_clear();
    let wall_secs = instant_of(start).elapsed().as_secs_f64();
    report(&client, &config, event, results, wall_secs).await
}

/// Milliseconds since the Unix epoch: the crowd's shared start, across worker processes.
pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// This process's `Instant` of the wall-clock moment `start_ms`.
pub fn instant_of(start_ms: u64) -> Instant {
    let ago = Duration::from_millis(epoch_ms().saturating_sub(start_ms));
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

pub fn progress_bar(config: &CrowdConfig) -> ProgressBar {
    if !config.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(config.fans as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} done · {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Creates the crowd's event (seats, a standing area, the sale window); returns its id.
pub async fn create(client: &Client, config: &CrowdConfig) -> anyhow::Result<i64> {
    let now = Utc::now();
    let standing = standing_places(config);
    let spec = SaleSpec {
        name: format!("Crowd sale {}", now.format("%Y-%m-%d %H:%M:%S")),
        seats: config.seats - standing,
        seats_per_row: 50,
        price_cents: 4_500,
        presale_opens_at: now - chrono::Duration::seconds(1),
        sale_starts_at: now + chrono::Duration::seconds(config.presale_secs as i64),
        sale_ends_at: now + chrono::Duration::hours(2),
        rate_per_minute: config.rate_per_minute,
        max_active: config.max_active,
        seats_per_fan: config.seats_per_fan,
    };
    let mut extra = serde_json::json!({ "sale": {
        "claim_window_secs": config.claim_window_secs,
        "pass_ttl_secs": config.pass_ttl_secs,
    } });
    if standing > 0 {
        extra["ticket_types"] = serde_json::json!([
            { "name": STANDING, "capacity": standing, "price_cents": 3_000 }
        ]);
    }
    let event = client
        .create_event_with(&config.organizer_token, &spec, extra)
        .await?;
    if let Some(tune) = &config.autotune {
        let mut body = serde_json::to_value(tune)?;
        body["enabled"] = serde_json::Value::Bool(true);
        client
            .set_autotune(&config.organizer_token, event, &body)
            .await
            .context("switching autotune on")?;
    }
    Ok(event)
}

/// Runs fans `fans` (indices into the whole crowd, which fix each fan's behaviour) of the sale
/// that started at `start` (epoch ms); every fan's outcome, in no particular order.
pub async fn run_fans(
    client: &Client,
    config: &CrowdConfig,
    event: i64,
    fans: std::ops::Range<usize>,
    start: u64,
    progress: &Arc<Progress>,
) -> anyhow::Result<Vec<FanResult>> {
    let started = instant_of(start);
    let standing = standing_places(config);
    let shared = Arc::new(Shared {
        progress: progress.clone(),
        board: SeatBoard::new(config.seats),
    });
    let arrival_window = Duration::from_millis(config.presale_secs * 800);
    let mut tasks = tokio::task::JoinSet::new();
    for i in fans {
        let client = client.counting_apart();
        let config = config.clone();
        let shared = shared.clone();
        let late = i % 100 < (config.late_share * 100.0) as usize;
        let delay = if late {
            Duration::from_secs(config.presale_secs)
                + Duration::from_millis(500)
                + Duration::from_secs(config.late_secs).mul_f64(rand::rng().random::<f64>())
        } else {
            arrival_window.mul_f64(rand::rng().random::<f64>())
        };
        let share = |s: f64| (s * config.fans as f64) as usize;
        let declines = i < share(config.decline_share);
        let leaves = (config.fans - i) <= share(config.leave_share);
        let misbehaves = !leaves
            && !declines
            && i >= share(config.decline_share)
            && i < share(config.decline_share) + share(config.misbehave_share);
        // Two independent, evenly spread draws over the fans for the other behaviours.
        let spread = |salt: u64| ((i as u64 + 1).wrapping_mul(salt) % 10_007) as f64 / 10_007.0;
        let (c, b) = (spread(7_919), spread(104_729));
        let choice = if c < config.general_share && standing > 0 {
            Choice::Standing
        } else if c < config.general_share + config.best_share {
            Choice::BestAvailable
        } else {
            Choice::Specific
        };
        let plain = !declines && !leaves && !misbehaves;
        let no_claim = plain && b < config.no_claim_share;
        let abandons = plain && !no_claim && b < config.no_claim_share + config.abandon_share;
        let retries = plain
            && !no_claim
            && !abandons
            && b < config.no_claim_share + config.abandon_share + config.retry_share;
        let kind = Kind {
            index: i,
            declines,
            leaves,
            misbehaves,
            choice,
            no_claim,
            abandons,
            retries,
        };
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            let mut result = FanResult::default();
            let outcome = fan(&client, &config, event, kind, started, &shared, &mut result).await;
            result.retries = client.retries();
            shared.progress.finish(&result, outcome.is_err());
            if let Err(e) = outcome {
                result.error = Some(format!("{e:#}"));
            }
            shared.progress.done.fetch_add(1, Ordering::Relaxed);
            result
        });
    }
    let mut results = Vec::with_capacity(tasks.len());
    while let Some(r) = tasks.join_next().await {
        results.push(r?);
    }
    Ok(results)
}

/// Live counts for the progress bar.
#[derive(Default)]
pub struct Progress {
    waiting: AtomicI64,
    buying: AtomicI64,
    seats_sold: AtomicI64,
    errors: AtomicI64,
    done: AtomicI64,
}

/// The progress counts at one moment (summed over worker processes by the parent).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ProgressCounts {
    pub waiting: i64,
    pub buying: i64,
    pub seats_sold: i64,
    pub errors: i64,
    pub done: i64,
}

impl ProgressCounts {
    pub fn plus(self, o: ProgressCounts) -> ProgressCounts {
        ProgressCounts {
            waiting: self.waiting + o.waiting,
            buying: self.buying + o.buying,
            seats_sold: self.seats_sold + o.seats_sold,
            errors: self.errors + o.errors,
            done: self.done + o.done,
        }
    }

    pub fn line(&self, seats: i64) -> String {
        format!(
            "waiting {} · buying {} · seats left {} · errors {}",
            self.waiting,
            self.buying,
            seats - self.seats_sold,
            self.errors
        )
    }
}

impl Progress {
    pub fn snapshot(&self) -> ProgressCounts {
        ProgressCounts {
            waiting: self.waiting.load(Ordering::Relaxed),
            buying: self.buying.load(Ordering::Relaxed),
            seats_sold: self.seats_sold.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Relaxed),
        }
    }

    /// A fan's wait or purchase ended (however it ended).
    fn finish(&self, result: &FanResult, failed: bool) {
        let (waited, admitted) = (result.join_ms.is_some(), result.admitted_after.is_some());
        if waited && !admitted && !result.left {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        if admitted {
            self.buying.fetch_sub(1, Ordering::Relaxed);
        }
        self.seats_sold
            .fetch_add(result.bought_seats as i64, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The standing area's ticket type.
const STANDING: &str = "Standing";

fn standing_places(config: &CrowdConfig) -> i64 {
    ((config.seats as f64 * config.general_share).round() as i64).clamp(0, config.seats - 1)
}

/// How a fan chooses seats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Choice {
    BestAvailable,
    Specific,
    Standing,
}

/// An identity assertion for `sub` as the organizer's site signs it (HS256, audience
/// `fairgate:join`, ten minutes).
fn identity_assertion(sub: &str, secret: &str) -> anyhow::Result<String> {
    let claims = serde_json::json!({
        "sub": sub,
        "aud": "fairgate:join",
        "exp": Utc::now().timestamp() + 600,
    });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// How a simulated fan behaves.
#[derive(Clone, Copy, Debug)]
struct Kind {
    /// The fan's number in the whole crowd (its identity, when fans have identities).
    index: usize,
    declines: bool,
    leaves: bool,
    misbehaves: bool,
    choice: Choice,
    no_claim: bool,
    abandons: bool,
    retries: bool,
}

async fn fan(
    client: &Client,
    config: &CrowdConfig,
    event: i64,
    kind: Kind,
    started: Instant,
    shared: &Shared,
    result: &mut FanResult,
) -> anyhow::Result<()> {
    let declines = kind.declines;
    let t = Instant::now();
    result.join_sent = Some(started.elapsed());
    let joined = match &config.identity_secret {
        Some(secret) => {
            let who = format!("crowd-{event}-{}", kind.index);
            client
                .join_as(event, &identity_assertion(&who, secret)?)
                .await?
        }
        None => client.join(event, None).await?,
    };
    result.join_answered = Some(started.elapsed());
    result.join_ms = Some(ms(t));
    result.joined_at = Some(joined.joined_at);
    result.presale = joined.status == "buffered";
    result.position = joined.position;
    result.ticket_id = Some(joined.ticket_id);
    result.told_position = joined.position;
    if kind.leaves {
        result.left = true;
        client.leave(event, &joined.ticket).await?;
        return Ok(());
    }
    shared.progress.waiting.fetch_add(1, Ordering::Relaxed);
    if kind.misbehaves {
        // A second and third tab at once: the same place, never another.
        result.misbehaving = true;
        let (a, b) = tokio::join!(
            client.join(event, Some(&joined.ticket)),
            client.join(event, Some(&joined.ticket))
        );
        for again in [a?, b?] {
            if again.ticket_id != joined.ticket_id || again.position != joined.position {
                result.got_through = true;
            }
        }
    }
    if kind.no_claim {
        client.look_and_leave(event, &joined.ticket).await?;
        result.no_show = true;
        return Ok(());
    }
    let t = Instant::now();
    let (pass, wait) = match client
        .wait_for_pass(event, &joined.ticket, config.fan_timeout)
        .await
    {
        Ok(admitted) => admitted,
        Err(e) if e.downcast_ref::<crate::client::SoldOut>().is_some() => {
            result.sold_out = true;
            return Ok(());
        }
        // Told that fewer places were left than fans ahead, the fan gave up at their time
        // limit, as a real one would: an honest answer, not an error.
        Err(e)
            if e.downcast_ref::<crate::client::NoPassInTime>()
                .is_some_and(|n| n.told_places_short) =>
        {
            result.places_short = true;
            result.gave_up = true;
            return Ok(());
        }
        Err(e) => {
            result.lapsed_while_waiting = refused(&e).is_some_and(|r| r.code == "admission_lapsed");
            return Err(e);
        }
    };
    result.told_position = result.told_position.or(wait.first_position);
    result.place_changed = wait.position_changed
        || matches!((joined.position, wait.first_position), (Some(a), Some(b)) if a != b);
    result.head_went_back = wait.head_went_back;
    result.catching_up = wait.catching_up;
    result.places_short = wait.places_short > 0;
    result.wait_ms = Some(ms(t));
    result.admitted_after = Some(started.elapsed());
    shared.progress.waiting.fetch_sub(1, Ordering::Relaxed);
    shared.progress.buying.fetch_add(1, Ordering::Relaxed);
    result.position = wait.first_position.or(joined.position);
    if kind.misbehaves {
        // An edited pass (one character of the signature changed) must be refused.
        let mut forged = pass.pass.clone();
        let at = forged.len().saturating_sub(10);
        let flipped = if forged[at..].starts_with('A') {
            "B"
        } else {
            "A"
        };
        forged.replace_range(at..at + 1, flipped);
        match client.seats(event, &forged).await {
            Err(e) if refused(&e).is_some_and(|r| r.status == 401) => {}
            _ => result.got_through = true,
        }
    }

    let wanted = rand::rng().random_range(1..=config.seats_per_fan.max(1)) as usize;
    let Some((hold, choice)) = take_places(
        client,
        &shared.board,
        event,
        &pass.pass,
        kind.choice,
        wanted,
    )
    .await?
    else {
        result.sold_out = true;
        return Ok(());
    };
    result.hold_ms = Some(ms(hold.1));
    result.hold_done = Some(started.elapsed());
    result.choice = Some(choice);
    let hold = hold.0;
    if kind.abandons {
        // Walks away: the hold runs out and the seats go back on sale.
        result.abandoned = true;
        return Ok(());
    }
    let card = if declines {
        "tok_chargeDeclined"
    } else {
        "tok_visa"
    };
    let key = Uuid::new_v4().to_string();
    let t = Instant::now();
    let checkout = || client.checkout(event, &pass.pass, hold.hold_id, &key, card);
    let answer = if kind.retries {
        // A double click and a retry after a lost answer: one order, one charge.
        result.retried = true;
        let (first, second) = tokio::join!(checkout(), checkout());
        let third = checkout().await;
        let mut orders = Vec::new();
        for answer in [&first, &second, &third] {
            match answer {
                Ok(order) => orders.push(order.order_id),
                Err(e) if refused(e).is_some_and(|r| r.status == 409) => {}
                Err(e) => return Err(anyhow::anyhow!("retried checkout: {e:#}")),
            }
        }
        orders.dedup();
        result.retry_split = orders.len() != 1;
        third
    } else {
        checkout().await
    };
    match answer {
        Ok(order) => {
            result.checkout_ms = Some(ms(t));
            result.checkout_done = Some(started.elapsed());
            result.bought_seats = order.tickets.len();
        }
        Err(e) if refused(&e).is_some_and(|r| r.status == 402) => result.declined = true,
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Holds places the way the fan chooses them; a fan whose choice is gone takes what is left
/// (standing → seats, best available → any seats). `None`: nothing left to hold.
async fn take_places(
    client: &Client,
    board: &SeatBoard,
    event: i64,
    pass: &str,
    choice: Choice,
    wanted: usize,
) -> anyhow::Result<Option<((crate::client::Hold, Instant), Choice)>> {
    if choice == Choice::Standing {
        for quantity in (1..=wanted as i64).rev() {
            let t = Instant::now();
            match client.hold_general(event, pass, STANDING, quantity).await {
                Ok(h) => return Ok(Some(((h, t), Choice::Standing))),
                Err(e) if refused(&e).is_some_and(|r| r.code == "not_enough_places") => continue,
                Err(e) => return Err(e),
            }
        }
    }
    let mut choice = if choice == Choice::Standing {
        Choice::Specific
    } else {
        choice
    };
    for attempt in 0..12 {
        if attempt == 6 {
            // Six times beaten to the front rows: any free seats will do.
            choice = Choice::Specific;
        }
        let pick = board.pick(client, event, pass, choice, wanted).await?;
        if pick.is_empty() {
            return Ok(None);
        }
        let t = Instant::now();
        match client.hold(event, pass, &pick).await {
            Ok(h) => {
                board.taken(&pick);
                return Ok(Some(((h, t), choice)));
            }
            Err(e) if refused(&e).is_some_and(|r| r.code == "seat_unavailable") => {
                board.taken(&pick);
                continue;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// How old a seat map may be when a fan asks for a fresh one.
const FRESH_ENOUGH: Duration = Duration::from_secs(1);

/// What the fans of one process share.
struct Shared {
    progress: Arc<Progress>,
    board: SeatBoard,
}

/// The seat map as this process's fans see it: one snapshot of the free seats fetched at most
/// every `refresh` and shared (as a browser's map is a few seconds stale, and so that 100,000
/// fans do not each download a 100,000-seat map), plus the seats this process has since seen
/// taken. Fans pick from it and learn of conflicts from the hold's answer, as real fans do.
pub struct SeatBoard {
    refresh: Duration,
    snapshot: tokio::sync::Mutex<Option<(Instant, Arc<Vec<i64>>)>>,
    taken: std::sync::Mutex<std::collections::HashSet<i64>>,
}

impl SeatBoard {
    pub fn new(seats: i64) -> SeatBoard {
        SeatBoard {
            // ~1 s per 20,000 seats of map to send, at least a second.
            refresh: Duration::from_millis((seats as u64 / 20).max(1_000)),
            snapshot: tokio::sync::Mutex::new(None),
            taken: std::sync::Mutex::new(Default::default()),
        }
    }

    fn taken(&self, seats: &[i64]) {
        if let Ok(mut taken) = self.taken.lock() {
            taken.extend(seats);
        }
    }

    async fn free(
        &self,
        client: &Client,
        event: i64,
        pass: &str,
        fresh: bool,
    ) -> anyhow::Result<Arc<Vec<i64>>> {
        let mut snapshot = self.snapshot.lock().await;
        // A fan who found nothing free asks for a fresh map, but one fetched in the last
        // second by another fan of this process is fresh enough: near a sell-out, hundreds of
        // disappointed fans would otherwise each download the whole map in turn.
        let stale = snapshot.as_ref().is_none_or(|(at, _)| {
            at.elapsed() > self.refresh || (fresh && at.elapsed() > FRESH_ENOUGH)
        });
        if stale {
            let seats = client.seats(event, pass).await?;
            let free: Vec<i64> = seats
                .iter()
                .filter(|s| s.status == "available")
                .map(|s| s.id)
                .collect();
            *snapshot = Some((Instant::now(), Arc::new(free)));
            if let Ok(mut taken) = self.taken.lock() {
                taken.clear();
            }
        }
        Ok(snapshot
            .as_ref()
            .map(|(_, f)| f.clone())
            .unwrap_or_default())
    }

    /// Up to `wanted` seats believed free: the front ones (the map is in id order) or random
    /// ones. Empty: none left, even on a fresh map.
    async fn pick(
        &self,
        client: &Client,
        event: i64,
        pass: &str,
        choice: Choice,
        wanted: usize,
    ) -> anyhow::Result<Vec<i64>> {
        for fresh in [false, true] {
            let free = self.free(client, event, pass, fresh).await?;
            let taken = self
                .taken
                .lock()
                .map_err(|_| anyhow::anyhow!("seat board poisoned"))?
                .clone();
            let open = |id: &&i64| !taken.contains(id);
            let pick: Vec<i64> = match choice {
                Choice::BestAvailable => free.iter().filter(open).take(wanted).copied().collect(),
                _ => {
                    let mut rng = rand::rng();
                    let mut pick = Vec::with_capacity(wanted);
                    for _ in 0..wanted * 20 {
                        if pick.len() == wanted || free.is_empty() {
                            break;
                        }
                        let id = free[rng.random_range(0..free.len())];
                        if !taken.contains(&id) && !pick.contains(&id) {
                            pick.push(id);
                        }
                    }
                    if pick.is_empty() {
                        pick = free.iter().filter(open).take(wanted).copied().collect();
                    }
                    pick
                }
            };
            if !pick.is_empty() {
                return Ok(pick);
            }
        }
        Ok(Vec::new())
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn percentiles(values: impl Iterator<Item = f64>) -> Percentiles {
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .expect("static histogram bounds are valid");
    for v in values {
        let _ = h.record(((v * 1000.0) as u64).max(1));
    }
    let at = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: h.max() as f64 / 1000.0,
    }
}

pub async fn report(
    client: &Client,
    config: &CrowdConfig,
    event: i64,
    results: Vec<FanResult>,
    wall_secs: f64,
) -> anyhow::Result<Report> {
    let mut latency = BTreeMap::new();
    latency.insert(
        "join".into(),
        percentiles(results.iter().filter_map(|r| r.join_ms)),
    );
    latency.insert(
        "wait".into(),
        percentiles(results.iter().filter_map(|r| r.wait_ms)),
    );
    latency.insert(
        "hold".into(),
        percentiles(results.iter().filter_map(|r| r.hold_ms)),
    );
    latency.insert(
        "checkout".into(),
        percentiles(results.iter().filter_map(|r| r.checkout_ms)),
    );

    let admitted: Vec<Duration> = results.iter().filter_map(|r| r.admitted_after).collect();
    let achieved = match (admitted.iter().min(), admitted.iter().max()) {
        (Some(first), Some(last)) if admitted.len() > 1 && last > first => {
            (admitted.len() - 1) as f64 / (*last - *first).as_secs_f64() * 60.0
        }
        _ => 0.0,
    };

    let mut presale: Vec<(DateTime<Utc>, i64)> = results
        .iter()
        .filter(|r| r.presale)
        .filter_map(|r| Some((r.joined_at?, r.position?)))
        .collect();
    presale.sort();
    let arrival: Vec<f64> = (0..presale.len()).map(|i| i as f64).collect();
    let positions: Vec<f64> = presale.iter().map(|(_, p)| *p as f64).collect();
    let spearman_presale = shared::stats::spearman(&arrival, &positions);

    let draw_verified = verify_draw(client, event).await.unwrap_or(false);

    let (mut invariants, seats, seats_sold) = match &config.database_url {
        Some(url) => {
            let pg = shared::db::connect_url(url, 2).await?;
            let inv = crate::invariants::check(&pg, event).await?;
            let seats = crate::invariants::capacity(&pg, event).await?;
            let sold = crate::invariants::seats_sold(&pg, event).await?;
            pg.close().await;
            (inv, seats, sold)
        }
        None => (
            BTreeMap::new(),
            config.seats,
            results.iter().map(|r| r.bought_seats as i64).sum(),
        ),
    };
    invariants.insert("draw_verified".into(), draw_verified);
    invariants.insert(
        "post_draw_arrivals_in_arrival_order".into(),
        live_arrivals_in_order(&results),
    );
    invariants.insert(
        "no_misbehaving_client_got_through".into(),
        !results.iter().any(|r| r.got_through),
    );
    invariants.insert(
        "retried_checkouts_gave_one_order".into(),
        !results.iter().any(|r| r.retry_split),
    );
    let places_changed = results.iter().filter(|r| r.place_changed).count();
    let heads_went_back = results.iter().filter(|r| r.head_went_back).count();
    invariants.insert("every_fan_kept_the_place_told".into(), places_changed == 0);
    invariants.insert("no_fan_saw_the_head_move_back".into(), heads_went_back == 0);
    invariants.insert(
        "no_waiting_fan_refused_as_lapsed".into(),
        !results.iter().any(|r| r.lapsed_while_waiting),
    );
    let ok = invariants.values().all(|v| *v);
    let errors: Vec<&String> = results.iter().filter_map(|r| r.error.as_ref()).collect();
    Ok(Report {
        event_id: event,
        fans: config.fans,
        seats,
        joined: results.iter().filter(|r| r.join_ms.is_some()).count(),
        transient_retries: results.iter().map(|r| r.retries).sum(),
        places_changed,
        heads_went_back,
        catching_up_statuses: results.iter().map(|r| r.catching_up).sum(),
        told_places_short: results.iter().filter(|r| r.places_short).count(),
        gave_up_places_short: results.iter().filter(|r| r.gave_up).count(),
        admitted: admitted.len(),
        bought: results.iter().filter(|r| r.bought_seats > 0).count(),
        seats_sold,
        declined: results.iter().filter(|r| r.declined).count(),
        sold_out: results.iter().filter(|r| r.sold_out).count(),
        errors: errors.len(),
        error_samples: errors.iter().take(5).map(|e| (*e).clone()).collect(),
        configured_rate_per_minute: config.rate_per_minute,
        achieved_rate_per_minute: achieved,
        wall_secs,
        latency_ms: latency,
        spearman_presale,
        draw_verified,
        live_arrivals: results
            .iter()
            .filter(|r| r.join_ms.is_some() && !r.presale)
            .count(),
        left: results.iter().filter(|r| r.left).count(),
        misbehaving: results.iter().filter(|r| r.misbehaving).count(),
        no_shows: results.iter().filter(|r| r.no_show).count(),
        abandoned_holds: results.iter().filter(|r| r.abandoned).count(),
        retried_checkouts: results.iter().filter(|r| r.retried).count(),
        bought_best_available: bought_by(&results, Choice::BestAvailable),
        bought_specific: bought_by(&results, Choice::Specific),
        bought_standing: bought_by(&results, Choice::Standing),
        timeline: timeline(&results),
        invariants,
        ok,
    })
}

fn bought_by(results: &[FanResult], choice: Choice) -> usize {
    results
        .iter()
        .filter(|r| r.bought_seats > 0 && r.choice == Some(choice))
        .count()
}

/// Fans who joined after the draw are placed in arrival order: whenever one fan's join was
/// answered before another's was sent, the first has the lower position. (Joins in flight at
/// the same moment have no order between them to keep.)
fn live_arrivals_in_order(results: &[FanResult]) -> bool {
    let mut live: Vec<(Duration, Duration, i64)> = results
        .iter()
        .filter(|r| !r.presale && !r.left)
        .filter_map(|r| Some((r.join_sent?, r.join_answered?, r.position?)))
        .collect();
    let mut by_answer = live.clone();
    by_answer.sort_by_key(|(_, answered, _)| *answered);
    live.sort_by_key(|(sent, _, _)| *sent);
    let mut highest_before = i64::MIN;
    let mut next = 0;
    for (sent, _, position) in live {
        while next < by_answer.len() && by_answer[next].1 < sent {
            highest_before = highest_before.max(by_answer[next].2);
            next += 1;
        }
        if highest_before >= position {
            return false;
        }
    }
    true
}

fn timeline(results: &[FanResult]) -> Timeline {
    let last = results
        .iter()
        .flat_map(|r| [r.join_answered, r.admitted_after])
        .flatten()
        .max()
        .map_or(0, |d| d.as_secs() as usize);
    let mut joined = vec![0usize; last + 2];
    let mut admitted = vec![0usize; last + 2];
    for r in results {
        if let Some(t) = r.join_answered {
            joined[t.as_secs() as usize] += 1;
        }
        if let Some(t) = r.admitted_after {
            admitted[t.as_secs() as usize] += 1;
        }
    }
    let mut waiting = 0usize;
    let mut queue_length = Vec::new();
    for second in 0..joined.len() {
        waiting = (waiting + joined[second]).saturating_sub(admitted[second]);
        queue_length.push((second as u32, waiting));
    }
    let series = |pick: fn(&FanResult) -> Option<(Duration, f64)>| -> Vec<(f32, f32)> {
        results
            .iter()
            .filter_map(pick)
            .map(|(t, ms)| (t.as_secs_f32(), ms as f32))
            .collect()
    };
    Timeline {
        queue_length,
        admissions_per_second: admitted
            .iter()
            .enumerate()
            .map(|(s, n)| (s as u32, *n))
            .collect(),
        join_ms: series(|r| Some((r.join_answered?, r.join_ms?))),
        hold_ms: series(|r| Some((r.hold_done?, r.hold_ms?))),
        checkout_ms: series(|r| Some((r.checkout_done?, r.checkout_ms?))),
    }
}

/// Recomputes the published draw from its seed and entrants and compares it with the
/// published order.
pub async fn verify_draw(client: &Client, event: i64) -> anyhow::Result<bool> {
    let published = crate::verify::fetch(client, event).await?;
    Ok(published.verdict() == shared::draw::Verdict::Match)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(sent_ms: u64, answered_ms: u64, position: i64) -> FanResult {
        FanResult {
            join_sent: Some(Duration::from_millis(sent_ms)),
            join_answered: Some(Duration::from_millis(answered_ms)),
            position: Some(position),
            ..FanResult::default()
        }
    }

    #[test]
    fn arrival_order_is_checked_between_joins_that_did_not_overlap() {
        // 1 then 2 then 3, one after the other.
        assert!(live_arrivals_in_order(&[
            live(0, 5, 11),
            live(6, 9, 12),
            live(10, 12, 13)
        ]));
        // Overlapping joins may be placed either way.
        assert!(live_arrivals_in_order(&[live(0, 10, 12), live(2, 8, 11)]));
        // A fan who asked after another was answered must not be placed ahead of them.
        assert!(!live_arrivals_in_order(&[live(0, 5, 12), live(6, 9, 11)]));
        assert!(!live_arrivals_in_order(&[live(0, 5, 11), live(6, 9, 11)]));
    }
}
