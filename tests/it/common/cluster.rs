//! A test cluster: recording Gitaly nodes on 127.0.0.1, a database of its
//! own, and JetStream streams and consumers under a unique prefix, all
//! removed when the fixture is dropped.

use super::db::TestDatabase;
use async_nats::jetstream::Context;
use gitaly_replicator::Config;
use gitaly_replicator::Job;
use gitaly_replicator::Layout;
use gitaly_replicator::Publisher;
use gitaly_replicator::dead_letters::{self, DeadMessage};
use std::time::Duration;
use testkit::nats_server::PrivateNats;
use testkit::pgbouncer::PgBouncer;
use testkit::recording_gitaly::{RecordingGitaly, RunningGitaly};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Not `GITALY_REPLICATOR_…`: the processes the tests start inherit it, and
/// would take it for a config override they do not know.
pub const NATS_URL_ENV: &str = "REPLICATOR_TEST_NATS_URL";

pub fn nats_url() -> String {
    std::env::var(NATS_URL_ENV).unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// Names unique to one test.
#[derive(Debug, Clone)]
pub struct TestNames {
    pub id: String,
    pub virtual_storage: String,
    pub subject_prefix: String,
    pub stream: String,
    pub dead_letter_stream: String,
    pub consumer_prefix: String,
}

impl TestNames {
    pub fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        TestNames {
            virtual_storage: format!("vs-{id}"),
            subject_prefix: format!("t{id}.replication"),
            stream: format!("T{id}"),
            dead_letter_stream: format!("T{id}_DEAD"),
            consumer_prefix: format!("t{id}"),
            id,
        }
    }
}

/// One node of the cluster config.
pub struct NodeSpec {
    pub storage: String,
    pub address: String,
    pub token: String,
}

/// The TOML of a test config; `extra` is appended inside `[replication]`.
pub fn config_toml(
    names: &TestNames,
    nodes: &[NodeSpec],
    database_url: &str,
    nats_url: &str,
) -> String {
    let mut s = String::from("prometheus_listen_addr = \"\"\ngraceful_stop_timeout = \"10s\"\n\n");
    s += &format!(
        "[[virtual_storage]]\nname = \"{}\"\n",
        names.virtual_storage
    );
    for n in nodes {
        s += &format!(
            "[[virtual_storage.node]]\nstorage = \"{}\"\naddress = \"{}\"\ntoken = \"{}\"\n",
            n.storage, n.address, n.token
        );
    }
    s += &format!("\n[database]\nurl = \"{database_url}\"\n");
    s += "\n[replication]\nbatch_size = 10\nhealth_check_interval = \"200ms\"\nretry_delay = \"200ms\"\nmax_retry_delay = \"1s\"\n";
    s += &format!(
        "\n[nats]\nurl = \"{nats_url}\"\nsubject_prefix = \"{}\"\nstream = \"{}\"\ndead_letter_stream = \"{}\"\nconsumer_prefix = \"{}\"\nack_wait = \"5s\"\nfetch_expires = \"1s\"\nduplicate_window = \"1m\"\n",
        names.subject_prefix, names.stream, names.dead_letter_stream, names.consumer_prefix
    );
    s
}

/// The port of a Postgres url.
pub fn db_port(db_url: &str) -> u16 {
    url::Url::parse(db_url)
        .ok()
        .and_then(|u| u.port())
        .unwrap_or(5432)
}

/// Deletes the test's streams (and with them the consumers).
pub fn delete_streams(nats_url: String, names: TestNames) {
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            if let Ok(client) = async_nats::connect(nats_url).await {
                let js = async_nats::jetstream::new(client);
                for s in [
                    names.stream.clone(),
                    names.dead_letter_stream.clone(),
                    format!("{}_ADVISORIES", names.stream),
                ] {
                    let _ = js.delete_stream(s).await;
                }
            }
        });
    })
    .join();
}

pub struct Cluster {
    pub names: TestNames,
    pub db: TestDatabase,
    pub nodes: Vec<RunningGitaly>,
    pub config: Config,
    pub client: async_nats::Client,
    pub js: Context,
    pub layout: Layout,
    /// The config as TOML, for tests that run the binary.
    pub toml: String,
    nats_url: String,
    /// In front of the database when the cluster runs through PgBouncer.
    pub pgbouncer: Option<PgBouncer>,
    /// The private nats-server granting the consumer role only, when the
    /// cluster runs as that role.
    pub role_nats: Option<PrivateNats>,
}

