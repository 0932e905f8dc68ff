//! The repository store: Praefect's `repositories` and `storage_repositories`
//! tables in Postgres, our completion record, and the per-repository advisory
//! locks (held by `queue::exclusion`). Every SQL statement of the crate lives here, one function per
//! statement or transaction. Writes are idempotent, because JetStream delivers
//! a job at least once.

mod lock_sessions;
mod order;

pub use lock_sessions::{
    ORPHAN_GRACE_SECONDS, expire_lock_sessions, register_lock_session, unregister_lock_session,
};
pub use order::{Gated, LockSessionId, Standing, WriteOrder};

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::PgArguments;
use sqlx::{Arguments, PgPool};
use std::sync::LazyLock;
use time::OffsetDateTime;

static MIGRATOR: Migrator = sqlx::migrate!();

/// Handle on the repository store; cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct RepositoryStore {
    pool: PgPool,
}

/// What replicating from a source replica to a target replica should do,
/// decided from the generations both hold (Praefect's rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicatedGeneration {
    /// Replicate, then record `generation` (the source's; -1 when the source
    /// has no record, in which case there is nothing to record).
    Replicate { generation: i64 },
    /// The target already holds the source's generation.
    UpToDate { generation: i64 },
    /// The target is newer than the source: replicating would lose writes.
    Downgrade {
        target_generation: i64,
        source_generation: i64,
    },
    /// A state-changing job as new or newer already took effect on the
    /// target (see [`WriteOrder`]).
    Superseded,
    /// The repository at the job's path is another one than the job's
    /// `repository_id` (see [`WriteOrder::repository_id`]).
    Stale,
}

/// Identifies a job for completion dedup: twins share every field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CompletionKey<'a> {
    pub virtual_storage: &'a str,
    pub relative_path: &'a str,
    pub target_storage: &'a str,
    pub change_type: &'a str,
    /// `""` when the job has no source.
    pub source_storage: &'a str,
}

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
    },
    #[error("repository store: migrate: {source}")]
    Migrate {
        #[source]
        source: MigrateError,
    },
}

impl StoreError {
    /// The store function that failed.
    pub fn operation(&self) -> &'static str {
        match self {
            Self::Query { operation, .. } | Self::Batch { operation, .. } => operation,
            Self::Migrate { .. } => "migrate",
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
            Self::Migrate { source } => match source {
                MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => is_transient(e),
                _ => false,
            },
        }
    }
}

fn is_transient(error: &sqlx::Error) -> bool {
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

fn failed(operation: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { operation, source }
}

/// Like [`failed`], for a parameter that could not be encoded.
fn encode_failed(operation: &'static str) -> impl Fn(sqlx::error::BoxDynError) -> StoreError {
    move |e| failed(operation)(sqlx::Error::Encode(e))
}

impl ReplicatedGeneration {
    fn decide(source: i64, target: Option<i64>) -> Self {
        match target {
            None => Self::Replicate { generation: source },
            Some(target) if target == source => Self::UpToDate { generation: target },
            Some(target) if target > source => Self::Downgrade {
                target_generation: target,
                source_generation: source,
            },
            Some(_) => Self::Replicate { generation: source },
        }
    }
}

/// One job's question to [`RepositoryStore::replicated_generations`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationQuery<'a> {
    pub virtual_storage: &'a str,
    pub relative_path: &'a str,
    pub source: &'a str,
    pub target: &'a str,
    /// The job's stream and sequence, to check the target's order record.
    pub order: Option<(&'a str, i64)>,
    /// The job's repository id, to check it is still the repository at the
    /// path (`None`: unchecked).
    pub repository_id: Option<i64>,
}

/// One replica's row for [`RepositoryStore::set_generations`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationRecord<'a> {
    pub virtual_storage: &'a str,
    pub relative_path: &'a str,
    pub storage: &'a str,
    /// -1: record only the order (nothing was replicated).
    pub generation: i64,
    /// Gate of the write (see [`WriteOrder`]); `None` writes ungated.
    pub order: Option<&'a WriteOrder>,
}

