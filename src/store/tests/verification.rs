//! Background verification's choice of replicas: a pass visits each due
//! replica once, in batches, whatever was verified meanwhile, and starts
//! over at its end.

use super::VS;
use crate::store::{DueReplica, VerificationCursor};
use crate::test_database::TestDatabase;
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);

fn storages() -> Vec<String> {
    vec!["gitaly-1".into(), "gitaly-2".into(), "gitaly-3".into()]
}

fn names(batch: &[DueReplica]) -> Vec<(String, String)> {
    batch
        .iter()
        .map(|r| (r.relative_path.clone(), r.target.clone()))
        .collect()
}

#[tokio::test]
async fn a_pass_visits_every_due_replica_once_in_batches_and_then_starts_over() {
    let db = TestDatabase::new().await;
    for i in 0..5 {
        db.store
            .create_repository(
                VS,
                &format!("r{i}.git"),
                "gitaly-1",
                1,
                &["gitaly-1", "gitaly-2", "gitaly-3"],
            )
            .await
            .unwrap();
    }
    // One far on, past an empty stretch of ids.
    sqlx::query("SELECT setval('repositories_repository_id_seq', 2500)")
        .execute(db.store.pool())
        .await
        .unwrap();
    db.store
        .create_repository(
            VS,
            "r5.git",
            "gitaly-1",
            1,
            &["gitaly-1", "gitaly-2", "gitaly-3"],
        )
        .await
        .unwrap();
    // An outdated replica is not due: the reconciler's, not verification's.
    sqlx::query(
        "UPDATE storage_repositories SET generation = 0
        WHERE relative_path = 'r4.git' AND storage = 'gitaly-3'",
    )
    .execute(db.store.pool())
    .await
    .unwrap();

    let mut cursor = VerificationCursor::default();
    let mut seen = Vec::new();
    let mut batches = 0;
    loop {
        let batch = db
            .store
            .replicas_due_for_verification(VS, &storages(), HOUR, 3, &mut cursor)
            .await
            .unwrap();
        batches += 1;
        // What is verified behind the cursor does not make it skip ahead.
        for replica in batch.iter().take(1) {
            db.store.record_verification(replica, "c").await.unwrap();
        }
        seen.extend(names(&batch));
        if cursor.at_start() {
            break;
        }
        assert!(batches < 10, "the pass does not end: {seen:?}");
    }
    let mut expected: Vec<(String, String)> = (0..6)
        .flat_map(|i| ["gitaly-2", "gitaly-3"].map(|s| (format!("r{i}.git"), s.to_owned())))
        .filter(|(r, s)| !(r == "r4.git" && s == "gitaly-3"))
        .collect();
    expected.sort();
    assert_eq!(seen, expected, "one pass, in (repository, storage) order");
    // Three full batches, and one with the last two that finds the end.
    assert_eq!(batches, 4);

    // The next pass starts over and offers only what was not verified.
    let batch = db
        .store
        .replicas_due_for_verification(VS, &storages(), HOUR, 100, &mut cursor)
        .await
        .unwrap();
    assert_eq!(batch.len(), 11 - 4);
    assert!(cursor.at_start());
}
