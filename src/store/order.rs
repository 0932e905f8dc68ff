//! Per-replica order and lock fencing of the state-changing writes.
//!
//! Each write of a state-changing job (update, create, delete,
//! delete_replica, rename) goes through a gate in the same statement:
//! - **fence**: the lock session that granted the job's repository locks
//!   must still be alive (its backend, by pid and start time, in
//!   `pg_stat_get_activity`) and its lease must not have run out (peers
//!   may end a session whose lease ran out and grant its keys). Its session locks last as long as it does
//!   (a lock is only given back when its job is done, and a session found
//!   missing a lock is dropped), so a live session still holds them; one
//!   that died freed them, and another process may run the repository now:
//!   the write is refused and the job redelivered. Asking for one backend
//!   costs far less than reading `pg_locks`, which copies the whole lock
//!   table under every lock partition's lock.
//! - **order**: the replica's `replication_order` row is raised to the job's
//!   stream sequence; if it already holds that sequence or a later one, the
//!   job is superseded and writes nothing. The upsert locks the row, so two
//!   writers of one replica serialize and the older one loses.
//! - **identity**: a job that names its `repository_id` (Praefect 14.5 and
//!   later) applies only while the repository at its path is that one. Once
//!   the repository was deleted and created again at the same path (a new
//!   id), the job belongs to a repository that is gone: it is stale and
//!   writes nothing, so a late delete never removes the new repository.

use super::{RepositoryStore, StoreError, failed, lock_sessions};
use time::OffsetDateTime;

/// A Postgres session, as the fence names it: a pid alone can be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockSessionId {
    pub pid: i32,
    pub backend_start: OffsetDateTime,
}

/// A state-changing job's place among its replica's jobs, and the lock
/// session it runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOrder {
    /// The work stream's incarnation (see `replication_order.stream`).
    pub stream: String,
    /// The job's stream sequence (its original one, if it was requeued).
    pub sequence: i64,
    /// The session holding the job's repository locks; `None` writes without
    /// a fence (tools and tests that hold no lock).
    pub lock_session: Option<LockSessionId>,
    /// The job's `repository_id`; `None` (jobs that do not name one) skips
    /// the identity check.
    pub repository_id: Option<i64>,
}

/// What a gated write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gated<T> {
    /// The gate let it through; the write's own answer.
    Written(T),
    /// A job as new or newer already took effect on the replica.
    Superseded,
    /// The repository at the job's path is another one than the job names
    /// (deleted and created again since).
    Stale,
    /// The job's repository lock is no longer held by its session.
    LockLost,
}

/// Where a job stands on one of its replica keys before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Nothing newer took effect: the job may run.
    Current,
    /// A job as new or newer already took effect there.
    Superseded,
    /// The repository at the path is another one than the job names.
    Stale,
}

/// The gate over parameters `$1..$8`: replica keys `$1` (virtual storage),
/// `$2` (relative path) and `$3` (storage) as arrays; the stream `$4` (NULL:
/// unordered), the sequence `$5`, the lock session's pid `$6` (NULL:
/// unfenced) and start `$8`, and the job's repository id `$7` (NULL:
/// unchecked), checked at the first key's path. Defines the CTE
/// `gate(held, current, in_order)`; a write proceeds only where `held` and
/// `in_order` are true (`in_order` implies `current`).
const GATE_SQL: &str = "
    gate_input AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS g(vs, rel, tgt)
    ), fence AS MATERIALIZED (
        SELECT $6::int IS NULL OR {HOLDS} AS held
    ), identity AS MATERIALIZED (
        SELECT $7::bigint IS NULL OR NOT EXISTS (
            SELECT FROM repositories r
            WHERE r.virtual_storage = $1[1] AND r.relative_path = $2[1]
              AND r.repository_id <> $7::bigint
        ) AS current
    ), ordered AS (
        INSERT INTO replication_order AS o
            (virtual_storage, relative_path, target_storage, stream, sequence)
        SELECT vs, rel, tgt, $4::text, $5::bigint FROM gate_input
        WHERE $4::text IS NOT NULL AND (SELECT held FROM fence)
          AND (SELECT current FROM identity)
        ON CONFLICT (virtual_storage, relative_path, target_storage) DO UPDATE
            SET stream = EXCLUDED.stream, sequence = EXCLUDED.sequence
            WHERE o.stream <> EXCLUDED.stream OR o.sequence < EXCLUDED.sequence
        RETURNING 1
    ), gate AS MATERIALIZED (
        SELECT (SELECT held FROM fence) AS held,
               (SELECT current FROM identity) AS current,
               (SELECT current FROM identity) AND ($4::text IS NULL
                 OR (SELECT count(*) FROM ordered) = (SELECT count(*) FROM gate_input))
                 AS in_order
    )";

