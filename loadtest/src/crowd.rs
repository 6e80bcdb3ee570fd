//! One simulated sale: create an event, let N fans arrive over the presale window, wait in the
//! waiting room for their pass, pick seats (contending for the same ones), hold and pay; then
//! check the invariants in Postgres and report latencies, fairness and outcomes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::IndexedRandom;
use rand::Rng;
use serde::Serialize;
use uuid::Uuid;

use crate::client::{refused, Client, Endpoints, SaleSpec};

#[derive(Clone, Debug)]
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
    /// Give up on a fan still waiting after this long.
    pub fan_timeout: Duration,
    pub progress: bool,
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

#[derive(Debug, Default)]
struct FanResult {
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
    position: Option<i64>,
    presale: bool,
    admitted_at: Option<Instant>,
    join_ms: Option<f64>,
    wait_ms: Option<f64>,
    hold_ms: Option<f64>,
    checkout_ms: Option<f64>,
    bought_seats: usize,
    declined: bool,
    sold_out: bool,
    error: Option<String>,
}

pub async fn run(config: CrowdConfig) -> anyhow::Result<Report> {
    let client = Client::new(config.endpoints.clone())?;
    let now = Utc::now();
    let spec = SaleSpec {
        name: format!("Crowd sale {}", now.format("%Y-%m-%d %H:%M:%S")),
        seats: config.seats,
        seats_per_row: 50,
        price_cents: 4_500,
        presale_opens_at: now - chrono::Duration::seconds(1),
        sale_starts_at: now + chrono::Duration::seconds(config.presale_secs as i64),
        sale_ends_at: now + chrono::Duration::hours(2),
        rate_per_minute: config.rate_per_minute,
        max_active: config.max_active,
        seats_per_fan: config.seats_per_fan,
    };
    let event = client.create_event(&config.organizer_token, &spec).await?;
    let started = Instant::now();
    let bar = if config.progress {
        let bar = ProgressBar::new(config.fans as u64);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} done · {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let progress = Arc::new(Progress::default());
    let ticker = {
        let (bar, progress, seats) = (bar.clone(), progress.clone(), config.seats);
        tokio::spawn(async move {
            loop {
                bar.set_message(progress.line(seats));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let arrival_window = Duration::from_millis(config.presale_secs * 800);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..config.fans {
        let client = client.clone();
        let config = config.clone();
        let bar = bar.clone();
        let progress = progress.clone();
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
        let kind = Kind {
            declines,
            leaves,
            misbehaves,
        };
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            let mut result = FanResult::default();
            let outcome = fan(
                &client,
                &config,
                event,
                kind,
                started,
                &progress,
                &mut result,
            )
            .await;
            progress.finish(&result, outcome.is_err());
            if let Err(e) = outcome {
                result.error = Some(format!("{e:#}"));
            }
            bar.inc(1);
            result
        });
    }
    let mut results = Vec::with_capacity(config.fans);
    while let Some(r) = tasks.join_next().await {
        results.push(r?);
    }
    ticker.abort();
    bar.finish_and_clear();
    let wall_secs = started.elapsed().as_secs_f64();
    report(&client, &config, event, results, wall_secs).await
}

/// Live counts for the progress bar.
#[derive(Default)]
struct Progress {
    waiting: AtomicI64,
    buying: AtomicI64,
    seats_sold: AtomicI64,
    errors: AtomicI64,
}

impl Progress {
    fn line(&self, seats: i64) -> String {
        format!(
            "waiting {} · buying {} · seats left {} · errors {}",
            self.waiting.load(Ordering::Relaxed),
            self.buying.load(Ordering::Relaxed),
            seats - self.seats_sold.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed)
        )
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

/// How a simulated fan behaves.
#[derive(Clone, Copy, Debug)]
struct Kind {
    declines: bool,
    leaves: bool,
    misbehaves: bool,
}

async fn fan(
    client: &Client,
    config: &CrowdConfig,
    event: i64,
    kind: Kind,
    started: Instant,
    progress: &Progress,
    result: &mut FanResult,
) -> anyhow::Result<()> {
    let declines = kind.declines;
    let t = Instant::now();
    result.join_sent = Some(started.elapsed());
    let joined = client.join(event, None).await?;
    result.join_answered = Some(started.elapsed());
    result.join_ms = Some(ms(t));
    result.joined_at = Some(joined.joined_at);
    result.presale = joined.status == "buffered";
    result.position = joined.position;
    if kind.leaves {
        result.left = true;
        client.leave(event, &joined.ticket).await?;
        return Ok(());
    }
    progress.waiting.fetch_add(1, Ordering::Relaxed);
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
        Err(e) => return Err(e),
    };
    result.wait_ms = Some(ms(t));
    result.admitted_at = Some(Instant::now());
    result.admitted_after = Some(started.elapsed());
    progress.waiting.fetch_sub(1, Ordering::Relaxed);
    progress.buying.fetch_add(1, Ordering::Relaxed);
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
    let mut hold = None;
    for _attempt in 0..6 {
        let seats = client.seats(event, &pass.pass).await?;
        let free: Vec<i64> = seats
            .iter()
            .filter(|s| s.status == "available")
            .map(|s| s.id)
            .collect();
        if free.is_empty() {
            result.sold_out = true;
            return Ok(());
        }
        let pick: Vec<i64> = free
            .choose_multiple(&mut rand::rng(), wanted.min(free.len()))
            .copied()
            .collect();
        let t = Instant::now();
        match client.hold(event, &pass.pass, &pick).await {
            Ok(h) => {
                result.hold_ms = Some(ms(t));
                result.hold_done = Some(started.elapsed());
                hold = Some(h);
                break;
            }
            Err(e) if refused(&e).is_some_and(|r| r.code == "seat_unavailable") => continue,
            Err(e) => return Err(e),
        }
    }
    let Some(hold) = hold else {
        result.sold_out = true;
        return Ok(());
    };
    let card = if declines {
        "tok_chargeDeclined"
    } else {
        "tok_visa"
    };
    let key = Uuid::new_v4().to_string();
    let t = Instant::now();
    match client
        .checkout(event, &pass.pass, hold.hold_id, &key, card)
        .await
    {
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

async fn report(
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

    let admitted: Vec<Instant> = results.iter().filter_map(|r| r.admitted_at).collect();
    let achieved = match (admitted.iter().min(), admitted.iter().max()) {
        (Some(first), Some(last)) if admitted.len() > 1 && last > first => {
            (admitted.len() - 1) as f64 / last.duration_since(*first).as_secs_f64() * 60.0
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
    let ok = invariants.values().all(|v| *v);
    let errors: Vec<&String> = results.iter().filter_map(|r| r.error.as_ref()).collect();
    Ok(Report {
        event_id: event,
        fans: config.fans,
        seats,
        joined: results.iter().filter(|r| r.join_ms.is_some()).count(),
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
        timeline: timeline(&results),
        invariants,
        ok,
    })
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
