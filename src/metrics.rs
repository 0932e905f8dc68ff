//! Metric names and labels, kept as Praefect named them so existing dashboards
//! work, and the Prometheus recorder they are rendered from.

use crate::event::ChangeType;
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Jobs in flight (gauge): virtual_storage, gitaly_storage, change_type.
pub const REPLICATION_JOBS: &str = "gitaly_praefect_replication_jobs";
/// Seconds from dispatch start to the end of a job that did not fail, as
/// Praefect observes it: completed, and skipped after the target was asked
/// (up to date, downgrade prevented, invalid source) (histogram): type.
pub const REPLICATION_LATENCY: &str = "gitaly_praefect_replication_latency";
/// Seconds from job creation to dispatch start (histogram): type.
pub const REPLICATION_DELAY: &str = "gitaly_praefect_replication_delay";
/// Jobs per consumer by state ready / in_progress / failed / dead (gauge):
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

/// Acknowledgements that failed or were sent while disconnected (counter):
/// kind (ack, nak, term, progress, dead_letter, requeue).
pub const ACK_ERRORS_TOTAL: &str = "gitaly_replicator_ack_errors_total";

/// The `kind` labels of [`ACK_ERRORS_TOTAL`].
pub const ACK_ERROR_KINDS: [&str; 6] = ["ack", "nak", "term", "progress", "dead_letter", "requeue"];

/// 1 while the service can reach the dependency (gauge): dependency (nats,
/// postgres).
pub const DEPENDENCY_UP: &str = "gitaly_replicator_dependency_up";

/// Seconds one reconciliation round took (histogram; Praefect's name and
/// its buckets from `[reconciliation] histogram_buckets`).
pub const RECONCILIATION_SCHEDULING: &str = "gitaly_praefect_reconciliation_scheduling_seconds";
/// Jobs the reconciler scheduled (counter): virtual_storage, change_type
/// (update, delete_replica).
pub const RECONCILIATION_JOBS_TOTAL: &str = "gitaly_replicator_reconciliation_jobs_total";
/// 1 while this process is the one reconciler (gauge).
pub const RECONCILER_LEADER: &str = "gitaly_replicator_reconciler_leader";
/// Replicas compared with their source by background verification
/// (counter): virtual_storage, gitaly_storage, result (verified, mismatch,
/// error).
pub const VERIFICATIONS_TOTAL: &str = "gitaly_replicator_verifications_total";
/// The `result` labels of [`VERIFICATIONS_TOTAL`].
pub const VERIFICATION_RESULTS: [&str; 3] = ["verified", "mismatch", "error"];

/// Jobs found left in the work stream below their consumer's
/// acknowledgement floor and settled by the sweep (counter):
/// virtual_storage, gitaly_storage, result (requeued, removed).
pub const LEFTOVER_JOBS_TOTAL: &str = "gitaly_replicator_leftover_jobs_total";
/// The `result` labels of [`LEFTOVER_JOBS_TOTAL`].
pub const LEFTOVER_RESULTS: [&str; 2] = ["requeued", "removed"];

/// Jobs waiting in this process without using an attempt (gauge):
/// virtual_storage, gitaly_storage, reason (source_unavailable,
/// repository_locked).
pub const JOBS_WAITING: &str = "gitaly_replicator_jobs_waiting";

/// Times this process found its work stream created again (deleted and
/// made anew) and followed it (counter).
pub const STREAM_RECREATIONS_TOTAL: &str = "gitaly_replicator_stream_recreations_total";

/// Every metric the service exports (for docs, alert rules and their tests).
pub const ALL: [&str; 17] = [
    REPLICATION_JOBS,
    REPLICATION_LATENCY,
    REPLICATION_DELAY,
    QUEUE_DEPTH,
    JOBS_TOTAL,
    DEAD_LETTERS_TOTAL,
    TARGET_HEALTHY,
    PULL_RENEWALS_TOTAL,
    ACK_ERRORS_TOTAL,
    DEPENDENCY_UP,
    RECONCILIATION_SCHEDULING,
    RECONCILIATION_JOBS_TOTAL,
    RECONCILER_LEADER,
    VERIFICATIONS_TOTAL,
    LEFTOVER_JOBS_TOTAL,
    JOBS_WAITING,
    STREAM_RECREATIONS_TOTAL,
];

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle;
/// later calls return the same handle (and keep the first call's buckets).
/// `buckets` are `[prometheus] grpc_latency_buckets`: Praefect uses them
/// for its replication latency and delay histograms, and so does this;
/// `reconciliation_buckets` are `[reconciliation] histogram_buckets`.
pub fn install(
    buckets: &[f64],
    reconciliation_buckets: &[f64],
) -> Result<PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(REPLICATION_LATENCY.into()), buckets)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(REPLICATION_DELAY.into()), buckets)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(RECONCILIATION_SCHEDULING.into()),
                        reconciliation_buckets,
                    )
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
            metrics::describe_counter!(
                ACK_ERRORS_TOTAL,
                "Acknowledgements that failed or were sent while disconnected from NATS"
            );
            metrics::describe_gauge!(
                DEPENDENCY_UP,
                "1 while the service can reach the dependency (nats, postgres)"
            );
            metrics::describe_histogram!(
                RECONCILIATION_SCHEDULING,
                metrics::Unit::Seconds,
                "The time spent performing a single reconciliation scheduling run"
            );
            metrics::describe_counter!(
                RECONCILIATION_JOBS_TOTAL,
                "Jobs the reconciler scheduled, by change type"
            );
            metrics::describe_counter!(
                VERIFICATIONS_TOTAL,
                "Replicas whose checksum was compared with their source's, by result"
            );
            metrics::describe_counter!(
                LEFTOVER_JOBS_TOTAL,
                "Jobs left in the work stream that no consumer delivers, requeued or removed as already dead-lettered"
            );
            metrics::describe_gauge!(
                JOBS_WAITING,
                "Jobs waiting in this process without using an attempt, by reason"
            );
            metrics::describe_gauge!(
                RECONCILER_LEADER,
                "1 while this process is the reconciler (one across all processes)"
            );
            metrics::describe_counter!(
                STREAM_RECREATIONS_TOTAL,
                "Times the work stream was found created again and followed"
            );
            counter!(STREAM_RECREATIONS_TOTAL).increment(0);
            // Exported from the start, so a rate over it is never empty.
            for kind in ACK_ERROR_KINDS {
                counter!(ACK_ERRORS_TOTAL, "kind" => kind).increment(0);
            }
            Ok(handle)
        })
        .clone()
}

