//! The `run` command as a library function: connect everything the config
//! names, provision the queue, serve metrics and health, and consume until
//! the shutdown future resolves. Tests call this directly.
//!
//! It is the one owner of shutdown: it makes the cancellation tokens and the
//! task trackers, and every task of the service is spawned in them. When
//! `run` returns, normally or with an error at any point of start-up,
//! nothing it started is still running: no pull request goes out, the ops
//! port is closed.

use crate::config::Config;
use crate::dependencies::{Dependency, DependencyState, WaitEnded, wait_for, watch_dependencies};
use crate::error_chain::display_error_chain;
use crate::gitaly::{ChannelError, NodeSet};
use crate::metrics;
use crate::ops_server::{self, Readiness};
use crate::queue::connect::{ConnectError, connect};
use crate::queue::consumer::{self, ConsumerDeps, ConsumerError, ConsumerSettings};
use crate::queue::layout::{Layout, LayoutChange, LayoutError};
use crate::reconciler::Reconciler;
use crate::replicator::GitalyReplicator;
use crate::retry_delay::RetryPolicy;
use crate::store::locks::RepositoryLocks;
use crate::store::{
    self, CompletionPruning, EmptyDatabase, RepositoryStore, StatementPool, StoreError,
    prune_completions,
};
use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use std::future::Future;
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on prometheus_listen_addr {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics recorder: {0}")]
    Metrics(String),
    /// `connection` is `[database]` or `[database.session_pooled]`; `url` the
    /// masked url, empty without one.
    #[error(
        "cannot connect to Postgres, {connection}{}: {}",
        url_part(url),
        database_reason(source, &key_prefix(connection))
    )]
    Database {
        connection: &'static str,
        url: String,
        source: sqlx::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Nats(#[from] ConnectError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Node(#[from] ChannelError),
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    /// `startup_timeout` passed with a dependency still not answering.
    #[error("{missing} did not answer within startup_timeout ({waited}): {cause}")]
    Unavailable {
        /// What is missing, e.g. `NATS and Postgres`.
        missing: String,
        waited: humantime::Duration,
        /// The last failure, of the dependency that ran out of time first.
        cause: String,
    },
    /// Shutdown came while waiting for a dependency.
    #[error("stopped while waiting for NATS and Postgres")]
    Stopped,
}

/// `[database.session_pooled]` → `database.session_pooled.`
fn key_prefix(connection: &str) -> String {
    format!("{}.", connection.trim_matches(['[', ']']))
}

fn url_part(url: &str) -> String {
    if url.is_empty() {
        String::new()
    } else {
        format!(" ({url})")
    }
}

/// The driver's reason, with the keys to look at when TLS is why; `keys` is
/// the prefix of the connection's keys (`database.`).
fn database_reason(source: &sqlx::Error, keys: &str) -> String {
    let text = source.to_string();
    if !is_tls_failure(source) {
        return text;
    }
    if text.contains("not valid for name") {
        format!(
            "{text}; set {keys}host to a name the server's certificate holds, or {keys}sslmode \
             to verify-ca (the chain only)"
        )
    } else if text.contains("certificate") && !text.contains("client") {
        format!(
            "{text}; check {keys}sslrootcert: the CA that signed the server's certificate \
             (the platform's roots are trusted as well)"
        )
    } else {
        format!("{text}; check {keys}sslcert and {keys}sslkey (PEM), and {keys}sslmode")
    }
}

/// Whether the TLS handshake (not the network) failed: a certificate or key
/// the server or this side refused. Configuration, so not worth waiting for.
fn is_tls_failure(source: &sqlx::Error) -> bool {
    match source {
        sqlx::Error::Tls(_) => true,
        sqlx::Error::Io(e) => e
            .get_ref()
            .is_some_and(|inner| inner.to_string().contains("certificate")),
        sqlx::Error::Configuration(e) => e.to_string().contains("pem"),
        _ => false,
    }
}

impl ServiceError {
    /// Whether waiting may help: the dependency is down or starting, not
    /// refusing the configuration.
    fn is_transient(&self) -> bool {
        match self {
            ServiceError::Database { source, .. } => {
                !is_tls_failure(source) && crate::store::is_transient(source)
            }
            ServiceError::Store(e) => e.is_retryable(),
            ServiceError::Nats(e) => e.is_transient(),
            ServiceError::Layout(LayoutError::Api { .. }) => true,
            _ => false,
        }
    }
}

/// The consumer settings a config describes.
pub fn consumer_settings(config: &Config) -> ConsumerSettings {
    let r = &config.replication;
    ConsumerSettings {
        batch_size: r.batch_size,
        pull_loops_per_target: r.parallel_storage_processing_workers,
        max_concurrent_jobs: r.max_concurrent_jobs,
        fetch_expires: config.nats.fetch_expires,
        ack_wait: config.nats.ack_wait,
        attempts: r.attempts,
        retry: RetryPolicy {
            initial: r.retry_delay,
            max: r.max_retry_delay,
            ..RetryPolicy::default()
        },
        health_check_interval: r.health_check_interval,
        queue_depth_interval: std::time::Duration::from_secs(10),
    }
}

/// Connects to Postgres with the configured pool and applies migrations, on
/// the session connection (they take a session lock), once the database's
/// schema is one the store can use (see [`EmptyDatabase`]).
pub async fn connect_store(
    config: &Config,
    empty: EmptyDatabase,
) -> Result<RepositoryStore, ServiceError> {
    let db = &config.database;
    let unreachable = |connection: &'static str| {
        move |source| ServiceError::Database {
            connection,
            url: db.masked_url().unwrap_or_default(),
            source,
        }
    };
    let pool = PgPoolOptions::new()
        .max_connections(db.max_connections)
        // Opened at start, so the first jobs do not wait for connections.
        .min_connections(db.max_connections.min(4))
        // A ping before every query would double the round trips; a broken
        // connection shows up as a retryable error on use instead.
        .test_before_acquire(false)
        .acquire_timeout(db.connect_timeout)
        // So a half-open connection is found (see `store::keep_connection_alive`).
        .after_connect(|conn, _| {
            Box::pin(async move {
                crate::store::keep_connection_alive(conn)
                    .await
                    .map_err(|e| sqlx::Error::Protocol(e.to_string()))
            })
        })
        .connect_with(db.connect_options()?)
        .await
        .map_err(unreachable("[database]"))?;
    let pool = if db.transaction_pooled() {
        StatementPool::transaction_pooled(pool, db.per_transaction_statement_timeout_ms())
    } else {
        StatementPool::direct(pool)
    };
    let store = RepositoryStore::with_statement_pool(pool);
    let session = if db.has_session_connection() {
        "[database.session_pooled]"
    } else {
        "[database]"
    };
    let mut conn = tokio::time::timeout(
        db.connect_timeout,
        PgConnection::connect_with(&db.session_connect_options()?),
    )
    .await
    .unwrap_or(Err(sqlx::Error::PoolTimedOut))
    .map_err(unreachable(session))?;
    let migrated = store::migrate_on(&mut conn, empty).await;
    let _ = conn.close().await;
    migrated?;
    Ok(store)
}

