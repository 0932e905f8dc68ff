//! Completion dedup, as Praefect does it for maintenance jobs: the latest
//! start time of a completed job per (repository, target, change type,
//! source), and whether a job created before it is superseded. Records are
//! pruned (see [`prune_completions`]): a record only matters while a twin
//! job created before it may still be in the queue.

use super::{RepositoryStore, StoreError, failed};
use crate::error_chain::display_error_chain;
use crate::event::Job;
use sqlx::Arguments;
use sqlx::postgres::PgArguments;
use std::time::Duration;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
// The standalone statements below exist for the tests of the SQL that the
// lock session's statements embed (see `lock_statements`).
#[cfg(test)]
use {super::encode_failed, std::sync::LazyLock};

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

/// A completion key that owns its strings, to travel to the batching task.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobKey {
    pub virtual_storage: String,
    pub relative_path: String,
    pub target_storage: String,
    pub change_type: &'static str,
    pub source_storage: String,
}

impl JobKey {
    pub fn of(job: &Job) -> JobKey {
        JobKey {
            virtual_storage: job.virtual_storage.clone(),
            relative_path: job.relative_path.clone(),
            target_storage: job.target_node_storage.clone(),
            change_type: job.change_type().as_str(),
            source_storage: job.source_node_storage.clone().unwrap_or_default(),
        }
    }

    pub fn as_key(&self) -> CompletionKey<'_> {
        CompletionKey {
            virtual_storage: &self.virtual_storage,
            relative_path: &self.relative_path,
            target_storage: &self.target_storage,
            change_type: self.change_type,
            source_storage: &self.source_storage,
        }
    }
}

/// Completion keys as column arrays, for `unnest`.
pub(super) struct CompletionColumns<'a> {
    virtual_storage: Vec<&'a str>,
    relative_path: Vec<&'a str>,
    target_storage: Vec<&'a str>,
    change_type: Vec<&'a str>,
    source_storage: Vec<&'a str>,
    time: Vec<Option<OffsetDateTime>>,
}

impl<'a> CompletionColumns<'a> {
    pub(super) fn of(rows: &[(CompletionKey<'a>, OffsetDateTime)]) -> Self {
        Self::of_optional(rows.iter().map(|(k, t)| Some((*k, *t))))
    }

    /// A row without a key gets empty names and no time.
    pub(super) fn of_optional(
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
    pub(super) fn add_to(self, args: &mut PgArguments) -> Result<(), sqlx::error::BoxDynError> {
        args.add(self.virtual_storage)?;
        args.add(self.relative_path)?;
        args.add(self.target_storage)?;
        args.add(self.change_type)?;
        args.add(self.source_storage)?;
        args.add(self.time)
    }

    #[cfg(test)]
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
pub(super) fn record_completions_sql(base: usize) -> String {
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
pub(super) fn superseded_sql(base: usize) -> String {
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

#[cfg(test)]
impl RepositoryStore {
    /// Records that jobs completed, each with the time it started; one
    /// statement for the whole slice. A key keeps its latest start, so a
    /// repeat (redelivery) or an older completion changes nothing.
    pub(crate) async fn record_completions(
        &self,
        completions: &[(CompletionKey<'_>, OffsetDateTime)],
    ) -> Result<(), StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| record_completions_sql(1));
        let args = CompletionColumns::of(completions).into_args("record_completions")?;
        sqlx::query_with(SQL.as_str(), args)
            .execute(&self.pool)
            .await
            .map_err(failed("record_completions"))?;
        Ok(())
    }

    /// Records one completion (see [`Self::record_completions`]).
    pub(crate) async fn record_completion(
        &self,
        key: &CompletionKey<'_>,
        started_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.record_completions(&[(*key, started_at)]).await
    }

    /// For each (key, created_at): whether a twin job with the same key
    /// completed that had started after this one was created (Praefect's
    /// completion dedup). One statement; answers in input order.
    pub(crate) async fn superseded_many(
        &self,
        jobs: &[(CompletionKey<'_>, OffsetDateTime)],
    ) -> Result<Vec<bool>, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| format!("SELECT {}", superseded_sql(1)));
        let args = CompletionColumns::of(jobs).into_args("superseded")?;
        sqlx::query_scalar_with(SQL.as_str(), args)
            .fetch_one(&self.pool)
            .await
            .map_err(failed("superseded"))
    }

    /// One job's answer of [`Self::superseded_many`].
    pub(crate) async fn superseded(
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

/// How completion records are pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompletionPruning {
    /// Records older than this go.
    pub retention: Duration,
    /// Records of a repository the store no longer has (deleted, or renamed
    /// away) go once older than this: a maintenance job that was running
    /// when its repository was deleted records its completion afterwards.
    pub orphan_grace: Duration,
    /// Time between passes.
    pub interval: Duration,
    /// Records deleted per statement, so that no pass holds many row locks
    /// or runs one long statement.
    pub batch: i64,
}

impl CompletionPruning {
    /// A pass every quarter of `retention`, at least every second and at
    /// most ten minutes apart; orphans go after an hour (or the retention,
    /// if shorter).
    pub fn for_retention(retention: Duration) -> CompletionPruning {
        CompletionPruning {
            retention,
            orphan_grace: retention.min(Duration::from_secs(3600)),
            interval: (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(600)),
            batch: 1000,
        }
    }
}

impl RepositoryStore {
    /// Deletes up to `limit` completion records that started more than
    /// `retention` ago, or more than `orphan_grace` ago for a repository
    /// that has no `repositories` row any more; answers how many went.
    /// Ages are on the database's clock.
    pub(crate) async fn prune_completions(
        &self,
        retention: Duration,
        orphan_grace: Duration,
        limit: i64,
    ) -> Result<u64, StoreError> {
        // Rows are picked by ctid, so one that a completion refreshed since
        // it was picked (a new row version) is not deleted.
        let done = sqlx::query(
            "DELETE FROM replication_completions
            WHERE ctid = ANY(ARRAY(
                SELECT c.ctid FROM replication_completions c
                WHERE c.started_at < now() - make_interval(secs => $1)
                   OR (c.started_at < now() - make_interval(secs => $2)
                       AND NOT EXISTS (
                           SELECT FROM repositories r
                           WHERE r.virtual_storage = c.virtual_storage
                             AND r.relative_path = c.relative_path))
                LIMIT $3))",
        )
        .bind(retention.as_secs_f64())
        .bind(orphan_grace.as_secs_f64())
        .bind(limit)
        .execute(&self.pool)
        .await
        .map_err(failed("prune_completions"))?;
        Ok(done.rows_affected())
    }
}

/// Prunes completion records every `pruning.interval` (the first pass at
/// once), batch after batch until a batch comes back short, until `stop`.
/// A failed pass is logged and the next one tries again.
pub async fn prune_completions(
    store: RepositoryStore,
    pruning: CompletionPruning,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(pruning.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let mut pruned = 0;
        loop {
            let batch = tokio::select! {
                r = store.prune_completions(pruning.retention, pruning.orphan_grace, pruning.batch) => r,
                () = stop.cancelled() => return,
            };
            match batch {
                Ok(n) => {
                    pruned += n;
                    if n < pruning.batch.unsigned_abs() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        error = display_error_chain(&e),
                        "pruning completion records failed; trying again at the next pass"
                    );
                    break;
                }
            }
        }
        if pruned > 0 {
            tracing::info!(pruned, "pruned completion records");
        }
    }
}
