//! Praefect's repository store tables, `repositories` and
//! `storage_repositories`: the generation rule that never lets a replica be
//! downgraded, and the writes of replication (set a generation, delete a
//! repository or a replica, rename, drop an invalid replica record). Each
//! state-changing write passes its replica's gate (see `order`).

use super::order::{self, Gated};
use super::{RepositoryStore, StoreError, WriteOrder, failed, lock_sessions};

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

impl RepositoryStore {
    /// Praefect's rule, for many jobs in one statement: reads each source's
    /// and target's replica generations (-1 = no row) and decides between
    /// replicate, up to date and downgrade. Answers in input order.
    pub(crate) async fn replicated_generations(
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
                outage: false,
            })
    }

    /// The storages whose replica holds the repository's latest generation,
    /// the repository's primary first, then by name: where an update can
    /// read from when its source is down.
    pub async fn up_to_date_storages(
        &self,
        virtual_storage: &str,
        relative_path: &str,
    ) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT s.storage
            FROM storage_repositories s
            LEFT JOIN repositories r
                ON r.virtual_storage = s.virtual_storage AND r.relative_path = s.relative_path
            WHERE s.virtual_storage = $1 AND s.relative_path = $2
              AND s.generation = (SELECT max(generation) FROM storage_repositories
                                  WHERE virtual_storage = $1 AND relative_path = $2)
            ORDER BY (s.storage = r.\"primary\") IS TRUE DESC, s.storage",
        )
        .bind(virtual_storage)
        .bind(relative_path)
        .fetch_all(&self.pool)
        .await
        .map_err(failed("up_to_date_storages"))
    }

    /// Records replica generations, many in one statement: upserts each
    /// replica row, never lowering it, and raises each repository's
    /// generation when lower (or NULL). Each row passes its own gate first
    /// (see [`WriteOrder`]); a row that is superseded, stale or whose lock
    /// is lost writes nothing. Answers, in input order, `Written(true)` when the
    /// replica row now holds that generation (inserted, raised or
    /// rewritten); `Written(false)` when skipped: -1, no repository row, or
    /// the replica already newer. A replica named twice keeps the higher
    /// generation. A repository renamed since its replica on that storage
    /// was recorded (that storage's rename job has not run yet) has the
    /// replica's row moved to the path written: the repository's replica
    /// there is now at that path, and a storage holds one replica of a
    /// repository (`UNIQUE (repository_id, storage)`); the rename job then
    /// finds the new path settled and only removes the old one.
    pub(crate) async fn set_generations(
        &self,
        replicas: &[GenerationRecord<'_>],
    ) -> Result<Vec<Gated<bool>>, StoreError> {
        let rows: Vec<(bool, bool, bool, bool)> = sqlx::query_as(set_generations_sql())
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

    /// Whether a job holds the repository lock of the replica on `storage`
    /// (any process: the locks are Postgres advisory locks). A source that
    /// answers "no such repository" while one does may be in the middle of
    /// that job's rename or delete, between its Gitaly call and its record.
    pub(crate) async fn replica_locked(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storage: &str,
    ) -> Result<bool, StoreError> {
        let key = super::repository_lock_key(virtual_storage, relative_path, storage);
        // A bigint advisory key shows in pg_locks as its high and low halves.
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT FROM pg_locks
                WHERE locktype = 'advisory' AND objsubid = 1 AND granted
                  AND classid = (($1::bigint >> 32) & 4294967295)::oid
                  AND objid = ($1::bigint & 4294967295)::oid)",
        )
        .bind(key)
        .fetch_one(&self.pool)
        .await
        .map_err(failed("replica_locked"))
    }

    /// Records that the replica on `storage` is about to be moved to
    /// `new_relative_path`, before the Gitaly call that moves it; the
    /// statement that records the rename clears it. Until then the replica
    /// is not dropped as an invalid source ([`Self::delete_invalid_repository`]).
    pub(crate) async fn begin_move(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storage: &str,
        new_relative_path: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO replica_moves (virtual_storage, relative_path, storage, new_relative_path)
            VALUES ($1, $2, $3, $4)
            ON CONFLICT (virtual_storage, relative_path, storage)
            DO UPDATE SET new_relative_path = EXCLUDED.new_relative_path",
        )
        .bind(virtual_storage)
        .bind(relative_path)
        .bind(storage)
        .bind(new_relative_path)
        .persistent(self.pool.persistent())
        .execute(&self.pool)
        .await
        .map_err(failed("begin_move"))?;
        Ok(())
    }

    /// Deletes the replica row of `storage`, and the repository row when no
    /// other replica remains, in one transaction, unless a rename of that
    /// replica may have moved it on disk without being recorded yet
    /// ([`InvalidSource::Moving`]). The repository row is locked first, so
    /// two of these for different storages cannot both see the other's
    /// replica and leave the repository row behind (which one statement with
    /// CTEs could, all of it reading one snapshot).
    pub(crate) async fn delete_invalid_repository(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storage: &str,
    ) -> Result<InvalidSource, StoreError> {
        const OPERATION: &str = "delete_invalid_repository";
        let mut tx = self.pool.begin().await.map_err(failed(OPERATION))?;
        sqlx::query(
            "SELECT FROM repositories
            WHERE virtual_storage = $1 AND relative_path = $2
            FOR UPDATE",
        )
        .bind(virtual_storage)
        .bind(relative_path)
        .persistent(self.pool.persistent())
        .execute(&mut *tx)
        .await
        .map_err(failed(OPERATION))?;
        let moving: Option<String> = sqlx::query_scalar(
            "SELECT new_relative_path FROM replica_moves
            WHERE virtual_storage = $1 AND relative_path = $2 AND storage = $3",
        )
        .bind(virtual_storage)
        .bind(relative_path)
        .bind(storage)
        .persistent(self.pool.persistent())
        .fetch_optional(&mut *tx)
        .await
        .map_err(failed(OPERATION))?;
        if let Some(to) = moving {
            return Ok(InvalidSource::Moving { to });
        }
        let replica = sqlx::query(
            "DELETE FROM storage_repositories
            WHERE virtual_storage = $1 AND relative_path = $2 AND storage = $3",
        )
        .bind(virtual_storage)
        .bind(relative_path)
        .bind(storage)
        .persistent(self.pool.persistent())
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
        .persistent(self.pool.persistent())
        .execute(&mut *tx)
        .await
        .map_err(failed(OPERATION))?;
        tx.commit().await.map_err(failed(OPERATION))?;
        Ok(
            if replica.rows_affected() > 0 || repository.rows_affected() > 0 {
                InvalidSource::Deleted
            } else {
                InvalidSource::Absent
            },
        )
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
}

