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

impl RepositoryStore {
    /// Up to `limit` replicas of `virtual_storage` on `storages` that the
    /// store has at the repository's generation, whose primary (on
    /// `storages` too) is at it as well, and that were not verified at that
    /// generation within `interval`; the never verified first.
    pub async fn replicas_due_for_verification(
        &self,
        virtual_storage: &str,
        storages: &[String],
        interval: Duration,
        limit: usize,
    ) -> Result<Vec<DueReplica>, StoreError> {
        let rows: Vec<(i64, String, Option<String>, i64, String, String)> = sqlx::query_as(
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
            WHERE r.virtual_storage = $1 AND s.storage = ANY($2) AND r.\"primary\" = ANY($2)
              AND s.storage <> r.\"primary\"
              AND (v.verified_at IS NULL OR v.generation <> s.generation
                   OR v.verified_at < now() - make_interval(secs => $3))
            ORDER BY v.verified_at NULLS FIRST, r.repository_id, s.storage
            LIMIT $4",
        )
        .bind(virtual_storage)
        .bind(storages)
        .bind(interval.as_secs_f64())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(failed("replicas_due_for_verification"))?;
        Ok(rows
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
