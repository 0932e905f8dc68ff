//! Metric names and labels, kept as Praefect named them so existing dashboards
//! work, and the Prometheus recorder they are rendered from.

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

/// Jobs in flight (gauge): virtual_storage, gitaly_storage, change_type.
pub const REPLICATION_JOBS: &str = "gitaly_praefect_replication_jobs";
/// Seconds from dispatch start to completion, successful jobs only (histogram): type.
pub const REPLICATION_LATENCY: &str = "gitaly_praefect_replication_latency";
/// Seconds from job creation to dispatch start (histogram): type.
pub const REPLICATION_DELAY: &str = "gitaly_praefect_replication_delay";
/// Jobs per consumer by state ready / in_progress / redelivered / dead (gauge):
/// virtual_storage, target_node, state.
pub const QUEUE_DEPTH: &str = "gitaly_praefect_replication_queue_depth";
/// Finished jobs (counter): virtual_storage, gitaly_storage, change_type, outcome.
pub const JOBS_TOTAL: &str = "gitaly_replicator_jobs_total";
/// Messages written to the dead-letter stream (counter): virtual_storage,
/// gitaly_storage, reason (dead, invalid, stranded).
pub const DEAD_LETTERS_TOTAL: &str = "gitaly_replicator_dead_letters_total";
/// 1 when the target passes its gRPC health check (gauge): virtual_storage, gitaly_storage.
pub const TARGET_HEALTHY: &str = "gitaly_replicator_target_healthy";
/// Pull requests that stalled and were renewed (counter): virtual_storage, gitaly_storage.
pub const PULL_RENEWALS_TOTAL: &str = "gitaly_replicator_pull_renewals_total";

/// Every metric the service exports (for docs, alert rules and their tests).
pub const ALL: [&str; 8] = [
    REPLICATION_JOBS,
    REPLICATION_LATENCY,
    REPLICATION_DELAY,
    QUEUE_DEPTH,
    JOBS_TOTAL,
    DEAD_LETTERS_TOTAL,
    TARGET_HEALTHY,
    PULL_RENEWALS_TOTAL,
];

/// Praefect's histogram buckets, in seconds.
pub const BUCKETS: [f64; 11] = [
    0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 10.0, 30.0, 60.0, 300.0, 1500.0,
];

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle;
/// later calls return the same handle.
pub fn install() -> Result<PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(REPLICATION_LATENCY.into()), &BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(REPLICATION_DELAY.into()), &BUCKETS)
                })
                .map_err(|e| e.to_string())?;
            let handle = builder.install_recorder().map_err(|e| e.to_string())?;
            metrics::describe_gauge!(REPLICATION_JOBS, "Replication jobs in flight");
            metrics::describe_histogram!(
                REPLICATION_LATENCY,
                metrics::Unit::Seconds,
                "Time from the start of a replication job's dispatch to its completion"
            );
            metrics::describe_histogram!(
                REPLICATION_DELAY,
                metrics::Unit::Seconds,
                "Time from a replication job's creation to the start of its dispatch"
            );
            metrics::describe_gauge!(QUEUE_DEPTH, "Replication jobs per target and state");
            metrics::describe_counter!(JOBS_TOTAL, "Finished replication jobs by outcome");
            metrics::describe_counter!(DEAD_LETTERS_TOTAL, "Jobs moved to the dead-letter stream");
            metrics::describe_gauge!(
                TARGET_HEALTHY,
                "1 when the target node passes its health check"
            );
            metrics::describe_counter!(
                PULL_RENEWALS_TOTAL,
                "Pull requests that stalled and were renewed"
            );
            Ok(handle)
        })
        .clone()
}

/// Metric handles for one target, so the hot path does not rebuild labels.
#[derive(Clone)]
pub struct TargetMetrics {
    pub virtual_storage: String,
    pub storage: String,
}

impl TargetMetrics {
    pub fn new(virtual_storage: &str, storage: &str) -> Self {
        TargetMetrics {
            virtual_storage: virtual_storage.to_owned(),
            storage: storage.to_owned(),
        }
    }

    pub fn job_started(&self, change_type: &'static str, delay: Duration) {
        gauge!(REPLICATION_JOBS,
            "virtual_storage" => self.virtual_storage.clone(),
            "gitaly_storage" => self.storage.clone(),
            "change_type" => change_type)
        .increment(1.0);
        histogram!(REPLICATION_DELAY, "type" => change_type).record(delay.as_secs_f64());
    }

    pub fn job_finished(
        &self,
        change_type: &'static str,
        outcome: &'static str,
        latency: Option<Duration>,
    ) {
        gauge!(REPLICATION_JOBS,
            "virtual_storage" => self.virtual_storage.clone(),
            "gitaly_storage" => self.storage.clone(),
            "change_type" => change_type)
        .decrement(1.0);
        if let Some(latency) = latency {
            histogram!(REPLICATION_LATENCY, "type" => change_type).record(latency.as_secs_f64());
        }
        self.outcome(change_type, outcome);
    }

    /// Counts an outcome of a job that never started dispatching (invalid,
    /// superseded, collapsed).
    pub fn outcome(&self, change_type: &'static str, outcome: &'static str) {
        counter!(JOBS_TOTAL,
            "virtual_storage" => self.virtual_storage.clone(),
            "gitaly_storage" => self.storage.clone(),
            "change_type" => change_type,
            "outcome" => outcome)
        .increment(1);
    }

    pub fn dead_letter(&self, reason: &'static str) {
        counter!(DEAD_LETTERS_TOTAL,
            "virtual_storage" => self.virtual_storage.clone(),
            "gitaly_storage" => self.storage.clone(),
            "reason" => reason)
        .increment(1);
    }

    pub fn healthy(&self, healthy: bool) {
        gauge!(TARGET_HEALTHY,
            "virtual_storage" => self.virtual_storage.clone(),
            "gitaly_storage" => self.storage.clone())
        .set(if healthy { 1.0 } else { 0.0 });
    }

    pub fn pull_renewed(&self) {
        counter!(PULL_RENEWALS_TOTAL,
            "virtual_storage" => self.virtual_storage.clone(),
            "gitaly_storage" => self.storage.clone())
        .increment(1);
    }

    pub fn queue_depth(&self, state: &'static str, value: u64) {
        gauge!(QUEUE_DEPTH,
            "virtual_storage" => self.virtual_storage.clone(),
            "target_node" => self.storage.clone(),
            "state" => state)
        .set(value as f64);
    }
}
