//! Praefect's generation rule, and recording generations.

use super::{REPO, VS, repository_generation};
use crate::store::ReplicatedGeneration;
use crate::test_database::TestDatabase;

// --- replicated_generation ---

#[tokio::test]
async fn replicated_generation_is_up_to_date_when_the_target_holds_the_source_generation() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 3, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();

    let decision = db
        .store
        .replicated_generation(VS, REPO, "gitaly-1", "gitaly-2")
        .await
        .unwrap();

    assert_eq!(decision, ReplicatedGeneration::UpToDate { generation: 3 });
}

#[tokio::test]
async fn replicated_generation_refuses_a_downgrade() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 2, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();
    db.store
        .set_generation(VS, REPO, "gitaly-2", 5)
        .await
        .unwrap();

    let decision = db
        .store
        .replicated_generation(VS, REPO, "gitaly-1", "gitaly-2")
        .await
        .unwrap();

    assert_eq!(
        decision,
        ReplicatedGeneration::Downgrade {
            target_generation: 5,
            source_generation: 2
        }
    );
}

#[tokio::test]
async fn replicated_generation_refuses_a_downgrade_from_a_source_without_a_record() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-2", 0, &["gitaly-2"])
        .await
        .unwrap();

    let decision = db
        .store
        .replicated_generation(VS, REPO, "gitaly-1", "gitaly-2")
        .await
        .unwrap();

    assert_eq!(
        decision,
        ReplicatedGeneration::Downgrade {
            target_generation: 0,
            source_generation: -1
        }
    );
}

#[tokio::test]
async fn replicated_generation_replicates_to_a_target_without_a_record() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 4, &["gitaly-1"])
        .await
        .unwrap();

    let decision = db
        .store
        .replicated_generation(VS, REPO, "gitaly-1", "gitaly-2")
        .await
        .unwrap();

    assert_eq!(decision, ReplicatedGeneration::Replicate { generation: 4 });
}

#[tokio::test]
async fn replicated_generation_replicates_to_an_older_target() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();
    db.store
        .set_generation(VS, REPO, "gitaly-1", 2)
        .await
        .unwrap();

    let decision = db
        .store
        .replicated_generation(VS, REPO, "gitaly-1", "gitaly-2")
        .await
        .unwrap();

    assert_eq!(decision, ReplicatedGeneration::Replicate { generation: 2 });
}

#[tokio::test]
async fn replicated_generation_replicates_minus_one_when_neither_replica_has_a_record() {
    let db = TestDatabase::new().await;

    let decision = db
        .store
        .replicated_generation(VS, REPO, "gitaly-1", "gitaly-2")
        .await
        .unwrap();

    assert_eq!(decision, ReplicatedGeneration::Replicate { generation: -1 });
}

// --- set_generation ---

#[tokio::test]
async fn set_generation_inserts_a_missing_replica_and_raises_the_repository() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();

    assert!(
        db.store
            .set_generation(VS, REPO, "gitaly-2", 2)
            .await
            .unwrap()
    );

    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-2").await.unwrap(),
        Some(2)
    );
    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-1").await.unwrap(),
        Some(1)
    );
    assert_eq!(repository_generation(&db.store, REPO).await, Some(Some(2)));
}

#[tokio::test]
async fn set_generation_raises_an_older_replica_and_is_idempotent() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();

    assert!(
        db.store
            .set_generation(VS, REPO, "gitaly-2", 3)
            .await
            .unwrap()
    );
    // Redelivered: same answer, same state.
    assert!(
        db.store
            .set_generation(VS, REPO, "gitaly-2", 3)
            .await
            .unwrap()
    );

    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-2").await.unwrap(),
        Some(3)
    );
    assert_eq!(repository_generation(&db.store, REPO).await, Some(Some(3)));
}

#[tokio::test]
async fn set_generation_never_lowers_a_replica() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 5, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();

    assert!(
        !db.store
            .set_generation(VS, REPO, "gitaly-2", 4)
            .await
            .unwrap()
    );

    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-2").await.unwrap(),
        Some(5)
    );
    assert_eq!(repository_generation(&db.store, REPO).await, Some(Some(5)));
}

#[tokio::test]
async fn set_generation_does_not_lower_the_repository() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 5, &["gitaly-1"])
        .await
        .unwrap();

    assert!(
        db.store
            .set_generation(VS, REPO, "gitaly-2", 3)
            .await
            .unwrap()
    );

    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-2").await.unwrap(),
        Some(3)
    );
    assert_eq!(repository_generation(&db.store, REPO).await, Some(Some(5)));
}

#[tokio::test]
async fn set_generation_raises_a_repository_whose_generation_is_null() {
    let db = TestDatabase::new().await;
    sqlx::query("INSERT INTO repositories (virtual_storage, relative_path) VALUES ($1, $2)")
        .bind(VS)
        .bind(REPO)
        .execute(db.store.pool())
        .await
        .unwrap();

    assert!(
        db.store
            .set_generation(VS, REPO, "gitaly-1", 0)
            .await
            .unwrap()
    );

    assert_eq!(repository_generation(&db.store, REPO).await, Some(Some(0)));
    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-1").await.unwrap(),
        Some(0)
    );
}

#[tokio::test]
async fn set_generation_skips_minus_one() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();

    assert!(
        !db.store
            .set_generation(VS, REPO, "gitaly-2", -1)
            .await
            .unwrap()
    );

    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-2").await.unwrap(),
        None
    );
}

#[tokio::test]
async fn set_generation_writes_nothing_without_a_repository_row() {
    let db = TestDatabase::new().await;

    assert!(
        !db.store
            .set_generation(VS, REPO, "gitaly-2", 1)
            .await
            .unwrap()
    );

    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-2").await.unwrap(),
        None
    );
    assert_eq!(repository_generation(&db.store, REPO).await, None);
}

// --- create_repository ---

#[tokio::test]
async fn create_repository_again_keeps_the_id_and_never_lowers() {
    let db = TestDatabase::new().await;
    let id = db
        .store
        .create_repository(VS, REPO, "gitaly-1", 2, &["gitaly-1"])
        .await
        .unwrap();

    let again = db
        .store
        .create_repository(
            VS,
            REPO,
            "gitaly-2",
            1,
            &["gitaly-1", "gitaly-2", "gitaly-2"],
        )
        .await
        .unwrap();

    assert_eq!(again, id);
    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-1").await.unwrap(),
        Some(2)
    );
    assert_eq!(
        db.store.generation(VS, REPO, "gitaly-2").await.unwrap(),
        Some(1)
    );
    assert_eq!(repository_generation(&db.store, REPO).await, Some(Some(2)));
}