/// The gauge of a storage node's health (1 healthy, 0 not), for every node
/// of the config: targets and the sources updates read from.
pub fn node_healthy(virtual_storage: &str, storage: &str) -> Gauge {
    gauge!(TARGET_HEALTHY,
        "virtual_storage" => virtual_storage.to_owned(),
        "gitaly_storage" => storage.to_owned())
}

/// The reconciler's series: its round duration, the jobs it scheduled per
/// (virtual storage, change type), whether this process leads.
pub struct ReconcilerMetrics {
    pub round: Histogram,
    pub leader: Gauge,
}

impl ReconcilerMetrics {
    /// Resolves the series and exports the counters at zero for the
    /// configured (virtual storage, storage) pairs.
    pub fn new(configured: &[(String, String)]) -> Self {
        for (vs, storage) in configured {
            for change in [ChangeType::Update, ChangeType::DeleteReplica] {
                Self::scheduled(vs, change, 0);
            }
            for result in VERIFICATION_RESULTS {
                Self::verified(vs, storage, result, 0);
            }
        }
        let leader = gauge!(RECONCILER_LEADER);
        leader.set(0.0);
        ReconcilerMetrics {
            round: histogram!(RECONCILIATION_SCHEDULING),
            leader,
        }
    }

    pub fn verified(virtual_storage: &str, storage: &str, result: &'static str, n: u64) {
        counter!(VERIFICATIONS_TOTAL,
            "virtual_storage" => virtual_storage.to_owned(),
            "gitaly_storage" => storage.to_owned(),
            "result" => result)
        .increment(n);
    }

    pub fn scheduled(virtual_storage: &str, change: ChangeType, n: u64) {
        counter!(RECONCILIATION_JOBS_TOTAL,
            "virtual_storage" => virtual_storage.to_owned(),
            "change_type" => change.as_str())
        .increment(n);
    }
}

/// Records whether `dependency` (`nats`, `postgres`) answers.
pub fn dependency_up(dependency: &'static str, up: bool) {
    gauge!(DEPENDENCY_UP, "dependency" => dependency).set(if up { 1.0 } else { 0.0 });
}

/// Counts one job settled by the sweep of left-over jobs: `requeued` or
/// `removed`.
pub fn leftover_settled(virtual_storage: &str, storage: &str, result: &'static str) {
    leftover_jobs(virtual_storage, storage, result).increment(1);
}

/// Counts one re-creation of the work stream this process followed.
pub fn stream_recreated() {
    counter!(STREAM_RECREATIONS_TOTAL).increment(1);
}

/// The waiting gauge of one target and reason.
pub fn jobs_waiting(virtual_storage: &str, storage: &str, reason: &'static str) -> Gauge {
    gauge!(JOBS_WAITING,
        "virtual_storage" => virtual_storage.to_owned(),
        "gitaly_storage" => storage.to_owned(),
        "reason" => reason)
}

fn leftover_jobs(virtual_storage: &str, storage: &str, result: &'static str) -> Counter {
    counter!(LEFTOVER_JOBS_TOTAL,
        "virtual_storage" => virtual_storage.to_owned(),
        "gitaly_storage" => storage.to_owned(),
        "result" => result)
}

/// Counts one failed acknowledgement of `kind` (one of [`ACK_ERROR_KINDS`]).
pub fn ack_error(kind: &'static str) {
    counter!(ACK_ERRORS_TOTAL, "kind" => kind).increment(1);
}

/// Outcome labels of [`JOBS_TOTAL`].
pub const OUTCOMES: [&str; 8] = [
    "completed",
    "skipped",
    "failed",
    "invalid",
    "unsupported",
    "abandoned",
    "interrupted",
    // An update whose source was down, with no other healthy up-to-date
    // replica, went back to wait for it (once per check).
    "deferred",
];