/// What [`RepositoryStore::delete_invalid_repository`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InvalidSource {
    /// The replica row (and the repository row, with its last replica) went.
    Deleted,
    /// There was no such replica row.
    Absent,
    /// Nothing was deleted: a rename to `to` may have moved the replica on
    /// disk and not been recorded yet.
    Moving { to: String },
}

/// The statement of [`RepositoryStore::set_generations`]. The fence: each
/// job's lock session still holds its locks.
pub(super) fn set_generations_sql() -> &'static str {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        "WITH input AS (
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[],
                                 $5::text[], $6::bigint[], $7::int[], $8::timestamptz[],
                                 $9::bigint[])
                WITH ORDINALITY AS t(vs, rel, storage, gen, stream, seq, pid, started, id, i)
        ), alive AS MATERIALIZED (
            SELECT s.pid, s.started FROM (SELECT DISTINCT pid, started FROM input
                                          WHERE pid IS NOT NULL) s
            WHERE {HOLDS}
        ), fenced AS MATERIALIZED (
            SELECT input.* FROM input
            WHERE input.pid IS NULL OR EXISTS (
                SELECT FROM alive WHERE alive.pid = input.pid
                                    AND alive.started = input.started)
        ), current AS MATERIALIZED (
            -- The repository row read once: its id and generation serve
            -- the id check, the raise and the replica row below.
            SELECT f.*, r.repository_id AS rid, r.generation AS rgen FROM fenced f
            LEFT JOIN repositories r ON r.virtual_storage = f.vs AND r.relative_path = f.rel
            WHERE f.id IS NULL OR r.repository_id IS NULL OR r.repository_id = f.id
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
            -- A hashed semi-join on `ordered` (one row per replica):
            -- a join was planned as a loop over it for every row.
            SELECT f.* FROM current f
            WHERE f.stream IS NULL
               OR (f.vs, f.rel, f.storage, f.seq) IN (
                    SELECT virtual_storage, relative_path, target_storage, sequence
                    FROM ordered)
        ), gens AS (
            SELECT DISTINCT ON (vs, rel, storage) vs, rel, storage, gen, rid, rgen
            FROM allowed WHERE gen <> -1 AND rid IS NOT NULL
            ORDER BY vs, rel, storage, gen DESC
        ), raised AS (
            -- Only where the row read is behind: a generation never
            -- falls, and the update checks again on the latest row.
            UPDATE repositories r SET generation = m.gen
            FROM (SELECT rid, max(gen) AS gen FROM gens
                  WHERE rgen IS NULL OR rgen < gen GROUP BY rid) m
            WHERE r.repository_id = m.rid
              AND (r.generation IS NULL OR r.generation < m.gen)
        ), targets AS MATERIALIZED (
            SELECT rid AS repository_id, vs AS virtual_storage, rel AS relative_path, storage, gen,
                -- The rare case first: AND stops at it, one probe a row.
                EXISTS (SELECT FROM storage_repositories s
                        WHERE s.repository_id = gens.rid AND s.storage = gens.storage
                          AND s.relative_path <> gens.rel)
                AND NOT EXISTS (SELECT FROM storage_repositories s
                                WHERE s.virtual_storage = gens.vs AND s.relative_path = gens.rel
                                  AND s.storage = gens.storage) AS elsewhere
            FROM gens
        ), moved AS (
            UPDATE storage_repositories s
            SET relative_path = t.relative_path, generation = GREATEST(s.generation, t.gen)
            FROM targets t
            WHERE t.elsewhere AND s.repository_id = t.repository_id AND s.storage = t.storage
            RETURNING s.virtual_storage, s.relative_path, s.storage, s.generation
        ), written AS (
            INSERT INTO storage_repositories
                (repository_id, virtual_storage, relative_path, storage, generation)
            SELECT repository_id, virtual_storage, relative_path, storage, gen
            FROM targets WHERE NOT elsewhere
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
        LEFT JOIN (SELECT DISTINCT * FROM (SELECT * FROM written UNION ALL SELECT * FROM moved) m) w
            ON w.virtual_storage = input.vs AND w.relative_path = input.rel
           AND w.storage = input.storage AND w.generation = input.gen
        ORDER BY input.i"
            .replace("{HOLDS}", &lock_sessions::holds_sql("s.pid", "s.started"))
    });
    SQL.as_str()
}
