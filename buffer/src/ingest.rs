//! Group commit for joins. Handlers hand each join to a few writer tasks and wait for its
//! transaction: a writer takes everything queued (up to [`MAX_BATCH`]) and inserts it in one
//! transaction, so a burst of a thousand joins costs a handful of commits instead of a thousand.
//! A join is still acknowledged only after the transaction that holds it has committed.
//!
//! The writer also signs the batch's join receipts, with one signature over all of them
//! (`shared::receipt`): the expensive public-key step is shared like the commit.
//!
//! Each batch takes the shared draw lock of every event in it (in event order), so it is ordered
//! against the draw exactly like a single join: joins committed before the draw are in it, later
//! ones are live arrivals.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use shared::ids::{EventId, Identity, TicketId};
use shared::receipt;
use shared::token::{ReceiptClaims, Signer, TokenKind};
use shared::ApiError;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::mirror::Appender;

/// Most joins in one transaction.
pub const MAX_BATCH: usize = 1_000;
/// Joins waiting for a writer at most; more make handlers wait (back-pressure).
const QUEUE_DEPTH: usize = 20_000;

/// A join as Postgres holds it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct JoinRow {
    pub ticket_id: Uuid,
    pub event_id: i64,
    pub identity: String,
    pub joined_at: DateTime<Utc>,
    /// The place in line: set when the join is recorded for a live arrival; `None` for a
    /// presale join, whose place the draw decides (see `draw::DrawnOrder::position_of`).
    pub position: Option<i64>,
    pub phase: String,
    /// The fan gave up the place (`POST …/leave`).
    pub left: bool,
}

/// What a join's receipt says beyond its row: the draw commitment and the receipt's expiry.
#[derive(Clone, Copy, Debug)]
pub struct ReceiptTerms {
    pub commitment: [u8; 32],
    pub expires_at: i64,
}

impl ReceiptTerms {
    /// The receipt's claims for the join `row` of `event`.
    pub fn claims(&self, signer: &Signer, event: EventId, row: &JoinRow) -> ReceiptClaims {
        let iat = row.joined_at.timestamp();
        ReceiptClaims {
            iss: signer.issuer().to_owned(),
            aud: TokenKind::Receipt.audience().to_owned(),
            sub: row.identity.clone(),
            evt: event,
            tkt: TicketId(row.ticket_id),
            cmt: hex::encode(self.commitment),
            iat,
            nbf: iat,
            exp: self.expires_at,
        }
    }
}

/// A recorded join: its row, whether the identity already had it, and its signed receipt.
pub struct Joined {
    pub row: JoinRow,
    pub resumed: bool,
    pub receipt: String,
}

struct Pending {
    event: EventId,
    ticket: TicketId,
    identity: Identity,
    terms: ReceiptTerms,
    reply: oneshot::Sender<Result<Joined, ApiError>>,
}

#[derive(Clone)]
pub struct JoinWriter {
    queue: mpsc::Sender<Pending>,
}

impl JoinWriter {
    /// Starts `writers` writer tasks on `pg`; they stop when `shutdown` fires and the queue is
    /// drained.
    pub fn start(
        pg: PgPool,
        signer: Signer,
        mirror: Appender,
        writers: usize,
        shutdown: CancellationToken,
    ) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers.max(1) {
            tokio::spawn(write_batches(
                pg.clone(),
                signer.clone(),
                mirror.clone(),
                receiver.clone(),
                shutdown.clone(),
            ));
        }
        JoinWriter { queue }
    }

    /// Records the join of `identity` (or finds the place it already has) durably, and signs
    /// its receipt.
    pub async fn join(
        &self,
        event: EventId,
        ticket: TicketId,
        identity: Identity,
        terms: ReceiptTerms,
    ) -> Result<Joined, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending {
                event,
                ticket,
                identity,
                terms,
                reply,
            })
            .await
            .map_err(|_| ApiError::internal("join writer stopped"))?;
        answer
            .await
            .map_err(|_| ApiError::internal("join writer dropped a join"))?
    }
}

