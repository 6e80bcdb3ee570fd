//! Live updates for a pass holder: `GET /api/v1/events/{id}/live` is a server-sent-events
//! stream of the event's seat changes (held, sold, back on sale) and of the fan's own notices
//! (order confirmed, order refunded).
//!
//! Seat changes: whichever instance commits a change publishes it on one Redis channel; every
//! instance holds one subscription and fans the changes out in-process, so a change costs one
//! `PUBLISH` however many fans watch. They are best effort (an instance dying between commit
//! and publish loses one message): a client subscribes first, then reads the seat map, and
//! reads it again after a reconnect.
//!
//! Notices come from the transactional outbox (`outbox` rows written in the transaction that
//! makes them true). Each instance's relay reads new rows once for all its fans; a stream first
//! replays the fan's rows after `Last-Event-ID`, so nothing is missed across reconnects. The
//! rows stay for notifiers (e-mail, SMS), which page through them with
//! `GET /api/v1/organizer/outbox?after=`.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use fred::prelude::*;
use futures::Stream;
use serde::{Deserialize, Serialize};
use shared::config::CommonConfig;
use shared::extract::{Json, Path, Query};
use shared::ids::EventId;
use shared::token::{TokenError, TokenKind};
use shared::ApiError;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::organizer::Organizer;
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/events/{id}/live", get(live))
        .route("/api/v1/organizer/outbox", get(outbox_feed))
}

/// Places of one event that changed to one status.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeatChange {
    pub event_id: i64,
    pub seat_ids: Vec<i64>,
    /// "available", "held" or "sold".
    pub status: String,
}

/// An outbox row: a notice for one fan.
#[derive(Clone, Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct Notice {
    pub id: i64,
    pub event_id: i64,
    pub identity: String,
    pub order_id: Uuid,
    pub kind: String,
    pub payload: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

#[derive(Clone, Debug)]
enum Message {
    Seats(Arc<SeatChange>),
    Notice(Arc<Notice>),
}

/// The instance's fan-out of live messages and its count of open streams.
#[derive(Clone)]
pub struct LiveHub {
    sender: broadcast::Sender<Message>,
    /// Seat changes waiting for the publisher.
    changes: tokio::sync::mpsc::Sender<SeatChange>,
    open: Arc<AtomicUsize>,
    max_streams: usize,
    /// Ends every stream at shutdown (they would otherwise hold the server open).
    shutdown: CancellationToken,
}

impl LiveHub {
    /// The hub, and the queue of seat changes to hand to [`run_seat_publisher`].
    pub fn new(
        max_streams: usize,
        shutdown: CancellationToken,
    ) -> (Self, tokio::sync::mpsc::Receiver<SeatChange>) {
        let (changes, queued) = tokio::sync::mpsc::channel(CHANGES_QUEUED);
        let hub = LiveHub {
            sender: broadcast::channel(8192).0,
            changes,
            open: Arc::default(),
            max_streams,
            shutdown,
        };
        (hub, queued)
    }
}

/// The channel seat changes travel on, between instances.
fn seats_channel(state: &AppState) -> String {
    format!("{}:seat-changes", state.redis.prefix())
}

/// Tells every instance (and so every watching fan) that `seat_ids` of `event` are now `status`.
/// Call after the change has committed. The change is queued for the instance's publisher
/// ([`run_seat_publisher`]), which sends what is waiting together: a rush of holds and sales
/// costs a few `PUBLISH`es (and a few messages to every watcher) instead of two per purchase.
pub fn seats_changed(state: &AppState, event: EventId, seat_ids: &[i64], status: &str) {
    if seat_ids.is_empty() {
        return;
    }
    let change = SeatChange {
        event_id: event.get(),
        seat_ids: seat_ids.to_vec(),
        status: status.to_owned(),
    };
    match state.live.changes.try_send(change) {
        Ok(()) => {}
        Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
            metrics::counter!("purchase_seat_changes_dropped_total").increment(1);
            tracing::warn!("seat change publisher is behind; a seat change was not published");
        }
        Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
            tracing::debug!("shutting down: a seat change was not published");
        }
    }
}

