//! Group commit of checkout starts. A checkout's start (claiming its Idempotency-Key, marking the
//! hold as being paid for, recording the pending payment) is handed to a few writer tasks: a
//! writer takes every start waiting (up to `Batched::MAX_BATCH`, 64) and runs the common case — a fresh
//! key for the pass's own active hold — for all of them with one call of `fg_checkout_begins`
//! (migrations 0020, 0040). A start is answered only after the transaction that made it has
//! committed. Each claim is an attempt with a lease on the key's payment (`attempt`, its fencing
//! token, returned with the claim): a first attempt in the batch, a key claimed again (its
//! earlier request given back after a failure) alone, where its lease is renewed.
//!
//! A pass named twice is split into rounds (the later start sees the earlier one). Every start
//! the batch call does not claim (`defer`: a key already used or with a payment already, a hold
//! that is not the pass's or
//! not active, a pass that has bought, a key another transaction claims), a round of one, and
//! the starts of a call that fails run through `fg_checkout_begin` one at a time, which gives
//! each its precise answer. A deferred start left nothing behind in the batch call, and a failed
//! call wrote nothing, or committed (connection lost after commit), in which case the single
//! call answers as a retry of the same key would (`key_running`: the client retries).

use sqlx::PgPool;
use uuid::Uuid;

use crate::rounds::Batched;

/// A checkout about to charge a card, as `fg_checkout_begin` takes it.
#[derive(Clone, Debug)]
pub struct NewStart {
    pub event: i64,
    pub jti: Uuid,
    pub key: String,
    pub hash: Vec<u8>,
    pub hold_id: Uuid,
    pub payment_key: String,
    pub provider: &'static str,
    pub identity: String,
    pub ticket: Uuid,
}

/// What `fg_checkout_begin` (migrations 0013, 0040) answers; `fg_checkout_begins` (0020, 0040)
/// answers `claimed` the same way.
#[derive(Debug, Default, sqlx::FromRow)]
pub struct BeginOutcome {
    pub code: String,
    pub status_code: Option<i32>,
    pub response: Option<serde_json::Value>,
    pub seat_ids: Option<Vec<i64>>,
    pub total_cents: Option<i64>,
    pub detail: Option<String>,
    /// The attempt claimed (`claimed`): the fencing token of this checkout's lease on its
    /// payment (migration 0040).
    pub attempt: Option<i32>,
}

pub type Outcome = Result<BeginOutcome, sqlx::Error>;
/// Checkout starts, written in rounds (`rounds.rs`): one per pass in a round.
pub struct Starts;

impl Batched for Starts {
    type Item = NewStart;
    type Answer = BeginOutcome;
    const SIZE_METRIC: &'static str = "purchase_checkout_start_batch_size";
    const RETRIED_METRIC: &'static str = "purchase_checkout_start_batches_retried_total";

    fn claims(item: &NewStart) -> (Uuid, &[i64]) {
        (item.jti, &[])
    }

    fn deferred(answer: &BeginOutcome) -> bool {
        answer.code == "defer"
    }

    async fn batch(pg: &PgPool, items: &[&NewStart]) -> Result<Vec<BeginOutcome>, sqlx::Error> {
        begin_batch(pg, items).await
    }

    async fn single(pg: &PgPool, item: &NewStart) -> Outcome {
        begin_one(pg, item).await
    }
}

pub type BeginWriter = crate::rounds::RoundWriter<Starts>;

/// One checkout start alone (`fg_checkout_begin`): every answer, replays included.
async fn begin_one(pg: &PgPool, c: &NewStart) -> Outcome {
    sqlx::query_as("SELECT * FROM fg_checkout_begin($1, $2, $3, $4, $5, $6, $7, $8, $9)")
        .bind(c.event)
        .bind(c.jti)
        .bind(&c.key)
        .bind(&c.hash)
        .bind(c.hold_id)
        .bind(&c.payment_key)
        .bind(c.provider)
        .bind(&c.identity)
        .bind(c.ticket)
        .fetch_one(pg)
        .await
}

/// One row of `fg_checkout_begins`.
#[derive(sqlx::FromRow)]
struct BatchRow {
    req: i32,
    code: String,
    seat_ids: Option<Vec<i64>>,
    total_cents: Option<i64>,
    attempt: Option<i32>,
}

/// A round in one statement (`fg_checkout_begins`, migration 0020); outcomes in order. The
/// provider is the same for every checkout of an instance.
async fn begin_batch(pg: &PgPool, starts: &[&NewStart]) -> Result<Vec<BeginOutcome>, sqlx::Error> {
    let rows: Vec<BatchRow> = sqlx::query_as(
        "SELECT req, code, seat_ids, total_cents, attempt
         FROM fg_checkout_begins($1, $2, $3, $4, $5, $6, $7, $8, $9) ORDER BY req",
    )
    .bind(starts.iter().map(|c| c.event).collect::<Vec<_>>())
    .bind(starts.iter().map(|c| c.jti).collect::<Vec<_>>())
    .bind(starts.iter().map(|c| c.key.as_str()).collect::<Vec<_>>())
    .bind(starts.iter().map(|c| c.hash.as_slice()).collect::<Vec<_>>())
    .bind(starts.iter().map(|c| c.hold_id).collect::<Vec<_>>())
    .bind(
        starts
            .iter()
            .map(|c| c.payment_key.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(starts[0].provider)
    .bind(
        starts
            .iter()
            .map(|c| c.identity.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(starts.iter().map(|c| c.ticket).collect::<Vec<_>>())
    .fetch_all(pg)
    .await?;
    Ok(rows
        .into_iter()
        .enumerate()
        .filter(|(i, row)| row.req == *i as i32 + 1)
        .map(|(_, row)| BeginOutcome {
            code: row.code,
            seat_ids: row.seat_ids,
            total_cents: row.total_cents,
            attempt: row.attempt,
            ..Default::default()
        })
        .collect())
}
