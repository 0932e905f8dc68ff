//! A private 3-node nats-server cluster with JetStream, for tests that kill
//! one node and start it again; never the machine's shared server. Each node
//! has its own client port, route port and store, kept across restarts.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Nodes in the cluster: the smallest that keeps a quorum with one down.
pub const NODES: usize = 3;

pub struct NatsCluster {
    /// Client ports, one per node.
    pub ports: Vec<u16>,
    configs: Vec<PathBuf>,
    _dir: tempfile::TempDir,
    children: Vec<Option<Child>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl NatsCluster {
    /// Starts the three nodes and waits until JetStream answers through them.
    pub async fn start() -> NatsCluster {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ports: Vec<u16> = (0..NODES).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..NODES).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut configs = Vec::new();
        for i in 0..NODES {
            let store = dir.path().join(format!("n{i}"));
            let config = format!(
                "server_name: \"n{i}\"\nlisten: \"127.0.0.1:{}\"\n\
                 jetstream {{ store_dir: \"{}\" }}\n\
                 cluster {{ name: \"private\", listen: \"127.0.0.1:{}\", routes: [{routes}] }}\n",
                ports[i],
                store.display(),
                route_ports[i]
            );
            let path = dir.path().join(format!("n{i}.conf"));
            std::fs::write(&path, config).expect("writing a node's config");
            configs.push(path);
        }
        let mut cluster = NatsCluster {
            ports,
            configs,
            _dir: dir,
            children: (0..NODES).map(|_| None).collect(),
        };
        for i in 0..NODES {
            cluster.spawn(i);
        }
        cluster.wait_for_jetstream().await;
        cluster
    }

    /// Every node's URL, comma-separated, as `[nats] url` takes them.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) {
        let child = Command::new(crate::nats_server::binary())
            .arg("-c")
            .arg(&self.configs[i])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is installed");
        self.children[i] = Some(child);
    }

    /// Waits until the cluster has elected a JetStream leader: account
    /// requests succeed through every node.
    async fn wait_for_jetstream(&self) {
        for port in &self.ports {
            let url = format!("nats://127.0.0.1:{port}");
            let ready = crate::eventually(Duration::from_secs(30), || {
                let url = url.clone();
                async move {
                    let Ok(client) = async_nats::connect(url).await else {
                        return false;
                    };
                    async_nats::jetstream::new(client)
                        .query_account()
                        .await
                        .is_ok()
                }
            })
            .await;
            assert!(ready, "JetStream did not come up on node {port}");
        }
    }

    /// SIGKILL of node `i` (0-based).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a killed node again on its ports and store, and waits until it
    /// accepts connections (it catches up with the others on its own).
    pub async fn start_again(&mut self, i: usize) {
        if self.children[i].is_some() {
            return;
        }
        self.spawn(i);
        let url = format!("nats://127.0.0.1:{}", self.ports[i]);
        let up = crate::eventually(Duration::from_secs(10), || {
            let url = url.clone();
            async move { async_nats::connect(url).await.is_ok() }
        })
        .await;
        assert!(up, "node {i} of the cluster did not start again");
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..NODES {
            self.kill(i);
        }
    }
}
