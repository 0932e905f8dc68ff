//! The reconciler: heals what no job says. Every `[reconciliation]
//! scheduling_interval`, one process across all of them (the holder of a
//! Postgres session advisory lock) walks the repository store and publishes
//! the jobs Praefect's reconciler would schedule: an `update` for each
//! assigned replica that is outdated or missing, a `delete_replica` for an
//! unassigned one (see `plan`). Each job's `Nats-Msg-Id` is fixed by
//! (change, repository, target, generation), so rounds within the stream's
//! duplicate window do not pile up; jobs already waiting in the work stream
//! are read first and their replicas skipped.

mod plan;
mod verify;

use crate::config::{Config, ConfigError, ReconciliationConfig, VerificationConfig};
use crate::error_chain::display_error_chain;
use crate::event::{Change, ChangeType, Job};
use crate::gitaly::NodeSet;
use crate::gitaly::health::Health;
use crate::metrics::ReconcilerMetrics;
use crate::queue::layout::Layout;
use crate::queue::pending::{PendingJobs, PendingScanError, scan_target};
use crate::queue::publisher::{PublishError, Publisher};
use crate::store::leadership::Leadership;
use crate::store::{RepositoryStore, StoreError, VerificationCursor};
use async_nats::jetstream::Context;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use plan::Planned;
pub use verify::VerificationReport;

/// The advisory lock whose holder is the one reconciler.
pub const RECONCILER_LOCK_KEY: i64 = 0x6769_7461_6c79_0001;

/// Why a round stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pending(#[from] PendingScanError),
    #[error("publishing a reconciliation job for {relative_path} to {target}: {source}")]
    Publish {
        relative_path: String,
        target: String,
        #[source]
        source: PublishError,
    },
}

/// What one round did, per virtual storage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Repositories read from the store.
    pub scanned: u64,
    /// Jobs the stream took, by change type.
    pub scheduled: BTreeMap<ChangeType, u64>,
    /// Jobs the stream dropped as repeats within its duplicate window.
    pub duplicates: u64,
    /// Virtual storages skipped for having fewer than two healthy storages.
    pub skipped_virtual_storages: Vec<String>,
}

/// The one reconciler of a process; it acts only while it holds the lock.
pub struct Reconciler {
    store: RepositoryStore,
    js: Context,
    layout: Layout,
    publisher: Publisher,
    nodes: NodeSet,
    /// Configured (virtual storage, storage) pairs.
    configured: Vec<(String, String)>,
    /// Storages per virtual storage, in config order.
    storages: Vec<(String, Vec<String>)>,
    settings: ReconciliationConfig,
    verification: VerificationConfig,
    leadership: Leadership,
    metrics: ReconcilerMetrics,
    /// Each virtual storage's place in its verification pass.
    verification_cursors: HashMap<String, VerificationCursor>,
}

impl Reconciler {
    pub fn new(
        config: &Config,
        store: RepositoryStore,
        js: Context,
        nodes: NodeSet,
    ) -> Result<Self, ConfigError> {
        let layout = Layout::from_config(config);
        let configured: Vec<(String, String)> = config
            .targets()
            .map(|(vs, n)| (vs.name.clone(), n.storage.clone()))
            .collect();
        let storages: Vec<(String, Vec<String>)> = config
            .virtual_storages
            .iter()
            .map(|vs| {
                (
                    vs.name.clone(),
                    vs.nodes.iter().map(|n| n.storage.clone()).collect(),
                )
            })
            .collect();
        let session = crate::service::session_endpoint(config, &store)?;
        Ok(Reconciler {
            store,
            publisher: Publisher::new(js.clone(), layout.clone()),
            js,
            layout,
            nodes,
            metrics: ReconcilerMetrics::new(&configured),
            configured,
            storages,
            settings: config.reconciliation.clone(),
            verification: config.background_verification.clone(),
            leadership: Leadership::new(session, RECONCILER_LOCK_KEY, "the reconciler"),
            verification_cursors: HashMap::new(),
        })
    }