/// Most seat changes queued for publishing; past that they are dropped (they are best effort,
/// and clients read the seat map again after a reconnect).
const CHANGES_QUEUED: usize = 65_536;
/// Most queued changes merged into one round of publishing.
const CHANGES_PER_ROUND: usize = 4_096;

/// Merges `changes` (in the order they were made) into one change per event and status, each
/// seat under the status it had last.
pub(crate) fn coalesce(changes: Vec<SeatChange>) -> Vec<SeatChange> {
    let mut last: BTreeMap<(i64, i64), (usize, String)> = BTreeMap::new();
    for (n, change) in changes.into_iter().enumerate() {
        for seat in change.seat_ids {
            last.insert((change.event_id, seat), (n, change.status.clone()));
        }
    }
    // Grouped by event and status, the groups in the order of their latest change.
    let mut groups: BTreeMap<(i64, String), (usize, Vec<i64>)> = BTreeMap::new();
    for ((event_id, seat), (n, status)) in last {
        let group = groups.entry((event_id, status)).or_default();
        group.0 = group.0.max(n);
        group.1.push(seat);
    }
    let mut merged: Vec<(usize, SeatChange)> = groups
        .into_iter()
        .map(|((event_id, status), (n, seat_ids))| {
            (
                n,
                SeatChange {
                    event_id,
                    seat_ids,
                    status,
                },
            )
        })
        .collect();
    merged.sort_by_key(|(n, _)| *n);
    merged.into_iter().map(|(_, change)| change).collect()
}

/// Publishes the instance's seat changes: whatever is waiting, merged, one `PUBLISH` per event
/// and status. Drains the queue at shutdown.
pub async fn run_seat_publisher(
    state: AppState,
    changes: tokio::sync::mpsc::Receiver<SeatChange>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let channel = seats_channel(&state);
    let changes = tokio::sync::Mutex::new(changes);
    while let Some(round) = shared::batch::next(&changes, CHANGES_PER_ROUND, &shutdown).await {
        for change in coalesce(round) {
            let Ok(raw) = serde_json::to_string(&change) else {
                continue;
            };
            let published: Result<i64, _> =
                state.redis.client().publish(channel.as_str(), raw).await;
            if let Err(e) = published {
                tracing::warn!(error = %e, "could not publish a seat change");
            }
        }
    }
    Ok(())
}

/// One subscription per instance to the seat changes of every event.
pub async fn run_seat_subscriber(
    state: AppState,
    config: CommonConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let channel = seats_channel(&state);
    shared::redis::subscribe(&config, channel, shutdown, |raw| {
        if let Ok(change) = serde_json::from_str::<SeatChange>(raw) {
            let _ = state.live.sender.send(Message::Seats(Arc::new(change)));
        }
    })
    .await
}

/// An id the relay skipped (a row with a higher id was read first) is looked for again on every
/// tick for this long: its transaction may still commit (statement and lock timeouts are far
/// shorter). After that it was rolled back, or is a hole the sequence left, and is forgotten.
const SETTLE: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
/// Most skipped ids the relay keeps looking for; beyond that the oldest are forgotten (a fan
/// whose notice that was still gets it on reconnecting: streams replay from `Last-Event-ID`).
/// Only transactions still running can fill a gap, a few per pool connection, so a jump of
/// the sequence (holes left by a crash or by deleted rows) is what fills this.
const MAX_GAPS: usize = 1_000;
/// How far below the newest row the relay looks for ids still committing when it starts.
const IN_FLIGHT: usize = 1_000;

