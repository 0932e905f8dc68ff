//! Where Praefect's store now keeps a job's repository. Praefect 15 renames
//! a repository whose replica path is its own (`@cluster/…`) in the store
//! alone: `repositories.relative_path` and every replica row move, nothing
//! moves on disk. A job published before such a rename carries the old
//! relative path; it acts on the repository its `repository_id` names, so
//! its locks, order and writes must use the path the store has now.
//!
//! Only a repository with the job's replica path is followed. A rename that
//! moved the directory (a replica path that was the relative path moves with
//! it) is left to the rename jobs, which move each storage's directory and
//! row in order; following it would find a replica row whose directory has
//! not moved yet.

use super::coalescer::Coalescer;
use super::{RepositoryStore, StoreError, failed};
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

/// A job's repository, as the job names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedRepository {
    pub virtual_storage: String,
    pub relative_path: String,
    pub repository_id: i64,
    pub replica_path: String,
}

impl RepositoryStore {
    /// For each repository, in input order, the relative path the store
    /// records for its id and replica path when that differs from the one
    /// named; `None` when it is the same, or the store has no repository with
    /// that id and replica path (deleted, or renamed on disk).
    pub(crate) async fn moved_relative_paths(
        &self,
        named: &[NamedRepository],
    ) -> Result<Vec<Option<String>>, StoreError> {
        sqlx::query_scalar(
            "SELECT r.relative_path
            FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[])
                WITH ORDINALITY AS q(vs, rel, id, replica, i)
            LEFT JOIN repositories r
                ON r.repository_id = q.id AND r.virtual_storage = q.vs
               AND r.replica_path = q.replica AND r.relative_path <> q.rel
            ORDER BY q.i",
        )
        .bind(
            named
                .iter()
                .map(|n| n.virtual_storage.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            named
                .iter()
                .map(|n| n.relative_path.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(named.iter().map(|n| n.repository_id).collect::<Vec<_>>())
        .bind(
            named
                .iter()
                .map(|n| n.replica_path.as_str())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&self.pool)
        .await
        .map_err(failed("moved_relative_paths"))
    }
}

type Lookup = (
    NamedRepository,
    oneshot::Sender<Result<Option<String>, StoreError>>,
);

/// [`RepositoryStore::moved_relative_paths`] for many concurrent jobs, one
/// statement per burst.
#[derive(Clone)]
pub struct RepositoryPathBatcher {
    lookups: Coalescer<Lookup>,
}

impl RepositoryPathBatcher {
    pub fn start(store: RepositoryStore, tasks: &TaskTracker) -> Self {
        let lookups = Coalescer::start(tasks, 256, 4, move |batch: Vec<Lookup>| {
            let store = store.clone();
            async move {
                let (named, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                match store.moved_relative_paths(&named).await {
                    Ok(paths) if paths.len() == replies.len() => {
                        for (reply, path) in replies.into_iter().zip(paths) {
                            let _ = reply.send(Ok(path));
                        }
                    }
                    answer => {
                        let error = match answer {
                            Err(e) => e,
                            Ok(paths) => StoreError::Batch {
                                operation: "moved_relative_paths",
                                message: format!(
                                    "{} rows for {} repositories",
                                    paths.len(),
                                    replies.len()
                                ),
                                retryable: true,
                                outage: false,
                            },
                        };
                        for reply in replies {
                            let _ = reply.send(Err(error.for_batch()));
                        }
                    }
                }
            }
        });
        Self { lookups }
    }

    /// The relative path the store records for `named`'s repository when it
    /// moved there (see [`RepositoryStore::moved_relative_paths`]).
    pub async fn moved_relative_path(
        &self,
        named: NamedRepository,
    ) -> Result<Option<String>, StoreError> {
        let (tx, rx) = oneshot::channel();
        let stopped = || StoreError::Batch {
            operation: "moved_relative_paths",
            message: "the batching task stopped".into(),
            retryable: true,
            outage: false,
        };
        if !self.lookups.send((named, tx)) {
            return Err(stopped());
        }
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }
}
