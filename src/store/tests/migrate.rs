//! Migrations, on an empty database and on Praefect's tables.

use super::completions::completion_key;
use super::{REPO, VS, at};
use crate::store::{
    EmptyDatabase, REQUIRED_PRAEFECT_MIGRATION, ReplicatedGeneration, StoreError, migrate_on,
};
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

// --- whose schema ---

async fn session(db: &TestDatabase) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(&db.url).await.unwrap()
}

fn schema_problem<T: std::fmt::Debug>(result: Result<T, StoreError>) -> String {
    match result {
        Err(e @ StoreError::Schema { .. }) => {
            assert!(
                !e.is_retryable(),
                "a schema problem is not worth waiting for"
            );
            e.to_string()
        }
        other => panic!("expected a schema error, got {other:?}"),
    }
}

/// Praefect's migration table, recording `ids` as applied.
async fn praefect_migrations(db: &TestDatabase, ids: &[&str]) {
    sqlx::raw_sql("CREATE TABLE schema_migrations (id TEXT PRIMARY KEY, applied_at TIMESTAMPTZ)")
        .execute(db.store.pool())
        .await
        .unwrap();
    for id in ids {
        sqlx::query("INSERT INTO schema_migrations VALUES ($1, now())")
            .bind(id)
            .execute(db.store.pool())
            .await
            .unwrap();
    }
}

async fn has_table(db: &TestDatabase, name: &str) -> bool {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(name)
        .fetch_one(db.store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn an_empty_database_is_refused_unless_standalone_is_asked_for() {
    let db = TestDatabase::empty().await;
    let mut conn = session(&db).await;

    let e = schema_problem(migrate_on(&mut conn, EmptyDatabase::Refuse).await);
    assert!(e.contains("praefect -config"), "{e}");
    assert!(e.contains("sql-migrate"), "{e}");
    assert!(e.contains("migrate --standalone"), "{e}");
    // Nothing was created that Praefect's first migrations would trip on.
    assert!(!has_table(&db, "repositories").await);
    assert!(!has_table(&db, "_sqlx_migrations").await);

    migrate_on(&mut conn, EmptyDatabase::CreateStandalone)
        .await
        .unwrap();
    assert!(has_table(&db, "repositories").await);
    // Once created so, it is ours: later starts take it as it is.
    migrate_on(&mut conn, EmptyDatabase::Refuse).await.unwrap();
}

#[tokio::test]
async fn a_praefect_schema_older_than_required_is_refused_naming_the_release() {
    let db = TestDatabase::empty().await;
    praefect_migrations(
        &db,
        &[
            "20200109161404_hello_world",
            "20210727085659_repository_ids",
        ],
    )
    .await;
    let mut conn = session(&db).await;

    for empty in [EmptyDatabase::Refuse, EmptyDatabase::CreateStandalone] {
        let e = schema_problem(migrate_on(&mut conn, empty).await);
        assert!(e.contains("older than Praefect 14.5"), "{e}");
        assert!(e.contains(REQUIRED_PRAEFECT_MIGRATION), "{e}");
        assert!(e.contains("20210727085659_repository_ids"), "{e}");
    }
    assert!(!has_table(&db, "_sqlx_migrations").await);
}

#[tokio::test]
async fn a_praefect_schema_new_enough_gets_our_tables_only() {
    let db = TestDatabase::empty().await;
    praefect_migrations(
        &db,
        &["20200109161404_hello_world", REQUIRED_PRAEFECT_MIGRATION],
    )
    .await;
    let mut conn = session(&db).await;

    migrate_on(&mut conn, EmptyDatabase::Refuse).await.unwrap();
    assert!(has_table(&db, "replication_order").await);
}

#[tokio::test]
async fn a_repositories_table_nobody_recorded_is_refused() {
    let db = TestDatabase::empty().await;
    sqlx::raw_sql("CREATE TABLE repositories (repository_id BIGSERIAL PRIMARY KEY)")
        .execute(db.store.pool())
        .await
        .unwrap();
    let mut conn = session(&db).await;

    let e = schema_problem(migrate_on(&mut conn, EmptyDatabase::CreateStandalone).await);
    assert!(e.contains("neither Praefect's schema_migrations"), "{e}");
}
