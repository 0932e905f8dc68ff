//! Per-replica order and lock fencing of the state-changing writes.
//!
//! Each write of a state-changing job (update, create, delete,
//! delete_replica, rename) goes through a gate in the same statement:
//! - **fence**: the lock session that granted the job's repository locks
//!   must still be alive (its backend, by pid and start time, in
//!   `pg_stat_get_activity`). Its session locks last as long as it does
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
//!   later) is about that repository, wherever the store has it now: its
//!   rows are found by id, not by the job's path, because Praefect 15
//!   renames a repository in its store only (the job may carry the path from
//!   before). A job whose id the store no longer has, while another
//!   repository sits at its path (deleted and created again, a new id),
//!   belongs to a repository that is gone: it is stale and writes nothing,
//!   so a late delete never removes the new repository. A rename is about
//!   its two paths and is checked at the old one only.
//!
//! The order of a replica is kept under two keys. (virtual storage,
//! relative path, target) is the replica's as every job without an id and
//! every rename knows it; a job with an id found in the store uses the
//! repository's current relative path there, so it meets those jobs on the
//! same record. (repository id, target), in
//! `replication_order_by_repository`, is the one that survives a rename in
//! Praefect's store: the path records move to another key then, the id does
//! not, and a retried job from before the rename must still lose to one
//! applied after it. Such a job checks and raises both.

use super::{RepositoryStore, StoreError, failed};
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

/// The gate over parameters `$1..$9`: replica keys `$1` (virtual storage),
/// `$2` (relative path) and `$3` (storage) as arrays; the stream `$4` (NULL:
/// unordered), the sequence `$5`, the lock session's pid `$6` (NULL:
/// unfenced) and start `$8`, the job's repository id `$7` (NULL: unchecked)
/// and `$9`, whether the first key's replica is found by that id (see the
/// module's doc). Defines the CTEs `found(repository_id, relative_path)`
/// (the job's repository when found by id) and `gate(held, current,
/// in_order)`; a write proceeds only where `held` and `in_order` are true
/// (`in_order` implies `current`).
const GATE_SQL: &str = "
    gate_input AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS g(vs, rel, tgt, i)
    ), found AS MATERIALIZED (
        SELECT r.repository_id, r.relative_path FROM repositories r
        WHERE $9::bool AND r.repository_id = $7::bigint AND r.virtual_storage = $1[1]
    ), fence AS MATERIALIZED (
        SELECT $6::int IS NULL OR EXISTS (
            SELECT FROM pg_stat_get_activity($6::int) a
            WHERE a.backend_start IS NULL OR a.backend_start = $8::timestamptz
        ) AS held
    ), identity AS MATERIALIZED (
        SELECT $7::bigint IS NULL OR EXISTS (SELECT FROM found) OR NOT EXISTS (
            SELECT FROM repositories r
            WHERE r.virtual_storage = $1[1] AND r.relative_path = $2[1]
              AND r.repository_id <> $7::bigint
        ) AS current
    ), ordered AS (
        INSERT INTO replication_order AS o
            (virtual_storage, relative_path, target_storage, stream, sequence)
        SELECT vs, CASE WHEN i = 1 THEN COALESCE((SELECT relative_path FROM found), rel)
                        ELSE rel END,
               tgt, $4::text, $5::bigint
        FROM gate_input
        WHERE $4::text IS NOT NULL AND (SELECT held FROM fence)
          AND (SELECT current FROM identity)
        ON CONFLICT (virtual_storage, relative_path, target_storage) DO UPDATE
            SET stream = EXCLUDED.stream, sequence = EXCLUDED.sequence
            WHERE o.stream <> EXCLUDED.stream OR o.sequence < EXCLUDED.sequence
        RETURNING 1
    ), ordered_by_id AS (
        INSERT INTO replication_order_by_repository AS o
            (repository_id, target_storage, stream, sequence)
        SELECT $7::bigint, $3[1], $4::text, $5::bigint
        WHERE $9::bool AND $7::bigint IS NOT NULL AND $4::text IS NOT NULL
          AND (SELECT held FROM fence) AND (SELECT current FROM identity)
        ON CONFLICT (repository_id, target_storage) DO UPDATE
            SET stream = EXCLUDED.stream, sequence = EXCLUDED.sequence
            WHERE o.stream <> EXCLUDED.stream OR o.sequence < EXCLUDED.sequence
        RETURNING 1
    ), gate AS MATERIALIZED (
        SELECT (SELECT held FROM fence) AS held,
               (SELECT current FROM identity) AS current,
               (SELECT current FROM identity) AND ($4::text IS NULL
                 OR ((SELECT count(*) FROM ordered) = (SELECT count(*) FROM gate_input)
                     AND (SELECT count(*) FROM ordered_by_id)
                         = CASE WHEN $9::bool AND $7::bigint IS NOT NULL THEN 1 ELSE 0 END))
                 AS in_order
    )";