/// Which outbox rows the relay has read: everything up to a high-water mark except the ids it
/// skipped on the way (gaps), each with the time it was first missed. Ids are assigned before
/// commit, so a lower id can appear after a higher one; rather than remembering every id sent
/// (which made each read compare every new row with every id of the last minute), the relay
/// reads rows above the mark plus the few gaps below it.
#[derive(Debug, Default)]
pub(crate) struct OutboxCursor {
    high: i64,
    gaps: BTreeMap<i64, DateTime<Utc>>,
}

impl OutboxCursor {
    /// A cursor that has read everything up to `high` but the `missing` ids (noticed at `now`).
    pub(crate) fn new(high: i64, missing: &[i64], now: DateTime<Utc>) -> Self {
        OutboxCursor {
            high,
            gaps: missing
                .iter()
                .filter(|id| **id <= high)
                .map(|id| (*id, now))
                .collect(),
        }
    }

    /// The ids still missing below the mark.
    pub(crate) fn gaps(&self) -> Vec<i64> {
        self.gaps.keys().copied().collect()
    }

    /// Records that row `id` was read at `now`; whether it is new (not read before).
    pub(crate) fn read(&mut self, id: i64, now: DateTime<Utc>) -> bool {
        if id <= self.high {
            return self.gaps.remove(&id).is_some();
        }
        // Every id between the old mark and this one was skipped; keep at most MAX_GAPS of the
        // newest (a jump of the sequence after a crash can leave thousands of holes).
        let skipped_from = (self.high + 1).max(id - MAX_GAPS as i64);
        for missing in skipped_from..id {
            self.gaps.insert(missing, now);
        }
        self.high = id;
        true
    }

    /// Forgets the gaps missed before `settled_before`, and the oldest ones beyond MAX_GAPS.
    pub(crate) fn settle(&mut self, settled_before: DateTime<Utc>) {
        self.gaps
            .retain(|_, missed_at| *missed_at >= settled_before);
        while self.gaps.len() > MAX_GAPS {
            self.gaps.pop_first();
        }
    }
}

/// Reads new outbox rows for the whole instance and hands each to the streams of its fan.
pub async fn run_outbox_relay(
    state: AppState,
    every: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Start at the newest row: a stream opened from now on replays its fan's earlier rows
    // itself. Ids missing just below it may belong to transactions still committing.
    let (high, missing): (i64, Vec<i64>) = sqlx::query_as(
        "WITH top AS (SELECT COALESCE(max(id), 0) AS high FROM outbox)
         SELECT top.high, COALESCE(array_agg(g.id) FILTER (
                    WHERE g.id IS NOT NULL
                      AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.id = g.id)), '{}')
         FROM top LEFT JOIN LATERAL
              generate_series(GREATEST(top.high - $1, 1), top.high) AS g(id) ON true
         GROUP BY top.high",
    )
    .bind(IN_FLIGHT as i64)
    .fetch_one(&state.pg)
    .await?;
    let mut cursor = OutboxCursor::new(high, &missing, Utc::now());
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        // Two index scans (0026): the rows above the mark, and the gaps by id.
        let rows: Result<Vec<Notice>, _> =
            sqlx::query_as("SELECT * FROM fg_outbox_after($1, 1000, $2)")
                .bind(cursor.high)
                .bind(cursor.gaps())
                .fetch_all(&state.pg)
                .await;
        let mut rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay could not read; retrying");
                continue;
            }
        };
        rows.sort_unstable_by_key(|n| n.id);
        let now = Utc::now();
        for notice in rows {
            if !cursor.read(notice.id, now) {
                continue;
            }
            metrics::counter!("purchase_outbox_relayed_total").increment(1);
            let _ = state.live.sender.send(Message::Notice(Arc::new(notice)));
        }
        cursor.settle(now - SETTLE);
        metrics::gauge!("purchase_outbox_relay_gaps").set(cursor.gaps.len() as f64);
    }
}

