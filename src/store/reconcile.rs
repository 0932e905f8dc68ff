//! The reconciler's scan: the repositories of one virtual storage, walked by
//! repository id in batches, with the replicas that need a job: assigned
//! ones that are outdated or missing, and unassigned ones that still have a
//! row. Each batch is two statements bounded by the batch size, so a round
//! over a million repositories costs a hundred small reads, never one
//! statement over the whole store.

use super::dataloss::{ASSIGNED_ALL, ASSIGNED_BY_TABLE, Row, query};
use super::{LaggingRepository, RepositoryStore, StoreError, failed};

/// An assigned replica behind, or an unassigned replica on a configured
/// storage that still has a row.
const NEEDS_A_JOB: &str = "bool_or(p.assigned AND COALESCE(p.generation, -1) < l.generation)
    OR bool_or(NOT p.assigned AND p.generation IS NOT NULL AND c.storage IS NOT NULL)";

/// One batch of the scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconciliationBatch {
    /// The repositories of the batch that need a job, by path.
    pub repositories: Vec<LaggingRepository>,
    /// Repositories the batch covered.
    pub scanned: u64,
    /// Where the next batch starts (its ids are above this); `None` when the
    /// scan is done.
    pub next: Option<i64>,
}

impl RepositoryStore {
    /// Whether Praefect's `repository_assignments` table exists (a
    /// standalone store has none: every configured storage is assigned).
    pub async fn has_assignments_table(&self) -> Result<bool, StoreError> {
        sqlx::query_scalar("SELECT to_regclass('repository_assignments') IS NOT NULL")
            .persistent(false)
            .fetch_one(self.pool())
            .await
            .map_err(failed("has_assignments_table"))
    }

    /// The batch of `virtual_storage`'s repositories with ids above `after`,
    /// at most `limit` of them, given the configured (virtual storage,
    /// storage) pairs.
    pub async fn reconciliation_batch(
        &self,
        configured: &[(String, String)],
        virtual_storage: &str,
        has_assignments: bool,
        after: i64,
        limit: usize,
    ) -> Result<ReconciliationBatch, StoreError> {
        const OPERATION: &str = "reconciliation_batch";
        let (end, scanned): (Option<i64>, i64) = sqlx::query_as(
            "SELECT max(repository_id), count(*) FROM (
                SELECT repository_id FROM repositories
                WHERE virtual_storage = $1 AND repository_id > $2
                ORDER BY repository_id LIMIT $3
            ) b",
        )
        .bind(virtual_storage)
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_one(&self.pool)
        .await
        .map_err(failed(OPERATION))?;
        let Some(end) = end else {
            return Ok(ReconciliationBatch {
                repositories: Vec::new(),
                scanned: 0,
                next: None,
            });
        };
        static WITH_TABLE: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| query(ASSIGNED_BY_TABLE, true, NEEDS_A_JOB));
        static WITHOUT_TABLE: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| query(ASSIGNED_ALL, true, NEEDS_A_JOB));
        let sql: &'static str = if has_assignments {
            WITH_TABLE.as_str()
        } else {
            WITHOUT_TABLE.as_str()
        };
        let (vs, storages): (Vec<String>, Vec<String>) = configured.iter().cloned().unzip();
        let rows: Vec<Row> = sqlx::query_as(sql)
            .bind(vs)
            .bind(storages)
            .bind([virtual_storage])
            .bind(after)
            .bind(end)
            .fetch_all(&self.pool)
            .await
            .map_err(failed(OPERATION))?;
        let scanned = u64::try_from(scanned).unwrap_or(0);
        Ok(ReconciliationBatch {
            repositories: rows.into_iter().map(LaggingRepository::from_row).collect(),
            scanned,
            next: (scanned >= u64::try_from(limit).unwrap_or(u64::MAX)).then_some(end),
        })
    }
}
