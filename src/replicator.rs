//! Turns one job into the right Gitaly calls and repository-store records, as
//! Praefect's replicator does, and reports one outcome. It never touches the
//! queue: the consumer maps outcomes to acknowledgements.

use crate::event::{Change, Job};
use crate::gitaly::health::Health;
use crate::gitaly::metadata::{GITALY_SERVERS, encode_gitaly_servers};
use crate::gitaly::{CallContext, CallError, CallErrorKind, NodeClient, NodeSet};
use crate::proto::gitaly as pb;
use crate::store::generation_batcher::GenerationBatcher;
use crate::store::repository_paths::{NamedRepository, RepositoryPathBatcher};
use crate::store::{
    Gated, GenerationQuery, GenerationRecord, InvalidSource, ReplicatedGeneration, RepositoryStore,
    Standing, StoreError, WriteOrder,
};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;
use tonic::metadata::MetadataValue;

/// Why a job was acknowledged without doing anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// The target already holds the source's generation.
    UpToDate { generation: i64 },
    /// The target is ahead of the source; replicating would lose writes.
    DowngradePrevented {
        target_generation: i64,
        source_generation: i64,
    },
    /// The source replica was not a valid repository; its record was deleted.
    InvalidSource,
    /// A twin job completed after this one was created.
    Superseded,
    /// An identical update delivered with it, or one still waiting for the
    /// replica's lock when it arrived, was dispatched instead.
    Collapsed,
    /// A state-changing job published later already took effect on the
    /// replica; applying this one would undo it.
    OutOfOrder,
    /// The job names a repository (by `repository_id`) that is no longer
    /// the one at its path: it was deleted and created again since.
    Recreated,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::UpToDate { generation } => {
                write!(f, "target already at generation {generation}")
            }
            SkipReason::DowngradePrevented {
                target_generation,
                source_generation,
            } => write!(
                f,
                "downgrade prevented: target at generation {target_generation}, source at {source_generation}"
            ),
            SkipReason::InvalidSource => {
                f.write_str("source is not a valid repository; its replica record was deleted")
            }
            SkipReason::Superseded => f.write_str("superseded by a twin job that completed later"),
            SkipReason::Collapsed => {
                f.write_str("collapsed into an identical update dispatched after it was published")
            }
            SkipReason::OutOfOrder => {
                f.write_str("a job published later already took effect on this replica")
            }
            SkipReason::Recreated => f.write_str(
                "the repository at this path was deleted and created again since the job was published",
            ),
        }
    }
}

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Retried: the source's replica is held by another job (a rename or
    /// delete between its Gitaly call and its record), so "not found" may be
    /// that job's doing, not an invalid replica.
    #[error(
        "source storage {storage:?} has no such repository while another job holds its replica; retried once that job is done"
    )]
    SourceReplicaBusy { storage: String },
    /// Retried: the source's replica was being renamed, and the rename may
    /// have moved it on disk without being recorded yet.
    #[error(
        "source storage {storage:?} has no such repository: a rename of its replica to {to:?} has not been recorded yet; retried once it is"
    )]
    SourceReplicaMoving { storage: String, to: String },
    /// Retried: the repository to rename is at neither path on the target
    /// (its creation may not have reached it yet).
    #[error(
        "rename on {storage:?}: no repository at {from:?} (RenameRepository answered NOT_FOUND) nor at {to:?}"
    )]
    RenameNotFound {
        storage: String,
        from: String,
        to: String,
    },
    /// Retried: `[replication] verify_after_update` compared the checksums
    /// after the copy and they differ (a write landed on the source during
    /// it, or the copy is incomplete).
    #[error(
        "after replication the target {target:?} has checksum {target_checksum:?}, the source {source_storage:?} {source_checksum:?}"
    )]
    ChecksumMismatch {
        source_storage: String,
        target: String,
        source_checksum: String,
        target_checksum: String,
    },
    /// Retried: during a rolling config change another process may know it.
    #[error("source storage {storage:?} is not configured in virtual storage {virtual_storage:?}")]
    UnknownSource {
        virtual_storage: String,
        storage: String,
    },
}

