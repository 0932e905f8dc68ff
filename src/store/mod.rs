//! Postgres, and nothing else: Praefect's repository store (`generations`),
//! the per-replica order and lock fence of state-changing writes (`order`),
//! completion dedup (`completions`), the per-repository advisory locks and
//! the session that holds them (`locks`, `lock_statements`,
//! `lock_sessions`), and the batching that turns many jobs' reads and writes
//! into one statement (`generation_batcher`, `coalescer`), and where a job's
//! repository is now after a rename in the store (`repository_paths`), and
//! the TLS relay of the connections whose server is verified against exactly
//! the configured roots (`tls_relay`, `tls_client`). Every SQL
//! statement of the crate lives here, one function per statement or
//! transaction. Writes are idempotent, because JetStream delivers a job at
//! least once.

pub mod coalescer;
mod completions;
mod connection;
mod dataloss;
mod error;
pub mod generation_batcher;
mod generations;
pub(crate) mod leadership;
mod lock_sessions;
mod lock_statements;
pub mod locks;
mod order;
pub mod praefect_capture;
mod reconcile;
pub mod repository_paths;
mod schema;
mod statement_pool;
mod tls_client;
mod tls_relay;
mod verification;

pub use completions::{CompletionKey, CompletionPruning, JobKey, prune_completions};
pub use connection::keep_connection_alive;
pub use dataloss::{LaggingRepository, ReplicaState};
pub use error::StoreError;
pub(crate) use error::is_transient;
use error::{encode_failed, failed};
pub(crate) use generations::InvalidSource;
pub use generations::{GenerationQuery, GenerationRecord, ReplicatedGeneration};
pub use lock_sessions::{register_lock_session, renew_lock_session, unregister_lock_session};
pub use lock_statements::{
    LockSessionAnswers, LockSessionBatch, LockSessionLease, advisory_locks_held,
    exchange_on_lock_session, set_lock_session_options, swap_advisory_locks,
};
pub use order::{Gated, LockSessionId, Standing, WriteOrder};
pub use reconcile::ReconciliationBatch;

pub use schema::{EmptyDatabase, REQUIRED_PRAEFECT_MIGRATION, REQUIRED_PRAEFECT_VERSION};
use sqlx::PgPool;
use sqlx::migrate::Migrator;
pub use statement_pool::StatementPool;
use std::sync::Arc;
pub(crate) use tls_client::TlsSetupError;
pub(crate) use tls_relay::PgEndpoint;
pub use verification::{DueReplica, VerificationCursor};

static MIGRATOR: Migrator = sqlx::migrate!();

/// Handle on the repository store; cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct RepositoryStore {
    pool: StatementPool,
    /// Where the pool's and the session's connections go, when the store
    /// opened them: the TLS relays they may need run while a clone lives.
    endpoints: Option<Arc<Endpoints>>,
}

#[derive(Debug)]
struct Endpoints {
    /// Held for the relay the pool's new connections go through.
    _pool: PgEndpoint,
    session: Option<PgEndpoint>,
}

/// The advisory lock key of a replica: the stable hash of the three names
/// (length-prefixed, so no two triples run together).
pub fn repository_lock_key(virtual_storage: &str, relative_path: &str, target: &str) -> i64 {
    // Postgres keys are bigint: keep the bits, not the value.
    crate::stable_hash::fnv1a_64(&[virtual_storage, relative_path, target]) as i64
}

impl RepositoryStore {
    /// A store whose statements go straight through `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self::with_statement_pool(StatementPool::direct(pool))
    }

    /// A store on `pool` as given (see [`StatementPool`]).
    pub fn with_statement_pool(pool: StatementPool) -> Self {
        Self {
            pool,
            endpoints: None,
        }
    }

    /// This store, keeping `pool` (where its pool connects) and `session`
    /// (the session connection's, for the locks and the reconciler).
    pub(crate) fn with_endpoints(self, pool: PgEndpoint, session: Option<PgEndpoint>) -> Self {
        Self {
            endpoints: Some(Arc::new(Endpoints {
                _pool: pool,
                session,
            })),
            ..self
        }
    }

    /// Where the session connection goes, when this store was opened with one.
    pub(crate) fn session_endpoint(&self) -> Option<&PgEndpoint> {
        self.endpoints.as_ref()?.session.as_ref()
    }

    pub fn pool(&self) -> &PgPool {
        self.pool.pool()
    }

    /// Applies the embedded migrations; safe to run again and on a database
    /// whose Praefect tables already exist.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(self.pool.pool())
            .await
            .map_err(|source| StoreError::Migrate { source })
    }
}

/// Checks the database's schema (see [`schema`]), then applies the embedded
/// migrations, on `conn`: a session of its own, since the migrator holds a
/// session advisory lock while it runs. Answers the migrations it applied,
/// as `<version>_<name>`.
pub async fn migrate_on(
    conn: &mut sqlx::PgConnection,
    empty: EmptyDatabase,
) -> Result<Vec<String>, StoreError> {
    let found = schema::inspect(conn).await?;
    schema::check(&found, empty)?;
    let recorded: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await
        .map_err(failed("migrate"))?;
    let before: Vec<i64> = if recorded {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&mut *conn)
            .await
            .map_err(failed("migrate"))?
    } else {
        Vec::new()
    };
    // `run_direct`: `run`'s future, generic over `Acquire<'c>`, is not `Send`
    // for every lifetime, which keeps the service's future from being spawned.
    MIGRATOR
        .run_direct(None, conn, false)
        .await
        .map_err(|source| StoreError::Migrate { source })?;
    Ok(MIGRATOR
        .iter()
        .filter(|m| !before.contains(&m.version))
        .map(|m| format!("{:04}_{}", m.version, m.description.replace(' ', "_")))
        .collect())
}

#[cfg(test)]
mod tests;