    /// How often [`Self::run`] wakes: the reconciliation interval, or
    /// without reconciliation a minute at most (the verification interval
    /// says how old a verification may be, not how often to look); `None`
    /// when both are off.
    pub fn tick(config: &Config) -> Option<Duration> {
        let reconcile = config.reconciliation.scheduling_interval;
        let verify = config.background_verification.verification_interval;
        match (reconcile.is_zero(), verify.is_zero()) {
            (false, _) => Some(reconcile),
            (true, false) => Some(verify.min(Duration::from_secs(60))),
            (true, true) => None,
        }
    }

    /// While this process leads, runs a reconciliation round and a
    /// verification round (each when enabled) every `tick`, until `stop`.
    pub async fn run(mut self, tick: Duration, stop: CancellationToken) {
        let interval = tick;
        let reconcile = !self.settings.scheduling_interval.is_zero();
        let verify = !self.verification.verification_interval.is_zero();
        tracing::info!(
            interval = %humantime::format_duration(interval),
            reconcile,
            verify,
            "reconciler started; one process at a time reconciles"
        );
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
            }
            if !self.leadership.hold().await {
                self.metrics.leader.set(0.0);
                continue;
            }
            self.metrics.leader.set(1.0);
            if verify {
                // Batch after batch while replicas are due, for one tick at
                // most, so that a large store comes round within the
                // interval and reconciliation still runs every tick.
                let started = Instant::now();
                let mut total = VerificationReport::default();
                let mut failed = None;
                loop {
                    let result = tokio::select! {
                        _ = stop.cancelled() => break,
                        r = self.verify_round() => r,
                    };
                    match result {
                        Ok(r) => {
                            total.add(&r);
                            if !r.more_due || started.elapsed() >= interval {
                                break;
                            }
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                    if !self.leadership.hold().await {
                        break;
                    }
                }
                if stop.is_cancelled() {
                    break;
                }
                match failed {
                    Some(e) => tracing::error!(
                        error = display_error_chain(&e),
                        verified = total.verified,
                        mismatches = total.mismatches,
                        "background verification failed; the next round tries again"
                    ),
                    None if total.mismatches > 0 || total.errors > 0 => tracing::info!(
                        verified = total.verified,
                        mismatches = total.mismatches,
                        errors = total.errors,
                        seconds = started.elapsed().as_secs_f64(),
                        "verification round finished"
                    ),
                    None => tracing::debug!(
                        verified = total.verified,
                        seconds = started.elapsed().as_secs_f64(),
                        "verification round finished"
                    ),
                }
            }
            if !self.leadership.leading() {
                // Lost between verification batches.
                self.metrics.leader.set(0.0);
                continue;
            }
            if !reconcile {
                continue;
            }
            let started = Instant::now();
            let result = tokio::select! {
                _ = stop.cancelled() => break,
                r = self.round() => r,
            };
            self.metrics.round.record(started.elapsed().as_secs_f64());
            match result {
                Ok(report) if report.scheduled.is_empty() => {
                    tracing::debug!(
                        scanned = report.scanned,
                        duplicates = report.duplicates,
                        "reconciliation did not result in any scheduled jobs"
                    );
                }
                Ok(report) => tracing::info!(
                    scanned = report.scanned,
                    scheduled = ?report.scheduled,
                    duplicates = report.duplicates,
                    seconds = started.elapsed().as_secs_f64(),
                    "reconciliation round finished"
                ),
                Err(e) => tracing::error!(
                    error = display_error_chain(&e),
                    "automatic reconciliation failed; the next round tries again"
                ),
            }
        }
        self.metrics.leader.set(0.0);
    }

