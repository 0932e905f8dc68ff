//! How a repository store operation fails, and which failures are worth a
//! retry: errors are classified here, where they enter.

use sqlx::migrate::MigrateError;

/// A repository store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("repository store: {operation}: {source}")]
    Query {
        /// The store function that failed, e.g. `set_generation`.
        operation: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// A batched statement failed; each job of the batch gets a copy.
    #[error("repository store: {operation}: {message}")]
    Batch {
        operation: &'static str,
        message: String,
        retryable: bool,
        /// The database could not be reached (see [`StoreError::is_outage`]).
        outage: bool,
    },
    #[error("repository store: migrate: {source}")]
    Migrate {
        #[source]
        source: MigrateError,
    },
    /// The database's schema is not one the store can use or create.
    #[error("repository store: {problem}: {fix}")]
    Schema { problem: String, fix: String },
}

impl StoreError {
    /// The store function that failed.
    pub fn operation(&self) -> &'static str {
        match self {
            Self::Query { operation, .. } | Self::Batch { operation, .. } => operation,
            Self::Migrate { .. } | Self::Schema { .. } => "migrate",
        }
    }

    /// A copy for each job of a failed batch (the sqlx error itself is not
    /// `Clone`).
    pub fn for_batch(&self) -> StoreError {
        StoreError::Batch {
            operation: self.operation(),
            message: match self {
                Self::Query { source, .. } => source.to_string(),
                other => other.to_string(),
            },
            retryable: self.is_retryable(),
            outage: self.is_outage(),
        }
    }

    /// Whether the statement failed in the server (an error answer) and left
    /// the connection usable, unlike a broken or closed connection.
    pub fn connection_usable(&self) -> bool {
        matches!(
            self,
            Self::Query {
                source: sqlx::Error::Database(_) | sqlx::Error::Encode(_) | sqlx::Error::Decode(_),
                ..
            }
        )
    }

    /// Whether the database could not be reached at all: down, restarting,
    /// failing over, or the connection broke. A job that failed so did
    /// nothing wrong; it waits for the database and keeps its attempts.
    pub fn is_outage(&self) -> bool {
        match self {
            Self::Query { source, .. } => is_unreachable(source),
            Self::Batch { outage, .. } => *outage,
            Self::Schema { .. } => false,
            Self::Migrate { source } => match source {
                MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => {
                    is_unreachable(e)
                }
                _ => false,
            },
        }
    }

    /// Whether Postgres broke a deadlock by aborting this statement.
    pub fn is_deadlock(&self) -> bool {
        matches!(self, Self::Query { source: sqlx::Error::Database(e), .. }
            if e.code().as_deref() == Some("40P01"))
    }

    /// True when trying again later may succeed: the connection, the pool, a
    /// timeout, a serialization failure or deadlock, a server restarting.
    /// Constraint violations, bad data and broken migrations are permanent.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Query { source, .. } => is_transient(source),
            Self::Batch { retryable, .. } => *retryable,
            Self::Schema { .. } => false,
            Self::Migrate { source } => match source {
                MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => is_transient(e),
                _ => false,
            },
        }
    }
}

fn is_unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(e) => e.code().is_some_and(|code| {
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "25006")
        }),
        _ => false,
    }
}

/// Whether trying again later may succeed (see [`StoreError::is_retryable`]).
pub(crate) fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        // Closed only while shutting down: another process can take the job.
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(e) => e.code().is_some_and(|code| is_transient_sqlstate(&code)),
        _ => false,
    }
}

fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources, too many connections
        || matches!(
            code,
            "40001" // serialization_failure
            | "40P01" // deadlock_detected
            | "40003" // statement_completion_unknown
            | "55P03" // lock_not_available (lock_timeout)
            | "57014" // query_canceled (statement_timeout)
            | "57P01" | "57P02" | "57P03" // server shutting down or starting
            | "25006" // read_only_sql_transaction: reached a standby during failover
            // foreign_key_violation: only set_generation inserts a reference,
            // and it fails so only when a concurrent delete removed the
            // repository; the retry then finds no row and writes nothing.
            | "23503"
        )
}

pub(super) fn failed(operation: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { operation, source }
}

/// Like [`failed`], for a parameter that could not be encoded.
pub(super) fn encode_failed(
    operation: &'static str,
) -> impl Fn(sqlx::error::BoxDynError) -> StoreError {
    move |e| failed(operation)(sqlx::Error::Encode(e))
}