impl ReplicationError {
    /// Whether the repository store could not be reached: the job is not at
    /// fault and is never dead-lettered for it.
    pub fn is_database_outage(&self) -> bool {
        matches!(self, ReplicationError::Store(e) if e.is_outage())
    }
}

/// The result of one job; the consumer turns it into an acknowledgement.
#[derive(Debug)]
pub enum JobOutcome {
    Completed,
    Skipped(SkipReason),
    /// Worth retrying.
    Failed(ReplicationError),
    /// Will never succeed as sent (bad payload, unknown storage, bad argument).
    Invalid(String),
    /// The target does not implement the RPC any more; never retried.
    Unsupported {
        method: &'static str,
        message: String,
    },
    /// The job's repository lock was lost before its write: it wrote
    /// nothing and must run again, without losing an attempt.
    Interrupted,
    /// An update whose source storage is unhealthy, with no other healthy
    /// replica holding the repository's generation: it did nothing and
    /// waits for one, without losing an attempt.
    SourceUnavailable {
        storage: String,
    },
}

impl JobOutcome {
    /// The `outcome` label of the job metrics.
    pub fn label(&self) -> &'static str {
        match self {
            JobOutcome::Completed => "completed",
            JobOutcome::Skipped(_) => "skipped",
            JobOutcome::Failed(_) => "failed",
            JobOutcome::Invalid(_) => "invalid",
            JobOutcome::Unsupported { .. } => "unsupported",
            JobOutcome::Interrupted => "interrupted",
            JobOutcome::SourceUnavailable { .. } => "deferred",
        }
    }

    /// Whether the latency histogram observes this outcome of a dispatched
    /// job: as Praefect's, every job that ended without an error, so also one
    /// that found nothing to do (up to date, downgrade prevented, invalid
    /// source, superseded by a newer job).
    pub fn observes_latency(&self) -> bool {
        matches!(self, JobOutcome::Completed | JobOutcome::Skipped(_))
    }
}

/// Runs one job to an outcome. Implementations must be idempotent: a job can
/// be delivered again after it took effect.
pub trait Replicator: Send + Sync + 'static {
    /// Runs `job`; with `order`, a state-changing job checks and records its
    /// place among its replica's jobs and writes only under its lock.
    fn replicate_in_order(
        &self,
        job: &Job,
        order: Option<&WriteOrder>,
    ) -> impl Future<Output = JobOutcome> + Send;

    /// The relative path Praefect's store now records for the repository
    /// `job` names by id, when it moved there in the store alone (see
    /// `store::repository_paths`); the job then runs at that path. `None`:
    /// the job's own path stands.
    fn followed_path(
        &self,
        _job: &Job,
    ) -> impl Future<Output = Result<Option<String>, JobOutcome>> + Send {
        std::future::ready(Ok(None))
    }

    /// Runs `job` outside any order.
    #[cfg(test)]
    fn replicate(&self, job: &Job) -> impl Future<Output = JobOutcome> + Send {
        self.replicate_in_order(job, None)
    }
}

/// The replicator that talks to Gitaly nodes and the repository store.
#[derive(Clone)]
pub struct GitalyReplicator {
    nodes: NodeSet,
    store: RepositoryStore,
    generations: GenerationBatcher,
    paths: RepositoryPathBatcher,
    job_timeout: Option<Duration>,
    /// `[replication] verify_after_update`.
    verify_after_update: bool,
}

/// One maintenance RPC on the target whose only effect is on disk there.
macro_rules! unary {
    ($target:expr, $ctx:expr, $service:ident, $method:literal, $rpc:ident, $request:expr) => {{
        let mut client = $target.$service();
        let request = $target.request($request, $ctx);
        $target
            .call($method, $ctx, client.$rpc(request))
            .await
            .map_err(call_failed)?;
        Ok(JobOutcome::Completed)
    }};
}

/// Early exit from a handler with its final outcome.
type Step<T> = Result<T, JobOutcome>;