/// Completion keys as column arrays, for `unnest`.
struct CompletionColumns<'a> {
    virtual_storage: Vec<&'a str>,
    relative_path: Vec<&'a str>,
    target_storage: Vec<&'a str>,
    change_type: Vec<&'a str>,
    source_storage: Vec<&'a str>,
    time: Vec<Option<OffsetDateTime>>,
}

impl<'a> CompletionColumns<'a> {
    fn of(rows: &[(CompletionKey<'a>, OffsetDateTime)]) -> Self {
        Self::of_optional(rows.iter().map(|(k, t)| Some((*k, *t))))
    }

    /// A row without a key gets empty names and no time.
    fn of_optional(
        rows: impl ExactSizeIterator<Item = Option<(CompletionKey<'a>, OffsetDateTime)>>,
    ) -> Self {
        let n = rows.len();
        let mut c = CompletionColumns {
            virtual_storage: Vec::with_capacity(n),
            relative_path: Vec::with_capacity(n),
            target_storage: Vec::with_capacity(n),
            change_type: Vec::with_capacity(n),
            source_storage: Vec::with_capacity(n),
            time: Vec::with_capacity(n),
        };
        for row in rows {
            let (k, t) = match row {
                Some((k, t)) => (k, Some(t)),
                None => (CompletionKey::default(), None),
            };
            c.virtual_storage.push(k.virtual_storage);
            c.relative_path.push(k.relative_path);
            c.target_storage.push(k.target_storage);
            c.change_type.push(k.change_type);
            c.source_storage.push(k.source_storage);
            c.time.push(t);
        }
        c
    }
}

impl CompletionColumns<'_> {
    /// Adds the six columns, in order, as the next six parameters.
    fn add_to(self, args: &mut PgArguments) -> Result<(), sqlx::error::BoxDynError> {
        args.add(self.virtual_storage)?;
        args.add(self.relative_path)?;
        args.add(self.target_storage)?;
        args.add(self.change_type)?;
        args.add(self.source_storage)?;
        args.add(self.time)
    }

    fn into_args(self, operation: &'static str) -> Result<PgArguments, StoreError> {
        let mut args = PgArguments::default();
        self.add_to(&mut args).map_err(encode_failed(operation))?;
        Ok(args)
    }
}

/// The six completion columns as an unnest over parameters `$base..$base+5`.
fn completion_unnest(base: usize) -> String {
    format!(
        "unnest(${}::text[], ${}::text[], ${}::text[], ${}::text[], ${}::text[], ${}::timestamptz[])",
        base,
        base + 1,
        base + 2,
        base + 3,
        base + 4,
        base + 5
    )
}

/// Inserts completions given as the six columns from parameter `$base`: a
/// key keeps its latest start, so a repeat (redelivery) or an older
/// completion changes nothing.
fn record_completions_sql(base: usize) -> String {
    format!(
        "INSERT INTO replication_completions
            (virtual_storage, relative_path, target_storage, change_type, source_storage,
             started_at)
        SELECT DISTINCT ON (vs, rel, tgt, ch, src) vs, rel, tgt, ch, src, at
        FROM {} AS t(vs, rel, tgt, ch, src, at)
        ORDER BY vs, rel, tgt, ch, src, at DESC
        ON CONFLICT (virtual_storage, relative_path, target_storage, change_type,
                     source_storage) DO UPDATE
            SET started_at = EXCLUDED.started_at
            WHERE replication_completions.started_at < EXCLUDED.started_at",
        completion_unnest(base)
    )
}

/// A bool[] expression: for each job given as the six columns from parameter
/// `$base` (the time being its creation), whether it is superseded. A NULL
/// creation time answers false.
fn superseded_sql(base: usize) -> String {
    format!(
        "ARRAY(SELECT EXISTS (
            SELECT FROM replication_completions c
            WHERE c.virtual_storage = t.vs AND c.relative_path = t.rel
              AND c.target_storage = t.tgt AND c.change_type = t.ch
              AND c.source_storage = t.src AND c.started_at > t.created
        )
        FROM {} WITH ORDINALITY AS t(vs, rel, tgt, ch, src, created, i)
        ORDER BY t.i)",
        completion_unnest(base)
    )
}

