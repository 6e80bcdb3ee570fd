//! Group commit of seat holds (holds by quantity: [`GeneralHolds`], at the end). A hold of
//! named seats is handed to a few writer tasks: a writer takes every hold waiting (up to
//! `Batched::MAX_BATCH`, 64) and takes them with one call of `fg_holds` (migration 0019), which
//! runs `fg_hold`'s statements once for the whole batch. Each hold keeps
//! its own answer, and is answered only after the transaction that took it has committed.
//!
//! Holds in one call never compete: a batch naming a pass or a seat twice is split into rounds
//! that do not, committed one after the other (so the later request sees the earlier one, as it
//! would have alone). A pass that already has an active hold (the new hold replaces it), a round
//! of one, and a call that fails are taken with `fg_hold` one at a time: a failed call wrote
//! nothing, and one whose connection broke may have committed, which a retry handles like any
//! replacement (the pass's new hold frees the seats of the committed one and takes them again).

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::rounds::Batched;

/// A hold of named seats, checked: 1..limit distinct seats, sorted.
#[derive(Clone, Debug)]
pub struct NewHold {
    pub event: i64,
    pub jti: Uuid,
    pub seat_ids: Vec<i64>,
    pub hold_id: Uuid,
    pub expires_at: DateTime<Utc>,
}

/// What `fg_hold` (migrations 0013, 0014) and `fg_holds` (0019) answer for one hold.
#[derive(Debug, sqlx::FromRow)]
pub struct HoldOutcome {
    pub code: String,
    pub seat_ids: Option<Vec<i64>>,
    pub freed: Option<Vec<i64>>,
    pub total_cents: Option<i64>,
    pub detail: Option<String>,
}

pub type Outcome = Result<HoldOutcome, sqlx::Error>;
/// Holds of named seats, written in rounds (`rounds.rs`).
pub struct Holds;

impl Batched for Holds {
    type Item = NewHold;
    type Answer = HoldOutcome;
    const SIZE_METRIC: &'static str = "purchase_hold_batch_size";
    const RETRIED_METRIC: &'static str = "purchase_hold_batches_retried_total";

    fn claims(item: &NewHold) -> (Uuid, &[i64]) {
        (item.jti, &item.seat_ids)
    }

    fn deferred(answer: &HoldOutcome) -> bool {
        answer.code == "defer"
    }

    async fn batch(pg: &PgPool, items: &[&NewHold]) -> Result<Vec<HoldOutcome>, sqlx::Error> {
        hold_batch(pg, items).await
    }

    async fn single(pg: &PgPool, item: &NewHold) -> Outcome {
        hold_one(pg, item).await
    }
}

pub type HoldWriter = crate::rounds::RoundWriter<Holds>;

/// One hold alone (`fg_hold`): also replaces the pass's active hold.
async fn hold_one(pg: &PgPool, h: &NewHold) -> Outcome {
    sqlx::query_as("SELECT * FROM fg_hold($1, $2, $3, NULL, NULL, $4, $5)")
        .bind(h.event)
        .bind(h.jti)
        .bind(&h.seat_ids)
        .bind(h.hold_id)
        .bind(h.expires_at)
        .fetch_one(pg)
        .await
}

/// A round in one statement (`fg_holds`, migration 0019); outcomes in order.
async fn hold_batch(pg: &PgPool, holds: &[&NewHold]) -> Result<Vec<HoldOutcome>, sqlx::Error> {
    let (mut seat_req, mut seat_ids) = (Vec::new(), Vec::new());
    for (index, hold) in holds.iter().enumerate() {
        for seat in &hold.seat_ids {
            seat_req.push(index as i32 + 1);
            seat_ids.push(*seat);
        }
    }
    let rows: Vec<BatchRow> = sqlx::query_as(
        "SELECT req, code, seat_ids, freed, total_cents, detail
         FROM fg_holds($1, $2, $3, $4, $5, $6) ORDER BY req",
    )
    .bind(holds.iter().map(|h| h.event).collect::<Vec<_>>())
    .bind(holds.iter().map(|h| h.jti).collect::<Vec<_>>())
    .bind(holds.iter().map(|h| h.hold_id).collect::<Vec<_>>())
    .bind(holds.iter().map(|h| h.expires_at).collect::<Vec<_>>())
    .bind(&seat_req)
    .bind(&seat_ids)
    .fetch_all(pg)
    .await?;
    Ok(in_order(rows))
}

/// The answers of a batch call, request 1 first (a row out of place is dropped, and the writer
/// then sees too few answers and retries the items alone).
fn in_order(rows: Vec<BatchRow>) -> Vec<HoldOutcome> {
    rows.into_iter()
        .enumerate()
        .filter(|(i, row)| row.req == *i as i32 + 1)
        .map(|(_, row)| row.outcome)
        .collect()
}

/// One row of `fg_holds`: the request's index and its answer.
#[derive(sqlx::FromRow)]
struct BatchRow {
    req: i32,
    #[sqlx(flatten)]
    outcome: HoldOutcome,
}

/// A hold of general-admission places by quantity, checked: a ticket type and 1..limit places.
#[derive(Clone, Debug)]
pub struct NewGeneralHold {
    pub event: i64,
    pub jti: Uuid,
    pub ticket_type: String,
    pub quantity: i32,
    pub hold_id: Uuid,
    pub expires_at: DateTime<Utc>,
}

/// Holds by quantity, written together: one call of `fg_holds_general` (migration 0024) takes
/// a batch in order with `fg_hold`'s statements, in one transaction, so each gets the answer it
/// would have had alone. They claim no named seat; a pass named twice still goes in two rounds.
pub struct GeneralHolds;

impl Batched for GeneralHolds {
    type Item = NewGeneralHold;
    type Answer = HoldOutcome;
    const SIZE_METRIC: &'static str = "purchase_general_hold_batch_size";
    const RETRIED_METRIC: &'static str = "purchase_general_hold_batches_retried_total";

    fn claims(item: &NewGeneralHold) -> (Uuid, &[i64]) {
        (item.jti, &[])
    }

    fn deferred(_: &HoldOutcome) -> bool {
        false
    }

    async fn batch(
        pg: &PgPool,
        items: &[&NewGeneralHold],
    ) -> Result<Vec<HoldOutcome>, sqlx::Error> {
        let rows: Vec<BatchRow> = sqlx::query_as(
            "SELECT req, code, seat_ids, freed, total_cents, detail
             FROM fg_holds_general($1, $2, $3, $4, $5, $6) ORDER BY req",
        )
        .bind(items.iter().map(|h| h.event).collect::<Vec<_>>())
        .bind(items.iter().map(|h| h.jti).collect::<Vec<_>>())
        .bind(
            items
                .iter()
                .map(|h| h.ticket_type.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(items.iter().map(|h| h.quantity).collect::<Vec<_>>())
        .bind(items.iter().map(|h| h.hold_id).collect::<Vec<_>>())
        .bind(items.iter().map(|h| h.expires_at).collect::<Vec<_>>())
        .fetch_all(pg)
        .await?;
        Ok(in_order(rows))
    }

    async fn single(pg: &PgPool, h: &NewGeneralHold) -> Outcome {
        sqlx::query_as("SELECT * FROM fg_hold($1, $2, '{}', $3, $4, $5, $6)")
            .bind(h.event)
            .bind(h.jti)
            .bind(&h.ticket_type)
            .bind(h.quantity)
            .bind(h.hold_id)
            .bind(h.expires_at)
            .fetch_one(pg)
            .await
    }
}

pub type GeneralHoldWriter = crate::rounds::RoundWriter<GeneralHolds>;
