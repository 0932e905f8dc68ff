//! `gitaly.RefService` on the node: only PackRefs.

use crate::maintenance;
use crate::node::StorageNode;
use gitaly_wire::proto::gitaly as pb;
use gitaly_wire::proto::gitaly::ref_service_server::RefService;
use tonic::{Request, Response, Status};

#[tonic::async_trait]
impl RefService for StorageNode {
    /// Packs every ref; `all_refs` (gone from Gitaly's proto) changes nothing.
    async fn pack_refs(
        &self,
        request: Request<pb::PackRefsRequest>,
    ) -> Result<Response<pb::PackRefsResponse>, Status> {
        let (repo, guard) = self.existing(request.get_ref().repository.as_ref()).await?;
        self.change(&repo, guard, move |repo| async move {
            maintenance::pack_refs(&repo).await
        })
        .await?;
        Ok(Response::new(pb::PackRefsResponse {}))
    }
}