/// Creates or updates the JetStream layout; logs what changed. Settings
/// that JetStream cannot change are in the report, not an error: see
/// [`LayoutChange::all_applied`].
pub async fn provision(
    client: &async_nats::Client,
    layout: &Layout,
) -> Result<Vec<LayoutChange>, ServiceError> {
    let js = async_nats::jetstream::new(client.clone());
    let changes = layout.ensure(&js).await?;
    log_changes(&changes);
    Ok(changes)
}

/// Runs the service until `shutdown` resolves, then drains: no new jobs
/// are fetched, those not started are released at once, running ones get
/// `graceful_stop_timeout`; then everything else stops.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServiceError> {
    let tokens = Tokens::new();
    let tasks = TaskTracker::new();
    let jobs = TaskTracker::new();
    let mut client = None;
    let result = serve(&config, shutdown, &tokens, &tasks, &jobs, &mut client).await;
    // Whatever happened, everything started stops before `run` returns.
    tokens.stop.cancel();
    jobs.close();
    if tokio::time::timeout(config.graceful_stop_timeout, jobs.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_period = ?config.graceful_stop_timeout,
            "grace period over: abandoning running jobs; JetStream redelivers them"
        );
        tokens.abort.cancel();
        jobs.wait().await;
    }
    // The last acknowledgements go out before the connection closes.
    if let Some(client) = client {
        let _ = client.flush().await;
    }
    tokens.background.cancel();
    tasks.close();
    tasks.wait().await;
    tracing::info!("stopped");
    result
}

