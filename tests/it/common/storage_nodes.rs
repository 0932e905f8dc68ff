//! Real storage nodes as processes (the `storage-node` binary, each with its
//! own storage directory and token), and a cluster of them for end-to-end
//! tests: a database and streams of the test's own, and the replicator
//! service run in this process. Processes are killed, streams and database
//! removed when the fixtures are dropped.

use super::cluster::{NodeSpec, TestNames, config_toml, delete_streams, nats_url};
use super::db::TestDatabase;
use super::eventually;
use super::service::ServiceTask;
use async_nats::jetstream::Context;
use gitaly_replicator::Job;
use gitaly_replicator::Layout;
use gitaly_replicator::Publisher;
use gitaly_replicator::dead_letters::DeadMessage;
use gitaly_replicator::{CallContext, NodeClient};
use gitaly_replicator::{Config, Node, Secret};
use std::time::Duration;
pub use testkit::storage_node::NodeProcess;

/// A client of `node` signing with `token`.
pub fn client(node: &NodeProcess, token: &str) -> NodeClient {
    let spec = Node {
        storage: node.storage.clone(),
        address: node.address().parse().expect("a node address"),
        token: Secret::new(token),
    };
    NodeClient::new("e2e", &spec).expect("a client")
}

/// How one node of a [`NodeCluster`] is set up.
#[derive(Debug, Clone, Default)]
pub struct NodeSetup {
    /// Extra flags of `storage-node` (`--latency 300ms`).
    pub flags: Vec<String>,
    /// The token the replicator is configured with when it differs from
    /// the node's own.
    pub config_token: Option<String>,
    /// Environment of the node's process (`SSL_CERT_FILE`).
    pub env: Vec<(String, String)>,
}

/// `gitaly-1` … `gitaly-n` as processes, a database and streams of the
/// test's own, and the config naming them.
pub struct NodeCluster {
    pub names: TestNames,
    pub db: TestDatabase,
    pub nodes: Vec<NodeProcess>,
    pub config: Config,
    pub js: Context,
    pub layout: Layout,
    /// The config as TOML, for tests that run the binary.
    pub toml: String,
    _storages: tempfile::TempDir,
    nats_url: String,
}

impl NodeCluster {
    /// `n` nodes with default setups.
    pub async fn start(n: usize) -> NodeCluster {
        Self::start_with(vec![NodeSetup::default(); n], |_| {}).await
    }

