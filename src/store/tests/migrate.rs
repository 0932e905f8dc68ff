//! Migrations, on an empty database and on Praefect's tables.

use super::completions::completion_key;
use super::{REPO, VS, at};
use crate::store::ReplicatedGeneration;
use crate::test_database::TestDatabase;

// --- migrate ---

#[tokio::test]
async fn migrate_twice_is_fine() {
    let db = TestDatabase::new().await;

    db.store.migrate().await.unwrap();

    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();
}

#[tokio::test]
async fn migrate_accepts_tables_praefect_created() {
    let db = TestDatabase::empty().await;
    // Praefect's tables as Praefect leaves them, with columns of its own.
    sqlx::raw_sql(
        "CREATE TABLE repositories (
            repository_id BIGSERIAL PRIMARY KEY,
            virtual_storage TEXT NOT NULL,
            relative_path TEXT NOT NULL,
            generation BIGINT,
            \"primary\" TEXT,
            replica_path TEXT,
            UNIQUE (virtual_storage, relative_path)
        );
        CREATE TABLE storage_repositories (
            repository_id BIGINT REFERENCES repositories ON DELETE CASCADE,
            virtual_storage TEXT NOT NULL,
            relative_path TEXT NOT NULL,
            storage TEXT NOT NULL,
            generation BIGINT NOT NULL,
            verified_at TIMESTAMPTZ,
            verification_leased_until TIMESTAMPTZ,
            PRIMARY KEY (virtual_storage, relative_path, storage),
            UNIQUE (repository_id, storage)
        );
        INSERT INTO repositories (virtual_storage, relative_path, generation, \"primary\", replica_path)
        VALUES ('default', 'praefect.git', 7, 'gitaly-1', '@cluster/repositories/1');
        INSERT INTO storage_repositories (repository_id, virtual_storage, relative_path, storage, generation)
        SELECT repository_id, 'default', 'praefect.git', 'gitaly-1', 7 FROM repositories;",
    )
    .execute(db.store.pool())
    .await
    .unwrap();

    db.store.migrate().await.unwrap();

    assert_eq!(
        db.store
            .generation(VS, "praefect.git", "gitaly-1")
            .await
            .unwrap(),
        Some(7)
    );
    assert!(
        db.store
            .set_generation(VS, "praefect.git", "gitaly-2", 7)
            .await
            .unwrap()
    );
    assert_eq!(
        db.store
            .replicated_generation(VS, "praefect.git", "gitaly-1", "gitaly-2")
            .await
            .unwrap(),
        ReplicatedGeneration::UpToDate { generation: 7 }
    );
    let key = completion_key("update", "gitaly-1");
    db.store.record_completion(&key, at(0)).await.unwrap();
}
