//! Why a demo run could not finish; each error says what it was doing.

use gitaly_replicator::ConfigError;
use gitaly_replicator::PublishError;
use gitaly_replicator::ServiceError;
use gitaly_replicator::StoreError;
use std::fmt;
use storage_node::ServeError;

/// A service the demo needs that did not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable {
    /// `NATS`, `NATS JetStream` or `Postgres`.
    pub service: &'static str,
    /// The address tried, password masked.
    pub address: String,
    pub reason: String,
    /// The command that starts it on this kind of machine (as `.ci/run` does).
    pub start_command: String,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is not reachable at {}: {}\n  start it with:\n    {}",
            self.service, self.address, self.reason, self.start_command
        )
    }
}

/// Why the demo stopped before its summary.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Usage(String),
    #[error(
        "{}\n(.ci/run installs and starts NATS and Postgres when they are down)",
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
    )]
    Unreachable(Vec<Unreachable>),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("git {args} in {dir}: {message}")]
    Git {
        args: String,
        dir: String,
        message: String,
    },
    #[error("{context}: {source}")]
    Database {
        context: String,
        source: sqlx::Error,
    },
    #[error("repository store: {0}")]
    Store(#[from] StoreError),
    #[error("the demo's configuration is not valid (a bug): {0}")]
    Config(#[from] ConfigError),
    #[error("storage node {storage}: {source}")]
    Node { storage: String, source: ServeError },
    #[error("replicator service: {0}")]
    Service(#[from] ServiceError),
    #[error("replicator service: {0}")]
    ServiceTask(String),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("publishing jobs: {0}")]
    Publish(#[from] PublishError),
    #[error("making the TLS certificates: {0}")]
    Tls(String),
    #[error("interrupted")]
    Interrupted,
}

impl DemoError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
        let context = context.into();
        move |source| DemoError::Io { context, source }
    }

    pub fn database(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> DemoError {
        let context = context.into();
        move |source| DemoError::Database { context, source }
    }

    pub fn nats<E: fmt::Display>(context: &str) -> impl FnOnce(E) -> DemoError {
        let context = context.to_owned();
        move |e| DemoError::Nats(format!("{context}: {e}"))
    }
}
