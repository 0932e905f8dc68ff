//! A private 3-node nats-server cluster with JetStream, for tests that kill
//! one node and start it again; never the machine's shared server. Each node
//! has its own client port, route port and store, kept across restarts.

use crate::ports::{self, unused_port};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Nodes in the cluster: the smallest that keeps a quorum with one down.
pub const NODES: usize = 3;

/// What nats-server logs once its listeners are up.
const READY: &str = "Server is ready";

pub struct NatsCluster {
    /// Client ports, one per node.
    pub ports: Vec<u16>,
    configs: Vec<PathBuf>,
    dir: tempfile::TempDir,
    children: Vec<Option<Child>>,
}

impl NatsCluster {
    /// Starts the three nodes and waits until JetStream answers through them.
    /// A port another process took meanwhile starts the cluster again on
    /// new ones.
    pub async fn start() -> NatsCluster {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut cluster = NatsCluster {
            ports: Vec::new(),
            configs: Vec::new(),
            dir,
            children: (0..NODES).map(|_| None).collect(),
        };
        for _ in 0..ports::ATTEMPTS {
            cluster.configure();
            let mut failed = Vec::new();
            for i in 0..NODES {
                if let Err(log) = cluster.spawn(i).await {
                    failed.push(log);
                }
            }
            if failed.is_empty() {
                cluster.wait_for_jetstream().await;
                return cluster;
            }
            for i in 0..NODES {
                cluster.kill(i);
            }
            let logs = failed.join("\n");
            assert!(ports::in_use(&logs), "the cluster did not start:\n{logs}");
        }
        panic!("the cluster found no free ports:\n{}", cluster.logs());
    }

    /// Writes each node's config on newly drawn client and route ports.
    fn configure(&mut self) {
        let dir = self.dir.path();
        self.ports = (0..NODES).map(|_| unused_port()).collect();
        let route_ports: Vec<u16> = (0..NODES).map(|_| unused_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        self.configs = (0..NODES)
            .map(|i| {
                let store = dir.join(format!("n{i}"));
                // A failed start's state names the old ports.
                let _ = std::fs::remove_dir_all(&store);
                let config = format!(
                    "server_name: \"n{i}\"\nlisten: \"127.0.0.1:{}\"\n\
                     jetstream {{ store_dir: \"{}\" }}\n\
                     cluster {{ name: \"private\", listen: \"127.0.0.1:{}\", routes: [{routes}] }}\n",
                    self.ports[i],
                    store.display(),
                    route_ports[i]
                );
                let path = dir.join(format!("n{i}.conf"));
                std::fs::write(&path, config).expect("writing a node's config");
                path
            })
            .collect();
    }

    /// Every node's URL, comma-separated, as `[nats] url` takes them.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{i}.log"))
    }

    /// Every node's log, for a failure's message.
    fn logs(&self) -> String {
        (0..NODES)
            .map(|i| format!("node {i}:\n{}", read(&self.log_path(i))))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts node `i` and waits until it logs that it is ready; when it
    /// exits first (as it does when a port is taken), answers what it logged.
    async fn spawn(&mut self, i: usize) -> Result<(), String> {
        let log = self.log_path(i);
        let logged_before = read(&log).len();
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        let mut child = Command::new(crate::nats_server::binary())
            .arg("-c")
            .arg(&self.configs[i])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("nats-server is installed");
        let logged = || {
            read(&log)
                .get(logged_before..)
                .unwrap_or_default()
                .to_owned()
        };
        for _ in 0..400 {
            if !matches!(child.try_wait(), Ok(None)) {
                return Err(logged());
            }
            if logged().contains(READY) {
                self.children[i] = Some(child);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(logged())
    }

    /// Waits until the cluster has elected a JetStream leader: account
    /// requests succeed through every node. The answer is read as JSON, not
    /// as async-nats' `Account`, which wants fields nats-server 2.9 does not
    /// send (`reserved_memory`, `reserved_storage`).
    async fn wait_for_jetstream(&self) {
        for port in &self.ports {
            let url = format!("nats://127.0.0.1:{port}");
            let ready = crate::eventually(Duration::from_secs(30), || {
                let url = url.clone();
                async move {
                    let Ok(client) = async_nats::connect(url).await else {
                        return false;
                    };
                    let Ok(answer) = client.request("$JS.API.INFO", "".into()).await else {
                        return false;
                    };
                    serde_json::from_slice::<serde_json::Value>(&answer.payload)
                        .is_ok_and(|info| info.get("error").is_none())
                }
            })
            .await;
            assert!(
                ready,
                "JetStream did not come up on node {port}:\n{}",
                self.logs()
            );
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
    /// accepts connections (it catches up with the others on its own). Its
    /// ports are the cluster's: one taken meanwhile is waited for.
    pub async fn start_again(&mut self, i: usize) {
        if self.children[i].is_some() {
            return;
        }
        for _ in 0..ports::ATTEMPTS {
            match self.spawn(i).await {
                Ok(()) => break,
                Err(log) if ports::in_use(&log) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(log) => panic!("node {i} of the cluster did not start again:\n{log}"),
            }
        }
        let url = format!("nats://127.0.0.1:{}", self.ports[i]);
        let up = crate::eventually(Duration::from_secs(10), || {
            let url = url.clone();
            async move { async_nats::connect(url).await.is_ok() }
        })
        .await;
        assert!(up, "node {i} of the cluster did not start again");
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..NODES {
            self.kill(i);
        }
    }
}
