//! Group commit's shared step: several writer tasks share one queue, and each takes everything
//! waiting in it (up to a limit) as its next batch, so a burst costs a few transactions instead
//! of one per item.

use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

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
}
