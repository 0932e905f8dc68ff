//! Jobs that name their repository_id (Praefect 14.5 and later): rows found
//! by id across a rename in Praefect's store (15.x changes only
//! `repositories.relative_path`), order kept by id, stale ids.

use super::{VS, repository_generation};
use crate::store::{
    Gated, GenerationQuery, GenerationRecord, Identity, ReplicatedGeneration, RepositoryStore,
    Standing, WriteOrder,
};
use crate::test_database::TestDatabase;

const OLD: &str = "@hashed/ab/cd/old.git";
const NEW: &str = "@hashed/ab/cd/new.git";
const REPLICA_PATH: &str = "@cluster/ab/cd/7";

fn order(sequence: i64) -> WriteOrder {
    WriteOrder {
        stream: "work@1".into(),
        sequence,
        lock_session: None,
    }
}

/// A repository at OLD, on gitaly-1 at 3 and gitaly-2 at 1, with its replica
/// path at REPLICA_PATH; returns its id.
async fn repository(store: &RepositoryStore) -> i64 {
    let id = store
        .create_repository(VS, OLD, "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();
    assert!(store.set_generation(VS, OLD, "gitaly-1", 3).await.unwrap());
    sqlx::query("UPDATE repositories SET replica_path = $1 WHERE repository_id = $2")
        .bind(REPLICA_PATH)
        .bind(id)
        .execute(store.pool())
        .await
        .unwrap();
    id
}

/// As Praefect 15 renames: the repository row only.
async fn rename_in_store(store: &RepositoryStore, id: i64, relative_path: &str) {
    sqlx::query("UPDATE repositories SET relative_path = $1 WHERE repository_id = $2")
        .bind(relative_path)
        .bind(id)
        .execute(store.pool())
        .await
        .unwrap();
}

/// (relative path, generation) of each replica row of `id`, by storage.
async fn replicas_of(store: &RepositoryStore, id: i64) -> Vec<(String, String, i64)> {
    sqlx::query_as(
        "SELECT storage, relative_path, generation FROM storage_repositories
        WHERE repository_id = $1 ORDER BY storage",
    )
    .bind(id)
    .fetch_all(store.pool())
    .await
    .unwrap()
}

fn query<'a>(
    relative_path: &'a str,
    repository_id: Option<i64>,
    order: Option<(&'a str, i64)>,
) -> GenerationQuery<'a> {
    GenerationQuery {
        virtual_storage: VS,
        relative_path,
        source: "gitaly-1",
        target: "gitaly-2",
        order,
        repository_id,
    }
}

fn record<'a>(
    relative_path: &'a str,
    generation: i64,
    repository_id: Option<i64>,
    order: Option<&'a WriteOrder>,
) -> GenerationRecord<'a> {
    GenerationRecord {
        virtual_storage: VS,
        relative_path,
        storage: "gitaly-2",
        generation,
        repository_id,
        order,
    }
}

#[tokio::test]
async fn after_a_rename_in_the_store_a_job_with_either_path_reads_its_replicas_by_id_and_the_stored_replica_path()
 {
    let db = TestDatabase::new().await;
    let id = repository(&db.store).await;
    rename_in_store(&db.store, id, NEW).await;

    for path in [OLD, NEW] {
        let answers = db
            .store
            .replicated_generations(&[query(path, Some(id), None)])
            .await
            .unwrap();
        assert_eq!(
            answers[0].decision,
            ReplicatedGeneration::Replicate { generation: 3 },
            "{path}"
        );
        assert_eq!(answers[0].replica_path.as_deref(), Some(REPLICA_PATH));
    }
    // Without the id, the new path has no replica rows yet: as before.
    let by_path = db
        .store
        .replicated_generations(&[query(NEW, None, None)])
        .await
        .unwrap();
    assert_eq!(
        by_path[0].decision,
        ReplicatedGeneration::Replicate { generation: -1 }
    );
    assert_eq!(by_path[0].replica_path, None);
}