/// The advisory lock key of a replica: the stable hash of the three names
/// (length-prefixed, so no two triples run together).
pub fn repository_lock_key(virtual_storage: &str, relative_path: &str, target: &str) -> i64 {
    // Postgres keys are bigint: keep the bits, not the value.
    crate::stable_hash::fnv1a_64(&[virtual_storage, relative_path, target]) as i64
}

impl RepositoryStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the embedded migrations; safe to run again and on a database
    /// whose Praefect tables already exist.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|source| StoreError::Migrate { source })
    }

    /// Praefect's rule, for many jobs in one statement: reads each source's
    /// and target's replica generations (-1 = no row) and decides between
    /// replicate, up to date and downgrade. Answers in input order.
    pub async fn replicated_generations(
        &self,
        jobs: &[GenerationQuery<'_>],
    ) -> Result<Vec<ReplicatedGeneration>, StoreError> {
        let rows: Vec<(i64, Option<i64>, bool, bool)> = sqlx::query_as(
            "SELECT COALESCE(s.generation, -1), t.generation,
                EXISTS (SELECT FROM replication_order o
                        WHERE o.virtual_storage = q.vs AND o.relative_path = q.rel
                          AND o.target_storage = q.tgt AND o.stream = q.stream
                          AND o.sequence >= q.seq),
                q.id IS NOT NULL AND EXISTS (
                    SELECT FROM repositories r
                    WHERE r.virtual_storage = q.vs AND r.relative_path = q.rel
                      AND r.repository_id <> q.id)
            FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                        $7::bigint[])
                WITH ORDINALITY AS q(vs, rel, src, tgt, stream, seq, id, i)
            LEFT JOIN storage_repositories s
                ON s.virtual_storage = q.vs AND s.relative_path = q.rel AND s.storage = q.src
            LEFT JOIN storage_repositories t
                ON t.virtual_storage = q.vs AND t.relative_path = q.rel AND t.storage = q.tgt
            ORDER BY q.i",
        )
        .bind(jobs.iter().map(|j| j.virtual_storage).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.relative_path).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.source).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.target).collect::<Vec<_>>())
        .bind(
            jobs.iter()
                .map(|j| j.order.map(|o| o.0))
                .collect::<Vec<_>>(),
        )
        .bind(
            jobs.iter()
                .map(|j| j.order.map_or(0, |o| o.1))
                .collect::<Vec<_>>(),
        )
        .bind(jobs.iter().map(|j| j.repository_id).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await
        .map_err(failed("replicated_generation"))?;
        Ok(rows
            .into_iter()
            .map(|(source, target, superseded, stale)| {
                if stale {
                    ReplicatedGeneration::Stale
                } else if superseded {
                    ReplicatedGeneration::Superseded
                } else {
                    ReplicatedGeneration::decide(source, target)
                }
            })
            .collect())
    }

    /// One job's answer of [`Self::replicated_generations`].
    pub async fn replicated_generation(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        source: &str,
        target: &str,
    ) -> Result<ReplicatedGeneration, StoreError> {
        let query = GenerationQuery {
            virtual_storage,
            relative_path,
            source,
            target,
            order: None,
            repository_id: None,
        };
        self.replicated_generations(&[query])
            .await?
            .pop()
            .ok_or_else(|| StoreError::Batch {
                operation: "replicated_generation",
                message: "no row returned".into(),
                retryable: true,
            })
    }

    /// Records replica generations, many in one statement: upserts each
    /// replica row, never lowering it, and raises each repository's
    /// generation when lower (or NULL). Each row passes its own gate first
    /// (see [`WriteOrder`]); a row that is superseded, stale or whose lock
    /// is lost writes nothing. Answers, in input order, `Written(true)` when the
    /// replica row now holds that generation (inserted, raised or
    /// rewritten); `Written(false)` when skipped: -1, no repository row, or
    /// the replica already newer. A replica named twice keeps the higher
    /// generation.
    pub async fn set_generations(
        &self,
        replicas: &[GenerationRecord<'_>],
    ) -> Result<Vec<Gated<bool>>, StoreError> {
        let rows: Vec<(bool, bool, bool, bool)> = sqlx::query_as(
            "WITH input AS (
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[],
                                     $5::text[], $6::bigint[], $7::int[], $8::timestamptz[],
                                     $9::bigint[])
                    WITH ORDINALITY AS t(vs, rel, storage, gen, stream, seq, pid, started, id, i)
            ), alive AS MATERIALIZED (
                SELECT s.pid, s.started FROM (SELECT DISTINCT pid, started FROM input
                                              WHERE pid IS NOT NULL) s
                WHERE EXISTS (SELECT FROM pg_stat_get_activity(s.pid) a
                              WHERE a.backend_start IS NULL OR a.backend_start = s.started)
            ), fenced AS MATERIALIZED (
                SELECT input.* FROM input
                WHERE input.pid IS NULL OR EXISTS (
                    SELECT FROM alive WHERE alive.pid = input.pid
                                        AND alive.started = input.started)
            ), current AS MATERIALIZED (
                SELECT f.* FROM fenced f
                WHERE f.id IS NULL OR NOT EXISTS (
                    SELECT FROM repositories r
                    WHERE r.virtual_storage = f.vs AND r.relative_path = f.rel
                      AND r.repository_id <> f.id)
            ), ordered AS (
                INSERT INTO replication_order AS o
                    (virtual_storage, relative_path, target_storage, stream, sequence)
                SELECT DISTINCT ON (vs, rel, storage) vs, rel, storage, stream, seq
                FROM current WHERE stream IS NOT NULL
                ORDER BY vs, rel, storage, seq DESC
                ON CONFLICT (virtual_storage, relative_path, target_storage) DO UPDATE
                    SET stream = EXCLUDED.stream, sequence = EXCLUDED.sequence
                    WHERE o.stream <> EXCLUDED.stream OR o.sequence < EXCLUDED.sequence
                RETURNING virtual_storage, relative_path, target_storage, sequence
            ), allowed AS MATERIALIZED (
                SELECT f.* FROM current f
                LEFT JOIN ordered o
                    ON o.virtual_storage = f.vs AND o.relative_path = f.rel
                   AND o.target_storage = f.storage AND o.sequence = f.seq
                WHERE f.stream IS NULL OR o.sequence IS NOT NULL
            ), gens AS (
                SELECT DISTINCT ON (vs, rel, storage) vs, rel, storage, gen
                FROM allowed WHERE gen <> -1
                ORDER BY vs, rel, storage, gen DESC
            ), raised AS (
                UPDATE repositories r SET generation = m.gen
                FROM (SELECT vs, rel, max(gen) AS gen FROM gens GROUP BY vs, rel) m
                WHERE r.virtual_storage = m.vs AND r.relative_path = m.rel
                  AND (r.generation IS NULL OR r.generation < m.gen)
            ), written AS (
                INSERT INTO storage_repositories
                    (repository_id, virtual_storage, relative_path, storage, generation)
                SELECT r.repository_id, r.virtual_storage, r.relative_path, gens.storage, gens.gen
                FROM gens
                JOIN repositories r ON r.virtual_storage = gens.vs AND r.relative_path = gens.rel
                ON CONFLICT (virtual_storage, relative_path, storage) DO UPDATE
                    SET repository_id = EXCLUDED.repository_id, generation = EXCLUDED.generation
                    WHERE storage_repositories.generation <= EXCLUDED.generation
                RETURNING virtual_storage, relative_path, storage, generation
            )
            SELECT f.i IS NOT NULL, c.i IS NOT NULL, a.i IS NOT NULL, w.generation IS NOT NULL
            FROM input
            LEFT JOIN fenced f ON f.i = input.i
            LEFT JOIN current c ON c.i = input.i
            LEFT JOIN allowed a ON a.i = input.i
            LEFT JOIN (SELECT DISTINCT * FROM written) w
                ON w.virtual_storage = input.vs AND w.relative_path = input.rel
               AND w.storage = input.storage AND w.generation = input.gen
            ORDER BY input.i",
        )
        .bind(
            replicas
                .iter()
                .map(|r| r.virtual_storage)
                .collect::<Vec<_>>(),
        )
        .bind(replicas.iter().map(|r| r.relative_path).collect::<Vec<_>>())
        .bind(replicas.iter().map(|r| r.storage).collect::<Vec<_>>())
        .bind(replicas.iter().map(|r| r.generation).collect::<Vec<_>>())
        .bind(
            replicas
                .iter()
                .map(|r| r.order.map(|o| o.stream.as_str()))
                .collect::<Vec<_>>(),
        )
        .bind(
            replicas
                .iter()
                .map(|r| r.order.map_or(0, |o| o.sequence))
                .collect::<Vec<_>>(),
        )
        .bind(
            replicas
                .iter()
                .map(|r| r.order.and_then(|o| o.lock_session).map(|l| l.pid))
                .collect::<Vec<_>>(),
        )
        .bind(
            replicas
                .iter()
                .map(|r| {
                    r.order
                        .and_then(|o| o.lock_session)
                        .map(|l| l.backend_start)
                })
                .collect::<Vec<_>>(),
        )
        .bind(
            replicas
                .iter()
                .map(|r| r.order.and_then(|o| o.repository_id))
                .collect::<Vec<_>>(),
        )
        .fetch_all(&self.pool)
        .await
        .map_err(failed("set_generation"))?;
        Ok(rows
            .into_iter()
            .map(|(held, current, in_order, written)| {
                order::gated(held, current, in_order, written)
            })
            .collect())
    }

    /// One replica's [`Self::set_generations`].
    pub async fn set_generation(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storage: &str,
        generation: i64,
    ) -> Result<bool, StoreError> {
        let record = GenerationRecord {
            virtual_storage,
            relative_path,
            storage,
            generation,
            order: None,
        };
        Ok(self.set_generations(&[record]).await?.first() == Some(&Gated::Written(true)))
    }

    /// Deletes the repository row and the replica rows of `storages` in one
    /// statement. Returns false when none of them existed.
    pub async fn delete_repository(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storages: &[&str],
    ) -> Result<bool, StoreError> {
        sqlx::query_scalar(
            "WITH repository AS (
                DELETE FROM repositories
                WHERE virtual_storage = $1 AND relative_path = $2
                RETURNING 1
            ), replicas AS (
                DELETE FROM storage_repositories
                WHERE virtual_storage = $1 AND relative_path = $2 AND storage = ANY($3)
                RETURNING 1
            )
            SELECT EXISTS (SELECT FROM repository) OR EXISTS (SELECT FROM replicas)",
        )
        .bind(virtual_storage)
        .bind(relative_path)
        .bind(storages)
        .fetch_one(&self.pool)
        .await
        .map_err(failed("delete_repository"))
    }

    /// Deletes the replica row of `storage`, ungated (see
    /// [`Self::delete_replica_in_order`]). Returns false when there was none.
    pub async fn delete_replica(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storage: &str,
    ) -> Result<bool, StoreError> {
        let gated = self
            .delete_replica_in_order(virtual_storage, relative_path, storage, None)
            .await?;
        Ok(gated == Gated::Written(true))
    }

    /// Renames, ungated (see [`Self::rename_repository_in_order`]). Returns
    /// false when neither row was at the old path (e.g. already renamed).
    pub async fn rename_repository(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storage: &str,
        new_relative_path: &str,
    ) -> Result<bool, StoreError> {
        let gated = self
            .rename_repository_in_order(
                virtual_storage,
                relative_path,
                storage,
                new_relative_path,
                None,
            )
            .await?;
        Ok(gated == Gated::Written(true))
    }

    /// Deletes the replica row of `storage`, and the repository row when no
    /// other replica remains, in one transaction. The repository row is locked
    /// first, so two of these for different storages cannot both see the
    /// other's replica and leave the repository row behind (which one
    /// statement with CTEs could, all of it reading one snapshot). Returns
    /// false when neither row was deleted.
    pub async fn delete_invalid_repository(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storage: &str,
    ) -> Result<bool, StoreError> {
        const OPERATION: &str = "delete_invalid_repository";
        let mut tx = self.pool.begin().await.map_err(failed(OPERATION))?;
        sqlx::query(
            "SELECT FROM repositories
            WHERE virtual_storage = $1 AND relative_path = $2
            FOR UPDATE",
        )
        .bind(virtual_storage)
        .bind(relative_path)
        .execute(&mut *tx)
        .await
        .map_err(failed(OPERATION))?;
        let replica = sqlx::query(
            "DELETE FROM storage_repositories
            WHERE virtual_storage = $1 AND relative_path = $2 AND storage = $3",
        )
        .bind(virtual_storage)
        .bind(relative_path)
        .bind(storage)
        .execute(&mut *tx)
        .await
        .map_err(failed(OPERATION))?;
        let repository = sqlx::query(
            "DELETE FROM repositories
            WHERE virtual_storage = $1 AND relative_path = $2
              AND NOT EXISTS (SELECT FROM storage_repositories
                              WHERE virtual_storage = $1 AND relative_path = $2)",
        )
        .bind(virtual_storage)
        .bind(relative_path)
        .execute(&mut *tx)
        .await
        .map_err(failed(OPERATION))?;
        tx.commit().await.map_err(failed(OPERATION))?;
        Ok(replica.rows_affected() > 0 || repository.rows_affected() > 0)
    }

    /// The generation the replica on `storage` holds; None when it has no row.
    pub async fn generation(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storage: &str,
    ) -> Result<Option<i64>, StoreError> {
        sqlx::query_scalar(
            "SELECT generation FROM storage_repositories
            WHERE virtual_storage = $1 AND relative_path = $2 AND storage = $3",
        )
        .bind(virtual_storage)
        .bind(relative_path)
        .bind(storage)
        .fetch_optional(&self.pool)
        .await
        .map_err(failed("generation"))
    }

    /// Ensures, in one statement, a repository row (with `primary` and a
    /// replica path equal to the relative path) and a replica row on each of
    /// `replicas`, all at least at `generation`: existing rows are raised,
    /// never lowered, and an existing repository keeps its primary. Returns
    /// the repository id. For demos, benchmarks and tests.
    pub async fn create_repository(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        primary: &str,
        generation: i64,
        replicas: &[&str],
    ) -> Result<i64, StoreError> {
        sqlx::query_scalar(
            "WITH repository AS (
                INSERT INTO repositories
                    (virtual_storage, relative_path, generation, \"primary\", replica_path)
                VALUES ($1, $2, $3, $4, $2)
                ON CONFLICT (virtual_storage, relative_path) DO UPDATE
                    SET generation = GREATEST(repositories.generation, EXCLUDED.generation)
                RETURNING repository_id
            ), replicas AS (
                INSERT INTO storage_repositories
                    (repository_id, virtual_storage, relative_path, storage, generation)
                SELECT repository_id, $1, $2, storage, $3
                FROM repository CROSS JOIN (SELECT DISTINCT unnest($5::text[]) AS storage) AS s
                ON CONFLICT (virtual_storage, relative_path, storage) DO UPDATE
                    SET generation = GREATEST(storage_repositories.generation, EXCLUDED.generation)
            )
            SELECT repository_id FROM repository",
        )
        .bind(virtual_storage)
        .bind(relative_path)
        .bind(generation)
        .bind(primary)
        .bind(replicas)
        .fetch_one(&self.pool)
        .await
        .map_err(failed("create_repository"))
    }

    /// Records that jobs completed, each with the time it started; one
    /// statement for the whole slice. A key keeps its latest start, so a
    /// repeat (redelivery) or an older completion changes nothing.
    pub async fn record_completions(
        &self,
        completions: &[(CompletionKey<'_>, OffsetDateTime)],
    ) -> Result<(), StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| record_completions_sql(1));
        let args = CompletionColumns::of(completions).into_args("record_completions")?;
        sqlx::query_with(&SQL, args)
            .execute(&self.pool)
            .await
            .map_err(failed("record_completions"))?;
        Ok(())
    }

    /// Records one completion (see [`Self::record_completions`]).
    pub async fn record_completion(
        &self,
        key: &CompletionKey<'_>,
        started_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.record_completions(&[(*key, started_at)]).await
    }

    /// For each (key, created_at): whether a twin job with the same key
    /// completed that had started after this one was created (Praefect's
    /// completion dedup). One statement; answers in input order.
    pub async fn superseded_many(
        &self,
        jobs: &[(CompletionKey<'_>, OffsetDateTime)],
    ) -> Result<Vec<bool>, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| format!("SELECT {}", superseded_sql(1)));
        let args = CompletionColumns::of(jobs).into_args("superseded")?;
        sqlx::query_scalar_with(&SQL, args)
            .fetch_one(&self.pool)
            .await
            .map_err(failed("superseded"))
    }

    /// One job's answer of [`Self::superseded_many`].
    pub async fn superseded(
        &self,
        key: &CompletionKey<'_>,
        created_at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        Ok(self
            .superseded_many(&[(*key, created_at)])
            .await?
            .first()
            .copied()
            .unwrap_or(false))
    }
}

