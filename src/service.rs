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
use crate::store::{CompletionPruning, EmptyDatabase, StoreError, prune_completions};
use std::future::Future;
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod database;

pub(crate) use database::session_endpoint;
pub use database::{connect_and_migrate, connect_store, open_store};
use database::{database_reason, is_tls_failure, key_prefix, url_part};

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

impl ServiceError {
    /// Whether NATS or Postgres could not be reached (down, not resolved,
    /// timed out, or its TLS refused), as opposed to refusing credentials
    /// or this side failing: what exit status 69 says.
    pub fn is_unreachable(&self) -> bool {
        match self {
            ServiceError::Unavailable { .. } => true,
            ServiceError::Database { source, .. } => {
                is_tls_failure(source) || crate::store::is_transient(source)
            }
            ServiceError::Nats(e) => e.is_unreachable(),
            _ => false,
        }
    }

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
    run_serving(config, OpsListener::FromConfig, shutdown).await
}

/// Like [`run`], serving `/metrics` and `/health/*` on `listener` (already
/// bound, say to port 0) instead of `prometheus_listen_addr`. A caller that
/// needs the port before the service starts binds it and hands it over, so
/// no other process can take it in between.
pub async fn run_with_ops_listener(
    config: Config,
    listener: std::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    run_serving(config, OpsListener::Bound(listener), shutdown).await
}

/// Where the operations endpoint listens.
enum OpsListener {
    /// `prometheus_listen_addr`, bound at start-up (none when unset).
    FromConfig,
    /// A listener the caller bound.
    Bound(std::net::TcpListener),
}

impl OpsListener {
    async fn bind(self, config: &Config) -> Result<Option<tokio::net::TcpListener>, ServiceError> {
        let bound = match self {
            OpsListener::FromConfig => match config.prometheus_listen_addr {
                Some(addr) => ops_server::bind(addr)
                    .await
                    .map_err(|source| (addr, source)),
                None => return Ok(None),
            },
            OpsListener::Bound(listener) => {
                let addr = listener
                    .local_addr()
                    .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                ops_server::adopt(listener).map_err(|source| (addr, source))
            }
        };
        bound
            .map(Some)
            .map_err(|(addr, source)| ServiceError::Listen { addr, source })
    }
}

async fn run_serving(
    config: Config,
    ops: OpsListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServiceError> {
    let tokens = Tokens::new();
    let tasks = TaskTracker::new();
    let jobs = TaskTracker::new();
    let mut client = None;
    let result = serve(&config, ops, shutdown, &tokens, &tasks, &jobs, &mut client).await;
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
    ops: OpsListener,
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
    if let Some(listener) = ops.bind(config).await? {
        // The bound address, so a port 0 in the config can be found.
        let addr = listener
            .local_addr()
            .map_err(|source| ServiceError::Listen {
                addr: config
                    .prometheus_listen_addr
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                source,
            })?;
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
        // Both are waited for side by side to the same deadline, so a
        // time-out names every dependency still missing; a refusal of
        // either ends both waits at once.
        let give_up = tokens.stop.child_token();
        let (store, nats) = tokio::join!(
            async {
                let r = wait_for(
                    Dependency::Postgres,
                    &dependencies,
                    deadline,
                    &give_up,
                    ServiceError::is_transient,
                    || connect_store(config, EmptyDatabase::Refuse),
                )
                .await;
                if matches!(r, Err(WaitEnded::Refused(_))) {
                    give_up.cancel();
                }
                r
            },
            async {
                let r = wait_for(
                    Dependency::Nats,
                    &dependencies,
                    deadline,
                    &give_up,
                    ServiceError::is_transient,
                    || connect_streams(config, &layout),
                )
                .await;
                if matches!(r, Err(WaitEnded::Refused(_))) {
                    give_up.cancel();
                }
                r
            },
        );
        both_up(config, store, nats)
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
    let pruning = CompletionPruning::for_retention(config.replication.completion_retention);
    tasks.spawn(prune_completions(
        store.clone(),
        pruning,
        tokens.background.clone(),
    ));
    // Order records are pruned as often as completion records.
    tasks.spawn(crate::queue::order_pruning::run(
        async_nats::jetstream::new(nats.clone()),
        layout.clone(),
        store.clone(),
        pruning.interval,
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
    let session = session_endpoint(config, &store)?;
    let locks = RepositoryLocks::start(
        session.options().clone(),
        config.replication.lock_lease,
        tasks,
        tokens.background.clone(),
    );
    // The lock holder reconnects through the session's relay, if it has
    // one, until the background services stop.
    let background = tokens.background.clone();
    tasks.spawn(async move {
        background.cancelled().await;
        drop(session);
    });
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
        store: store.clone(),
    };
    tasks.spawn(crate::queue::praefect_capture::run(
        async_nats::jetstream::new(deps.client.clone()),
        deps.layout.clone(),
        store.clone(),
        session_endpoint(config, &store)?,
        tokens.background.clone(),
    ));
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

/// Both dependencies, or why `run` cannot start: a refusal (an error
/// waiting cannot cure: a refused password, an incompatible stream), else
/// every dependency that did not answer by the deadline, each with its last
/// error.
fn both_up<S, N>(
    config: &Config,
    store: Result<S, WaitEnded<ServiceError>>,
    nats: Result<N, WaitEnded<ServiceError>>,
) -> Result<(S, N), ServiceError> {
    let (store, nats) = match (store, nats) {
        (Ok(s), Ok(n)) => return Ok((s, n)),
        (Err(WaitEnded::Refused(e)), _) | (_, Err(WaitEnded::Refused(e))) => return Err(e),
        (store, nats) => (store.err(), nats.err()),
    };
    let mut missing = Vec::new();
    let mut causes = Vec::new();
    for (d, ended) in [(Dependency::Nats, nats), (Dependency::Postgres, store)] {
        match ended {
            Some(WaitEnded::TimedOut(e)) => {
                missing.push(d.name());
                causes.push(match e {
                    // Named once: most causes name their dependency already.
                    Some(e) => {
                        let chain = display_error_chain(&e);
                        if chain.contains(d.name()) {
                            chain
                        } else {
                            format!("{}: {chain}", d.name())
                        }
                    }
                    None => format!("{}: no answer yet", d.name()),
                });
            }
            Some(WaitEnded::Stopped) => return Err(ServiceError::Stopped),
            _ => {}
        }
    }
    Err(ServiceError::Unavailable {
        missing: missing.join(" and "),
        waited: config.startup_timeout.into(),
        cause: causes.join("; "),
    })
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
