//! Completion dedup, the lock key, error classification, batched writes
//! and the fence of gated writes.

use super::{REPO, VS, at, replica_storages};
use crate::store::{self, CompletionKey, Gated, GenerationRecord, repository_lock_key};
use crate::test_database::TestDatabase;

// --- completion dedup ---

pub(super) fn completion_key<'a>(
    change_type: &'a str,
    source_storage: &'a str,
) -> CompletionKey<'a> {
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
    use crate::store::generation_batcher::GenerationBatcher;

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
    let batcher = GenerationBatcher::start(db.store.clone(), &tokio_util::task::TaskTracker::new());
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

/// A lock session of its own on the test database: its pid and start, and
/// the connection that keeps it alive.
async fn live_session(db: &TestDatabase) -> (store::LockSessionId, sqlx::PgConnection) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    // Listed with a lease, as a lock session is: the gate checks both.
    let (pid, backend_start) =
        store::register_lock_session(&mut conn, std::time::Duration::from_secs(600))
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
        testkit::eventually(std::time::Duration::from_secs(5), || async {
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

// --- pruning ---

/// The (relative path, target, change type) of every completion record,
/// sorted bytewise.
pub(super) async fn completion_records(db: &TestDatabase) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT relative_path, target_storage, change_type FROM replication_completions
        ORDER BY relative_path COLLATE \"C\", target_storage, change_type",
    )
    .fetch_all(db.store.pool())
    .await
    .unwrap()
}

fn ago(seconds: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() - time::Duration::seconds(seconds)
}

const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

#[tokio::test]
async fn records_older_than_the_retention_are_pruned_in_bounded_batches() {
    let db = TestDatabase::new().await;
    // The repository exists: only age counts.
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();
    for change in ["gc", "cleanup", "pack_refs", "repack_full", "midx_repack"] {
        db.store
            .record_completion(&completion_key(change, ""), ago(2 * 86400))
            .await
            .unwrap();
    }
    for change in ["repack_incremental", "write_commit_graph"] {
        db.store
            .record_completion(&completion_key(change, ""), ago(60))
            .await
            .unwrap();
    }

    let mut batches = Vec::new();
    loop {
        let n = db.store.prune_completions(DAY, HOUR, 2).await.unwrap();
        batches.push(n);
        if n < 2 {
            break;
        }
    }

    assert_eq!(batches, [2, 2, 1]);
    let left: Vec<String> = completion_records(&db)
        .await
        .into_iter()
        .map(|(_, _, change)| change)
        .collect();
    assert_eq!(left, ["repack_incremental", "write_commit_graph"]);
}

#[tokio::test]
async fn records_of_a_repository_the_store_no_longer_has_are_pruned_after_the_grace() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository(VS, REPO, "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();
    let gone = |change| CompletionKey {
        relative_path: "gone.git",
        ..completion_key(change, "")
    };
    db.store
        .record_completion(&completion_key("gc", ""), ago(2 * 3600))
        .await
        .unwrap();
    db.store
        .record_completion(&gone("gc"), ago(2 * 3600))
        .await
        .unwrap();
    // Recorded after its repository went, by a job that was still running.
    db.store
        .record_completion(&gone("cleanup"), ago(60))
        .await
        .unwrap();

    assert_eq!(db.store.prune_completions(DAY, HOUR, 100).await.unwrap(), 1);

    assert_eq!(
        completion_records(&db).await,
        [
            (REPO.into(), "gitaly-2".into(), "gc".into()),
            ("gone.git".into(), "gitaly-2".into(), "cleanup".into()),
        ]
    );
}

#[test]
fn pruning_runs_a_few_times_per_retention_within_bounds() {
    use crate::store::CompletionPruning;
    use std::time::Duration;
    let day = CompletionPruning::for_retention(DAY);
    assert_eq!(
        (day.interval, day.orphan_grace),
        (Duration::from_secs(600), HOUR)
    );
    let short = CompletionPruning::for_retention(Duration::from_secs(2));
    assert_eq!(
        (short.interval, short.orphan_grace),
        (Duration::from_secs(1), Duration::from_secs(2))
    );
    let minutes = CompletionPruning::for_retention(Duration::from_secs(120));
    assert_eq!(minutes.interval, Duration::from_secs(30));
}
