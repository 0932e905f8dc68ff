//! Deleting repositories and replicas, renaming, dropping invalid replica
//! records.

use super::{REPO, VS, replica_storages, repository_generation};
use crate::store::InvalidSource;
use crate::test_database::TestDatabase;

// --- delete_repository, delete_replica ---

#[tokio::test]
async fn delete_repository_deletes_the_repository_and_the_listed_replicas() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();
    db.store
        .create_repository(VS, "other.git", "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();

    assert!(
        db.store
            .delete_repository(VS, REPO, &["gitaly-1", "gitaly-2"])
            .await
            .unwrap()
    );

    assert_eq!(repository_generation(&db.store, REPO).await, None);
    assert!(replica_storages(&db.store, REPO).await.is_empty());
    assert_eq!(replica_storages(&db.store, "other.git").await, ["gitaly-1"]);
}

#[tokio::test]
async fn delete_repository_deletes_listed_replicas_left_without_a_repository_row() {
    let db = TestDatabase::new().await;
    sqlx::query(
        "INSERT INTO storage_repositories (virtual_storage, relative_path, storage, generation)
        VALUES ($1, $2, 'gitaly-1', 1), ($1, $2, 'gitaly-2', 1)",
    )
    .bind(VS)
    .bind(REPO)
    .execute(db.store.pool())
    .await
    .unwrap();

    assert!(
        db.store
            .delete_repository(VS, REPO, &["gitaly-2"])
            .await
            .unwrap()
    );

    assert_eq!(replica_storages(&db.store, REPO).await, ["gitaly-1"]);
}

#[tokio::test]
async fn delete_repository_reports_a_missing_repository() {
    let db = TestDatabase::new().await;

    assert!(
        !db.store
            .delete_repository(VS, REPO, &["gitaly-1"])
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn delete_replica_deletes_only_that_replica() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();

    assert!(db.store.delete_replica(VS, REPO, "gitaly-2").await.unwrap());

    assert_eq!(replica_storages(&db.store, REPO).await, ["gitaly-1"]);
    assert_eq!(repository_generation(&db.store, REPO).await, Some(Some(1)));
}

#[tokio::test]
async fn delete_replica_reports_a_missing_replica() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();

    assert!(!db.store.delete_replica(VS, REPO, "gitaly-2").await.unwrap());

    assert_eq!(replica_storages(&db.store, REPO).await, ["gitaly-1"]);
}

// --- rename_repository ---

#[tokio::test]
async fn rename_repository_moves_the_repository_and_that_storage_replica() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();

    assert!(
        db.store
            .rename_repository(VS, REPO, "gitaly-2", "renamed.git")
            .await
            .unwrap()
    );

    let (relative_path, replica_path): (String, Option<String>) = sqlx::query_as(
        "SELECT relative_path, replica_path FROM repositories WHERE virtual_storage = $1",
    )
    .bind(VS)
    .fetch_one(db.store.pool())
    .await
    .unwrap();
    assert_eq!(relative_path, "renamed.git");
    assert_eq!(replica_path.as_deref(), Some("renamed.git"));
    assert_eq!(
        replica_storages(&db.store, "renamed.git").await,
        ["gitaly-2"]
    );
    // The other storage's replica is renamed by that storage's own job.
    assert_eq!(replica_storages(&db.store, REPO).await, ["gitaly-1"]);
    assert!(
        db.store
            .rename_repository(VS, REPO, "gitaly-1", "renamed.git")
            .await
            .unwrap()
    );
    assert_eq!(
        replica_storages(&db.store, "renamed.git").await,
        ["gitaly-1", "gitaly-2"]
    );
}

#[tokio::test]
async fn rename_repository_reports_a_missing_repository() {
    let db = TestDatabase::new().await;

    assert!(
        !db.store
            .rename_repository(VS, REPO, "gitaly-1", "renamed.git")
            .await
            .unwrap()
    );
}

// --- delete_invalid_repository ---

#[tokio::test]
async fn delete_invalid_repository_keeps_the_repository_while_another_replica_remains() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();

    assert_eq!(
        db.store
            .delete_invalid_repository(VS, REPO, "gitaly-2")
            .await
            .unwrap(),
        InvalidSource::Deleted
    );

    assert_eq!(replica_storages(&db.store, REPO).await, ["gitaly-1"]);
    assert_eq!(repository_generation(&db.store, REPO).await, Some(Some(1)));
}