fn call_failed(e: CallError) -> JobOutcome {
    match e.kind {
        CallErrorKind::Unsupported => JobOutcome::Unsupported {
            method: e.method,
            message: e.message,
        },
        CallErrorKind::Permanent => JobOutcome::Invalid(e.to_string()),
        _ => JobOutcome::Failed(e.into()),
    }
}

fn store_failed(e: StoreError) -> JobOutcome {
    JobOutcome::Failed(e.into())
}

/// The outcome of a job whose gated write answered `gated`.
fn after_write<T>(gated: Gated<T>, done: JobOutcome) -> JobOutcome {
    match gated {
        Gated::Written(_) => done,
        Gated::Superseded => JobOutcome::Skipped(SkipReason::OutOfOrder),
        Gated::Stale => JobOutcome::Skipped(SkipReason::Recreated),
        Gated::LockLost => JobOutcome::Interrupted,
    }
}

fn repo(storage: &str, relative_path: &str) -> Option<pb::Repository> {
    Some(pb::Repository {
        storage_name: storage.to_owned(),
        relative_path: relative_path.to_owned(),
        ..Default::default()
    })
}

impl GitalyReplicator {
    /// Starts its generation batching tasks in `tasks`.
    pub fn new(
        nodes: NodeSet,
        store: RepositoryStore,
        job_timeout: Option<Duration>,
        tasks: &TaskTracker,
    ) -> Self {
        GitalyReplicator {
            nodes,
            generations: GenerationBatcher::start(store.clone(), tasks),
            paths: RepositoryPathBatcher::start(store.clone(), tasks),
            store,
            job_timeout,
            verify_after_update: false,
        }
    }

    /// With `on`, an update completes only when the target's checksum
    /// equals the source's afterwards.
    pub fn verifying_after_update(self, on: bool) -> Self {
        Self {
            verify_after_update: on,
            ..self
        }
    }

    /// The target's client. A consumer only runs for configured targets, so
    /// a miss means the payload names another target than its subject.
    fn target(&self, job: &Job) -> Step<&Arc<NodeClient>> {
        let storage = &job.target_node_storage;
        self.nodes
            .get(&job.virtual_storage, storage)
            .ok_or_else(|| {
                JobOutcome::Invalid(format!(
                    "target storage {storage:?} is not configured in virtual storage {:?}",
                    job.virtual_storage
                ))
            })
    }

    async fn run(&self, job: &Job, order: Option<&WriteOrder>) -> Step<JobOutcome> {
        let target = self.target(job)?;
        let ctx = CallContext::new(job.correlation_id.clone(), self.job_timeout);
        // Each kind boxed on its own: a job's future lives while it is in
        // flight, and inline every job's would be as large as an update's.
        match &job.change {
            Change::Update | Change::Create => {
                Box::pin(self.update(job, target, &ctx, order)).await
            }
            Change::Delete | Change::DeleteReplica => {
                Box::pin(self.delete(job, target, &ctx, order)).await
            }
            Change::Rename { new_relative_path } => {
                Box::pin(self.rename(job, new_relative_path, target, &ctx, order)).await
            }
            _ => Box::pin(self.maintain(job, target, &ctx)).await,
        }
    }

    /// Removes the replica, then its record (with `Delete`, the repository's).
    async fn delete(
        &self,
        job: &Job,
        target: &NodeClient,
        ctx: &CallContext,
        order: Option<&WriteOrder>,
    ) -> Step<JobOutcome> {
        let target_repo = repo(&job.target_node_storage, job.replica_path());
        let (vs, rel, storage) = job.repository_key();
        let standing = self.standing(&[(vs, rel, storage)], order).await?;
        if let Some(skipped) = standing.into_iter().next().flatten() {
            return Ok(JobOutcome::Skipped(skipped));
        }
        self.remove(target, ctx, target_repo).await?;
        let gated = if matches!(job.change, Change::Delete) {
            self.store
                .delete_repository_in_order(vs, rel, storage, order)
                .await
        } else {
            self.store
                .delete_replica_in_order(vs, rel, storage, order)
                .await
        };
        Ok(after_write(
            gated.map_err(store_failed)?,
            JobOutcome::Completed,
        ))
    }

