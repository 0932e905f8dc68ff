//! The node's entry point: opens the storages and serves the Gitaly services
//! and health on a listener the caller bound, until the shutdown future ends.

use crate::config::{NodeConfig, NodeConfigError};
use crate::guard::{Guard, GuardLayer};
use crate::node::StorageNode;
use crate::storage::Storages;
use gitaly_wire::proto::gitaly::object_pool_service_server::ObjectPoolServiceServer;
use gitaly_wire::proto::gitaly::ref_service_server::RefServiceServer;
use gitaly_wire::proto::gitaly::repository_service_server::RepositoryServiceServer;
use gitaly_wire::proto::health::health_server::HealthServer;
use std::future::Future;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// Why the node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] NodeConfigError),
    #[error("cannot open storage directories: {0}")]
    Storage(#[source] std::io::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A node whose storages are open, ready to serve.
#[derive(Debug)]
pub struct OpenNode {
    node: StorageNode,
    guard: Guard,
}

impl OpenNode {
    /// Validates the configuration and opens (creates) the storage directories.
    pub fn open(config: NodeConfig) -> Result<OpenNode, ServeError> {
        config.validate()?;
        let storages = Storages::open(&config.storages).map_err(ServeError::Storage)?;
        Ok(OpenNode {
            node: StorageNode::new(storages),
            guard: Guard {
                token: config.token,
                faults: config.faults,
            },
        })
    }

    /// Serves on `listener` until `shutdown` completes, then lets the calls
    /// in progress finish, and the repository changes of calls whose
    /// clients went away.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let node = self.node;
        let served = tonic::transport::Server::builder()
            .layer(GuardLayer::new(self.guard))
            .add_service(RepositoryServiceServer::new(node.clone()))
            .add_service(ObjectPoolServiceServer::new(node.clone()))
            .add_service(RefServiceServer::new(node.clone()))
            .add_service(HealthServer::new(node.clone()))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await;
        node.changes_done().await;
        served?;
        Ok(())
    }
}

/// Opens the storages and serves the node on `listener` until `shutdown`
/// completes, then lets the calls and repository changes in progress finish.
pub async fn serve(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    OpenNode::open(config)?.run(listener, shutdown).await
}