async fn write_batches(
    pg: PgPool,
    signer: Signer,
    mirror: Appender,
    receiver: Arc<Mutex<mpsc::Receiver<Pending>>>,
    shutdown: CancellationToken,
) {
    loop {
        let Some(batch) = shared::batch::next(&receiver, MAX_BATCH, &shutdown).await else {
            return;
        };
        metrics::histogram!("buffer_join_batch_size").record(batch.len() as f64);
        let started = std::time::Instant::now();
        match write(&pg, &batch).await {
            Ok(rows) => {
                metrics::histogram!("buffer_join_batch_seconds", "stage" => "write")
                    .record(started.elapsed().as_secs_f64());
                mirror_arrivals(&mirror, &rows);
                let started = std::time::Instant::now();
                answer(&signer, batch, rows);
                metrics::histogram!("buffer_join_batch_seconds", "stage" => "answer")
                    .record(started.elapsed().as_secs_f64());
            }
            Err(e) => {
                tracing::error!(error = %e, joins = batch.len(), "join batch failed");
                // Postgres out of reach or overloaded (no connection within the pool's
                // timeout): 503 with Retry-After, like any other request that cannot get one.
                let unavailable = shared::error::is_unavailable_db(&e);
                for pending in batch {
                    let _ = pending.reply.send(Err(if unavailable {
                        ApiError::Unavailable(
                            "unavailable",
                            "the line cannot record joins right now; retry shortly".into(),
                        )
                    } else {
                        ApiError::internal("the join could not be recorded")
                    }));
                }
            }
        }
    }
}

/// Hands the batch's new live arrivals, committed with their places, to the Redis mirror.
fn mirror_arrivals(mirror: &Appender, rows: &HashMap<Uuid, (JoinRow, bool)>) {
    let mut by_event: HashMap<i64, Vec<(i64, Uuid)>> = HashMap::new();
    for (row, resumed) in rows.values() {
        if let (false, Some(position)) = (*resumed, row.position) {
            by_event
                .entry(row.event_id)
                .or_default()
                .push((position, row.ticket_id));
        }
    }
    for (event, places) in by_event {
        if let Some(event) = EventId::new(event) {
            mirror.append(event, places);
        }
    }
}

/// Signs the committed batch's receipts together and answers every join.
fn answer(signer: &Signer, batch: Vec<Pending>, mut rows: HashMap<Uuid, (JoinRow, bool)>) {
    let mut found = Vec::with_capacity(batch.len());
    for pending in batch {
        match rows.remove(&pending.ticket.0) {
            Some((row, resumed)) => found.push((pending, row, resumed)),
            // Its event was deleted after the handler read it: nothing was recorded.
            None => {
                let _ = pending.reply.send(Err(ApiError::NotFound(
                    "event_not_found",
                    "this event no longer exists".into(),
                )));
            }
        }
    }
    let claims: Vec<ReceiptClaims> = found
        .iter()
        .map(|(pending, row, _)| pending.terms.claims(signer, pending.event, row))
        .collect();
    match receipt::sign_batch(signer, &claims) {
        Ok(receipts) => {
            for ((pending, row, resumed), receipt) in found.into_iter().zip(receipts) {
                let _ = pending.reply.send(Ok(Joined {
                    row,
                    resumed,
                    receipt,
                }));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "signing a batch of receipts failed");
            for (pending, _, _) in found {
                let _ = pending.reply.send(Err(ApiError::internal(
                    "the join was recorded but its receipt could not be signed; join again",
                )));
            }
        }
    }
}

