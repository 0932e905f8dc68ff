//! Where a job's repository is now: a rename in Praefect's store alone is
//! followed by id and replica path; a rename that moved the directory, a
//! deleted repository and another virtual storage are not.

use super::{REPO, VS, replica_storages};
use crate::store::RepositoryStore;
use crate::store::repository_paths::NamedRepository;
use crate::test_database::TestDatabase;

const CLUSTER_PATH: &str = "@cluster/ab/cd/1";

fn named(relative_path: &str, id: i64, replica_path: &str) -> NamedRepository {
    NamedRepository {
        virtual_storage: VS.into(),
        relative_path: relative_path.into(),
        repository_id: id,
        replica_path: replica_path.into(),
    }
}

/// A repository at REPO with its own replica path, on two storages.
async fn cluster_repository(store: &RepositoryStore) -> i64 {
    let id = store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();
    sqlx::query("UPDATE repositories SET replica_path = $1 WHERE repository_id = $2")
        .bind(CLUSTER_PATH)
        .bind(id)
        .execute(store.pool())
        .await
        .unwrap();
    id
}

/// Praefect 15's rename of a repository with its own replica path: the
/// repository row and every replica row move; nothing moves on disk.
async fn rename_in_place(store: &RepositoryStore, id: i64, new: &str) {
    sqlx::query(
        "WITH r AS (UPDATE repositories SET relative_path = $2 WHERE repository_id = $1)
        UPDATE storage_repositories SET relative_path = $2 WHERE repository_id = $1",
    )
    .bind(id)
    .bind(new)
    .execute(store.pool())
    .await
    .unwrap();
}

#[tokio::test]
async fn a_repository_renamed_in_the_store_alone_is_found_at_its_new_path_by_id_and_replica_path() {
    let db = TestDatabase::new().await;
    let id = cluster_repository(&db.store).await;
    let other = db
        .store
        .create_repository(VS, "other.git", "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();

    let asked = [
        named(REPO, id, CLUSTER_PATH),
        named("other.git", other, "other.git"),
    ];
    assert_eq!(
        db.store.moved_relative_paths(&asked).await.unwrap(),
        [None, None]
    );

    rename_in_place(&db.store, id, "renamed.git").await;
    let asked = [
        named(REPO, id, CLUSTER_PATH),
        // Named at its new path already.
        named("renamed.git", id, CLUSTER_PATH),
        // Another replica path: not this repository's directory.
        named(REPO, id, "@cluster/ff/ff/9"),
        // Another virtual storage.
        NamedRepository {
            virtual_storage: "other".into(),
            ..named(REPO, id, CLUSTER_PATH)
        },
        // No such id.
        named(REPO, id + other + 1, CLUSTER_PATH),
    ];
    assert_eq!(
        db.store.moved_relative_paths(&asked).await.unwrap(),
        [Some("renamed.git".to_owned()), None, None, None, None]
    );
}

#[tokio::test]
async fn a_rename_that_moves_the_directory_is_not_followed_and_a_cluster_path_survives_a_rename_job()
 {
    let db = TestDatabase::new().await;
    // From before replica paths: the replica path is the relative path, and
    // a rename moves it with the directory.
    let legacy = db
        .store
        .create_repository(VS, "legacy.git", "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();
    assert!(
        db.store
            .rename_repository(VS, "legacy.git", "gitaly-1", "moved.git")
            .await
            .unwrap()
    );
    // gitaly-2's directory and row are still at the old path until its own
    // rename job runs: a job for the old path stays there.
    assert_eq!(
        replica_storages(&db.store, "legacy.git").await,
        ["gitaly-2"]
    );
    assert_eq!(
        db.store
            .moved_relative_paths(&[named("legacy.git", legacy, "legacy.git")])
            .await
            .unwrap(),
        [None]
    );

    // A rename job on an `@cluster/…` repository keeps its replica path.
    let id = cluster_repository(&db.store).await;
    assert!(
        db.store
            .rename_repository(VS, REPO, "gitaly-1", "renamed.git")
            .await
            .unwrap()
    );
    let replica_path: Option<String> =
        sqlx::query_scalar("SELECT replica_path FROM repositories WHERE repository_id = $1")
            .bind(id)
            .fetch_one(db.store.pool())
            .await
            .unwrap();
    assert_eq!(replica_path.as_deref(), Some(CLUSTER_PATH));
}