    /// Moves the replica to `new_relative_path`, then its record.
    async fn rename(
        &self,
        job: &Job,
        new_relative_path: &str,
        target: &NodeClient,
        ctx: &CallContext,
        order: Option<&WriteOrder>,
    ) -> Step<JobOutcome> {
        let (vs, rel, storage) = job.repository_key();
        // A rename moves the relative path, as Praefect's does; a
        // replica path does not follow renames.
        let target_repo = repo(storage, rel);
        let keys = [(vs, rel, storage), (vs, new_relative_path, storage)];
        let mut standing = self.standing(&keys, order).await?;
        if let Some(skipped) = standing[0].take() {
            return Ok(JobOutcome::Skipped(skipped));
        }
        if standing[1].is_some() {
            // A later job already settled the new path; what is
            // left of the rename is that the old path is gone.
            self.remove(target, ctx, target_repo).await?;
            let gated = self
                .store
                .delete_replica_in_order(vs, rel, storage, order)
                .await
                .map_err(store_failed)?;
            return Ok(after_write(gated, JobOutcome::Completed));
        }
        // Recorded before the call: should the call move the
        // directory and the record fail, this replica must not be
        // taken for an invalid source until the rename is recorded.
        self.store
            .begin_move(vs, rel, storage, new_relative_path)
            .await
            .map_err(store_failed)?;
        let mut client = target.repository_service();
        let req = target.request(
            pb::RenameRepositoryRequest {
                repository: target_repo,
                relative_path: new_relative_path.to_owned(),
            },
            ctx,
        );
        match target
            .call("RenameRepository", ctx, client.rename_repository(req))
            .await
        {
            // The old path is gone. Done only if the repository is at
            // the new one (a redelivery after the rename took
            // effect); else nothing moved, and the record must not
            // say it did.
            Err(e) if e.kind == CallErrorKind::NotFound => {
                let moved = repo(storage, new_relative_path);
                if !self.exists(target, ctx, moved).await? {
                    return Err(JobOutcome::Failed(ReplicationError::RenameNotFound {
                        storage: storage.to_owned(),
                        from: rel.to_owned(),
                        to: new_relative_path.to_owned(),
                    }));
                }
            }
            r => {
                r.map_err(call_failed)?;
            }
        }
        let gated = self
            .store
            .rename_repository_in_order(vs, rel, storage, new_relative_path, order)
            .await
            .map_err(store_failed)?;
        Ok(after_write(gated, JobOutcome::Completed))
    }

    /// A maintenance change: one call on the target, no rows written.
    async fn maintain(
        &self,
        job: &Job,
        target: &NodeClient,
        ctx: &CallContext,
    ) -> Step<JobOutcome> {
        let target_repo = repo(&job.target_node_storage, job.replica_path());
        match &job.change {
            Change::GarbageCollect {
                create_bitmap,
                prune,
            } => unary!(
                target,
                ctx,
                repository_service,
                "GarbageCollect",
                garbage_collect,
                pb::GarbageCollectRequest {
                    repository: target_repo,
                    create_bitmap: *create_bitmap,
                    prune: *prune,
                }
            ),
            Change::RepackFull { create_bitmap } => unary!(
                target,
                ctx,
                repository_service,
                "RepackFull",
                repack_full,
                pb::RepackFullRequest {
                    repository: target_repo,
                    create_bitmap: *create_bitmap,
                }
            ),
            Change::RepackIncremental => unary!(
                target,
                ctx,
                repository_service,
                "RepackIncremental",
                repack_incremental,
                pb::RepackIncrementalRequest {
                    repository: target_repo
                }
            ),
            Change::Cleanup => unary!(
                target,
                ctx,
                repository_service,
                "Cleanup",
                cleanup,
                pb::CleanupRequest {
                    repository: target_repo
                }
            ),
            Change::PackRefs { all_refs } => unary!(
                target,
                ctx,
                ref_service,
                "PackRefs",
                pack_refs,
                pb::PackRefsRequest {
                    repository: target_repo,
                    all_refs: *all_refs,
                }
            ),
            Change::WriteCommitGraph { split_strategy } => unary!(
                target,
                ctx,
                repository_service,
                "WriteCommitGraph",
                write_commit_graph,
                pb::WriteCommitGraphRequest {
                    repository: target_repo,
                    split_strategy: split_strategy.as_i32(),
                }
            ),
            Change::MidxRepack => unary!(
                target,
                ctx,
                repository_service,
                "MidxRepack",
                midx_repack,
                pb::MidxRepackRequest {
                    repository: target_repo
                }
            ),
            Change::OptimizeRepository => unary!(
                target,
                ctx,
                repository_service,
                "OptimizeRepository",
                optimize_repository,
                pb::OptimizeRepositoryRequest {
                    repository: target_repo
                }
            ),
            Change::Update
            | Change::Create
            | Change::Delete
            | Change::DeleteReplica
            | Change::Rename { .. } => Err(JobOutcome::Invalid(format!(
                "{:?} is not a maintenance change",
                job.change_type()
            ))),
        }
    }