/// Inserts a batch in one transaction; answers per pending ticket id: the row (its own, or the
/// one its identity already had) and whether it already existed.
///
/// A join to a drawn event is a live arrival and gets its place at the back here, in the same
/// transaction: the event's `draws.tail` advances by the batch's new arrivals (its row lock
/// orders concurrent batches) and they take the numbers after it in the batch's order, which is
/// their arrival order. The position is committed with the join or not at all, so no position
/// is ever given twice or lost, whatever happens to Redis.
///
/// Anonymous joins carry an identity minted from their fresh ticket id, so they cannot collide
/// with an earlier join: they go in with `COPY`, half the per-row cost of an `INSERT`. Joins under
/// an asserted identity may meet the place that identity already has, so they take
/// `INSERT … ON CONFLICT` (first, to learn which are new) and read back the existing row.
async fn write(
    pg: &PgPool,
    batch: &[Pending],
) -> Result<HashMap<Uuid, (JoinRow, bool)>, sqlx::Error> {
    let events: BTreeSet<EventId> = batch.iter().map(|p| p.event).collect();
    let mut tx = pg.begin().await?;
    for event in &events {
        shared::db::lock_draw(&mut tx, *event, false).await?;
    }
    // Under the shared draw lock, a drawn event stays drawn and an undrawn one undrawn until
    // commit: joins to a drawn event are live arrivals. `now()` is the transaction's time, the
    // `joined_at` default of every row it inserts.
    // The events are locked against deletion once per batch (what a foreign key would do for
    // every row, migration 0015): a join for an event deleted meanwhile is not recorded.
    let event_ids: Vec<i64> = events.iter().map(|e| e.get()).collect();
    let (now, existing, drawn): (DateTime<Utc>, Vec<i64>, Vec<i64>) = sqlx::query_as(
        "WITH e AS (SELECT id FROM events WHERE id = ANY($1) FOR KEY SHARE)
         SELECT now(), COALESCE(array_agg(e.id), '{}'),
                COALESCE(array_agg(e.id) FILTER (WHERE d.drawn_at IS NOT NULL), '{}')
         FROM e LEFT JOIN draws d ON d.event_id = e.id",
    )
    .bind(&event_ids)
    .fetch_one(&mut *tx)
    .await?;
    let phase = |event: EventId| {
        if drawn.contains(&event.get()) {
            "live"
        } else {
            "presale"
        }
    };
    let recorded: Vec<&Pending> = batch
        .iter()
        .filter(|p| existing.contains(&p.event.get()))
        .collect();
    let asserted: Vec<&Pending> = recorded
        .iter()
        .copied()
        .filter(|p| !p.identity.is_anonymous_for(p.ticket))
        .collect();
    let mut rows = HashMap::with_capacity(batch.len());

    // Asserted identities first: which of them are new decides how many places are given.
    let mut created_asserted: HashMap<Uuid, JoinRow> = HashMap::new();
    if !asserted.is_empty() {
        let tickets: Vec<Uuid> = asserted.iter().map(|p| p.ticket.0).collect();
        let event_ids: Vec<i64> = asserted.iter().map(|p| p.event.get()).collect();
        let identities: Vec<&str> = asserted.iter().map(|p| p.identity.as_str()).collect();
        let phases: Vec<&str> = asserted.iter().map(|p| phase(p.event)).collect();
        let inserted: Vec<JoinRow> = sqlx::query_as(
            "INSERT INTO joins (ticket_id, event_id, identity, phase)
             SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::text[], $4::text[])
             ON CONFLICT (event_id, identity) WHERE identity NOT LIKE 'anon:%' DO NOTHING
             RETURNING ticket_id, event_id, identity, joined_at, position, phase,
                       left_at IS NOT NULL AS left",
        )
        .bind(&tickets)
        .bind(&event_ids)
        .bind(&identities)
        .bind(&phases)
        .fetch_all(&mut *tx)
        .await?;
        created_asserted = inserted.into_iter().map(|r| (r.ticket_id, r)).collect();
    }

    // Places at the back for the new live arrivals, in the batch's (arrival) order.
    let new_live: Vec<&Pending> = recorded
        .iter()
        .copied()
        .filter(|p| phase(p.event) == "live")
        .filter(|p| {
            p.identity.is_anonymous_for(p.ticket) || created_asserted.contains_key(&p.ticket.0)
        })
        .collect();
    let mut positions: HashMap<Uuid, i64> = HashMap::with_capacity(new_live.len());
    for event in &events {
        let arrivals: Vec<&&Pending> = new_live.iter().filter(|p| p.event == *event).collect();
        if arrivals.is_empty() {
            continue;
        }
        let tail: i64 = sqlx::query_scalar(
            "UPDATE draws SET tail = tail + $2 WHERE event_id = $1 RETURNING tail",
        )
        .bind(event.get())
        .bind(arrivals.len() as i64)
        .fetch_one(&mut *tx)
        .await?;
        let first = tail - arrivals.len() as i64 + 1;
        for (i, p) in arrivals.iter().enumerate() {
            positions.insert(p.ticket.0, first + i as i64);
        }
    }

    let fresh: Vec<&Pending> = recorded
        .iter()
        .copied()
        .filter(|p| p.identity.is_anonymous_for(p.ticket))
        .collect();
    if !fresh.is_empty() {
        // Text format: ticket ids, event ids, `anon:<uuid>`, the phase and numbers need no
        // escaping; `\N` is COPY's null.
        let mut data = String::with_capacity(fresh.len() * 104);
        for p in &fresh {
            let _ = write!(
                data,
                "{}\t{}\t{}\t{}\t",
                p.ticket.0,
                p.event.get(),
                p.identity.as_str(),
                phase(p.event)
            );
            let _ = match positions.get(&p.ticket.0) {
                Some(position) => writeln!(data, "{position}"),
                None => writeln!(data, "\\N"),
            };
        }
        let mut copy = tx
            .copy_in_raw("COPY joins (ticket_id, event_id, identity, phase, position) FROM STDIN")
            .await?;
        copy.send(data.into_bytes()).await?;
        copy.finish().await?;
        for p in &fresh {
            let row = JoinRow {
                ticket_id: p.ticket.0,
                event_id: p.event.get(),
                identity: p.identity.as_str().to_owned(),
                joined_at: now,
                position: positions.get(&p.ticket.0).copied(),
                phase: phase(p.event).to_owned(),
                left: false,
            };
            rows.insert(p.ticket.0, (row, false));
        }
    }

    if !asserted.is_empty() {
        let placed: Vec<(Uuid, i64)> = created_asserted
            .keys()
            .filter_map(|t| positions.get(t).map(|p| (*t, *p)))
            .collect();
        if !placed.is_empty() {
            let (tickets, numbers): (Vec<Uuid>, Vec<i64>) = placed.iter().copied().unzip();
            sqlx::query(
                "UPDATE joins j SET position = w.position
                 FROM UNNEST($1::uuid[], $2::bigint[]) AS w(ticket_id, position)
                 WHERE j.ticket_id = w.ticket_id",
            )
            .bind(&tickets)
            .bind(&numbers)
            .execute(&mut *tx)
            .await?;
        }
        let mut by_identity: HashMap<(i64, String), JoinRow> = created_asserted
            .into_values()
            .map(|mut r| {
                r.position = r.position.or_else(|| positions.get(&r.ticket_id).copied());
                ((r.event_id, r.identity.clone()), r)
            })
            .collect();
        let created: HashSet<Uuid> = by_identity.values().map(|r| r.ticket_id).collect();
        let missing: Vec<&&Pending> = asserted
            .iter()
            .filter(|p| !by_identity.contains_key(&(p.event.get(), p.identity.as_str().to_owned())))
            .collect();
        if !missing.is_empty() {
            let existing: Vec<JoinRow> = sqlx::query_as(
                "SELECT j.ticket_id, j.event_id, j.identity, j.joined_at, j.position, j.phase,
                        j.left_at IS NOT NULL AS left
                 FROM joins j JOIN UNNEST($1::bigint[], $2::text[]) AS w(event_id, identity)
                   ON j.event_id = w.event_id AND j.identity = w.identity
                 WHERE j.identity NOT LIKE 'anon:%'",
            )
            .bind(missing.iter().map(|p| p.event.get()).collect::<Vec<_>>())
            .bind(
                missing
                    .iter()
                    .map(|p| p.identity.as_str())
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&mut *tx)
            .await?;
            for row in existing {
                by_identity.insert((row.event_id, row.identity.clone()), row);
            }
        }
        for p in &asserted {
            if let Some(row) = by_identity.get(&(p.event.get(), p.identity.as_str().to_owned())) {
                rows.insert(p.ticket.0, (row.clone(), !created.contains(&p.ticket.0)));
            }
        }
    }
    tx.commit().await?;
    Ok(rows)
}