#[tokio::test]
async fn an_update_from_before_a_rename_in_the_store_records_the_generation_on_the_renamed_repository()
 {
    let db = TestDatabase::new().await;
    let id = repository(&db.store).await;
    rename_in_store(&db.store, id, NEW).await;

    let o = order(10);
    let written = db
        .store
        .set_generations(&[record(OLD, 3, Some(id), Some(&o))])
        .await
        .unwrap();

    assert_eq!(written, [Gated::Written(true)]);
    // The target's row is the repository's, now at its current path.
    assert_eq!(
        replicas_of(&db.store, id).await,
        [
            ("gitaly-1".to_owned(), OLD.to_owned(), 3),
            ("gitaly-2".to_owned(), NEW.to_owned(), 3),
        ]
    );
    assert_eq!(repository_generation(&db.store, NEW).await, Some(Some(3)));
    assert_eq!(repository_generation(&db.store, OLD).await, None);
}

#[tokio::test]
async fn a_job_from_before_a_rename_in_the_store_is_superseded_by_a_later_one_from_after_it() {
    let db = TestDatabase::new().await;
    let id = repository(&db.store).await;
    let later = order(20);
    assert_eq!(
        db.store
            .set_generations(&[record(OLD, 3, Some(id), Some(&later))])
            .await
            .unwrap(),
        [Gated::Written(true)]
    );
    rename_in_store(&db.store, id, NEW).await;

    // An older job, retried, names the new path: the path's record is
    // another key, the id's is not.
    let answers = db
        .store
        .replicated_generations(&[query(NEW, Some(id), Some(("work@1", 15)))])
        .await
        .unwrap();
    assert_eq!(answers[0].decision, ReplicatedGeneration::Superseded);
    let older = order(15);
    assert_eq!(
        db.store
            .delete_replica_in_order(VS, NEW, "gitaly-2", Identity::by_id(Some(id)), Some(&older))
            .await
            .unwrap(),
        Gated::Superseded
    );
    assert_eq!(
        db.store
            .standing_in_order(&[(VS, OLD, "gitaly-2")], Identity::by_id(Some(id)), &older)
            .await
            .unwrap(),
        [Standing::Superseded]
    );
    assert_eq!(replicas_of(&db.store, id).await.len(), 2);
    // A newer one goes through.
    let newest = order(30);
    assert_eq!(
        db.store
            .standing_in_order(&[(VS, NEW, "gitaly-2")], Identity::by_id(Some(id)), &newest)
            .await
            .unwrap(),
        [Standing::Current]
    );
}

#[tokio::test]
async fn deletes_after_a_rename_in_the_store_remove_the_repository_s_rows_found_by_id() {
    let db = TestDatabase::new().await;
    let id = repository(&db.store).await;
    rename_in_store(&db.store, id, NEW).await;

    // The replica rows are still recorded at the old path, the job names
    // the new one.
    assert_eq!(
        db.store
            .delete_replica_in_order(
                VS,
                NEW,
                "gitaly-2",
                Identity::by_id(Some(id)),
                Some(&order(1))
            )
            .await
            .unwrap(),
        Gated::Written(true)
    );
    assert_eq!(
        replicas_of(&db.store, id).await,
        [("gitaly-1".to_owned(), OLD.to_owned(), 3)]
    );

    // The job names the old path, the repository row is at the new one.
    assert_eq!(
        db.store
            .delete_repository_in_order(
                VS,
                OLD,
                "gitaly-1",
                Identity::by_id(Some(id)),
                Some(&order(2))
            )
            .await
            .unwrap(),
        Gated::Written(true)
    );
    assert_eq!(repository_generation(&db.store, NEW).await, None);
    assert!(replicas_of(&db.store, id).await.is_empty());
}