/// Set (to anything) to run every cluster on the shared NATS URL as the
/// consumer role instead: a private nats-server that grants the service
/// only what `deploy-manifests --nats` writes for `consumer`, while the
/// fixture itself (provisioning, publishing, inspection) logs in with every
/// permission.
pub const AS_CONSUMER_ROLE_ENV: &str = "REPLICATOR_TEST_AS_CONSUMER_ROLE";

/// The fixture's own user on a role server.
const FIXTURE_USER: (&str, &str) = ("fixture", "fixture-pw");
const CONSUMER_USER: (&str, &str) = ("consumer", "consumer-pw");

/// A nats-server whose users are the fixture (everything) and the consumer
/// role of `layout`.
async fn consumer_role_nats(layout: &Layout) -> PrivateNats {
    let permissions = gitaly_replicator::manifests::nats_permissions_conf(layout);
    // nats-server refuses a defined variable left unused: the other two
    // roles get users as well, which nothing logs in as.
    let config = format!(
        "include \"permissions.conf\"\nauthorization {{\n  users = [\n    \
         {{user: \"{}\", password: \"{}\"}}\n    \
         {{user: \"{}\", password: \"{}\", permissions: $GITALY_REPLICATOR_CONSUMER}}\n    \
         {{user: \"publisher\", password: \"{unused}\", permissions: $GITALY_REPLICATOR_PUBLISHER}}\n    \
         {{user: \"operator\", password: \"{unused}\", permissions: $GITALY_REPLICATOR_OPERATOR}}\n  ]\n}}\n",
        FIXTURE_USER.0,
        FIXTURE_USER.1,
        CONSUMER_USER.0,
        CONSUMER_USER.1,
        unused = uuid::Uuid::new_v4().simple(),
    );
    PrivateNats::start_with_files(&config, &[("permissions.conf", &permissions)]).await
}

/// Set (to anything) to run every cluster's `[database]` through a private
/// PgBouncer in transaction mode, with the session connection direct, as
/// Praefect deployments do.
pub const VIA_PGBOUNCER_ENV: &str = "REPLICATOR_TEST_VIA_PGBOUNCER";

/// Routes `toml`'s `[database]` (whose url is `db_url`) through `bouncer`,
/// with `[database.session_pooled]` straight to Postgres.
pub fn via_pgbouncer(toml: &mut String, db_url: &str, bouncer: &PgBouncer) {
    let mut url = url::Url::parse(db_url).unwrap();
    let direct_port = url.port().unwrap_or(5432);
    url.set_port(Some(bouncer.port)).unwrap();
    *toml = toml.replace(
        &format!("\n[database]\nurl = \"{db_url}\"\n"),
        &format!(
            "\n[database]\nurl = \"{url}\"\n\n[database.session_pooled]\nhost = \"127.0.0.1\"\nport = {direct_port}\n"
        ),
    );
    assert!(
        toml.contains("session_pooled"),
        "no [database] url to route"
    );
}

impl Cluster {
    /// `n` recording nodes named gitaly-1..n with tokens token-1..n; each
    /// checks its token. Streams and consumers are provisioned.
    pub async fn start(n: usize) -> Cluster {
        Self::start_with(n, |_| {}).await
    }

    /// Like `start`, with a chance to edit the config's TOML first.
    pub async fn start_with(n: usize, edit: impl FnOnce(&mut String)) -> Cluster {
        Self::start_on(n, nats_url(), edit).await
    }

    /// Like `start_with`, on the NATS server at `nats_url`.
    pub async fn start_on(n: usize, nats_url: String, edit: impl FnOnce(&mut String)) -> Cluster {
        let storages: Vec<String> = (1..=n).map(|i| format!("gitaly-{i}")).collect();
        Self::start_named(&storages, nats_url, edit).await
    }

    /// One recording node per storage name, in order (`node(1)` is the
    /// first); the names go into the TOML as basic strings, unescaped.
    pub async fn start_named(
        storages: &[String],
        nats_url: String,
        edit: impl FnOnce(&mut String),
    ) -> Cluster {
        // Small pools, so clients share server connections as in production.
        let bouncer = std::env::var_os(VIA_PGBOUNCER_ENV).map(|_| 4);
        let as_consumer =
            std::env::var_os(AS_CONSUMER_ROLE_ENV).is_some() && nats_url == self::nats_url();
        Self::start_inner(storages, nats_url, edit, bouncer, as_consumer).await
    }