/// The pass of a live stream: the `Authorization` header, or `?pass=` because a browser's
/// `EventSource` cannot send headers (request logs never include query strings).
struct StreamPass {
    event: EventId,
    identity: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PassQuery {
    pass: Option<String>,
}

impl FromRequestParts<AppState> for StreamPass {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Path(id) = Path::<i64>::from_request_parts(parts, state).await?;
        let event = EventId::from_path(id)?;
        let Query(query) = Query::<PassQuery>::from_request_parts(parts, state).await?;
        let token = shared::extract::bearer(parts)
            .map(str::to_owned)
            .or(query.pass)
            .ok_or_else(|| TokenError::Missing.into_api(TokenKind::Pass))?;
        let claims = state
            .passes
            .verify(&token, event)
            .await
            .map_err(|e| e.into_api(TokenKind::Pass))?;
        Ok(StreamPass {
            event,
            identity: claims.sub,
        })
    }
}

/// Decrements the open-stream count when a stream ends.
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("purchase_live_streams_open").decrement(1.0);
    }
}

async fn live(
    State(state): State<AppState>,
    pass: StreamPass,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let open = state.live.open.fetch_add(1, Ordering::Relaxed);
    let slot = StreamSlot(state.live.open.clone());
    metrics::gauge!("purchase_live_streams_open").increment(1.0);
    if open >= state.live.max_streams {
        return Err(ApiError::RateLimited {
            retry_after_secs: 5,
            message: "this instance has as many live streams open as it serves; retry shortly"
                .into(),
        });
    }
    let after: i64 = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Subscribe before replaying, so nothing falls between the two.
    let receiver = state.live.sender.subscribe();
    let replay: Vec<Notice> = sqlx::query_as("SELECT * FROM fg_outbox_of_fan($1, $2, $3)")
        .bind(pass.event.get())
        .bind(&pass.identity)
        .bind(after)
        .fetch_all(&state.pg)
        .await?;
    let event = pass.event.get();
    let identity: Arc<str> = pass.identity.into();
    let replayed: Arc<BTreeSet<i64>> = Arc::new(replay.iter().map(|n| n.id).collect());
    let first = futures::stream::iter(replay.into_iter().map(|n| Ok(notice_event(&n))));
    let shutdown = state.live.shutdown.clone();
    let rest = futures::stream::unfold((receiver, slot), move |(mut receiver, slot)| {
        let (identity, replayed) = (identity.clone(), replayed.clone());
        let shutdown = shutdown.clone();
        async move {
            loop {
                let received = tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    received = receiver.recv() => received,
                };
                let next = match received {
                    Ok(Message::Seats(change)) if change.event_id == event => {
                        let data = serde_json::to_string(&*change).unwrap_or_default();
                        Some(Event::default().event("seats").data(data))
                    }
                    Ok(Message::Notice(notice))
                        if notice.event_id == event
                            && *notice.identity == *identity
                            && !replayed.contains(&notice.id) =>
                    {
                        Some(notice_event(&notice))
                    }
                    Ok(_) => None,
                    // Too slow to keep up: say so; the client reloads the seat map.
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        Some(Event::default().event("lagged").data(missed.to_string()))
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                if let Some(next) = next {
                    return Some((Ok(next), (receiver, slot)));
                }
            }
        }
    });
    let stream = futures::StreamExt::chain(first, rest);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(20))))
}

fn notice_event(notice: &Notice) -> Event {
    Event::default()
        .id(notice.id.to_string())
        .event(notice.kind.clone())
        .data(serde_json::to_string(&notice.payload).unwrap_or_default())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedQuery {
    #[serde(default)]
    after: i64,
    limit: Option<i64>,
}

#[derive(Serialize)]
struct Feed {
    notices: Vec<Notice>,
    /// Pass as `after` for the next page.
    next_after: i64,
}

/// The outbox for notifiers: notices in id order after a cursor. A notifier keeps the cursor of
/// rows older than a minute (younger ids can still fill in below it).
async fn outbox_feed(
    State(state): State<AppState>,
    _organizer: Organizer,
    Query(query): Query<FeedQuery>,
) -> Result<Json<Feed>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) || query.after < 0 {
        return Err(ApiError::Unprocessable(
            "invalid_field",
            "limit: must be 1 to 1000; after: must not be negative".into(),
        ));
    }
    let notices: Vec<Notice> = sqlx::query_as("SELECT * FROM fg_outbox_after($1, $2, '{}')")
        .bind(query.after)
        .bind(limit)
        .fetch_all(&state.pg)
        .await?;
    let next_after = notices.last().map_or(query.after, |n| n.id);
    Ok(Json(Feed {
        notices,
        next_after,
    }))
}

