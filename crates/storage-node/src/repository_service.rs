//! `gitaly.RepositoryService` on the node: each method resolves its
//! repository, takes the repository's lock when it reads or changes the whole
//! of it, and hands over to the module that does the work; a change that
//! runs git runs in a task of its own ([`StorageNode::change`]), so it ends
//! whole even when the client goes away.

use crate::node::StorageNode;
use crate::snapshot_stream::{self, SnapshotStream};
use crate::storage::{RepoPath, io_status};
use crate::{checksum, cleanup, lifecycle, maintenance, replicate};
use gitaly_wire::proto::gitaly as pb;
use gitaly_wire::proto::gitaly::repository_service_server::RepositoryService;
use std::time::SystemTime;
use tonic::{Request, Response, Status};

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl RepositoryService for StorageNode {
    async fn repository_exists(
        &self,
        request: Request<pb::RepositoryExistsRequest>,
    ) -> Reply<pb::RepositoryExistsResponse> {
        let repo = self.repo(request.get_ref().repository.as_ref())?;
        Ok(Response::new(pb::RepositoryExistsResponse {
            exists: repo.exists(),
        }))
    }

    async fn create_repository(
        &self,
        request: Request<pb::CreateRepositoryRequest>,
    ) -> Reply<pb::CreateRepositoryResponse> {
        let req = request.into_inner();
        let repo = self.repo(req.repository.as_ref())?;
        let guard = self.locks().lock(&repo.path).await;
        self.change(&repo, guard, move |repo| async move {
            lifecycle::create(&repo, &req.default_branch, req.object_format).await
        })
        .await?;
        Ok(Response::new(pb::CreateRepositoryResponse {}))
    }

    async fn replicate_repository(
        &self,
        request: Request<pb::ReplicateRepositoryRequest>,
    ) -> Reply<pb::ReplicateRepositoryResponse> {
        let (metadata, _, req) = request.into_parts();
        replicate::replicate(self, &metadata, req).await?;
        Ok(Response::new(pb::ReplicateRepositoryResponse {}))
    }

    async fn remove_repository(
        &self,
        request: Request<pb::RemoveRepositoryRequest>,
    ) -> Reply<pb::RemoveRepositoryResponse> {
        let (repo, _guard) = self.existing(request.get_ref().repository.as_ref()).await?;
        lifecycle::remove(&repo).await?;
        Ok(Response::new(pb::RemoveRepositoryResponse {}))
    }

    async fn rename_repository(
        &self,
        request: Request<pb::RenameRepositoryRequest>,
    ) -> Reply<pb::RenameRepositoryResponse> {
        let req = request.into_inner();
        let from = self.repo(req.repository.as_ref())?;
        let to = from.storage.repo(&req.relative_path)?;
        let _guards = self.locks().lock_two(&from.path, &to.path).await;
        from.require()?;
        lifecycle::rename(&from, &to)?;
        Ok(Response::new(pb::RenameRepositoryResponse {}))
    }

    async fn garbage_collect(
        &self,
        request: Request<pb::GarbageCollectRequest>,
    ) -> Reply<pb::GarbageCollectResponse> {
        let req = request.into_inner();
        let (repo, guard) = self.existing(req.repository.as_ref()).await?;
        self.change(&repo, guard, move |repo| async move {
            maintenance::garbage_collect(&repo, req.create_bitmap, req.prune).await
        })
        .await?;
        Ok(Response::new(pb::GarbageCollectResponse {}))
    }

    async fn repack_full(
        &self,
        request: Request<pb::RepackFullRequest>,
    ) -> Reply<pb::RepackFullResponse> {
        let req = request.into_inner();
        let (repo, guard) = self.existing(req.repository.as_ref()).await?;
        self.change(&repo, guard, move |repo| async move {
            maintenance::repack_full(&repo, req.create_bitmap).await
        })
        .await?;
        Ok(Response::new(pb::RepackFullResponse {}))
    }

    async fn repack_incremental(
        &self,
        request: Request<pb::RepackIncrementalRequest>,
    ) -> Reply<pb::RepackIncrementalResponse> {
        let (repo, guard) = self.existing(request.get_ref().repository.as_ref()).await?;
        self.change(&repo, guard, move |repo| async move {
            maintenance::repack_incremental(&repo).await
        })
        .await?;
        Ok(Response::new(pb::RepackIncrementalResponse {}))
    }

    async fn cleanup(&self, request: Request<pb::CleanupRequest>) -> Reply<pb::CleanupResponse> {
        let (repo, guard) = self.existing(request.get_ref().repository.as_ref()).await?;
        // The change removes lock files of any age first.
        let clean = |repo: RepoPath| async move {
            tokio::task::spawn_blocking(move || {
                cleanup::clean_stale_files(&repo.path, SystemTime::now())
            })
            .await
            .map_err(|e| Status::internal(format!("cleanup task failed: {e}")))?
            .map_err(|e| io_status("cleaning up", e))
        };
        let removed = self.change(&repo, guard, clean).await?;
        tracing::debug!(removed, "cleanup removed stale files");
        Ok(Response::new(pb::CleanupResponse {}))
    }

    async fn write_commit_graph(
        &self,
        request: Request<pb::WriteCommitGraphRequest>,
    ) -> Reply<pb::WriteCommitGraphResponse> {
        let req = request.into_inner();
        let (repo, guard) = self.existing(req.repository.as_ref()).await?;
        self.change(&repo, guard, move |repo| async move {
            maintenance::write_commit_graph(&repo, req.split_strategy).await
        })
        .await?;
        Ok(Response::new(pb::WriteCommitGraphResponse {}))
    }

    async fn midx_repack(
        &self,
        request: Request<pb::MidxRepackRequest>,
    ) -> Reply<pb::MidxRepackResponse> {
        let (repo, guard) = self.existing(request.get_ref().repository.as_ref()).await?;
        self.change(&repo, guard, move |repo| async move {
            maintenance::midx_repack(&repo).await
        })
        .await?;
        Ok(Response::new(pb::MidxRepackResponse {}))
    }

    async fn optimize_repository(
        &self,
        request: Request<pb::OptimizeRepositoryRequest>,
    ) -> Reply<pb::OptimizeRepositoryResponse> {
        let (repo, guard) = self.existing(request.get_ref().repository.as_ref()).await?;
        self.change(&repo, guard, move |repo| async move {
            maintenance::optimize(&repo).await
        })
        .await?;
        Ok(Response::new(pb::OptimizeRepositoryResponse {}))
    }

    type GetSnapshotStream = SnapshotStream;

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Reply<Self::GetSnapshotStream> {
        let (repo, guard) = self.existing(request.get_ref().repository.as_ref()).await?;
        Ok(Response::new(snapshot_stream::snapshot(repo, guard).await?))
    }

    async fn calculate_checksum(
        &self,
        request: Request<pb::CalculateChecksumRequest>,
    ) -> Reply<pb::CalculateChecksumResponse> {
        let (repo, _guard) = self.existing(request.get_ref().repository.as_ref()).await?;
        Ok(Response::new(pb::CalculateChecksumResponse {
            checksum: checksum::checksum(&repo).await?,
        }))
    }
}
