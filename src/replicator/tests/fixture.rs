//! A replicator under test between two recording Gitaly nodes: a source and
//! a target on 127.0.0.1:0, each checking its own v2 token, the config that
//! names them, and a database of the test's own. Everything stops on drop.

use crate::config::Config;
use crate::gitaly::NodeSet;
use crate::replicator::GitalyReplicator;
use crate::test_database::TestDatabase;
use testkit::recording_gitaly::{RecordingGitaly, RunningGitaly};

pub const VIRTUAL_STORAGE: &str = "default";
pub const SOURCE: &str = "gitaly-1";
pub const SOURCE_TOKEN: &str = "token-1";
pub const TARGET: &str = "gitaly-2";
pub const TARGET_TOKEN: &str = "token-2";
/// A third storage, holding another replica, when a test asks for it.
pub const SPARE: &str = "gitaly-3";
pub const SPARE_TOKEN: &str = "token-3";

/// One `[[virtual_storage.node]]` of the config.
pub struct NodeSpec<'a> {
    pub storage: &'a str,
    pub address: &'a str,
    pub token: &'a str,
}

/// A config with one virtual storage holding `nodes`; `job_timeout` as
/// written in TOML ("0s" = none).
pub fn config_toml(
    virtual_storage: &str,
    nodes: &[NodeSpec<'_>],
    database_url: &str,
    job_timeout: &str,
) -> String {
    let mut s = format!(
        "prometheus_listen_addr = \"\"\n\n[[virtual_storage]]\nname = \"{virtual_storage}\"\n"
    );
    for n in nodes {
        s += &format!(
            "[[virtual_storage.node]]\nstorage = \"{}\"\naddress = \"{}\"\ntoken = \"{}\"\n",
            n.storage, n.address, n.token
        );
    }
    s += &format!("\n[database]\nurl = \"{database_url}\"\n");
    s += &format!("\n[replication]\njob_timeout = \"{job_timeout}\"\n");
    s
}

/// A TCP port on 127.0.0.1 that refuses connections while this lives: bound
/// but never listening, so nothing else can take it and listen there.
pub struct ClosedPort(tokio::net::TcpSocket);

impl ClosedPort {
    pub fn bind() -> ClosedPort {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
        ClosedPort(socket)
    }

    /// Its address, as the config names a node.
    pub fn address(&self) -> String {
        format!("tcp://{}", self.0.local_addr().unwrap())
    }
}

/// What a test changes about the two-node setup.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The token the target server checks; the config always gives the
    /// replicator `TARGET_TOKEN`.
    pub target_server_token: String,
    /// `[replication] job_timeout`.
    pub job_timeout: String,
    /// Configure the target at this address instead of its server's.
    pub target_address: Option<String>,
    /// Configure the source at this address instead of its server's.
    pub source_address: Option<String>,
    /// Whether the source node appears in the config at all.
    pub source_in_config: bool,
    /// Whether a third node, `SPARE`, runs and is configured.
    pub spare: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            target_server_token: TARGET_TOKEN.to_owned(),
            job_timeout: "0s".to_owned(),
            target_address: None,
            source_address: None,
            source_in_config: true,
            spare: false,
        }
    }
}

/// Source and target nodes, the replicator built from the config as the
/// service builds it, and the test's database.
pub struct TwoNodes {
    pub db: TestDatabase,
    pub source: RunningGitaly,
    pub target: RunningGitaly,
    /// Present with `Setup::spare`.
    pub spare: Option<RunningGitaly>,
    pub replicator: GitalyReplicator,
}

impl TwoNodes {
    pub async fn start() -> TwoNodes {
        Self::start_with(Setup::default()).await
    }

    pub async fn start_with(setup: Setup) -> TwoNodes {
        let db = TestDatabase::new().await;
        let source = RecordingGitaly::new(Some(SOURCE_TOKEN))
            .serve()
            .await
            .unwrap();
        let target = RecordingGitaly::new(Some(&setup.target_server_token))
            .serve()
            .await
            .unwrap();
        let source_address = setup.source_address.unwrap_or_else(|| source.address());
        let target_address = setup.target_address.unwrap_or_else(|| target.address());
        let mut nodes = Vec::new();
        if setup.source_in_config {
            nodes.push(NodeSpec {
                storage: SOURCE,
                address: &source_address,
                token: SOURCE_TOKEN,
            });
        }
        nodes.push(NodeSpec {
            storage: TARGET,
            address: &target_address,
            token: TARGET_TOKEN,
        });
        let spare = if setup.spare {
            Some(
                RecordingGitaly::new(Some(SPARE_TOKEN))
                    .serve()
                    .await
                    .unwrap(),
            )
        } else {
            None
        };
        let spare_address = spare.as_ref().map(|s| s.address());
        if let Some(address) = &spare_address {
            nodes.push(NodeSpec {
                storage: SPARE,
                address,
                token: SPARE_TOKEN,
            });
        }
        let toml = config_toml(VIRTUAL_STORAGE, &nodes, &db.url, &setup.job_timeout);
        let config = Config::from_toml_str(&toml).unwrap();
        let nodes = NodeSet::from_config(&config).unwrap();
        // As the service does: a zero job timeout means none.
        let timeout = config.replication.job_timeout;
        let replicator = GitalyReplicator::new(
            nodes,
            db.store.clone(),
            (!timeout.is_zero()).then_some(timeout),
            &tokio_util::task::TaskTracker::new(),
        );
        TwoNodes {
            db,
            source,
            target,
            spare,
            replicator,
        }
    }
}