#[cfg(test)]
mod tests {

    fn change(event_id: i64, seat_ids: &[i64], status: &str) -> SeatChange {
        SeatChange {
            event_id,
            seat_ids: seat_ids.to_vec(),
            status: status.into(),
        }
    }

    #[test]
    fn seat_changes_merge_per_event_and_status_and_each_seat_keeps_its_last_status() {
        let merged = coalesce(vec![
            change(1, &[10, 11], "held"),
            change(2, &[20], "held"),
            change(1, &[12], "held"),
            change(1, &[10, 11], "sold"),
            change(1, &[12], "available"),
            change(2, &[21], "held"),
        ]);
        assert_eq!(
            merged,
            vec![
                change(1, &[10, 11], "sold"),
                change(1, &[12], "available"),
                change(2, &[20, 21], "held"),
            ]
        );
        assert!(coalesce(Vec::new()).is_empty());
    }
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("a valid timestamp")
    }

    #[test]
    fn a_row_committed_after_a_higher_one_is_read_once_and_then_the_gap_closes() {
        let mut cursor = OutboxCursor::new(10, &[], at(0));
        // 11 and 13 still committing when 12 and 14 are read.
        assert!(cursor.read(12, at(0)));
        assert!(cursor.read(14, at(0)));
        assert_eq!(cursor.gaps(), vec![11, 13]);
        // A second read of the same rows sends nothing twice.
        assert!(!cursor.read(12, at(1)));
        assert!(!cursor.read(14, at(1)));
        // 13 commits: read once, and no longer looked for.
        assert!(cursor.read(13, at(1)));
        assert!(!cursor.read(13, at(2)));
        assert_eq!(cursor.gaps(), vec![11]);
        // 11 was rolled back: forgotten once settled, never reported.
        cursor.settle(at(0));
        assert_eq!(cursor.gaps(), vec![11]);
        cursor.settle(at(1));
        assert!(cursor.gaps().is_empty());
        assert!(
            !cursor.read(9, at(3)),
            "ids at or below the start are not new"
        );
    }

    #[test]
    fn ids_missing_at_start_are_looked_for() {
        let mut cursor = OutboxCursor::new(100, &[97, 99, 120], at(0));
        assert_eq!(
            cursor.gaps(),
            vec![97, 99],
            "only ids below the start are gaps"
        );
        assert!(cursor.read(99, at(1)));
        assert!(!cursor.read(98, at(1)), "98 existed at start: already read");
        assert!(cursor.read(101, at(1)));
        assert_eq!(cursor.gaps(), vec![97]);
    }

    #[test]
    fn a_jump_of_the_sequence_keeps_only_the_newest_gaps() {
        let mut cursor = OutboxCursor::new(0, &[], at(0));
        assert!(cursor.read(MAX_GAPS as i64 * 3, at(0)));
        let gaps = cursor.gaps();
        assert_eq!(gaps.len(), MAX_GAPS);
        assert_eq!(gaps.first(), Some(&(MAX_GAPS as i64 * 2)));
        assert_eq!(gaps.last(), Some(&(MAX_GAPS as i64 * 3 - 1)));
        // A late row inside the kept gaps is still delivered.
        assert!(cursor.read(MAX_GAPS as i64 * 3 - 1, at(1)));
        assert_eq!(cursor.gaps().len(), MAX_GAPS - 1);
    }
}
