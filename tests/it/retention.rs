//! `run` prunes the completion records of maintenance-job dedup: those past
//! `[replication] completion_retention`, and those of repositories the store
//! no longer has.

use crate::common::cluster::Cluster;
use std::time::Duration;

/// (relative path, change type) of every completion record, sorted.
async fn records(c: &Cluster) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT relative_path, change_type FROM replication_completions
        ORDER BY relative_path COLLATE \"C\", change_type",
    )
    .fetch_all(c.db.store.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn run_prunes_completion_records_past_their_retention_and_of_gone_repositories() {
    let c = Cluster::start_with(2, |t| {
        *t = t.replace(
            "[replication]\n",
            "[replication]\ncompletion_retention = \"3h\"\n",
        );
    })
    .await;
    c.db.store
        .create_repository(c.vs(), "kept.git", "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();
    for (path, change, minutes_ago) in [
        ("kept.git", "gc", 120),
        ("kept.git", "cleanup", 240),
        ("gone.git", "gc", 120),
        ("gone.git", "cleanup", 10),
    ] {
        sqlx::query(
            "INSERT INTO replication_completions
                (virtual_storage, relative_path, target_storage, change_type, started_at)
            VALUES ($1, $2, 'gitaly-2', $3, now() - make_interval(mins => $4))",
        )
        .bind(c.vs())
        .bind(path)
        .bind(change)
        .bind(minutes_ago)
        .execute(c.db.store.pool())
        .await
        .unwrap();
    }
    let pair = |p: &str, ch: &str| (p.to_owned(), ch.to_owned());
    // Past the retention, or of a repository gone for more than an hour.
    let expected = [pair("gone.git", "cleanup"), pair("kept.git", "gc")];

    let consumer = c.consumer().await;
    assert!(
        c.eventually(Duration::from_secs(15), || async {
            records(&c).await == expected
        })
        .await,
        "{:?}",
        records(&c).await
    );
    consumer.stop().await.unwrap();
    assert_eq!(records(&c).await, expected);
}