/// The CTE of a lock swap that says whether new locks are barred: some lock
/// session is gone while its jobs may still run (see `lock_sessions`).
/// Asked only when `$2` asks for locks.
fn lock_fence_cte() -> String {
    format!(
        "fence AS MATERIALIZED (
            SELECT CASE WHEN cardinality($2::bigint[]) = 0 THEN false
                        ELSE {} END AS barred)",
        lock_sessions::orphan_blocks_sql()
    )
}

/// The select list of a lock swap (after [`lock_fence_cte`]): the count of
/// keys released from `$1`, whether each key of `$2` was taken, in order
/// (none while barred), and whether new locks were barred.
const LOCK_SWAP_COLUMNS: &str = "
    (SELECT count(*) FROM unnest($1::bigint[]) AS u(k) WHERE pg_advisory_unlock(u.k)),
    ARRAY(SELECT CASE WHEN (SELECT barred FROM fence) THEN false
                      ELSE pg_try_advisory_lock(l.k) END
          FROM unnest($2::bigint[]) WITH ORDINALITY AS l(k, i) ORDER BY l.i),
    (SELECT barred FROM fence)";

/// What a lock swap answers.
#[derive(Debug)]
pub struct LockSwap {
    /// Whether each requested key was taken, in order.
    pub taken: Vec<bool>,
    /// No lock was granted because a lost lock session may still have jobs
    /// running: see [`expire_lock_sessions`].
    pub barred: bool,
}