    /// One pass over every virtual storage, leader or not (tests and tools).
    pub async fn round(&self) -> Result<RoundReport, ReconcileError> {
        let mut report = RoundReport::default();
        let has_assignments = self.store.has_assignments_table().await?;
        for (vs, storages) in &self.storages {
            let healthy: BTreeSet<&str> = storages
                .iter()
                .filter(|s| {
                    self.nodes
                        .get(vs, s)
                        .is_some_and(|n| n.health() == Health::Healthy)
                })
                .map(String::as_str)
                .collect();
            if healthy.len() < 2 {
                tracing::info!(
                    virtual_storage = %vs,
                    healthy = healthy.len(),
                    "reconciliation skipped for virtual storage due to not having enough healthy storages"
                );
                report.skipped_virtual_storages.push(vs.clone());
                continue;
            }
            let pending = self.pending(vs, storages).await?;
            let mut after = 0;
            loop {
                let batch = self
                    .store
                    .reconciliation_batch(
                        &self.configured,
                        vs,
                        has_assignments,
                        after,
                        self.settings.scan_batch_size,
                    )
                    .await?;
                report.scanned += batch.scanned;
                for repository in &batch.repositories {
                    let planned = plan::plan(
                        repository,
                        |s| healthy.contains(s),
                        |s| {
                            pending.get(s).map_or_else(BTreeSet::new, |p| {
                                p.for_repository(
                                    &repository.relative_path,
                                    repository.repository_id,
                                )
                            })
                        },
                    );
                    for p in planned {
                        self.schedule(repository, &p, &mut report).await?;
                    }
                }
                match batch.next {
                    Some(next) => after = next,
                    None => break,
                }
            }
        }
        Ok(report)
    }

    /// The jobs waiting for each storage of `vs`.
    async fn pending(
        &self,
        vs: &str,
        storages: &[String],
    ) -> Result<HashMap<String, PendingJobs>, PendingScanError> {
        let mut pending = HashMap::new();
        if self.settings.pending_scan_limit == 0 {
            return Ok(pending);
        }
        for storage in storages {
            let found = scan_target(
                &self.js,
                &self.layout,
                vs,
                storage,
                self.settings.pending_scan_limit,
            )
            .await?;
            if !found.complete {
                tracing::debug!(virtual_storage = %vs, storage = %storage, scanned = found.scanned, "more jobs wait than reconciliation.pending_scan_limit reads; repeats of what it did not see are dropped by the duplicate window");
            }
            pending.insert(storage.clone(), found);
        }
        Ok(pending)
    }

    async fn schedule(
        &self,
        repository: &crate::store::LaggingRepository,
        planned: &Planned,
        report: &mut RoundReport,
    ) -> Result<(), ReconcileError> {
        let correlation_id = format!("reconcile-{}", uuid::Uuid::new_v4());
        let job = Job {
            change: match planned.change {
                ChangeType::DeleteReplica => Change::DeleteReplica,
                _ => Change::Update,
            },
            virtual_storage: repository.virtual_storage.clone(),
            relative_path: repository.relative_path.clone(),
            target_node_storage: planned.target.clone(),
            source_node_storage: planned.source.clone(),
            correlation_id: Some(correlation_id.clone()),
            created_at: None,
            repository_id: Some(repository.repository_id),
            replica_path: repository.replica_path.clone(),
        };
        let message_id = planned.message_id(repository);
        let published = self
            .publisher
            .publish(&job, Some(&message_id))
            .await
            .map_err(|source| ReconcileError::Publish {
                relative_path: repository.relative_path.clone(),
                target: planned.target.clone(),
                source,
            })?;
        if published.duplicate {
            report.duplicates += 1;
            return Ok(());
        }
        *report.scheduled.entry(planned.change).or_default() += 1;
        ReconcilerMetrics::scheduled(&repository.virtual_storage, planned.change, 1);
        tracing::info!(
            change = planned.change.as_str(),
            correlation_id = %correlation_id,
            virtual_storage = %repository.virtual_storage,
            relative_path = %repository.relative_path,
            repository_id = repository.repository_id,
            source_storage = planned.source.as_deref().unwrap_or(""),
            target_storage = %planned.target,
            generation = planned.generation,
            stream_sequence = published.sequence,
            "reconciliation job scheduled"
        );
        Ok(())
    }
}