/// A CTE (after a comma), `replica(virtual_storage, relative_path,
/// storage)`: the key of the target's replica row, the one of the job's
/// repository on that storage when it was found by id (its row's relative
/// path may be older than the repository's), else the first key.
const REPLICA_ROW: &str = "replica AS MATERIALIZED (
    SELECT s.virtual_storage, s.relative_path, s.storage
    FROM storage_repositories s JOIN found f ON s.repository_id = f.repository_id
    WHERE s.storage = $3[1]
    UNION ALL
    SELECT $1[1], $2[1], $3[1] WHERE NOT EXISTS (SELECT FROM found))";

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

/// The repository a job names, and how its replica is found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Identity {
    /// The job's `repository_id`; `None` (jobs that do not name one)
    /// skips the identity check, and rows are found by path.
    pub repository_id: Option<i64>,
    /// Whether the replica is found by that id rather than at the job's
    /// path: true for every state-changing job but a rename, which is
    /// about its two paths.
    pub by_id: bool,
}

impl Identity {
    /// Rows found by `repository_id` when the store has it.
    pub fn by_id(repository_id: Option<i64>) -> Identity {
        Identity {
            repository_id,
            by_id: true,
        }
    }

    /// Rows found at the job's path; `repository_id` only checked there.
    pub fn at_path(repository_id: Option<i64>) -> Identity {
        Identity {
            repository_id,
            by_id: false,
        }
    }
}

fn gate_query<'q, O>(
    sql: &'q str,
    keys: &[ReplicaKey<'_>],
    identity: Identity,
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
        .bind(identity.repository_id)
        .bind(order.and_then(|o| o.lock_session).map(|l| l.backend_start))
        .bind(identity.by_id)
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
    format!("WITH {GATE_SQL} {rest}")
}

impl RepositoryStore {
    /// Runs a gated statement whose final SELECT answers `held, current,
    /// in_order` and whether its write changed anything.
    async fn gated_write(
        &self,
        sql: &str,
        keys: &[ReplicaKey<'_>],
        identity: Identity,
        order: Option<&WriteOrder>,
        operation: &'static str,
    ) -> Result<Gated<bool>, StoreError> {
        let (held, current, in_order, written): (bool, bool, bool, bool) =
            gate_query(sql, keys, identity, order)
                .fetch_one(&self.pool)
                .await
                .map_err(failed(operation))?;
        Ok(gated(held, current, in_order, written))
    }

    /// Where the job stands on each replica key: superseded when a job at
    /// or after `order`'s sequence (of the same stream) already took effect
    /// there; stale when `identity` names a repository the store no longer
    /// has while another one is at the first key's path (see the module's
    /// doc for keys found by id). Read after the job's lock is taken, so it
    /// sees every write made under the lock before.
    pub(crate) async fn standing_in_order(
        &self,
        keys: &[ReplicaKey<'_>],
        identity: Identity,
        order: &WriteOrder,
    ) -> Result<Vec<Standing>, StoreError> {
        let rows: Vec<(bool, bool)> = sqlx::query_as(
            "WITH found AS MATERIALIZED (
                SELECT r.repository_id, r.relative_path FROM repositories r
                WHERE $7::bool AND r.repository_id = $6::bigint AND r.virtual_storage = $1[1]
            )
            SELECT q.i = 1 AND $6::bigint IS NOT NULL AND NOT EXISTS (SELECT FROM found)
                AND EXISTS (
                    SELECT FROM repositories r
                    WHERE r.virtual_storage = q.vs AND r.relative_path = q.rel
                      AND r.repository_id <> $6::bigint),
                EXISTS (
                    SELECT FROM replication_order o
                    WHERE o.virtual_storage = q.vs
                      AND o.relative_path = CASE
                          WHEN q.i = 1 THEN COALESCE((SELECT relative_path FROM found), q.rel)
                          ELSE q.rel END
                      AND o.target_storage = q.tgt AND o.stream = $4 AND o.sequence >= $5)
                OR q.i = 1 AND $7::bool AND EXISTS (
                    SELECT FROM replication_order_by_repository o
                    WHERE o.repository_id = $6::bigint AND o.target_storage = q.tgt
                      AND o.stream = $4 AND o.sequence >= $5)
            FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS q(vs, rel, tgt, i)
            ORDER BY q.i",
        )
        .bind(keys.iter().map(|k| k.0).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.1).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.2).collect::<Vec<_>>())
        .bind(&order.stream)
        .bind(order.sequence)
        .bind(identity.repository_id)
        .bind(identity.by_id)
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