/// The service's cancellation tree.
struct Tokens {
    /// Stop fetching; release what has not started.
    stop: CancellationToken,
    /// The grace period is over: abandon running dispatches.
    abort: CancellationToken,
    /// Jobs are done: stop what served them (ops server, locks, health).
    background: CancellationToken,
}

impl Tokens {
    fn new() -> Self {
        let root = CancellationToken::new();
        Tokens {
            stop: root.child_token(),
            abort: root.child_token(),
            background: root.child_token(),
        }
    }
}

/// Starts everything in `tasks` and `jobs` and consumes until `shutdown`;
/// returns at the first error of start-up. `client` gets the NATS
/// connection once there is one.
async fn serve(
    config: &Config,
    shutdown: impl Future<Output = ()>,
    tokens: &Tokens,
    tasks: &TaskTracker,
    jobs: &TaskTracker,
    client: &mut Option<async_nats::Client>,
) -> Result<(), ServiceError> {
    let handle = metrics::install(
        &config.prometheus.grpc_latency_buckets,
        &config.reconciliation.histogram_buckets,
    )
    .map_err(ServiceError::Metrics)?;
    let readiness = Readiness::new(DependencyState::default());
    tasks.spawn(ops_server::upkeep(
        handle.clone(),
        tokens.background.clone(),
    ));
    if let Some(addr) = config.prometheus_listen_addr {
        let listener = ops_server::bind(addr)
            .await
            .map_err(|source| ServiceError::Listen { addr, source })?;
        tracing::info!(%addr, "serving /metrics, /health/live and /health/ready");
        tasks.spawn(ops_server::serve(
            listener,
            handle,
            readiness.clone(),
            tokens.background.clone(),
        ));
    }
    let layout = Layout::from_config(config);
    // Both are waited for at once, so the log names everything missing.
    let deadline = (!config.startup_timeout.is_zero())
        .then(|| tokio::time::Instant::now() + config.startup_timeout);
    let dependencies = readiness.dependencies().clone();
    let connected = async {
        tokio::try_join!(
            wait_until_up(
                Dependency::Postgres,
                config,
                &dependencies,
                deadline,
                &tokens.stop,
                || { connect_store(config, EmptyDatabase::Refuse) }
            ),
            wait_until_up(
                Dependency::Nats,
                config,
                &dependencies,
                deadline,
                &tokens.stop,
                || { connect_streams(config, &layout) }
            ),
        )
    };
    tokio::pin!(shutdown);
    let (store, nats) = tokio::select! {
        r = connected => r?,
        () = &mut shutdown => return Ok(()),
    };
    *client = Some(nats.clone());
    tasks.spawn(watch_dependencies(
        dependencies,
        nats.clone(),
        store.pool().clone(),
        DEPENDENCY_CHECK_INTERVAL,
        config.database.connect_timeout,
        tokens.background.clone(),
    ));
    tasks.spawn(prune_completions(
        store.clone(),
        CompletionPruning::for_retention(config.replication.completion_retention),
        tokens.background.clone(),
    ));
    let nodes = NodeSet::from_config(config)?;
    let job_timeout =
        (!config.replication.job_timeout.is_zero()).then_some(config.replication.job_timeout);
    let replicator = GitalyReplicator::new(nodes.clone(), store.clone(), job_timeout, tasks)
        .verifying_after_update(config.replication.verify_after_update);
    if let Some(tick) = Reconciler::tick(config) {
        let reconciler = Reconciler::new(
            config,
            store.clone(),
            async_nats::jetstream::new(nats.clone()),
            nodes.clone(),
        )?;
        tasks.spawn(reconciler.run(tick, tokens.background.clone()));
    }
    let locks = RepositoryLocks::start(
        config.database.session_connect_options()?,
        config.replication.lock_lease,
        tasks,
        tokens.background.clone(),
    );
    let deps = ConsumerDeps {
        client: nats,
        layout,
        replicator,
        locks,
        nodes,
        settings: consumer_settings(config),
        stop: tokens.stop.clone(),
        abort: tokens.abort.clone(),
        background: tokens.background.clone(),
        tasks: tasks.clone(),
        jobs: jobs.clone(),
        readiness: readiness.clone(),
    };
    drop(store);
    let consumer = consumer::run(deps);
    tokio::pin!(consumer);
    let result = tokio::select! {
        r = &mut consumer => r,
        () = &mut shutdown => {
            tokens.stop.cancel();
            consumer.await
        }
    };
    readiness.set(false);
    Ok(result?)
}