    /// For each of `keys`, why the job must not run there: a later
    /// state-changing job already took effect, or the repository was
    /// re-created (all `None` without an order).
    async fn standing(
        &self,
        keys: &[(&str, &str, &str)],
        order: Option<&WriteOrder>,
    ) -> Step<Vec<Option<SkipReason>>> {
        let Some(order) = order else {
            return Ok(vec![None; keys.len()]);
        };
        let standing = self
            .store
            .standing_in_order(keys, order)
            .await
            .map_err(store_failed)?;
        Ok(standing
            .into_iter()
            .map(|s| match s {
                Standing::Current => None,
                Standing::Superseded => Some(SkipReason::OutOfOrder),
                Standing::Stale => Some(SkipReason::Recreated),
            })
            .collect())
    }

    /// RepositoryExists on the target.
    async fn exists(
        &self,
        target: &NodeClient,
        ctx: &CallContext,
        repository: Option<pb::Repository>,
    ) -> Step<bool> {
        let mut client = target.repository_service();
        let req = target.request(pb::RepositoryExistsRequest { repository }, ctx);
        target
            .call("RepositoryExists", ctx, client.repository_exists(req))
            .await
            .map(|r| r.exists)
            .map_err(call_failed)
    }

    /// RemoveRepository on the target; a repository already gone counts as
    /// removed (a redelivery after the removal took effect).
    async fn remove(
        &self,
        target: &NodeClient,
        ctx: &CallContext,
        repository: Option<pb::Repository>,
    ) -> Step<()> {
        let mut client = target.repository_service();
        let req = target.request(pb::RemoveRepositoryRequest { repository }, ctx);
        match target
            .call("RemoveRepository", ctx, client.remove_repository(req))
            .await
        {
            Err(e) if e.kind == CallErrorKind::NotFound => Ok(()),
            r => r.map(drop).map_err(call_failed),
        }
    }

    /// Records the order of an update that replicated nothing, then reports
    /// `skipped` (or what the gate says instead).
    async fn skip_in_order(
        &self,
        job: &Job,
        order: Option<&WriteOrder>,
        skipped: SkipReason,
    ) -> Step<JobOutcome> {
        let (vs, rel, target) = job.repository_key();
        let gated = self
            .generations
            .set_generation(GenerationRecord {
                virtual_storage: vs,
                relative_path: rel,
                storage: target,
                generation: -1,
                order,
            })
            .await
            .map_err(store_failed)?;
        Ok(after_write(gated, JobOutcome::Skipped(skipped)))
    }

