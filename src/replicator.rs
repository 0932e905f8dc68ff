//! Turns one job into the right Gitaly calls and repository-store records, as
//! Praefect's replicator does, and reports one outcome. It never touches the
//! queue: the consumer maps outcomes to acknowledgements.

use crate::event::{Change, Job};
use crate::generation_batcher::GenerationBatcher;
use crate::gitaly::metadata::{GITALY_SERVERS, encode_gitaly_servers};
use crate::gitaly::{CallContext, CallError, CallErrorKind, NodeClient, NodeSet};
use crate::proto::gitaly as pb;
use crate::store::{ReplicatedGeneration, RepositoryStore, StoreError};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
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
    /// An identical update in the same batch was dispatched instead.
    Collapsed,
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
                f.write_str("collapsed into an identical update in the same batch")
            }
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
        }
    }
}

/// Runs one job to an outcome. Implementations must be idempotent: a job can
/// be delivered again after it took effect.
pub trait Replicator: Send + Sync + 'static {
    fn replicate(&self, job: &Job) -> impl Future<Output = JobOutcome> + Send;
}

/// The replicator that talks to Gitaly nodes and the repository store.
#[derive(Clone)]
pub struct GitalyReplicator {
    nodes: NodeSet,
    store: RepositoryStore,
    generations: GenerationBatcher,
    job_timeout: Option<Duration>,
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

fn repo(storage: &str, relative_path: &str) -> Option<pb::Repository> {
    Some(pb::Repository {
        storage_name: storage.to_owned(),
        relative_path: relative_path.to_owned(),
        ..Default::default()
    })
}

impl GitalyReplicator {
    /// Needs a Tokio runtime: it starts the generation batching tasks.
    pub fn new(nodes: NodeSet, store: RepositoryStore, job_timeout: Option<Duration>) -> Self {
        GitalyReplicator {
            nodes,
            generations: GenerationBatcher::start(store.clone()),
            store,
            job_timeout,
        }
    }

    pub fn nodes(&self) -> &NodeSet {
        &self.nodes
    }

    pub fn store(&self) -> &RepositoryStore {
        &self.store
    }

    fn node(&self, job: &Job, storage: &str, role: &str) -> Step<&Arc<NodeClient>> {
        self.nodes
            .get(&job.virtual_storage, storage)
            .ok_or_else(|| {
                JobOutcome::Invalid(format!(
                    "{role} storage {storage:?} is not configured in virtual storage {:?}",
                    job.virtual_storage
                ))
            })
    }