/// How often NATS and Postgres are checked once running.
const DEPENDENCY_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Connects to NATS and makes sure the streams exist.
async fn connect_streams(
    config: &Config,
    layout: &Layout,
) -> Result<async_nats::Client, ServiceError> {
    let nats = connect(&config.nats, "gitaly-replicator").await?;
    let js = async_nats::jetstream::new(nats.clone());
    let changes = layout.ensure_streams(&js).await?;
    log_changes(&changes);
    LayoutChange::all_applied(&changes)?;
    Ok(nats)
}

/// [`wait_for`] `d` while its errors are transient; a permanent one (a
/// refused password, an incompatible stream) ends `run` at once.
async fn wait_until_up<T, F, Fut>(
    d: Dependency,
    config: &Config,
    state: &DependencyState,
    deadline: Option<tokio::time::Instant>,
    stop: &tokio_util::sync::CancellationToken,
    attempt: F,
) -> Result<T, ServiceError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ServiceError>>,
{
    match wait_for(
        d,
        state,
        deadline,
        stop,
        ServiceError::is_transient,
        attempt,
    )
    .await
    {
        Ok(v) => Ok(v),
        Err(WaitEnded::Refused(e)) => Err(e),
        Err(WaitEnded::Stopped) => Err(ServiceError::Stopped),
        Err(WaitEnded::TimedOut(e)) => {
            let missing: Vec<&str> = [Dependency::Nats, Dependency::Postgres]
                .into_iter()
                .filter(|&other| other == d || !state.is_up(other))
                .map(Dependency::name)
                .collect();
            Err(ServiceError::Unavailable {
                missing: missing.join(" and "),
                waited: config.startup_timeout.into(),
                cause: {
                    // Named once: most causes name their dependency already.
                    let chain = display_error_chain(&e);
                    if chain.contains(d.name()) {
                        chain
                    } else {
                        format!("{}: {chain}", d.name())
                    }
                },
            })
        }
    }
}

pub(crate) fn log_changes(changes: &[LayoutChange]) {
    for c in changes {
        match c {
            LayoutChange::Unchanged(_) => tracing::debug!("{c}"),
            LayoutChange::NotUpdatable { .. } => tracing::warn!("{c}"),
            _ => tracing::info!("{c}"),
        }
    }
}