    /// `n` nodes, with `[database]` through a private PgBouncer in
    /// transaction mode with `pool_size` server connections.
    pub async fn start_through_pgbouncer(n: usize, pool_size: u32) -> Cluster {
        let storages: Vec<String> = (1..=n).map(|i| format!("gitaly-{i}")).collect();
        Self::start_inner(&storages, nats_url(), |_| {}, Some(pool_size), false).await
    }

    async fn start_inner(
        storages: &[String],
        nats_url: String,
        edit: impl FnOnce(&mut String),
        pgbouncer_pool_size: Option<u32>,
        as_consumer: bool,
    ) -> Cluster {
        let names = TestNames::new();
        let db = TestDatabase::new().await;
        let mut nodes = Vec::new();
        let mut specs = Vec::new();
        for (i, storage) in storages.iter().enumerate() {
            let token = format!("token-{}", i + 1);
            let node = RecordingGitaly::new(Some(&token)).serve().await.unwrap();
            specs.push(NodeSpec {
                storage: storage.clone(),
                address: node.address(),
                token,
            });
            nodes.push(node);
        }
        let mut toml = config_toml(&names, &specs, &db.url, &nats_url);
        let pgbouncer =
            pgbouncer_pool_size.map(|size| PgBouncer::start(db_port(&db.url), "transaction", size));
        if let Some(bouncer) = &pgbouncer {
            via_pgbouncer(&mut toml, &db.url, bouncer);
        }
        edit(&mut toml);
        let mut nats_url = nats_url;
        let mut role_nats = None;
        if as_consumer {
            // The permissions follow the layout, which the URL is no part of.
            let layout = Layout::from_config(&Config::from_toml_str(&toml).unwrap());
            let nats = consumer_role_nats(&layout).await;
            let (user, password) = CONSUMER_USER;
            toml = toml
                .replace(
                    &format!("url = \"{nats_url}\""),
                    &format!("url = \"{}\"", nats.url()),
                )
                .replacen(
                    "\n[nats]\n",
                    &format!("\n[nats]\nuser = \"{user}\"\npassword = \"{password}\"\n"),
                    1,
                );
            // Its streams go with the server: nothing is left to delete.
            nats_url = nats.url();
            role_nats = Some(nats);
        }
        let config = Config::from_toml_str(&toml).unwrap();
        let client = if as_consumer {
            let (user, password) = FIXTURE_USER;
            async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
                .connect(&nats_url)
                .await
                .unwrap()
        } else {
            // As the service connects, so that credentials in the URL are used.
            gitaly_replicator::connect_nats(&config.nats, "test fixture")
                .await
                .unwrap()
        };
        let js = async_nats::jetstream::new(client.clone());
        let layout = Layout::from_config(&config);
        layout.ensure(&js).await.unwrap();
        Cluster {
            names,
            db,
            nodes,
            config,
            client,
            js,
            layout,
            toml,
            nats_url,
            pgbouncer,
            role_nats,
        }
    }

    /// The durable consumer name of `target`'s jobs.
    pub fn durable(&self, target: &str) -> String {
        self.layout
            .consumer(self.vs(), target)
            .map(|c| c.durable_name.clone())
            .unwrap_or_else(|| panic!("no consumer for {target}"))
    }

    pub fn vs(&self) -> &str {
        &self.names.virtual_storage
    }

    /// The recording node of `gitaly-<i>` (1-based).
    pub fn node(&self, i: usize) -> &RecordingGitaly {
        &self.nodes[i - 1].gitaly
    }

    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.js.clone(), self.layout.clone())
    }

    /// A job of this cluster's virtual storage.
    pub fn job(&self, json: serde_json::Value) -> Job {
        let mut v = json;
        v["virtual_storage"] = self.vs().into();
        Job::from_value(&v).unwrap()
    }

    pub async fn publish(&self, job: &Job) {
        self.publisher().publish(job, None).await.unwrap();
    }

    /// Starts a consumer in this process: the service, as `run` runs it,
    /// on the cluster's config.
    pub async fn consumer(&self) -> RunningConsumer {
        self.consumer_with(|_| {}).await
    }

    /// Like `consumer`, with a chance to change the config first.
    pub async fn consumer_with(&self, edit: impl FnOnce(&mut Config)) -> RunningConsumer {
        let mut config = self.config.clone();
        edit(&mut config);
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            gitaly_replicator::run(config, async {
                let _ = rx.await;
            })
            .await
            .map_err(|e| e.to_string())
        });
        RunningConsumer {
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// Messages left in the work stream.
    pub async fn work_messages(&self) -> u64 {
        work_messages(&self.js, &self.layout).await
    }

    pub async fn dead_letters(&self) -> Vec<DeadMessage> {
        dead_letters(&self.js, &self.layout).await
    }

    /// Polls `check` every 50 ms until it holds or `timeout` passes.
    pub async fn eventually<F, Fut>(&self, timeout: Duration, check: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        super::eventually(timeout, check).await
    }
}

