//! The demo's cluster: three git-backed storage nodes served in this
//! process (so `cargo run` needs no second binary), each on its own port of
//! 127.0.0.1, with its own storage directory and token.

use crate::error::DemoError;
use crate::tls::DemoTls;
use crate::workspace::Workspace;
use gitaly_replicator::Secret;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use storage_node::{NodeConfig, NodeTls, OpenNode, ServeError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The demo's one virtual storage.
pub const VIRTUAL_STORAGE: &str = "default";
/// Where the repositories are created: every update job copies from here.
pub const SOURCE: &str = "gitaly-1";
/// The storages that receive replicas.
pub const TARGETS: [&str; 2] = ["gitaly-2", "gitaly-3"];
/// Every storage of the virtual storage.
pub const STORAGES: [&str; 3] = [SOURCE, TARGETS[0], TARGETS[1]];

/// One running node.
#[derive(Debug, Clone)]
pub struct DemoNode {
    pub storage: String,
    /// Its directory of bare repositories.
    pub dir: PathBuf,
    pub address: SocketAddr,
    pub token: String,
    /// Whether it serves TLS.
    pub tls: bool,
}

impl DemoNode {
    /// The address as the config writes it.
    pub fn config_address(&self) -> String {
        let scheme = if self.tls { "tls" } else { "tcp" };
        format!("{scheme}://{}", self.address)
    }

    /// Where a repository of this storage lives on disk.
    pub fn repository(&self, relative_path: &str) -> PathBuf {
        self.dir.join(relative_path)
    }
}

/// The three nodes; stopped with [`DemoNodes::stop`] (or when the runtime ends).
pub struct DemoNodes {
    pub nodes: Vec<DemoNode>,
    stop: CancellationToken,
    tasks: Vec<(String, JoinHandle<Result<(), ServeError>>)>,
}

impl DemoNodes {
    /// Opens a storage directory per node under the workspace and serves each
    /// on 127.0.0.1:0. Calls are accepted as soon as this returns (the
    /// listeners are bound before it does). With `tls`, each serves TLS.
    pub async fn start(
        workspace: &Workspace,
        tls: Option<&DemoTls>,
    ) -> Result<DemoNodes, DemoError> {
        let stop = CancellationToken::new();
        let mut nodes = Vec::new();
        let mut tasks = Vec::new();
        for storage in STORAGES {
            let dir = workspace.storage_dir(storage);
            let token = uuid::Uuid::new_v4().simple().to_string();
            let node_error = |source| DemoError::Node {
                storage: storage.to_owned(),
                source,
            };
            let open = OpenNode::open(NodeConfig {
                storages: vec![(storage.to_owned(), dir.clone())],
                token: Secret::new(token.clone()),
                faults: Default::default(),
            })
            .map_err(node_error)?;
            let open = match tls {
                Some(t) => open.with_tls(NodeTls::from_pem(&t.cert_pem, &t.key_pem)),
                None => open,
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(DemoError::io(format!("binding a port for {storage}")))?;
            let address = listener
                .local_addr()
                .map_err(DemoError::io(format!("reading the address of {storage}")))?;
            let stopped = stop.clone();
            tasks.push((
                storage.to_owned(),
                tokio::spawn(open.run(listener, async move { stopped.cancelled().await })),
            ));
            nodes.push(DemoNode {
                storage: storage.to_owned(),
                dir,
                address,
                token,
                tls: tls.is_some(),
            });
        }
        Ok(DemoNodes { nodes, stop, tasks })
    }

    pub fn get(&self, storage: &str) -> Option<&DemoNode> {
        self.nodes.iter().find(|n| n.storage == storage)
    }

    /// The node of [`SOURCE`] (started first, so always there).
    pub fn source(&self) -> &DemoNode {
        &self.nodes[0]
    }

    /// Stops serving and lets the calls in progress finish, for at most
    /// `grace` per node (then the node is dropped with its connections).
    pub async fn stop(self, grace: Duration) {
        self.stop.cancel();
        for (storage, mut task) in self.tasks {
            match tokio::time::timeout(grace, &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::warn!(%storage, error = %e, "storage node stopped with an error")
                }
                Ok(Err(e)) => tracing::warn!(%storage, error = %e, "storage node task failed"),
                Err(_) => {
                    tracing::warn!(%storage, ?grace, "storage node still busy; stopping it now");
                    task.abort();
                }
            }
        }
    }
}
