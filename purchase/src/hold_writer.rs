//! Group commit of seat holds. A hold of named seats is handed to a few writer tasks: a writer
//! takes every hold waiting (up to [`MAX_BATCH`]) and takes them with one call of `fg_holds`
//! (migration 0019), which runs `fg_hold`'s statements once for the whole batch. Each hold keeps
//! its own answer, and is answered only after the transaction that took it has committed.
//!
//! Holds in one call never compete: a batch naming a pass or a seat twice is split into rounds
//! that do not, committed one after the other (so the later request sees the earlier one, as it
//! would have alone). A pass that already has an active hold (the new hold replaces it), a round
//! of one, and a call that fails are taken with `fg_hold` one at a time: a failed call wrote
//! nothing, and one whose connection broke may have committed, which a retry handles like any
//! replacement (the pass's new hold frees the seats of the committed one and takes them again).

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// Most holds in one transaction.
pub const MAX_BATCH: usize = 64;
/// Holds waiting for a writer at most; more make requests wait (back-pressure).
const QUEUE_DEPTH: usize = 4_096;

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
type Pending = shared::batch::Pending<NewHold, Outcome>;

#[derive(Clone)]
pub struct HoldWriter {
    writers: shared::batch::Writers<NewHold, Outcome>,
}

impl HoldWriter {
    /// Starts `writers` writer tasks on `pg` (they drain their queue before stopping).
    pub fn start(pg: PgPool, writers: usize) -> Self {
        let writers =
            shared::batch::Writers::start(writers, MAX_BATCH, QUEUE_DEPTH, move |batch| {
                write_batch(pg.clone(), batch)
            });
        HoldWriter { writers }
    }

    /// Takes `hold` (with whatever other holds are waiting) and returns its outcome.
    pub async fn hold(&self, hold: NewHold) -> Outcome {
        self.writers
            .submit(hold)
            .await
            .unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

/// Splits `items` into rounds in which no pass and no seat appears twice, keeping their order:
/// each item goes to the first round after every round that shares a pass or seat with it.
pub(crate) fn rounds<T>(items: Vec<T>, hold: impl Fn(&T) -> &NewHold) -> Vec<Vec<T>> {
    let mut rounds: Vec<(HashSet<Uuid>, HashSet<i64>, Vec<T>)> = Vec::new();
    for item in items {
        let h = hold(&item);
        let last_conflict = rounds.iter().rposition(|(passes, seats, _)| {
            passes.contains(&h.jti) || h.seat_ids.iter().any(|s| seats.contains(s))
        });
        let at = last_conflict.map_or(0, |i| i + 1);
        if at == rounds.len() {
            rounds.push(Default::default());
        }
        let (passes, seats, members) = &mut rounds[at];
        passes.insert(h.jti);
        seats.extend(h.seat_ids.iter().copied());
        members.push(item);
    }
    rounds.into_iter().map(|(_, _, members)| members).collect()
}

async fn write_batch(pg: PgPool, batch: Vec<Pending>) {
    metrics::histogram!("purchase_hold_batch_size").record(batch.len() as f64);
    for round in rounds(batch, |p| &p.item) {
        let mut alone = Vec::new();
        if round.len() == 1 {
            alone = round;
        } else {
            match hold_batch(&pg, &round).await {
                Ok(outcomes) if outcomes.len() == round.len() => {
                    for (pending, outcome) in round.into_iter().zip(outcomes) {
                        if outcome.code == "defer" {
                            alone.push(pending);
                        } else {
                            let _ = pending.reply.send(Ok(outcome));
                        }
                    }
                }
                Ok(_) => {
                    tracing::error!("fg_holds answered for the wrong holds");
                    alone = round;
                }
                Err(e) => {
                    metrics::counter!("purchase_hold_batches_retried_total").increment(1);
                    tracing::debug!(error = %e, holds = round.len(), "hold batch failed; holding one by one");
                    alone = round;
                }
            }
        }
        for pending in alone {
            let outcome = hold_one(&pg, &pending.item).await;
            let _ = pending.reply.send(outcome);
        }
    }
}

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
async fn hold_batch(pg: &PgPool, round: &[Pending]) -> Result<Vec<HoldOutcome>, sqlx::Error> {
    let holds: Vec<&NewHold> = round.iter().map(|p| &p.item).collect();
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
    Ok(rows
        .into_iter()
        .enumerate()
        .filter(|(i, row)| row.req == *i as i32 + 1)
        .map(|(_, row)| row.outcome)
        .collect())
}

/// One row of `fg_holds`: the request's index and its answer.
#[derive(sqlx::FromRow)]
struct BatchRow {
    req: i32,
    #[sqlx(flatten)]
    outcome: HoldOutcome,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(pass: u128, seats: &[i64]) -> NewHold {
        NewHold {
            event: 1,
            jti: Uuid::from_u128(pass),
            seat_ids: seats.to_vec(),
            hold_id: Uuid::now_v7(),
            expires_at: Utc::now(),
        }
    }

    fn shape(rounds: &[Vec<NewHold>]) -> Vec<Vec<u128>> {
        rounds
            .iter()
            .map(|r| r.iter().map(|h| h.jti.as_u128()).collect())
            .collect()
    }

    #[test]
    fn rounds_never_name_a_pass_or_seat_twice_and_keep_the_order_of_competitors() {
        let batch = vec![
            hold(1, &[10, 11]),
            hold(2, &[11, 12]), // seat 11 again: after 1
            hold(3, &[20]),
            hold(1, &[30]),     // pass 1 again: after 1
            hold(4, &[12, 40]), // seat 12 again: after 2
            hold(5, &[50]),
        ];
        let rounds = rounds(batch, |h| h);
        assert_eq!(shape(&rounds), vec![vec![1, 3, 5], vec![2, 1], vec![4]]);
        for round in &rounds {
            let mut passes = HashSet::new();
            let mut seats = HashSet::new();
            for h in round {
                assert!(passes.insert(h.jti));
                assert!(h.seat_ids.iter().all(|s| seats.insert(*s)));
            }
        }
    }
}