/// A CTE (after a comma) that deletes the completion records of the first
/// key's replica when the gate lets the write through: the replica is gone
/// from that path. Only that replica's: its repository lock is held, so no
/// completion of it is being recorded meanwhile, while other targets' rows
/// may be (the periodic pruning takes those).
const FORGET_REPLICA_COMPLETIONS: &str = "forgotten AS (
    DELETE FROM replication_completions
    WHERE virtual_storage = $1[1] AND relative_path = $2[1] AND target_storage = $3[1]
      AND (SELECT held AND in_order FROM gate))";

/// One replica key of a gated write.
pub(crate) type ReplicaKey<'a> = (&'a str, &'a str, &'a str);

fn gate_query<'q, O>(
    sql: &'static str,
    keys: &[ReplicaKey<'_>],
    order: Option<&WriteOrder>,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>
where
    O: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    sqlx::query_as(sql)
        .bind(keys.iter().map(|k| k.0.to_owned()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.1.to_owned()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.2.to_owned()).collect::<Vec<_>>())
        .bind(order.map(|o| o.stream.clone()))
        .bind(order.map_or(0, |o| o.sequence))
        .bind(order.and_then(|o| o.lock_session).map(|l| l.pid))
        .bind(order.and_then(|o| o.repository_id))
        .bind(order.and_then(|o| o.lock_session).map(|l| l.backend_start))
}

pub(super) fn gated<T>(held: bool, current: bool, in_order: bool, written: T) -> Gated<T> {
    match (held, current, in_order) {
        (false, _, _) => Gated::LockLost,
        (true, false, _) => Gated::Stale,
        (true, true, false) => Gated::Superseded,
        (true, true, true) => Gated::Written(written),
    }
}

/// A statement made of the gate and `rest` (further CTEs, each after a
/// comma, then the final SELECT).
fn with_gate(rest: &str) -> String {
    let gate = GATE_SQL.replace(
        "{HOLDS}",
        &lock_sessions::holds_sql("$6::int", "$8::timestamptz"),
    );
    format!("WITH {gate} {rest}")
}