/// Handles of one change type's series, resolved once.
struct ChangeTypeHandles {
    in_flight: Gauge,
    delay: Histogram,
    latency: Histogram,
    outcomes: Vec<Counter>,
}

struct Handles {
    per_change: Vec<ChangeTypeHandles>,
    /// Outcomes of messages whose change type could not be read.
    unknown: Vec<Counter>,
    dead_letters: Vec<Counter>,
    pull_renewals: Counter,
    depth: Vec<Gauge>,
}

/// Dead-letter reasons of [`DEAD_LETTERS_TOTAL`].
const DEAD_REASONS: [&str; 3] = ["dead", "invalid", "stranded"];
/// States of [`QUEUE_DEPTH`].
/// Praefect's states; `failed` counts jobs delivered more than once and not yet
/// acknowledged: a failed attempt waiting for its retry, or running it.
const DEPTH_STATES: [&str; 4] = ["ready", "in_progress", "failed", "dead"];

fn position(list: &[&str], item: &str) -> usize {
    list.iter().position(|x| *x == item).unwrap_or(0)
}

/// The metric handles of one target, resolved once so that the hot path
/// neither allocates labels nor looks series up.
#[derive(Clone)]
pub struct TargetMetrics {
    handles: Arc<Handles>,
}

impl TargetMetrics {
    pub fn new(virtual_storage: &str, storage: &str) -> Self {
        let vs = virtual_storage.to_owned();
        let st = storage.to_owned();
        let outcome_counters = |change: &'static str| -> Vec<Counter> {
            OUTCOMES
                .iter()
                .map(|o| {
                    counter!(JOBS_TOTAL,
                        "virtual_storage" => vs.clone(),
                        "gitaly_storage" => st.clone(),
                        "change_type" => change,
                        "outcome" => *o)
                })
                .collect()
        };
        let per_change = ChangeType::ALL
            .iter()
            .map(|c| ChangeTypeHandles {
                in_flight: gauge!(REPLICATION_JOBS,
                    "virtual_storage" => vs.clone(),
                    "gitaly_storage" => st.clone(),
                    "change_type" => c.as_str()),
                delay: histogram!(REPLICATION_DELAY, "type" => c.as_str()),
                latency: histogram!(REPLICATION_LATENCY, "type" => c.as_str()),
                outcomes: outcome_counters(c.as_str()),
            })
            .collect();
        // Exported from the start; the sweep counts by name (it is seldom).
        for result in LEFTOVER_RESULTS {
            leftover_jobs(&vs, &st, result).increment(0);
        }
        let handles = Handles {
            per_change,
            unknown: outcome_counters("unknown"),
            dead_letters: DEAD_REASONS
                .iter()
                .map(|r| {
                    counter!(DEAD_LETTERS_TOTAL,
                        "virtual_storage" => vs.clone(),
                        "gitaly_storage" => st.clone(),
                        "reason" => *r)
                })
                .collect(),
            pull_renewals: counter!(PULL_RENEWALS_TOTAL,
                "virtual_storage" => vs.clone(),
                "gitaly_storage" => st.clone()),
            depth: DEPTH_STATES
                .iter()
                .map(|s| {
                    gauge!(QUEUE_DEPTH,
                        "virtual_storage" => vs.clone(),
                        "target_node" => st.clone(),
                        "state" => *s)
                })
                .collect(),
        };
        TargetMetrics {
            handles: Arc::new(handles),
        }
    }

    fn change(&self, change: ChangeType) -> &ChangeTypeHandles {
        &self.handles.per_change[change.index()]
    }

    pub fn job_started(&self, change: ChangeType, delay: Duration) {
        let h = self.change(change);
        h.in_flight.increment(1.0);
        h.delay.record(delay.as_secs_f64());
    }

    pub fn job_finished(
        &self,
        change: ChangeType,
        outcome: &'static str,
        latency: Option<Duration>,
    ) {
        let h = self.change(change);
        h.in_flight.decrement(1.0);
        if let Some(latency) = latency {
            h.latency.record(latency.as_secs_f64());
        }
        self.outcome(Some(change), outcome);
    }

    /// Counts an outcome of a job that never started dispatching (invalid,
    /// superseded, collapsed); `None` when the change type is unreadable.
    pub fn outcome(&self, change: Option<ChangeType>, outcome: &'static str) {
        let counters = match change {
            Some(c) => &self.change(c).outcomes,
            None => &self.handles.unknown,
        };
        counters[position(&OUTCOMES, outcome)].increment(1);
    }

    pub fn dead_letter(&self, reason: &'static str) {
        self.handles.dead_letters[position(&DEAD_REASONS, reason)].increment(1);
    }

    pub fn pull_renewed(&self) {
        self.handles.pull_renewals.increment(1);
    }

    pub fn queue_depth(&self, state: &'static str, value: u64) {
        self.handles.depth[position(&DEPTH_STATES, state)].set(value as f64);
    }
}
