//! The shared step of the hold and checkout-start writers (group commit with answers that
//! depend on each other): a batch is split into rounds in which no pass and no seat appears
//! twice, each round is one call of the batch function, and what that call leaves to a single
//! call (`defer`), a round of one, and every item of a call that failed go through the single
//! function one at a time — which gives each item the answer it would have got alone.

use std::collections::HashSet;
use std::future::Future;

use sqlx::PgPool;
use uuid::Uuid;

/// A kind of item written in rounds.
pub trait Batched: 'static {
    type Item: Send + Sync + 'static;
    type Answer: Send + 'static;
    /// Most items in one call; most items waiting (more make callers wait: back-pressure).
    const MAX_BATCH: usize = 64;
    const QUEUE_DEPTH: usize = 4_096;
    /// Histogram of batch sizes, and counter of batch calls that failed (items then go alone).
    const SIZE_METRIC: &'static str;
    const RETRIED_METRIC: &'static str;
    /// The pass and the seats an item claims: items sharing either go in different rounds.
    fn claims(item: &Self::Item) -> (Uuid, &[i64]);
    /// Whether the batch call left this item to the single call.
    fn deferred(answer: &Self::Answer) -> bool;
    /// One call for a round (no pass or seat twice); one answer per item, in order.
    fn batch(
        pg: &PgPool,
        items: &[&Self::Item],
    ) -> impl Future<Output = Result<Vec<Self::Answer>, sqlx::Error>> + Send;
    /// One item alone.
    fn single(
        pg: &PgPool,
        item: &Self::Item,
    ) -> impl Future<Output = Result<Self::Answer, sqlx::Error>> + Send;
}

pub type Pending<B> =
    shared::batch::Pending<<B as Batched>::Item, Result<<B as Batched>::Answer, sqlx::Error>>;

/// Splits `items` into rounds in which no pass and no seat appears twice, keeping their order:
/// each item goes to the first round after every round that shares a pass or seat with it.
/// `claims` names an item's pass and seats.
pub(crate) fn rounds<T>(items: Vec<T>, claims: impl Fn(&T) -> (Uuid, &[i64])) -> Vec<Vec<T>> {
    let mut rounds: Vec<(HashSet<Uuid>, HashSet<i64>, Vec<T>)> = Vec::new();
    for item in items {
        let (pass, wanted) = claims(&item);
        let last_conflict = rounds.iter().rposition(|(passes, seats, _)| {
            passes.contains(&pass) || wanted.iter().any(|s| seats.contains(s))
        });
        let at = last_conflict.map_or(0, |i| i + 1);
        if at == rounds.len() {
            rounds.push(Default::default());
        }
        let (passes, seats, members) = &mut rounds[at];
        passes.insert(pass);
        seats.extend(wanted.iter().copied());
        members.push(item);
    }
    rounds.into_iter().map(|(_, _, members)| members).collect()
}

/// Writer tasks for `B`: items handed over together are written in rounds (see the module).
pub struct RoundWriter<B: Batched> {
    writers: shared::batch::Writers<B::Item, Result<B::Answer, sqlx::Error>>,
}

impl<B: Batched> Clone for RoundWriter<B> {
    fn clone(&self) -> Self {
        RoundWriter {
            writers: self.writers.clone(),
        }
    }
}

impl<B: Batched> RoundWriter<B> {
    /// Starts `writers` writer tasks on `pg` (they drain their queue before stopping).
    pub fn start(pg: PgPool, writers: usize) -> Self {
        let writers =
            shared::batch::Writers::start(writers, B::MAX_BATCH, B::QUEUE_DEPTH, move |batch| {
                write::<B>(pg.clone(), batch)
            });
        RoundWriter { writers }
    }

    /// Writes `item` (with whatever else is waiting) and returns its answer.
    pub async fn submit(&self, item: B::Item) -> Result<B::Answer, sqlx::Error> {
        self.writers
            .submit(item)
            .await
            .unwrap_or(Err(sqlx::Error::PoolClosed))
    }
}

/// Writes a batch taken from the queue: in rounds, each round's leftovers one at a time.
async fn write<B: Batched>(pg: PgPool, batch: Vec<Pending<B>>) {
    metrics::histogram!(B::SIZE_METRIC).record(batch.len() as f64);
    for round in rounds(batch, |p| B::claims(&p.item)) {
        let mut alone = Vec::new();
        if round.len() == 1 {
            alone = round;
        } else {
            let items: Vec<&B::Item> = round.iter().map(|p| &p.item).collect();
            match B::batch(&pg, &items).await {
                Ok(answers) if answers.len() == round.len() => {
                    for (pending, answer) in round.into_iter().zip(answers) {
                        if B::deferred(&answer) {
                            alone.push(pending);
                        } else {
                            let _ = pending.reply.send(Ok(answer));
                        }
                    }
                }
                Ok(_) => {
                    tracing::error!(
                        metric = B::SIZE_METRIC,
                        "a batch call answered for the wrong items"
                    );
                    alone = round;
                }
                Err(e) => {
                    metrics::counter!(B::RETRIED_METRIC).increment(1);
                    tracing::debug!(error = %e, items = round.len(), metric = B::SIZE_METRIC, "batch call failed; one at a time");
                    alone = round;
                }
            }
        }
        for pending in alone {
            let answer = B::single(&pg, &pending.item).await;
            let _ = pending.reply.send(answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hold_writer::NewHold;
    use chrono::Utc;

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
        let rounds = rounds(batch, |h| (h.jti, &h.seat_ids));
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
