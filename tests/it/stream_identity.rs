//! A work stream has an identity: a `run` process follows a stream that is
//! deleted and created again under it, and nothing of the old stream (order
//! records, dead-letter ids) makes a job of the new one look old or done.

use crate::common::cluster::Cluster;
use crate::common::process::ReplicatorProcess;
use serde_json::json;
use std::time::{Duration, Instant};

const REPOSITORIES: usize = 10;

async fn replicas_at(pool: &sqlx::PgPool, vs: &str, generation: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM storage_repositories
         WHERE virtual_storage = $1 AND storage = 'gitaly-2' AND generation = $2",
    )
    .bind(vs)
    .bind(generation)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_process_follows_a_work_stream_created_again_and_skips_nothing_of_the_new_one() {
    let c = Cluster::start(2).await;
    let pool = sqlx::PgPool::connect(&c.db.url).await.unwrap();
    let paths: Vec<String> = (0..REPOSITORIES)
        .map(|i| format!("rebuilt-{i}.git"))
        .collect();
    for p in &paths {
        c.db.store
            .create_repository(c.vs(), p, "gitaly-1", 1, &["gitaly-1"])
            .await
            .unwrap();
    }
    let update = |path: &str| {
        c.job(json!({"change": "update", "relative_path": path, "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}))
    };
    let invalid = |path: &str| {
        // Valid JSON for the subject, but no source for an update: invalid,
        // so it goes to the dead letters at once.
        json!({"change": "update", "virtual_storage": c.vs(), "relative_path": path, "target_node_storage": "gitaly-2"})
    };
    let p = ReplicatorProcess::run(&c.toml);
    let subject = c
        .layout
        .consumer(c.vs(), "gitaly-2")
        .unwrap()
        .filter_subject
        .clone();
    let publish_raw = |payload: serde_json::Value| {
        let js = c.js.clone();
        let subject = subject.clone();
        async move {
            js.publish(subject, payload.to_string().into())
                .await
                .unwrap()
                .await
                .unwrap()
                .sequence
        }
    };
    // The old stream: an invalid job at sequence 1 (dead-lettered), then
    // an update per repository at 2..=11, which the new stream's updates
    // will have as well.
    assert_eq!(publish_raw(invalid("dead-old.git")).await, 1);
    let old_jobs: Vec<_> = paths.iter().map(|p| update(p)).collect();
    for r in c.publisher().publish_many(&old_jobs, 100).await {
        r.unwrap();
    }
    assert!(
        c.eventually(Duration::from_secs(30), || async {
            replicas_at(&pool, c.vs(), 1).await == REPOSITORIES as i64
                && c.work_messages().await == 0
                && c.dead_letters().await.len() == 1
        })
        .await,
        "the old stream's jobs did not settle"
    );
    let highest: i64 = sqlx::query_scalar(
        "SELECT max(sequence) FROM replication_order WHERE virtual_storage = $1",
    )
    .bind(c.vs())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(highest, REPOSITORIES as i64 + 1);

    // Rebuilt while the process runs: deleted, then made again by `setup`.
    c.js.delete_stream(&c.layout.stream).await.unwrap();
    let setup = ReplicatorProcess::spawn(&c.toml, &["setup"]);
    let (code, stderr) = setup.wait().await;
    assert_eq!(code, Some(0), "setup: {stderr}");
    for p in &paths {
        assert!(
            c.db.store
                .set_generation(c.vs(), p, "gitaly-1", 2)
                .await
                .unwrap()
        );
    }
    // The new stream's first job has the sequence of the old stream's dead
    // one, and is dead as well: it needs a dead letter of its own.
    assert_eq!(publish_raw(invalid("dead-new.git")).await, 1);
    let new_jobs: Vec<_> = paths.iter().map(|p| update(p)).collect();
    for r in c.publisher().publish_many(&new_jobs, 100).await {
        r.unwrap();
    }
    let published = Instant::now();
    let followed = c
        .eventually(Duration::from_secs(15), || async {
            replicas_at(&pool, c.vs(), 2).await == REPOSITORIES as i64
        })
        .await;
    assert!(
        followed,
        "{} of {REPOSITORIES} updates published after the rebuild took effect within 15 s",
        replicas_at(&pool, c.vs(), 2).await
    );
    println!(
        "every update of the new stream took effect {:?} after publishing",
        published.elapsed()
    );
    assert!(
        c.eventually(Duration::from_secs(15), || async {
            c.work_messages().await == 0 && c.dead_letters().await.len() == 2
        })
        .await,
        "the new stream's dead job has no dead letter of its own: {} dead letters, {} jobs left",
        c.dead_letters().await.len(),
        c.work_messages().await
    );
    let dead_paths: Vec<String> = c
        .dead_letters()
        .await
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap()["relative_path"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(dead_paths, ["dead-old.git", "dead-new.git"]);

    p.signal("TERM");
    let (code, stderr) = p.wait().await;
    assert_eq!(code, Some(0));
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let out_of_order = lines
        .iter()
        .filter(|l| {
            l["skipped"]
                .as_str()
                .is_some_and(|s| s.contains("published later"))
        })
        .count();
    assert_eq!(out_of_order, 0, "jobs skipped as out of order");
    assert!(
        lines.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("the work stream was created again"))),
        "the process did not say it followed the new stream"
    );
}
