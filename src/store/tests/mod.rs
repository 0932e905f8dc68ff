//! The repository store against a real Postgres: Praefect's generation rules,
//! the idempotent writes, completion dedup, the advisory lock key and the
//! gates of state-changing writes. Each test owns a database of its own.

mod completions;
mod deletes;
mod generations;
mod migrate;
mod repository_paths;
mod verification;

use crate::store::RepositoryStore;
use time::OffsetDateTime;

pub(super) const VS: &str = "default";
pub(super) const REPO: &str = "@hashed/ab/cd/abcd.git";

/// The repository row's generation: None without a row, Some(None) for NULL.
pub(super) async fn repository_generation(
    store: &RepositoryStore,
    relative_path: &str,
) -> Option<Option<i64>> {
    sqlx::query_scalar(
        "SELECT generation FROM repositories WHERE virtual_storage = $1 AND relative_path = $2",
    )
    .bind(VS)
    .bind(relative_path)
    .fetch_optional(store.pool())
    .await
    .unwrap()
}

pub(super) async fn replica_storages(store: &RepositoryStore, relative_path: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT storage FROM storage_repositories
        WHERE virtual_storage = $1 AND relative_path = $2 ORDER BY storage",
    )
    .bind(VS)
    .bind(relative_path)
    .fetch_all(store.pool())
    .await
    .unwrap()
}

pub(super) fn at(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_700_000_000 + seconds).unwrap()
}
