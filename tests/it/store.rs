//! The repository store against a real Postgres: Praefect's generation rules,
//! the idempotent writes, completion dedup and the advisory lock. Each test
//! owns a database of its own.

use crate::common::db::TestDatabase;
use gitaly_replicator::store::{
    self, CompletionKey, Gated, GenerationRecord, ReplicatedGeneration, RepositoryStore,
    repository_lock_key,
};
use time::OffsetDateTime;

const VS: &str = "default";
const REPO: &str = "@hashed/ab/cd/abcd.git";

/// The repository row's generation: None without a row, Some(None) for NULL.
async fn repository_generation(
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

async fn replica_storages(store: &RepositoryStore, relative_path: &str) -> Vec<String> {
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

fn at(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_700_000_000 + seconds).unwrap()
}

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

    assert!(
        db.store
            .delete_invalid_repository(VS, REPO, "gitaly-2")
            .await
            .unwrap()
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

    assert!(
        db.store
            .delete_invalid_repository(VS, REPO, "gitaly-2")
            .await
            .unwrap()
    );
    assert!(
        db.store
            .delete_invalid_repository(VS, REPO, "gitaly-1")
            .await
            .unwrap()
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
        assert!(delete.await.unwrap().unwrap());
    }

    assert_eq!(repository_generation(&db.store, REPO).await, None);
}

#[tokio::test]
async fn delete_invalid_repository_reports_a_missing_replica() {
    let db = TestDatabase::new().await;

    assert!(
        !db.store
            .delete_invalid_repository(VS, REPO, "gitaly-1")
            .await
            .unwrap()
    );
}

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

// --- completion dedup ---

fn completion_key<'a>(change_type: &'a str, source_storage: &'a str) -> CompletionKey<'a> {
    CompletionKey {
        virtual_storage: VS,
        relative_path: REPO,
        target_storage: "gitaly-2",
        change_type,
        source_storage,
    }
}

#[tokio::test]
async fn a_job_created_before_its_completed_twin_started_is_superseded() {
    let db = TestDatabase::new().await;
    let key = completion_key("update", "gitaly-1");

    db.store.record_completion(&key, at(10)).await.unwrap();

    assert!(db.store.superseded(&key, at(9)).await.unwrap());
    assert!(!db.store.superseded(&key, at(10)).await.unwrap());
    assert!(!db.store.superseded(&key, at(11)).await.unwrap());
}

#[tokio::test]
async fn nothing_is_superseded_before_any_completion() {
    let db = TestDatabase::new().await;

    assert!(
        !db.store
            .superseded(&completion_key("update", "gitaly-1"), at(0))
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn a_completion_supersedes_no_job_of_another_source_change_type_or_target() {
    let db = TestDatabase::new().await;
    db.store
        .record_completion(&completion_key("update", "gitaly-1"), at(10))
        .await
        .unwrap();

    assert!(
        !db.store
            .superseded(&completion_key("update", "gitaly-3"), at(0))
            .await
            .unwrap()
    );
    assert!(
        !db.store
            .superseded(&completion_key("update", ""), at(0))
            .await
            .unwrap()
    );
    assert!(
        !db.store
            .superseded(&completion_key("gc", "gitaly-1"), at(0))
            .await
            .unwrap()
    );
    let other_target = CompletionKey {
        target_storage: "gitaly-3",
        ..completion_key("update", "gitaly-1")
    };
    assert!(!db.store.superseded(&other_target, at(0)).await.unwrap());
    let other_repository = CompletionKey {
        relative_path: "other.git",
        ..completion_key("update", "gitaly-1")
    };
    assert!(!db.store.superseded(&other_repository, at(0)).await.unwrap());
}

#[tokio::test]
async fn record_completion_keeps_the_latest_start() {
    let db = TestDatabase::new().await;
    let key = completion_key("gc", "");

    db.store.record_completion(&key, at(20)).await.unwrap();
    // An older job finishing late must not move the mark back.
    db.store.record_completion(&key, at(10)).await.unwrap();

    assert!(db.store.superseded(&key, at(15)).await.unwrap());
    db.store.record_completion(&key, at(30)).await.unwrap();
    assert!(db.store.superseded(&key, at(25)).await.unwrap());
}

// --- advisory lock ---

#[test]
fn lock_keys_are_stable_and_unambiguous() {
    // Pinned values (computed independently), so a change of hash or encoding
    // is noticed: mixed versions would not exclude each other.
    assert_eq!(repository_lock_key("", "", ""), -9_092_134_505_053_150_459);
    assert_eq!(
        repository_lock_key(VS, REPO, "gitaly-2"),
        -2_682_423_323_302_174_094
    );
    assert_ne!(
        repository_lock_key("a", "b/c", "d"),
        repository_lock_key("a/b", "c", "d")
    );
    assert_ne!(
        repository_lock_key("ab", "", "c"),
        repository_lock_key("a", "b", "c")
    );
    assert_ne!(
        repository_lock_key("default", "a.git", "gitaly-1"),
        repository_lock_key("default", "a.git", "gitaly-2")
    );
}

// --- errors ---

#[tokio::test]
async fn a_constraint_violation_names_the_operation_and_is_not_retryable() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();
    db.store
        .create_repository(VS, "taken.git", "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();

    let error = db
        .store
        .rename_repository(VS, REPO, "gitaly-1", "taken.git")
        .await
        .unwrap_err();

    assert_eq!(error.operation(), "rename_repository");
    assert!(!error.is_retryable(), "{error}");
    assert!(error.to_string().contains("rename_repository"), "{error}");
}

#[tokio::test]
async fn a_closed_pool_is_retryable() {
    let db = TestDatabase::new().await;
    db.store.pool().close().await;

    let error = db.store.generation(VS, REPO, "gitaly-1").await.unwrap_err();

    assert_eq!(error.operation(), "generation");
    assert!(error.is_retryable(), "{error}");
}

// --- batched generation writes ---

// On a current-thread runtime every write below is queued before the
// batching task runs, so they go to Postgres as one statement first.
#[tokio::test(flavor = "current_thread")]
async fn a_bad_row_in_a_generation_batch_fails_only_its_own_job() {
    use gitaly_replicator::store::generation_batcher::GenerationBatcher;

    let db = TestDatabase::new().await;
    let paths: Vec<String> = (0..5).map(|i| format!("batch-{i}.git")).collect();
    for p in &paths {
        db.store
            .create_repository(VS, p, "gitaly-1", 7, &["gitaly-1"])
            .await
            .unwrap();
    }
    // Postgres text cannot hold NUL: this row breaks the batch's statement.
    let bad = "bad\0.git".to_owned();
    let batcher = GenerationBatcher::start(db.store.clone());
    let writes = paths.iter().chain([&bad]).map(|p| {
        batcher.set_generation(GenerationRecord {
            virtual_storage: VS,
            relative_path: p,
            storage: "gitaly-2",
            generation: 7,
            order: None,
        })
    });
    let answers = futures::future::join_all(writes).await;
    for (p, a) in paths.iter().zip(&answers) {
        assert_eq!(a.as_ref().ok(), Some(&Gated::Written(true)), "{p}: {a:?}");
        assert_eq!(
            db.store.generation(VS, p, "gitaly-2").await.unwrap(),
            Some(7)
        );
    }
    assert!(answers[paths.len()].is_err(), "{:?}", answers[paths.len()]);
}

/// A session of its own on the test database: its pid and start, and the
/// connection that keeps it alive.
async fn live_session(db: &TestDatabase) -> (store::LockSessionId, sqlx::PgConnection) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let (pid, backend_start) =
        sqlx::query_as("SELECT pid, backend_start FROM pg_stat_get_activity(pg_backend_pid())")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    (store::LockSessionId { pid, backend_start }, conn)
}

fn fenced_by(session: store::LockSessionId, sequence: i64) -> store::WriteOrder {
    store::WriteOrder {
        stream: "work@1".into(),
        sequence,
        lock_session: Some(session),
        repository_id: None,
    }
}

#[tokio::test]
async fn gated_writes_go_through_only_while_the_lock_session_that_granted_them_lives() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 3, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();
    let (session, conn) = live_session(&db).await;
    let record = |order| GenerationRecord {
        virtual_storage: VS,
        relative_path: REPO,
        storage: "gitaly-2",
        generation: 3,
        order,
    };

    let live = fenced_by(session, 1);
    assert_eq!(
        db.store
            .set_generations(&[record(Some(&live))])
            .await
            .unwrap(),
        [Gated::Written(true)]
    );
    // The same pid with another start is another session (a reused pid).
    let reused = store::LockSessionId {
        backend_start: session.backend_start - time::Duration::seconds(1),
        ..session
    };
    let impostor = fenced_by(reused, 2);
    assert_eq!(
        db.store
            .set_generations(&[record(Some(&impostor))])
            .await
            .unwrap(),
        [Gated::LockLost]
    );
    assert_eq!(
        db.store
            .delete_replica_in_order(VS, REPO, "gitaly-2", Some(&impostor))
            .await
            .unwrap(),
        Gated::LockLost
    );
    // Once the session is gone, nothing it fenced is written.
    use sqlx::Connection;
    conn.close().await.unwrap();
    let gone = fenced_by(session, 3);
    assert!(
        crate::common::eventually(std::time::Duration::from_secs(5), || async {
            db.store
                .delete_replica_in_order(VS, REPO, "gitaly-2", Some(&gone))
                .await
                .unwrap()
                == Gated::LockLost
        })
        .await
    );
    assert_eq!(
        replica_storages(&db.store, REPO).await,
        ["gitaly-1", "gitaly-2"]
    );
}
