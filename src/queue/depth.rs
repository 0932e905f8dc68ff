//! Queue depth per target, read from the consumers' info and the dead-letter
//! stream: for the `status` command and the queue-depth metric.

use crate::metrics::TargetMetrics;
use crate::queue::layout::Layout;
use crate::subject::{dead_letter_prefix, escape_token};
use async_nats::jetstream::Context;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Counts for one (virtual storage, target).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetDepth {
    pub virtual_storage: String,
    pub target_storage: String,
    pub consumer: String,
    /// Waiting to be delivered.
    pub pending: u64,
    /// Delivered, not yet acknowledged.
    pub in_flight: u64,
    /// Delivered more than once and not yet acknowledged.
    pub redelivered: u64,
    /// In the dead-letter stream.
    pub dead: u64,
}

/// Reads the counts of every target of the layout.
pub async fn snapshot(js: &Context, layout: &Layout) -> Result<Vec<TargetDepth>, String> {
    let mut work = js
        .get_stream(&layout.stream)
        .await
        .map_err(|e| e.to_string())?;
    let mut dead_counts = std::collections::HashMap::new();
    if let Ok(dead) = js.get_stream(&layout.dead_letter_stream).await {
        let filter = format!("{}.>", dead_letter_prefix(&layout.subject_prefix));
        let mut subjects = dead
            .info_with_subjects(filter)
            .await
            .map_err(|e| e.to_string())?;
        use futures::TryStreamExt;
        while let Some((subject, count)) = subjects.try_next().await.map_err(|e| e.to_string())? {
            dead_counts.insert(subject, count as u64);
        }
    }
    let _ = work.info().await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for c in &layout.consumers {
        let info = work
            .consumer_info(&c.durable_name)
            .await
            .map_err(|e| format!("consumer {}: {e}", c.durable_name))?;
        let dead_subject = format!(
            "{}.{}.{}",
            dead_letter_prefix(&layout.subject_prefix),
            escape_token(&c.virtual_storage),
            escape_token(&c.target_storage)
        );
        out.push(TargetDepth {
            virtual_storage: c.virtual_storage.clone(),
            target_storage: c.target_storage.clone(),
            consumer: c.durable_name.clone(),
            pending: info.num_pending,
            in_flight: info.num_ack_pending as u64,
            redelivered: info.num_redelivered as u64,
            dead: dead_counts.get(&dead_subject).copied().unwrap_or(0),
        });
    }
    Ok(out)
}

/// Refreshes the queue-depth gauges every `interval` until `stop`.
pub async fn poll(js: Context, layout: Layout, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        match snapshot(&js, &layout).await {
            Ok(depths) => {
                for d in depths {
                    let m = TargetMetrics::new(&d.virtual_storage, &d.target_storage);
                    m.queue_depth("ready", d.pending);
                    m.queue_depth("in_progress", d.in_flight);
                    m.queue_depth("failed", d.redelivered);
                    m.queue_depth("dead", d.dead);
                }
            }
            Err(e) => tracing::debug!(error = %e, "reading queue depth failed"),
        }
    }
}