/// Releases the session advisory locks of `unlock` and takes, without
/// waiting, those of `lock`, on `conn`, in one statement; answers whether each
/// of `lock` was taken, in order. Locks are reentrant per session, so a key
/// in both lists stays held whichever Postgres evaluates first, and the
/// caller must not ask twice for a key it holds unless it also releases it
/// twice. Releasing a key the session does not hold is ignored (Postgres
/// logs a warning). No lock is taken while barred (see [`LockSwap`]).
pub async fn swap_advisory_locks(
    conn: &mut sqlx::PgConnection,
    unlock: &[i64],
    lock: &[i64],
) -> Result<LockSwap, StoreError> {
    static SQL: LazyLock<String> =
        LazyLock::new(|| format!("WITH {} SELECT {LOCK_SWAP_COLUMNS}", lock_fence_cte()));
    let (_, taken, barred): (i64, Vec<bool>, bool) = sqlx::query_as(&SQL)
        .bind(unlock)
        .bind(lock)
        .fetch_one(conn)
        .await
        .map_err(failed("swap_advisory_locks"))?;
    Ok(LockSwap { taken, barred })
}

/// The advisory lock keys the session on `conn` holds.
pub async fn advisory_locks_held(conn: &mut sqlx::PgConnection) -> Result<Vec<i64>, StoreError> {
    sqlx::query_scalar(
        "SELECT (classid::int8 << 32) | objid::int8 FROM pg_locks
        WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND pid = pg_backend_pid()",
    )
    .fetch_all(conn)
    .await
    .map_err(failed("advisory_locks_held"))
}