    /// One node per setup; `edit` may change the config's TOML first.
    /// Streams and consumers are provisioned.
    pub async fn start_with(setups: Vec<NodeSetup>, edit: impl FnOnce(&mut String)) -> NodeCluster {
        let nats_url = nats_url();
        let names = TestNames::new();
        let db = TestDatabase::new().await;
        let storages = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        let mut specs = Vec::new();
        for (i, setup) in setups.iter().enumerate() {
            let storage = format!("gitaly-{}", i + 1);
            let token = format!("token-{}-{}", i + 1, names.id);
            let node = NodeProcess::spawn_with_env(
                &storage,
                &storages.path().join(&storage),
                &token,
                "127.0.0.1:0",
                &setup.flags,
                &setup.env,
            )
            .await;
            specs.push(NodeSpec {
                storage,
                address: node.address(),
                token: setup.config_token.clone().unwrap_or(token),
            });
            nodes.push(node);
        }
        let mut toml = config_toml(&names, &specs, &db.url, &nats_url);
        // A small pool: tests run in parallel on one Postgres.
        toml = toml.replacen(
            "\n[replication]\n",
            "max_connections = 4\n\n[replication]\n",
            1,
        );
        edit(&mut toml);
        let config = Config::from_toml_str(&toml).unwrap();
        let client = async_nats::connect(&nats_url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let layout = Layout::from_config(&config);
        layout.ensure(&js).await.unwrap();
        NodeCluster {
            names,
            db,
            nodes,
            config,
            js,
            layout,
            toml,
            _storages: storages,
            nats_url,
        }
    }

    pub fn vs(&self) -> &str {
        &self.names.virtual_storage
    }

    /// `gitaly-<i>` (1-based).
    pub fn node(&self, i: usize) -> &NodeProcess {
        &self.nodes[i - 1]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut NodeProcess {
        &mut self.nodes[i - 1]
    }

    /// Starts the replicator service in this process, as `run` does.
    pub fn replicator(&self) -> ServiceTask {
        ServiceTask::start(self.config.clone())
    }

    /// Records a repository created on `gitaly-1` at `generation` (raising
    /// an existing record), as Praefect does after a write on the primary.
    pub async fn record(&self, relative_path: &str, generation: i64) {
        self.db
            .store
            .create_repository(
                self.vs(),
                relative_path,
                "gitaly-1",
                generation,
                &["gitaly-1"],
            )
            .await
            .unwrap();
    }

    /// A repository with a few commits on gitaly-1, recorded at generation 1.
    pub async fn create_on_source(&self, relative_path: &str) {
        super::git::populate(&self.node(1).repo(relative_path));
        self.record(relative_path, 1).await;
    }

    pub async fn generation(&self, relative_path: &str, storage: &str) -> Option<i64> {
        self.db
            .store
            .generation(self.vs(), relative_path, storage)
            .await
            .unwrap()
    }

    /// How many of `paths` gitaly-2 holds at generation 1.
    pub async fn replicated(&self, paths: &[String]) -> usize {
        let mut n = 0;
        for p in paths {
            if self.generation(p, "gitaly-2").await == Some(1) {
                n += 1;
            }
        }
        n
    }

    /// A job of this cluster's virtual storage from its JSON fields.
    pub fn job(&self, mut json: serde_json::Value) -> Job {
        json["virtual_storage"] = self.vs().into();
        Job::from_value(&json).unwrap()
    }

    pub async fn publish(&self, job: &Job) {
        Publisher::new(self.js.clone(), self.layout.clone())
            .publish(job, None)
            .await
            .unwrap();
    }

    /// Publishes an update of `relative_path` from gitaly-1 to `target`.
    pub async fn publish_update(&self, relative_path: &str, target: &str) {
        let job = self.job(serde_json::json!({
            "change": "update",
            "relative_path": relative_path,
            "source_node_storage": "gitaly-1",
            "target_node_storage": target,
        }));
        self.publish(&job).await;
    }

    /// Messages left in the work stream (pending or in flight).
    pub async fn work_messages(&self) -> u64 {
        super::cluster::work_messages(&self.js, &self.layout).await
    }

    pub async fn dead_letters(&self) -> Vec<DeadMessage> {
        super::cluster::dead_letters(&self.js, &self.layout).await
    }

    /// Waits until `relative_path` on `storage` is recorded at `generation`.
    pub async fn wait_for_generation(&self, relative_path: &str, storage: &str, generation: i64) {
        let reached = eventually(Duration::from_secs(30), || async {
            self.generation(relative_path, storage).await == Some(generation)
        })
        .await;
        assert!(
            reached,
            "{relative_path} on {storage} never reached generation {generation} (at {:?}; dead letters: {:?})",
            self.generation(relative_path, storage).await,
            self.dead_letter_errors().await
        );
    }

    /// The `Gitaly-Replicator-Error` header of every dead letter.
    pub async fn dead_letter_errors(&self) -> Vec<String> {
        self.dead_letters()
            .await
            .iter()
            .map(|d| {
                d.header("Gitaly-Replicator-Error")
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    }

    /// Waits until the work stream is empty.
    pub async fn wait_until_drained(&self) {
        assert!(
            eventually(Duration::from_secs(30), || async {
                self.work_messages().await == 0
            })
            .await,
            "the work stream still holds {} jobs",
            self.work_messages().await
        );
    }
}

impl Drop for NodeCluster {
    fn drop(&mut self) {
        delete_streams(self.nats_url.clone(), self.names.clone());
    }
}

/// A call context for direct calls to a node.
pub fn call_context() -> CallContext {
    CallContext::new(None, Some(Duration::from_secs(30)))
}
