//! Waiting is not failing: jobs whose source is down wait without using
//! attempts, without filling their consumer's ack-pending window, and
//! without a log line per retry.

use crate::common::cluster::Cluster;
use crate::common::nats_server::PrivateNats;
use crate::common::process::ReplicatorProcess;
use serde_json::json;
use std::time::{Duration, Instant};

/// Replicas of `prefix*` on `storage` at generation 1.
async fn replicated(pool: &sqlx::PgPool, vs: &str, prefix: &str, storage: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM storage_repositories
         WHERE virtual_storage = $1 AND storage = $2 AND generation = 1
           AND starts_with(relative_path, $3)",
    )
    .bind(vs)
    .bind(storage)
    .bind(prefix)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_waiting_for_a_source_that_is_down_neither_hold_up_their_target_nor_die() {
    const WAITING: i64 = 250;
    const FLOWING: i64 = 20;
    let nats = PrivateNats::start().await;
    let c = Cluster::start_on(3, nats.url(), |toml| {
        *toml = toml.replacen("\n[nats]\n", "\n[nats]\nmax_ack_pending = 100\n", 1);
    })
    .await;
    let pool = sqlx::PgPool::connect(&c.db.url).await.unwrap();
    // gitaly-1 is down and alone holds the waiting jobs' generation;
    // gitaly-3 is healthy and holds the others'.
    c.node(1).set_serving(false);
    for i in 0..WAITING {
        let path = format!("wait-{i}.git");
        c.db.store
            .create_repository(c.vs(), &path, "gitaly-1", 1, &["gitaly-1"])
            .await
            .unwrap();
    }
    for i in 0..FLOWING {
        let path = format!("flow-{i}.git");
        c.db.store
            .create_repository(c.vs(), &path, "gitaly-3", 1, &["gitaly-3"])
            .await
            .unwrap();
    }
    let update = |path: String, source: &str| {
        c.job(json!({"change": "update", "relative_path": path, "target_node_storage": "gitaly-2", "source_node_storage": source}))
    };
    let p = ReplicatorProcess::run(&c.toml);
    // A source not checked yet is tried (the call would find it down), so
    // the jobs come once the process has seen gitaly-1 unhealthy.
    let seen_down = || {
        p.stderr
            .lock()
            .unwrap()
            .lines()
            .any(|l| l.contains("storage node is unhealthy") && l.contains("gitaly-1"))
    };
    assert!(
        c.eventually(Duration::from_secs(15), || async { seen_down() })
            .await,
        "the process never saw gitaly-1 unhealthy"
    );
    let waiting: Vec<_> = (0..WAITING)
        .map(|i| update(format!("wait-{i}.git"), "gitaly-1"))
        .collect();
    for r in c.publisher().publish_many(&waiting, 100).await {
        r.unwrap();
    }
    let flowing: Vec<_> = (0..FLOWING)
        .map(|i| update(format!("flow-{i}.git"), "gitaly-3"))
        .collect();
    for r in c.publisher().publish_many(&flowing, 100).await {
        r.unwrap();
    }
    let published = Instant::now();
    let flowed = c
        .eventually(Duration::from_secs(15), || async {
            replicated(&pool, c.vs(), "flow-", "gitaly-2").await == FLOWING
        })
        .await;
    assert!(
        flowed,
        "{} of {FLOWING} jobs from a healthy source took effect within 15 s while other jobs of their target waited",
        replicated(&pool, c.vs(), "flow-", "gitaly-2").await
    );
    println!(
        "the {FLOWING} flowing jobs took effect {:?} after publishing",
        published.elapsed()
    );
    assert_eq!(replicated(&pool, c.vs(), "wait-", "gitaly-2").await, 0);
    // Waiting a while longer uses no attempts either.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(c.dead_letters().await.is_empty(), "a waiting job died");

    c.node(1).set_serving(true);
    let back = Instant::now();
    let all = c
        .eventually(Duration::from_secs(120), || async {
            replicated(&pool, c.vs(), "wait-", "gitaly-2").await == WAITING
        })
        .await;
    assert!(
        all,
        "{} of {WAITING} waiting jobs took effect after their source came back",
        replicated(&pool, c.vs(), "wait-", "gitaly-2").await
    );
    println!(
        "the {WAITING} waiting jobs took effect {:?} after their source came back",
        back.elapsed()
    );
    assert!(
        c.eventually(Duration::from_secs(30), || async {
            c.work_messages().await == 0
        })
        .await
    );
    assert!(c.dead_letters().await.is_empty());
    p.signal("TERM");
    let (code, stderr) = p.wait().await;
    assert_eq!(code, Some(0));
    // Log lines by message; a job's retries while it waits log nothing.
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let paths_of = |prefix: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l["message"].as_str().unwrap_or("").starts_with(prefix))
            .map(|l| l["relative_path"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    let started = paths_of("started waiting");
    let stopped = paths_of("stopped waiting");
    let tries = paths_of("replication job processing started");
    let from_the_wait = started.len() + stopped.len() + tries.len();
    println!(
        "{from_the_wait} log lines from the wait: {} started waiting, {} stopped, {} processing started",
        started.len(),
        stopped.len(),
        tries.len()
    );
    assert!(
        from_the_wait < 1000,
        "{from_the_wait} log lines from the wait"
    );
    assert_eq!(
        started.len(),
        stopped.len(),
        "every wait that started ended"
    );
    let mut twice = 0;
    for i in 0..WAITING {
        let path = format!("wait-{i}.git");
        let count = |seen: &[String]| seen.iter().filter(|p| **p == path).count();
        assert!(
            count(&started) >= 1,
            "{path}: no line when it started waiting"
        );
        assert!(
            count(&stopped) >= 1,
            "{path}: no line when it stopped waiting"
        );
        twice += usize::from(count(&started) > 1);
    }
    println!("{twice} of {WAITING} jobs logged more than one wait");
}