/// Lets this session's commits return before their WAL is flushed.
pub async fn relax_commit_durability(conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    sqlx::query("SET synchronous_commit = off")
        .execute(conn)
        .await
        .map_err(failed("relax_commit_durability"))?;
    Ok(())
}

/// One statement's worth of work on the lock session, see
/// [`exchange_on_lock_session`].
#[derive(Debug, Default)]
pub struct LockSessionBatch<'a> {
    /// Keys to release.
    pub unlock: Vec<i64>,
    /// Completions to record, each with the time its job started.
    pub record: Vec<(CompletionKey<'a>, OffsetDateTime)>,
    /// Keys to take without waiting.
    pub lock: Vec<i64>,
    /// One per `lock`: the job to check for completion dedup, with the time
    /// it was created; `None` asks nothing.
    pub check: Vec<Option<(CompletionKey<'a>, OffsetDateTime)>>,
}

/// What [`exchange_on_lock_session`] answers, in the order of the batch's
/// `lock`.
#[derive(Debug)]
pub struct LockSessionAnswers {
    pub taken: Vec<bool>,
    pub superseded: Vec<bool>,
    /// See [`LockSwap::barred`].
    pub barred: bool,
}

/// Does a [`LockSessionBatch`] in one statement on `conn`: records the
/// completions, releases and takes advisory locks (see
/// [`swap_advisory_locks`]) and answers the dedup checks. The checks read the
/// completions committed before the statement, not those it records.
pub async fn exchange_on_lock_session(
    conn: &mut sqlx::PgConnection,
    batch: &LockSessionBatch<'_>,
) -> Result<LockSessionAnswers, StoreError> {
    const OPERATION: &str = "exchange_on_lock_session";
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH recorded AS ({}), {}
            SELECT {LOCK_SWAP_COLUMNS}, {}",
            record_completions_sql(3),
            lock_fence_cte(),
            superseded_sql(9)
        )
    });
    let encode = encode_failed(OPERATION);
    let mut args = PgArguments::default();
    args.add(&batch.unlock).map_err(&encode)?;
    args.add(&batch.lock).map_err(&encode)?;
    CompletionColumns::of(&batch.record)
        .add_to(&mut args)
        .map_err(&encode)?;
    CompletionColumns::of_optional(batch.check.iter().copied())
        .add_to(&mut args)
        .map_err(&encode)?;
    let (_, taken, barred, superseded): (i64, Vec<bool>, bool, Vec<bool>) =
        sqlx::query_as_with(&SQL, args)
            .fetch_one(conn)
            .await
            .map_err(failed(OPERATION))?;
    Ok(LockSessionAnswers {
        taken,
        superseded,
        barred,
    })
}
