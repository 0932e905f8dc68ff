//! `grpc.health.v1.Health` on the node: SERVING for the whole server and for
//! each service it offers; no authentication, as in Gitaly.

use crate::node::StorageNode;
use gitaly_wire::proto::health::health_check_response::ServingStatus;
use gitaly_wire::proto::health::health_server::Health;
use gitaly_wire::proto::health::{HealthCheckRequest, HealthCheckResponse};
use std::pin::Pin;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The service names a health check may ask about ("" is the whole server).
const SERVICES: [&str; 5] = [
    "",
    "gitaly.RepositoryService",
    "gitaly.ObjectPoolService",
    "gitaly.RefService",
    "grpc.health.v1.Health",
];

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for StorageNode {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = &request.get_ref().service;
        if !SERVICES.contains(&service.as_str()) {
            return Err(Status::not_found(format!("unknown service {service:?}")));
        }
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("use Check"))
    }
}