    /// A healthy node other than the job's target and its named source whose
    /// replica holds the repository's latest generation (the primary
    /// preferred), as the repository store says.
    async fn healthy_replica(&self, job: &Job, named: &str) -> Step<Option<&Arc<NodeClient>>> {
        let storages = self
            .store
            .up_to_date_storages(&job.virtual_storage, &job.relative_path)
            .await
            .map_err(store_failed)?;
        Ok(storages
            .iter()
            .filter(|s| *s != named && **s != job.target_node_storage)
            .filter_map(|s| self.nodes.get(&job.virtual_storage, s))
            .find(|n| n.health() == Health::Healthy))
    }

    /// Praefect's update: check generations, replicate with the source named in
    /// `gitaly-servers` (another up-to-date replica when the job's source is
    /// unhealthy), link the source's object pool, then record the
    /// generation. The record is written last so a crash before it only means
    /// a redelivery that repeats idempotent calls.
    async fn update(
        &self,
        job: &Job,
        target: &NodeClient,
        ctx: &CallContext,
        order: Option<&WriteOrder>,
    ) -> Step<JobOutcome> {
        // Validation guarantees a source for update/create.
        let named = job.source_node_storage.as_deref().unwrap_or_default();
        let named_node = self.nodes.get(&job.virtual_storage, named).ok_or_else(|| {
            JobOutcome::Failed(ReplicationError::UnknownSource {
                virtual_storage: job.virtual_storage.clone(),
                storage: named.to_owned(),
            })
        })?;
        let (vs, rel, target_storage) = job.repository_key();
        let query = |source| GenerationQuery {
            virtual_storage: vs,
            relative_path: rel,
            source,
            target: target_storage,
            order: order.map(|o| (o.stream.as_str(), o.sequence)),
            repository_id: order.and_then(|o| o.repository_id),
        };
        let mut decided = self
            .generations
            .replicated_generation(query(named))
            .await
            .map_err(store_failed)?;
        let (mut source_storage, mut source) = (named, named_node);
        // The store alone can tell that nothing needs copying; only a copy
        // needs a source that answers.
        if matches!(decided, ReplicatedGeneration::Replicate { .. })
            && named_node.health() == Health::Unhealthy
        {
            let Some(node) = self.healthy_replica(job, named).await? else {
                return Err(JobOutcome::SourceUnavailable {
                    storage: named.to_owned(),
                });
            };
            tracing::info!(
                virtual_storage = vs,
                relative_path = rel,
                target = target_storage,
                source = named,
                source_used = %node.storage,
                correlation_id = job.correlation_id.as_deref().unwrap_or(""),
                "source storage is unhealthy; replicating from another replica that holds the repository's generation"
            );
            decided = self
                .generations
                .replicated_generation(query(&node.storage))
                .await
                .map_err(store_failed)?;
            (source_storage, source) = (node.storage.as_str(), node);
        }
        let generation = match decided {
            ReplicatedGeneration::Replicate { generation } => generation,
            ReplicatedGeneration::UpToDate { generation } => {
                return self
                    .skip_in_order(job, order, SkipReason::UpToDate { generation })
                    .await;
            }
            ReplicatedGeneration::Downgrade {
                target_generation,
                source_generation,
            } => {
                let skipped = SkipReason::DowngradePrevented {
                    target_generation,
                    source_generation,
                };
                return self.skip_in_order(job, order, skipped).await;
            }
            ReplicatedGeneration::Superseded => {
                return Ok(JobOutcome::Skipped(SkipReason::OutOfOrder));
            }
            ReplicatedGeneration::Stale => {
                return Ok(JobOutcome::Skipped(SkipReason::Recreated));
            }
        };
        // On disk the repository lives at its replica path (Praefect 14.5
        // and later), on the source and the target alike.
        let path = job.replica_path();

        let mut client = target.repository_service();
        let mut req = target.request(
            pb::ReplicateRepositoryRequest {
                repository: repo(target_storage, path),
                source: repo(source_storage, path),
            },
            ctx,
        );
        let servers =
            encode_gitaly_servers(source_storage, &source.address, source.token().expose());
        match MetadataValue::try_from(servers) {
            Ok(v) => {
                req.metadata_mut().insert(GITALY_SERVERS, v);
            }
            Err(_) => {
                return Err(JobOutcome::Invalid(
                    "source address or token cannot travel in gRPC metadata".into(),
                ));
            }
        }
        match target
            .call("ReplicateRepository", ctx, client.replicate_repository(req))
            .await
        {
            Ok(_) => {}
            Err(e) if e.kind == CallErrorKind::InvalidSource => {
                // Never drop the record of a source replica that another job
                // is moving: its rename may have run on disk but not yet in
                // Postgres, and the record would be lost with the path.
                if self
                    .store
                    .replica_locked(vs, rel, source_storage)
                    .await
                    .map_err(store_failed)?
                {
                    return Err(JobOutcome::Failed(ReplicationError::SourceReplicaBusy {
                        storage: source_storage.to_owned(),
                    }));
                }
                let dropped = self
                    .store
                    .delete_invalid_repository(vs, rel, source_storage)
                    .await
                    .map_err(store_failed)?;
                if let InvalidSource::Moving { to } = dropped {
                    return Err(JobOutcome::Failed(ReplicationError::SourceReplicaMoving {
                        storage: source_storage.to_owned(),
                        to,
                    }));
                }
                return self
                    .skip_in_order(job, order, SkipReason::InvalidSource)
                    .await;
            }
            Err(e) => return Err(call_failed(e)),
        }

        let mut pools = source.object_pool_service();
        let req = source.request(
            pb::GetObjectPoolRequest {
                repository: repo(source_storage, path),
            },
            ctx,
        );
        let pool = source
            .call("GetObjectPool", ctx, pools.get_object_pool(req))
            .await
            .map_err(call_failed)?;
        if let Some(mut pool) = pool.object_pool {
            if let Some(pool_repo) = pool.repository.as_mut() {
                pool_repo.storage_name = target_storage.to_owned();
            }
            let mut pools = target.object_pool_service();
            let req = target.request(
                pb::LinkRepositoryToObjectPoolRequest {
                    object_pool: Some(pool),
                    repository: repo(target_storage, path),
                },
                ctx,
            );
            target
                .call(
                    "LinkRepositoryToObjectPool",
                    ctx,
                    pools.link_repository_to_object_pool(req),
                )
                .await
                .map_err(call_failed)?;
        }
        if self.verify_after_update {
            let source_checksum = source.checksum(path, ctx).await.map_err(call_failed)?;
            let target_checksum = target.checksum(path, ctx).await.map_err(call_failed)?;
            if source_checksum != target_checksum {
                return Err(JobOutcome::Failed(ReplicationError::ChecksumMismatch {
                    source_storage: source_storage.to_owned(),
                    target: target_storage.to_owned(),
                    source_checksum,
                    target_checksum,
                }));
            }
        }

        let gated = self
            .generations
            .set_generation(GenerationRecord {
                virtual_storage: vs,
                relative_path: rel,
                storage: target_storage,
                generation,
                order,
            })
            .await
            .map_err(store_failed)?;
        Ok(after_write(gated, JobOutcome::Completed))
    }
}

impl Replicator for GitalyReplicator {
    async fn replicate_in_order(&self, job: &Job, order: Option<&WriteOrder>) -> JobOutcome {
        match self.run(job, order).await {
            Ok(outcome) | Err(outcome) => outcome,
        }
    }

    async fn followed_path(&self, job: &Job) -> Result<Option<String>, JobOutcome> {
        // A rename is about its two relative paths and moves the directory;
        // a job without a replica path of its own is found by path.
        let (Some(repository_id), Some(replica_path)) = (job.repository_id, &job.replica_path)
        else {
            return Ok(None);
        };
        if matches!(job.change, Change::Rename { .. }) {
            return Ok(None);
        }
        self.paths
            .moved_relative_path(NamedRepository {
                virtual_storage: job.virtual_storage.clone(),
                relative_path: job.relative_path.clone(),
                repository_id,
                replica_path: replica_path.clone(),
            })
            .await
            .map_err(store_failed)
    }
}

#[cfg(test)]
mod tests;