#[tokio::test]
async fn delete_invalid_repository_deletes_the_repository_with_its_last_replica() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();

    assert_eq!(
        db.store
            .delete_invalid_repository(VS, REPO, "gitaly-2")
            .await
            .unwrap(),
        InvalidSource::Deleted
    );
    assert_eq!(
        db.store
            .delete_invalid_repository(VS, REPO, "gitaly-1")
            .await
            .unwrap(),
        InvalidSource::Deleted
    );

    assert!(replica_storages(&db.store, REPO).await.is_empty());
    assert_eq!(repository_generation(&db.store, REPO).await, None);
}

#[tokio::test]
async fn delete_invalid_repository_run_for_all_replicas_at_once_leaves_no_repository() {
    let db = TestDatabase::new().await;
    let storages = ["gitaly-1", "gitaly-2", "gitaly-3", "gitaly-4"];
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &storages)
        .await
        .unwrap();

    let deletes = storages.map(|storage| {
        let store = db.store.clone();
        tokio::spawn(async move { store.delete_invalid_repository(VS, REPO, storage).await })
    });
    for delete in deletes {
        assert_eq!(delete.await.unwrap().unwrap(), InvalidSource::Deleted);
    }

    assert_eq!(repository_generation(&db.store, REPO).await, None);
}

#[tokio::test]
async fn delete_invalid_repository_reports_a_missing_replica() {
    let db = TestDatabase::new().await;

    assert_eq!(
        db.store
            .delete_invalid_repository(VS, REPO, "gitaly-1")
            .await
            .unwrap(),
        InvalidSource::Absent
    );
}

#[tokio::test]
async fn delete_invalid_repository_keeps_a_replica_whose_rename_is_not_recorded_yet() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();
    db.store
        .begin_move(VS, REPO, "gitaly-1", "renamed.git")
        .await
        .unwrap();

    assert_eq!(
        db.store
            .delete_invalid_repository(VS, REPO, "gitaly-1")
            .await
            .unwrap(),
        InvalidSource::Moving {
            to: "renamed.git".into()
        }
    );
    assert_eq!(
        replica_storages(&db.store, REPO).await,
        ["gitaly-1", "gitaly-2"]
    );

    // Recording the rename ends the move: the replica at its new path is
    // an ordinary replica again.
    assert!(
        db.store
            .rename_repository(VS, REPO, "gitaly-1", "renamed.git")
            .await
            .unwrap()
    );
    assert_eq!(
        db.store
            .delete_invalid_repository(VS, "renamed.git", "gitaly-1")
            .await
            .unwrap(),
        InvalidSource::Deleted
    );
    let moves: i64 = sqlx::query_scalar("SELECT count(*) FROM replica_moves")
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    assert_eq!(moves, 0);
}

// --- completion records of deleted and renamed replicas ---

#[tokio::test]
async fn a_delete_or_rename_takes_the_completion_records_of_its_replica_with_it() {
    use super::completions::{completion_key, completion_records};
    use crate::store::CompletionKey;
    let db = TestDatabase::new().await;
    for path in [REPO, "renamed.git", "deleted.git"] {
        db.store
            .create_repository(
                VS,
                path,
                "gitaly-1",
                1,
                &["gitaly-1", "gitaly-2", "gitaly-3"],
            )
            .await
            .unwrap();
        for target in ["gitaly-2", "gitaly-3"] {
            let key = CompletionKey {
                relative_path: path,
                target_storage: target,
                ..completion_key("gc", "")
            };
            db.store
                .record_completion(&key, super::at(1))
                .await
                .unwrap();
        }
    }
    let written = crate::store::Gated::Written(true);

    assert_eq!(
        db.store
            .delete_replica_in_order(VS, REPO, "gitaly-2", None)
            .await
            .unwrap(),
        written
    );
    assert_eq!(
        db.store
            .rename_repository_in_order(VS, "renamed.git", "gitaly-3", "new.git", None)
            .await
            .unwrap(),
        written
    );
    assert_eq!(
        db.store
            .delete_repository_in_order(VS, "deleted.git", "gitaly-2", None)
            .await
            .unwrap(),
        written
    );

    let left: Vec<(String, String)> = completion_records(&db)
        .await
        .into_iter()
        .map(|(path, target, _)| (path, target))
        .collect();
    let pair = |p: &str, t: &str| (p.to_owned(), t.to_owned());
    assert_eq!(
        left,
        [
            pair(REPO, "gitaly-3"),
            // The other replicas' go with their own jobs, or the pruning.
            pair("deleted.git", "gitaly-3"),
            pair("renamed.git", "gitaly-2"),
        ]
    );
}
