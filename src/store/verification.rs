//! Background verification's records: which replicas are due (up to date in
//! the store, not verified within the interval), a replica found equal to
//! its source, and a replica found different, whose record is dropped so
//! that it counts as missing until replicated again.

use super::{RepositoryStore, StoreError, failed};
use std::time::Duration;

/// A replica to compare with the repository's primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueReplica {
    pub repository_id: i64,
    pub relative_path: String,
    pub replica_path: Option<String>,
    pub generation: i64,
    /// The repository's primary, at the same generation: the source.
    pub source: String,
    pub target: String,
}

impl DueReplica {
    /// Where both replicas are on disk.
    pub fn disk_path(&self) -> &str {
        self.replica_path.as_deref().unwrap_or(&self.relative_path)
    }
}

/// Where a pass over a virtual storage's replicas has got to: batches are
/// chosen in (repository id, storage) order after it, so a pass reads the
/// store once however many batches it takes, as the reconciler's scan does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerificationCursor {
    /// The next replica is at this repository id or after, and at this id
    /// on a storage named after `after_storage` ('' for any).
    from_id: i64,
    after_storage: String,
}

impl VerificationCursor {
    /// Whether the next batch starts a new pass.
    pub fn at_start(&self) -> bool {
        *self == VerificationCursor::default()
    }
}

/// Repository ids one statement looks at: the planner estimates a bounded
/// id range well and walks the indexes, where an open range with a LIMIT
/// can make it hash whole tables. A window of the store costs a few
/// milliseconds whether its replicas are due or not.
const WINDOW: i64 = 1000;

type DueRow = (i64, String, Option<String>, i64, String, String);

impl RepositoryStore {
    /// Up to `limit` replicas of `virtual_storage` on `storages`, after
    /// `cursor`, that the store has at the repository's generation, whose
    /// primary (on `storages` too) is at it as well, and that were not
    /// verified at that generation within `interval`. Moves `cursor` past
    /// them, or back to the start when the pass has reached the end.
    pub async fn replicas_due_for_verification(
        &self,
        virtual_storage: &str,
        storages: &[String],
        interval: Duration,
        limit: usize,
        cursor: &mut VerificationCursor,
    ) -> Result<Vec<DueReplica>, StoreError> {
        let last_id: i64 =
            sqlx::query_scalar("SELECT coalesce(max(repository_id), 0) FROM repositories")
                .fetch_one(&self.pool)
                .await
                .map_err(failed("replicas_due_for_verification"))?;
        let mut due: Vec<DueRow> = Vec::new();
        while due.len() < limit {
            if cursor.from_id > last_id {
                *cursor = VerificationCursor::default();
                break;
            }
            let window_end = cursor.from_id.saturating_add(WINDOW);
            let wanted = limit - due.len();
            let rows: Vec<DueRow> = sqlx::query_as(
                "SELECT r.repository_id, r.relative_path, r.replica_path, r.generation,
                        r.\"primary\", s.storage
                FROM repositories r
                JOIN storage_repositories s
                    ON s.repository_id = r.repository_id AND s.generation = r.generation
                JOIN storage_repositories p
                    ON p.repository_id = r.repository_id AND p.storage = r.\"primary\"
                   AND p.generation = r.generation
                LEFT JOIN replica_verifications v
                    ON v.repository_id = r.repository_id AND v.storage = s.storage
                   AND v.repository_id >= $5 AND v.repository_id < $7
                WHERE r.virtual_storage = $1 AND s.storage = ANY($2) AND r.\"primary\" = ANY($2)
                  AND s.storage <> r.\"primary\"
                  -- The window, spelled out per table: the planner does not
                  -- carry a bound across a join.
                  AND r.repository_id >= $5 AND r.repository_id < $7
                  AND s.repository_id >= $5 AND s.repository_id < $7
                  AND p.repository_id >= $5 AND p.repository_id < $7
                  AND (r.repository_id > $5 OR s.storage > $6)
                  AND (v.verified_at IS NULL OR v.generation <> s.generation
                       OR v.verified_at < now() - make_interval(secs => $3))
                ORDER BY r.repository_id, s.storage
                LIMIT $4",
            )
            .bind(virtual_storage)
            .bind(storages)
            .bind(interval.as_secs_f64())
            .bind(i64::try_from(wanted).unwrap_or(i64::MAX))
            .bind(cursor.from_id)
            .bind(&cursor.after_storage)
            .bind(window_end)
            .fetch_all(&self.pool)
            .await
            .map_err(failed("replicas_due_for_verification"))?;
            *cursor = match rows.last() {
                Some(last) if rows.len() == wanted => VerificationCursor {
                    from_id: last.0,
                    after_storage: last.5.clone(),
                },
                _ => VerificationCursor {
                    from_id: window_end,
                    after_storage: String::new(),
                },
            };
            due.extend(rows);
        }
        Ok(due
            .into_iter()
            .map(
                |(repository_id, relative_path, replica_path, generation, source, target)| {
                    DueReplica {
                        repository_id,
                        relative_path,
                        replica_path,
                        generation,
                        source,
                        target,
                    }
                },
            )
            .collect())
    }

    /// Records `replica` as equal to its source, with `checksum`, now.
    pub async fn record_verification(
        &self,
        replica: &DueReplica,
        checksum: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO replica_verifications (repository_id, storage, generation, checksum)
            SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT FROM repositories WHERE repository_id = $1)
            ON CONFLICT (repository_id, storage) DO UPDATE
                SET generation = EXCLUDED.generation, checksum = EXCLUDED.checksum,
                    verified_at = now()",
        )
        .bind(replica.repository_id)
        .bind(&replica.target)
        .bind(replica.generation)
        .bind(checksum)
        .execute(&self.pool)
        .await
        .map_err(failed("record_verification"))?;
        Ok(())
    }

    /// Drops the record of `replica`, found different from its source, if
    /// it still holds the generation checked: the replica then counts as
    /// missing until an update replicates it. Whether a row went.
    pub async fn drop_differing_replica(&self, replica: &DueReplica) -> Result<bool, StoreError> {
        let deleted = sqlx::query(
            "WITH v AS (DELETE FROM replica_verifications WHERE repository_id = $1 AND storage = $2)
            DELETE FROM storage_repositories
            WHERE repository_id = $1 AND storage = $2 AND generation = $3",
        )
        .bind(replica.repository_id)
        .bind(&replica.target)
        .bind(replica.generation)
        .execute(&self.pool)
        .await
        .map_err(failed("drop_differing_replica"))?;
        Ok(deleted.rows_affected() > 0)
    }
}
