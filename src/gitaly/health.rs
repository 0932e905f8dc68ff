//! Watches a node's gRPC health so that jobs for an unhealthy target stay in
//! the queue (attempts intact) instead of failing against it.

use crate::error_chain::display_error_chain;
use crate::gitaly::NodeClient;
use crate::metrics::TargetMetrics;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Checks the node now and then every `interval`, in a task of `tasks`; the
/// receiver holds the latest verdict. The first check happens before the
/// receiver says `true`, so nothing is fetched for a node that was never seen
/// healthy.
pub fn watch_health(
    node: Arc<NodeClient>,
    interval: Duration,
    metrics: TargetMetrics,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tasks.spawn(async move {
        let timeout = interval.clamp(Duration::from_millis(200), Duration::from_secs(5));
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<bool> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let result = node.check_health(timeout).await;
            let healthy = result.is_ok();
            if last != Some(healthy) {
                match &result {
                    Ok(()) => {
                        tracing::info!(virtual_storage = %node.virtual_storage, storage = %node.storage, "target is healthy; fetching its jobs")
                    }
                    Err(e) => {
                        tracing::warn!(virtual_storage = %node.virtual_storage, storage = %node.storage, error = display_error_chain(e), "target is unhealthy; its jobs wait in the queue")
                    }
                }
                metrics.healthy(healthy);
                last = Some(healthy);
            }
            if tx.send(healthy).is_err() {
                break;
            }
        }
    });
    rx
}