    async fn run(&self, job: &Job) -> Step<JobOutcome> {
        let target = self.node(job, &job.target_node_storage, "target")?;
        let ctx = CallContext::new(job.correlation_id.clone(), self.job_timeout);
        let target_repo = repo(&job.target_node_storage, &job.relative_path);
        match &job.change {
            Change::Update | Change::Create => self.update(job, target, &ctx).await,
            Change::Delete | Change::DeleteReplica => {
                let mut client = target.repository_service();
                let req = target.request(
                    pb::RemoveRepositoryRequest {
                        repository: target_repo,
                    },
                    &ctx,
                );
                match target
                    .call("RemoveRepository", &ctx, client.remove_repository(req))
                    .await
                {
                    // Already gone: a redelivery after the removal took effect.
                    Err(e) if e.kind == CallErrorKind::NotFound => {}
                    r => {
                        r.map_err(call_failed)?;
                    }
                }
                let (vs, rel, storage) = job.repository_key();
                if matches!(job.change, Change::Delete) {
                    self.store
                        .delete_repository(vs, rel, &[storage])
                        .await
                        .map_err(store_failed)?;
                } else {
                    self.store
                        .delete_replica(vs, rel, storage)
                        .await
                        .map_err(store_failed)?;
                }
                Ok(JobOutcome::Completed)
            }
            Change::Rename { new_relative_path } => {
                let mut client = target.repository_service();
                let req = target.request(
                    pb::RenameRepositoryRequest {
                        repository: target_repo,
                        relative_path: new_relative_path.clone(),
                    },
                    &ctx,
                );
                match target
                    .call("RenameRepository", &ctx, client.rename_repository(req))
                    .await
                {
                    // The old path is gone: a redelivery after the rename took effect.
                    Err(e) if e.kind == CallErrorKind::NotFound => {}
                    r => {
                        r.map_err(call_failed)?;
                    }
                }
                let (vs, rel, storage) = job.repository_key();
                self.store
                    .rename_repository(vs, rel, storage, new_relative_path)
                    .await
                    .map_err(store_failed)?;
                Ok(JobOutcome::Completed)
            }
            Change::GarbageCollect {
                create_bitmap,
                prune,
            } => unary!(
                target,
                &ctx,
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
                &ctx,
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
                &ctx,
                repository_service,
                "RepackIncremental",
                repack_incremental,
                pb::RepackIncrementalRequest {
                    repository: target_repo
                }
            ),
            Change::Cleanup => unary!(
                target,
                &ctx,
                repository_service,
                "Cleanup",
                cleanup,
                pb::CleanupRequest {
                    repository: target_repo
                }
            ),
            Change::PackRefs { all_refs } => unary!(
                target,
                &ctx,
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
                &ctx,
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
                &ctx,
                repository_service,
                "MidxRepack",
                midx_repack,
                pb::MidxRepackRequest {
                    repository: target_repo
                }
            ),
            Change::OptimizeRepository => unary!(
                target,
                &ctx,
                repository_service,
                "OptimizeRepository",
                optimize_repository,
                pb::OptimizeRepositoryRequest {
                    repository: target_repo
                }
            ),
        }
    }

    /// Praefect's update: check generations, replicate with the source named in
    /// `gitaly-servers`, link the source's object pool, then record the
    /// generation. The record is written last so a crash before it only means
    /// a redelivery that repeats idempotent calls.
    async fn update(&self, job: &Job, target: &NodeClient, ctx: &CallContext) -> Step<JobOutcome> {
        // Validation guarantees a source for update/create.
        let source_storage = job.source_node_storage.as_deref().unwrap_or_default();
        let source = self.node(job, source_storage, "source")?;
        let (vs, rel, target_storage) = job.repository_key();

        let generation = match self
            .generations
            .replicated_generation(vs, rel, source_storage, target_storage)
            .await
            .map_err(store_failed)?
        {
            ReplicatedGeneration::Replicate { generation } => generation,
            ReplicatedGeneration::UpToDate { generation } => {
                return Ok(JobOutcome::Skipped(SkipReason::UpToDate { generation }));
            }
            ReplicatedGeneration::Downgrade {
                target_generation,
                source_generation,
            } => {
                return Ok(JobOutcome::Skipped(SkipReason::DowngradePrevented {
                    target_generation,
                    source_generation,
                }));
            }
        };

        let mut client = target.repository_service();
        let mut req = target.request(
            pb::ReplicateRepositoryRequest {
                repository: repo(target_storage, rel),
                source: repo(source_storage, rel),
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
                self.store
                    .delete_invalid_repository(vs, rel, source_storage)
                    .await
                    .map_err(store_failed)?;
                return Ok(JobOutcome::Skipped(SkipReason::InvalidSource));
            }
            Err(e) => return Err(call_failed(e)),
        }

        let mut pools = source.object_pool_service();
        let req = source.request(
            pb::GetObjectPoolRequest {
                repository: repo(source_storage, rel),
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
                    repository: repo(target_storage, rel),
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

        self.generations
            .set_generation(vs, rel, target_storage, generation)
            .await
            .map_err(store_failed)?;
        Ok(JobOutcome::Completed)
    }
}

impl Replicator for GitalyReplicator {
    async fn replicate(&self, job: &Job) -> JobOutcome {
        match self.run(job).await {
            Ok(outcome) | Err(outcome) => outcome,
        }
    }
}
