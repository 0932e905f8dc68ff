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
use std::path::Path;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, ServerTlsConfig};

/// Why the node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] NodeConfigError),
    #[error("cannot open storage directories: {0}")]
    Storage(#[source] std::io::Error),
    #[error("cannot read {flag} {path}: {source}")]
    TlsFile {
        flag: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The certificate and key a node serves TLS with, as PEM.
#[derive(Clone)]
pub struct NodeTls {
    identity: Identity,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeTls")
    }
}

impl NodeTls {
    /// A certificate (chain) and its private key, both PEM.
    pub fn from_pem(certificate: impl AsRef<[u8]>, key: impl AsRef<[u8]>) -> NodeTls {
        NodeTls {
            identity: Identity::from_pem(certificate, key),
        }
    }

    /// Reads the PEM files given as `--tls-cert` and `--tls-key`.
    pub fn read(certificate: &Path, key: &Path) -> Result<NodeTls, ServeError> {
        let read = |flag, path: &Path| {
            std::fs::read(path).map_err(|source| ServeError::TlsFile {
                flag,
                path: path.display().to_string(),
                source,
            })
        };
        Ok(Self::from_pem(
            read("--tls-cert", certificate)?,
            read("--tls-key", key)?,
        ))
    }
}

/// A node whose storages are open, ready to serve.
#[derive(Debug)]
pub struct OpenNode {
    node: StorageNode,
    guard: Guard,
    tls: Option<NodeTls>,
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
            tls: None,
        })
    }

    /// Serves TLS with `tls` (HTTP/2 over TLS, as Gitaly's `tls://`
    /// listener) instead of plaintext.
    pub fn with_tls(mut self, tls: NodeTls) -> OpenNode {
        self.tls = Some(tls);
        self
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
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = self.tls {
            builder = builder.tls_config(ServerTlsConfig::new().identity(tls.identity))?;
        }
        let served = builder
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