#[tokio::test]
async fn a_job_for_a_deleted_id_is_stale_where_another_repository_now_sits_and_by_path_elsewhere() {
    let db = TestDatabase::new().await;
    let old_id = repository(&db.store).await;
    sqlx::query("DELETE FROM repositories WHERE repository_id = $1")
        .bind(old_id)
        .execute(db.store.pool())
        .await
        .unwrap();
    // Nothing at the path: as without an id (nothing to read or write).
    let answers = db
        .store
        .replicated_generations(&[query(OLD, Some(old_id), None)])
        .await
        .unwrap();
    assert_eq!(
        answers[0].decision,
        ReplicatedGeneration::Replicate { generation: -1 }
    );

    let new_id = db
        .store
        .create_repository(VS, OLD, "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();
    let answers = db
        .store
        .replicated_generations(&[query(OLD, Some(old_id), None)])
        .await
        .unwrap();
    assert_eq!(answers[0].decision, ReplicatedGeneration::Stale);
    assert_eq!(
        db.store
            .set_generations(&[record(OLD, 5, Some(old_id), Some(&order(1)))])
            .await
            .unwrap(),
        [Gated::Stale]
    );
    assert_eq!(
        db.store
            .delete_repository_in_order(
                VS,
                OLD,
                "gitaly-2",
                Identity::by_id(Some(old_id)),
                Some(&order(2))
            )
            .await
            .unwrap(),
        Gated::Stale
    );
    assert_eq!(
        replicas_of(&db.store, new_id).await,
        [
            ("gitaly-1".to_owned(), OLD.to_owned(), 1),
            ("gitaly-2".to_owned(), OLD.to_owned(), 1),
        ]
    );
}

#[tokio::test]
async fn a_renamed_repository_with_another_at_its_old_path_is_still_found_by_id() {
    let db = TestDatabase::new().await;
    let id = repository(&db.store).await;
    rename_in_store(&db.store, id, NEW).await;
    let other = db
        .store
        .create_repository(VS, OLD, "gitaly-3", 9, &["gitaly-3"])
        .await
        .unwrap();

    // A job of the renamed repository that names its old path is about it,
    // not about the repository that sits there now.
    assert_eq!(
        db.store
            .set_generations(&[record(OLD, 3, Some(id), Some(&order(1)))])
            .await
            .unwrap(),
        [Gated::Written(true)]
    );
    assert_eq!(
        replicas_of(&db.store, id).await,
        [
            ("gitaly-1".to_owned(), OLD.to_owned(), 3),
            ("gitaly-2".to_owned(), NEW.to_owned(), 3),
        ]
    );
    assert_eq!(
        replicas_of(&db.store, other).await,
        [("gitaly-3".to_owned(), OLD.to_owned(), 9)]
    );
}

#[tokio::test]
async fn fallback_sources_and_invalid_source_records_follow_the_id() {
    let db = TestDatabase::new().await;
    let id = repository(&db.store).await;
    rename_in_store(&db.store, id, NEW).await;

    assert_eq!(
        db.store
            .up_to_date_storages(VS, NEW, Some(id))
            .await
            .unwrap(),
        ["gitaly-1"]
    );
    assert!(
        db.store
            .up_to_date_storages(VS, NEW, None)
            .await
            .unwrap()
            .is_empty()
    );

    assert!(
        db.store
            .delete_invalid_repository(VS, NEW, "gitaly-1", Some(id))
            .await
            .unwrap()
    );
    assert_eq!(
        replicas_of(&db.store, id).await,
        [("gitaly-2".to_owned(), OLD.to_owned(), 1)]
    );
    // The last replica's record goes with the repository's.
    assert!(
        db.store
            .delete_invalid_repository(VS, NEW, "gitaly-2", Some(id))
            .await
            .unwrap()
    );
    assert_eq!(repository_generation(&db.store, NEW).await, None);
}

#[tokio::test]
async fn replica_path_is_the_stored_one_of_the_id_in_its_virtual_storage() {
    let db = TestDatabase::new().await;
    let id = repository(&db.store).await;

    assert_eq!(
        db.store.replica_path(VS, id).await.unwrap().as_deref(),
        Some(REPLICA_PATH)
    );
    assert_eq!(db.store.replica_path("other", id).await.unwrap(), None);
    assert_eq!(db.store.replica_path(VS, id + 1).await.unwrap(), None);
}

#[tokio::test]
async fn a_rename_moves_a_replica_path_only_when_it_was_the_relative_path() {
    let db = TestDatabase::new().await;
    let id = repository(&db.store).await;
    let plain = db
        .store
        .create_repository(VS, "plain.git", "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();

    for (from, to) in [(OLD, NEW), ("plain.git", "plain-renamed.git")] {
        assert!(
            db.store
                .rename_repository(VS, from, "gitaly-1", to)
                .await
                .unwrap()
        );
    }

    // `@cluster/…` does not move with a rename; a path that was the relative
    // path did (the rename moved that directory).
    assert_eq!(
        db.store.replica_path(VS, id).await.unwrap().as_deref(),
        Some(REPLICA_PATH)
    );
    assert_eq!(
        db.store.replica_path(VS, plain).await.unwrap().as_deref(),
        Some("plain-renamed.git")
    );
}
