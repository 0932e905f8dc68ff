//! Coalesces many small requests into batches: callers send items, a task
//! hands whatever has queued up (up to a maximum) to a handler as one batch,
//! with a bounded number of batches running at once. Under load this turns
//! one database round trip per job into one per burst of jobs; when idle, a
//! lone item goes out at once.

use std::future::Future;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::task::TaskTracker;

/// The sending side; cheap to clone.
pub struct Coalescer<T> {
    tx: mpsc::UnboundedSender<T>,
}

impl<T> Clone for Coalescer<T> {
    fn clone(&self) -> Self {
        Coalescer {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Send + 'static> Coalescer<T> {
    /// Starts the batching task in `tasks`. It ends when every sender is
    /// dropped and the queue is drained.
    pub fn start<F, Fut>(
        tasks: &TaskTracker,
        max_batch: usize,
        max_in_flight: usize,
        handler: F,
    ) -> Coalescer<T>
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<T>();
        let handler = Arc::new(handler);
        let slots = Arc::new(Semaphore::new(max_in_flight.max(1)));
        let batches = tasks.clone();
        tasks.spawn(async move {
            while let Some(first) = rx.recv().await {
                // Wait for a free slot first: items keep queueing meanwhile,
                // so a busy handler gets bigger batches.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let mut batch = vec![first];
                while batch.len() < max_batch.max(1) {
                    match rx.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                let handler = handler.clone();
                batches.spawn(async move {
                    handler(batch).await;
                    drop(slot);
                });
            }
        });
        Coalescer { tx }
    }

    /// Queues an item; false when the task has stopped.
    pub fn send(&self, item: T) -> bool {
        self.tx.send(item).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn items_queued_while_the_handler_is_busy_arrive_as_one_batch() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let c = Coalescer::start(
            &TaskTracker::new(),
            100,
            1,
            move |batch: Vec<oneshot::Sender<()>>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(batch.len());
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    for reply in batch {
                        let _ = reply.send(());
                    }
                }
            },
        );
        let mut waits = Vec::new();
        for _ in 0..21 {
            let (tx, rx) = oneshot::channel();
            assert!(c.send(tx));
            waits.push(rx);
        }
        for w in waits {
            w.await.unwrap();
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 21);
        assert!(
            sizes.len() <= 2,
            "expected coalescing, got batches {sizes:?}"
        );
    }
}