    /// Deletes the target's replica row (found by `identity`'s repository id
    /// when it says so and the store has it, else at the path), and the
    /// replica's completion records, through the gate of that replica;
    /// `Written(false)` when there was no row.
    pub(crate) async fn delete_replica_in_order(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storage: &str,
        identity: Identity,
        order: Option<&WriteOrder>,
    ) -> Result<Gated<bool>, StoreError> {
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            with_gate(&format!(
                ", {REPLICA_ROW}, deleted AS (
                    DELETE FROM storage_repositories s USING replica r
                    WHERE s.virtual_storage = r.virtual_storage
                      AND s.relative_path = r.relative_path AND s.storage = r.storage
                      AND (SELECT held AND in_order FROM gate)
                    RETURNING 1
                ), {FORGET_REPLICA_COMPLETIONS}
                SELECT held, current, in_order, EXISTS (SELECT FROM deleted) FROM gate"
            ))
        });
        let key = (virtual_storage, relative_path, storage);
        self.gated_write(&SQL, &[key], identity, order, "delete_replica")
            .await
    }

    /// Deletes the repository row and the target's replica row (both found
    /// as `identity` says, see [`Self::delete_replica_in_order`]), and the
    /// replica's completion records, through the gate of the target's
    /// replica.
    pub(crate) async fn delete_repository_in_order(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storage: &str,
        identity: Identity,
        order: Option<&WriteOrder>,
    ) -> Result<Gated<bool>, StoreError> {
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            with_gate(&format!(
                ", {REPLICA_ROW}, repository AS (
                    DELETE FROM repositories
                    WHERE repository_id IN (
                        SELECT repository_id FROM found
                        UNION ALL
                        SELECT repository_id FROM repositories
                        WHERE virtual_storage = $1[1] AND relative_path = $2[1]
                          AND NOT EXISTS (SELECT FROM found))
                      AND (SELECT held AND in_order FROM gate)
                    RETURNING 1
                ), replicas AS (
                    DELETE FROM storage_repositories s USING replica r
                    WHERE s.virtual_storage = r.virtual_storage
                      AND s.relative_path = r.relative_path AND s.storage = r.storage
                      AND (SELECT held AND in_order FROM gate)
                    RETURNING 1
                ), {FORGET_REPLICA_COMPLETIONS}
                SELECT held, current, in_order,
                       EXISTS (SELECT FROM repository) OR EXISTS (SELECT FROM replicas)
                FROM gate"
            ))
        });
        let key = (virtual_storage, relative_path, storage);
        self.gated_write(&SQL, &[key], identity, order, "delete_repository")
            .await
    }

    /// Moves the repository row and the replica row of `storage` to
    /// `new_relative_path`, through the gates of that replica at both paths:
    /// a rename takes effect at the old path and at the new one. Found at the
    /// old path, not by id: a rename is about its paths (`repository_id` is
    /// only checked there). The replica path follows only a repository that
    /// lived at its relative path (the rename moved that directory); one
    /// elsewhere (`@cluster/…`) stays where it is. The replica's completion
    /// records at the old path go. `Written(false)` when neither was at the
    /// old path.
    pub(crate) async fn rename_repository_in_order(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storage: &str,
        new_relative_path: &str,
        repository_id: Option<i64>,
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
        let identity = Identity::at_path(repository_id);
        self.gated_write(&SQL, &keys, identity, order, "rename_repository")
            .await
    }
}
