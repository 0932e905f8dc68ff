//! Watches each node's gRPC health: jobs for an unhealthy target stay in the
//! queue (attempts intact) instead of failing against it, and an update whose
//! source is unhealthy is served from another up-to-date replica or waits.

use crate::error_chain::display_error_chain;
use crate::gitaly::NodeClient;
use metrics::Gauge;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A node's health as last checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Not checked yet, or nobody checks (a replicator outside the service).
    Unknown,
    Healthy,
    Unhealthy,
}

/// Checks the node now and then every `interval`, in a task of `tasks`, and
/// records each verdict on the node (`NodeClient::health`). Until the first
/// check the node is `Unknown`, so nothing is fetched for a target that was
/// never seen healthy.
pub fn watch_health(
    node: Arc<NodeClient>,
    interval: Duration,
    healthy_gauge: Gauge,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) {
    tasks.spawn(async move {
        let timeout = interval.clamp(Duration::from_millis(200), Duration::from_secs(5));
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(50)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let result = node.check_health(timeout).await;
            let health = if result.is_ok() {
                Health::Healthy
            } else {
                Health::Unhealthy
            };
            if node.set_health(health) {
                match &result {
                    Ok(()) => {
                        tracing::info!(virtual_storage = %node.virtual_storage, storage = %node.storage, address = %node.address, "storage node is healthy; fetching its jobs")
                    }
                    Err(e) => {
                        tracing::warn!(virtual_storage = %node.virtual_storage, storage = %node.storage, address = %node.address, error = display_error_chain(e), "storage node is unhealthy; jobs that target it wait in the queue, updates that read from it use another up-to-date replica or wait")
                    }
                }
                healthy_gauge.set(if result.is_ok() { 1.0 } else { 0.0 });
            }
        }
    });
}
