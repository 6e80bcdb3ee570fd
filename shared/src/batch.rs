//! Group commit's shared step: several writer tasks share one queue, and each takes everything
//! waiting in it (up to a limit) as its next batch, so a burst costs a few transactions instead
//! of one per item.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_util::sync::CancellationToken;

/// An item handed to a writer, with where its outcome goes.
pub struct Pending<T, O> {
    pub item: T,
    pub reply: oneshot::Sender<O>,
}

/// A queue served by a few writer tasks that each take every item waiting as one batch (group
/// commit). The writers stop once every handle is dropped and the queue is drained, not at
/// shutdown: what was handed over is always written and answered.
pub struct Writers<T, O> {
    queue: mpsc::Sender<Pending<T, O>>,
}

impl<T, O> Clone for Writers<T, O> {
    fn clone(&self) -> Self {
        Writers {
            queue: self.queue.clone(),
        }
    }
}

impl<T: Send + 'static, O: Send + 'static> Writers<T, O> {
    /// Starts `writers` tasks (at least one) that call `write` with batches of at most `max`
    /// items; at most `depth` items wait (more make `submit` wait: back-pressure). `write` must
    /// answer every item of its batch.
    pub fn start<F, Fut>(writers: usize, max: usize, depth: usize, write: F) -> Self
    where
        F: Fn(Vec<Pending<T, O>>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let (queue, receiver) = mpsc::channel(depth.max(1));
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers.max(1) {
            let (receiver, write) = (receiver.clone(), write.clone());
            tokio::spawn(async move {
                let never = CancellationToken::new();
                while let Some(batch) = next(&receiver, max, &never).await {
                    write(batch).await;
                }
            });
        }
        Writers { queue }
    }

    /// Hands `item` to the writers and waits for its outcome; `None` if the writers are gone
    /// or dropped it unanswered.
    pub async fn submit(&self, item: T) -> Option<O> {
        let (reply, answer) = oneshot::channel();
        self.queue.send(Pending { item, reply }).await.ok()?;
        answer.await.ok()
    }
}

/// The next batch from `queue`: waits for one item, then takes every item already waiting, up
/// to `max`. `None` once the queue is closed and empty, or once `shutdown` fires and nothing is
/// waiting (what is waiting is still handed out, so the queue drains).
pub async fn next<T>(
    queue: &Mutex<mpsc::Receiver<T>>,
    max: usize,
    shutdown: &CancellationToken,
) -> Option<Vec<T>> {
    let mut receiver = queue.lock().await;
    let first = tokio::select! {
        item = receiver.recv() => item,
        _ = shutdown.cancelled() => receiver.try_recv().ok(),
    }?;
    let mut batch = vec![first];
    while batch.len() < max.max(1) {
        match receiver.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_is_what_is_waiting_up_to_the_limit_and_the_queue_drains_on_shutdown() {
        let (sender, receiver) = mpsc::channel(16);
        let queue = Mutex::new(receiver);
        let shutdown = CancellationToken::new();
        for i in 0..5 {
            sender.send(i).await.expect("send");
        }
        assert_eq!(next(&queue, 3, &shutdown).await, Some(vec![0, 1, 2]));
        shutdown.cancel();
        assert_eq!(next(&queue, 3, &shutdown).await, Some(vec![3, 4]));
        assert_eq!(next(&queue, 3, &shutdown).await, None);
        drop(sender);
    }

    #[tokio::test]
    async fn writers_answer_every_item_in_batches() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let writers = Writers::start(2, 4, 64, move |batch: Vec<Pending<u32, u32>>| {
            let seen = seen.clone();
            async move {
                seen.lock().expect("sizes").push(batch.len());
                tokio::task::yield_now().await;
                for pending in batch {
                    let _ = pending.reply.send(pending.item * 2);
                }
            }
        });
        let answers = futures::future::join_all((0..40u32).map(|i| writers.submit(i))).await;
        assert_eq!(answers, (0..40u32).map(|i| Some(i * 2)).collect::<Vec<_>>());
        let sizes = sizes.lock().expect("sizes");
        assert_eq!(sizes.iter().sum::<usize>(), 40);
        assert!(sizes.iter().all(|n| (1..=4).contains(n)), "{sizes:?}");
    }
}