impl RepositoryStore {
    /// Runs a gated statement whose final SELECT answers `held, current,
    /// in_order` and whether its write changed anything.
    async fn gated_write(
        &self,
        sql: &'static str,
        keys: &[ReplicaKey<'_>],
        order: Option<&WriteOrder>,
        operation: &'static str,
    ) -> Result<Gated<bool>, StoreError> {
        let (held, current, in_order, written): (bool, bool, bool, bool) =
            gate_query(sql, keys, order)
                .fetch_one(&self.pool)
                .await
                .map_err(failed(operation))?;
        Ok(gated(held, current, in_order, written))
    }

    /// Where the job stands on each replica key: superseded when a job at
    /// or after `order`'s sequence (of the same stream) already took effect
    /// there; stale when the repository at the first key's path is another
    /// one than `order` names. Read after the job's lock is taken, so it sees
    /// every write made under the lock before.
    pub(crate) async fn standing_in_order(
        &self,
        keys: &[ReplicaKey<'_>],
        order: &WriteOrder,
    ) -> Result<Vec<Standing>, StoreError> {
        let rows: Vec<(bool, bool)> = sqlx::query_as(
            "SELECT q.i = 1 AND $6::bigint IS NOT NULL AND EXISTS (
                    SELECT FROM repositories r
                    WHERE r.virtual_storage = q.vs AND r.relative_path = q.rel
                      AND r.repository_id <> $6::bigint),
                EXISTS (
                    SELECT FROM replication_order o
                    WHERE o.virtual_storage = q.vs AND o.relative_path = q.rel
                      AND o.target_storage = q.tgt AND o.stream = $4 AND o.sequence >= $5)
            FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS q(vs, rel, tgt, i)
            ORDER BY q.i",
        )
        .bind(keys.iter().map(|k| k.0).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.1).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.2).collect::<Vec<_>>())
        .bind(&order.stream)
        .bind(order.sequence)
        .bind(order.repository_id)
        .fetch_all(&self.pool)
        .await
        .map_err(failed("standing_in_order"))?;
        Ok(rows
            .into_iter()
            .map(|(stale, superseded)| match (stale, superseded) {
                (true, _) => Standing::Stale,
                (false, true) => Standing::Superseded,
                (false, false) => Standing::Current,
            })
            .collect())
    }

    /// Deletes the replica row of `storage`, and the replica's completion
    /// records, through the gate of that replica; `Written(false)` when there
    /// was no row.
    pub(crate) async fn delete_replica_in_order(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storage: &str,
        order: Option<&WriteOrder>,
    ) -> Result<Gated<bool>, StoreError> {
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            with_gate(&format!(
                ", deleted AS (
                    DELETE FROM storage_repositories
                    WHERE virtual_storage = $1[1] AND relative_path = $2[1] AND storage = $3[1]
                      AND (SELECT held AND in_order FROM gate)
                    RETURNING 1
                ), {FORGET_REPLICA_COMPLETIONS}
                SELECT held, current, in_order, EXISTS (SELECT FROM deleted) FROM gate"
            ))
        });
        let key = (virtual_storage, relative_path, storage);
        self.gated_write(SQL.as_str(), &[key], order, "delete_replica")
            .await
    }

    /// [`Self::delete_repository`] (the repository row and the target's
    /// replica row) and the replica's completion records, through the gate of
    /// the target's replica.
    pub(crate) async fn delete_repository_in_order(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storage: &str,
        order: Option<&WriteOrder>,
    ) -> Result<Gated<bool>, StoreError> {
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            with_gate(&format!(
                ", repository AS (
                    DELETE FROM repositories
                    WHERE virtual_storage = $1[1] AND relative_path = $2[1]
                      AND (SELECT held AND in_order FROM gate)
                    RETURNING 1
                ), replicas AS (
                    DELETE FROM storage_repositories
                    WHERE virtual_storage = $1[1] AND relative_path = $2[1] AND storage = $3[1]
                      AND (SELECT held AND in_order FROM gate)
                    RETURNING 1
                ), {FORGET_REPLICA_COMPLETIONS}
                SELECT held, current, in_order,
                       EXISTS (SELECT FROM repository) OR EXISTS (SELECT FROM replicas)
                FROM gate"
            ))
        });
        let key = (virtual_storage, relative_path, storage);
        self.gated_write(SQL.as_str(), &[key], order, "delete_repository")
            .await
    }

    /// Moves the repository row and the replica row of `storage` to
    /// `new_relative_path` (the replica path too, where it was the relative
    /// path: a repository from before replica paths, whose directory the
    /// rename moves; an `@cluster/…` one keeps it), through the gates of that
    /// replica at both paths: a rename takes effect at the old path and at the
    /// new one. The replica's completion records at the old path go.
    /// `Written(false)` when neither was at the old path.
    pub(crate) async fn rename_repository_in_order(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storage: &str,
        new_relative_path: &str,
        order: Option<&WriteOrder>,
    ) -> Result<Gated<bool>, StoreError> {
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            with_gate(&format!(
                ", repository AS (
                    UPDATE repositories SET relative_path = $2[2],
                        replica_path = CASE WHEN replica_path IS NULL OR replica_path = $2[1]
                                            THEN $2[2] ELSE replica_path END
                    WHERE virtual_storage = $1[1] AND relative_path = $2[1]
                      AND (SELECT held AND in_order FROM gate)
                    RETURNING 1
                ), replica AS (
                    UPDATE storage_repositories SET relative_path = $2[2]
                    WHERE virtual_storage = $1[1] AND relative_path = $2[1] AND storage = $3[1]
                      AND (SELECT held AND in_order FROM gate)
                    RETURNING 1
                ), moved AS (
                    DELETE FROM replica_moves
                    WHERE virtual_storage = $1[1] AND relative_path = $2[1] AND storage = $3[1]
                      AND (SELECT held FROM gate)
                ), {FORGET_REPLICA_COMPLETIONS}
                SELECT held, current, in_order,
                       EXISTS (SELECT FROM repository) OR EXISTS (SELECT FROM replica)
                FROM gate"
            ))
        });
        let keys = [
            (virtual_storage, relative_path, storage),
            (virtual_storage, new_relative_path, storage),
        ];
        self.gated_write(SQL.as_str(), &keys, order, "rename_repository")
            .await
    }
}

impl RepositoryStore {
    /// Deletes the order records of work stream `stream` that decide
    /// nothing any more: those of another incarnation than `current` (a
    /// label, `<stream>@<created>`), and those of `current` below `floor`,
    /// the lowest place a queued or dead job holds. In batches, so no
    /// statement holds many rows that gated writes may be waiting for;
    /// answers how many went.
    pub async fn prune_order(
        &self,
        stream: &str,
        current: &str,
        floor: i64,
    ) -> Result<u64, StoreError> {
        const BATCH: i64 = 5000;
        let mut pruned = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM replication_order
                WHERE ctid = ANY(ARRAY(
                    SELECT ctid FROM replication_order
                    WHERE starts_with(stream, $1 || '@')
                      AND (stream <> $2 OR sequence < $3)
                    LIMIT $4))",
            )
            .bind(stream)
            .bind(current)
            .bind(floor)
            .bind(BATCH)
            .execute(&self.pool)
            .await
            .map_err(failed("prune_order"))?;
            pruned += done.rows_affected();
            if done.rows_affected() < BATCH as u64 {
                return Ok(pruned);
            }
        }
    }
}