impl Cluster {
    /// Makes the provisioned layout look like one that `setup` made before
    /// consumer names were sanitized: every consumer is deleted and created
    /// again, same settings, under its old name. Returns (old, new) names, the
    /// advisory consumer's last.
    pub async fn rename_consumers_to_old_names(&self) -> Vec<(String, String)> {
        let work = self.js.get_stream(&self.layout.stream).await.unwrap();
        let advisories = self
            .js
            .get_stream(&self.layout.advisory_stream)
            .await
            .unwrap();
        let mut consumers: Vec<_> = self
            .layout
            .consumers
            .iter()
            .map(|spec| {
                let old = old_durable_name(
                    &self.names.consumer_prefix,
                    &spec.virtual_storage,
                    &spec.target_storage,
                );
                (&work, self.layout.consumer_config(spec), old)
            })
            .collect();
        consumers.push((
            &advisories,
            self.layout.advisory_consumer_config(),
            format!("{}~advisories", self.names.consumer_prefix),
        ));
        let mut renamed = Vec::new();
        for (stream, mut config, old) in consumers {
            let new = config.durable_name.clone().unwrap();
            stream.delete_consumer(&new).await.unwrap();
            config.durable_name = Some(old.clone());
            config.name = Some(old.clone());
            stream.create_consumer(config).await.unwrap();
            renamed.push((old, new));
        }
        renamed
    }

    /// Names of the durable consumers on `stream`, sorted.
    pub async fn consumer_names(&self, stream: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let stream = self.js.get_stream(stream).await.unwrap();
        let mut names: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
        names.sort();
        names
    }
}

/// The durable name of a target before names were sanitized:
/// `<prefix>~<escaped vs>~<escaped target>`.
pub fn old_durable_name(consumer_prefix: &str, virtual_storage: &str, target: &str) -> String {
    use gitaly_replicator::escape_token;
    format!(
        "{consumer_prefix}~{}~{}",
        escape_token(virtual_storage),
        escape_token(target)
    )
}

/// Takes the `jobs` jobs waiting for `target` three times each without
/// acking (a process that dies before acking, three times over), so the
/// server gives up on each at max_deliver (attempts = 3), then pulls once
/// more after the last ack wait, which is when it does.
pub async fn strand(
    js: &Context,
    layout: &Layout,
    virtual_storage: &str,
    target: &str,
    jobs: usize,
) {
    use futures::StreamExt;
    let durable = &layout
        .consumer(virtual_storage, target)
        .unwrap()
        .durable_name;
    let raw: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(&layout.stream)
        .await
        .unwrap()
        .get_consumer(durable)
        .await
        .unwrap();
    let mut deliveries = 0;
    while deliveries < 3 * jobs {
        let mut batch = raw
            .fetch()
            .max_messages(jobs)
            .expires(Duration::from_secs(3))
            .messages()
            .await
            .unwrap();
        while let Some(Ok(_unacked)) = batch.next().await {
            deliveries += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = raw
        .fetch()
        .max_messages(1)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .unwrap()
        .next()
        .await;
}

/// Messages left in the layout's work stream (pending or in flight).
pub async fn work_messages(js: &Context, layout: &Layout) -> u64 {
    let mut s = js.get_stream(&layout.stream).await.unwrap();
    s.info().await.unwrap().state.messages
}

/// Every message of the layout's dead-letter stream.
pub async fn dead_letters(js: &Context, layout: &Layout) -> Vec<DeadMessage> {
    dead_letters::list(js, layout, 1, 100_000).await.unwrap()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        delete_streams(self.nats_url.clone(), self.names.clone());
    }
}

/// A consumer running in a task of the test.
pub struct RunningConsumer {
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), String>>>,
}

impl RunningConsumer {
    /// Graceful shutdown; returns the run's result.
    pub async fn stop(mut self) -> Result<(), String> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.handle.take() {
            Some(h) => h.await.unwrap_or_else(|e| Err(e.to_string())),
            None => Ok(()),
        }
    }
}

impl Drop for RunningConsumer {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}
