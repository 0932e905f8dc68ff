//! `gitaly.ObjectPoolService` on the node: report and set the pool a
//! repository borrows objects from.

use crate::node::StorageNode;
use crate::object_pool;
use gitaly_wire::proto::gitaly as pb;
use gitaly_wire::proto::gitaly::object_pool_service_server::ObjectPoolService;
use tonic::{Request, Response, Status};

#[tonic::async_trait]
impl ObjectPoolService for StorageNode {
    async fn get_object_pool(
        &self,
        request: Request<pb::GetObjectPoolRequest>,
    ) -> Result<Response<pb::GetObjectPoolResponse>, Status> {
        let repo = self.repo(request.get_ref().repository.as_ref())?;
        repo.require()?;
        let object_pool = object_pool::pool_of(&repo).map(|relative_path| pb::ObjectPool {
            repository: Some(pb::Repository {
                storage_name: repo.storage.name.clone(),
                relative_path,
                ..Default::default()
            }),
        });
        Ok(Response::new(pb::GetObjectPoolResponse { object_pool }))
    }

    async fn link_repository_to_object_pool(
        &self,
        request: Request<pb::LinkRepositoryToObjectPoolRequest>,
    ) -> Result<Response<pb::LinkRepositoryToObjectPoolResponse>, Status> {
        let req = request.into_inner();
        let pool = req
            .object_pool
            .as_ref()
            .and_then(|p| p.repository.as_ref())
            .ok_or_else(|| Status::invalid_argument("empty ObjectPool"))?;
        let pool = self.repo(Some(pool))?;
        let (repo, _guard) = self.existing(req.repository.as_ref()).await?;
        if pool.storage.name != repo.storage.name {
            return Err(Status::invalid_argument(format!(
                "the pool is on storage {:?}, the repository on {:?}: both must be on one storage",
                pool.storage.name, repo.storage.name
            )));
        }
        if !pool.exists() {
            return Err(Status::failed_precondition(format!(
                "object pool does not exist: {:?}",
                pool.relative
            )));
        }
        object_pool::link(&repo, &pool)?;
        Ok(Response::new(pb::LinkRepositoryToObjectPoolResponse {}))
    }
}
