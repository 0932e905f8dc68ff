//! Per-replica order: the state-changing jobs of one replica take effect in
//! publish order, whatever order they run in, fail in, or which process runs
//! them. Each pair of jobs is published back to back (a) into one batch,
//! (b) with the first job's first attempt failing, and (c) to two consumer
//! processes sharing the durable consumer; the final state is what the last
//! job asked for.

const WAIT: Duration = Duration::from_secs(20);
use crate::common::cluster::Cluster;
use serde_json::json;
use std::time::Duration;
use testkit::recording_gitaly::Behaviour;
use tonic::Code;

#[derive(Debug, Clone, Copy)]
enum Run {
    OneBatch,
    FirstAttemptFails,
    TwoProcesses,
}

const RUNS: [Run; 3] = [Run::OneBatch, Run::FirstAttemptFails, Run::TwoProcesses];

/// Replica rows of the target, as (relative path, generation).
async fn target_rows(c: &Cluster) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT relative_path, generation FROM storage_repositories
        WHERE virtual_storage = $1 AND storage = 'gitaly-2' ORDER BY relative_path",
    )
    .bind(c.vs())
    .fetch_all(c.db.store.pool())
    .await
    .unwrap()
}

/// Publishes `jobs` in order and runs them as `run` says, until the work
/// stream is empty; `first_method` is the RPC the first job calls.
async fn run_pair(c: &Cluster, run: Run, first_method: &str, jobs: [serde_json::Value; 2]) {
    if matches!(run, Run::FirstAttemptFails) {
        c.node(2).respond(
            first_method,
            Behaviour::fail(Code::Unavailable, "restarting").times(1),
        );
    }
    for j in jobs {
        c.publish(&c.job(j)).await;
    }
    let mut consumers = vec![c.consumer().await];
    if matches!(run, Run::TwoProcesses) {
        consumers.push(c.consumer().await);
    }
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await,
        "{run:?}: jobs left in the stream"
    );
    for consumer in consumers {
        consumer.stop().await.unwrap();
    }
    assert!(c.dead_letters().await.is_empty(), "{run:?}: dead letters");
}

/// r.git at generation 5 on the source and 3 on the target.
async fn seed_outdated_replica(c: &Cluster) {
    c.db.store
        .create_repository(c.vs(), "r.git", "gitaly-1", 5, &["gitaly-1"])
        .await
        .unwrap();
    c.db.store
        .set_generation(c.vs(), "r.git", "gitaly-2", 3)
        .await
        .unwrap();
}

/// The last of the target's calls that removed or replicated a repository.
fn last_remove_or_replicate(c: &Cluster) -> Option<&'static str> {
    c.node(2)
        .calls()
        .iter()
        .rev()
        .map(|call| call.method)
        .find(|m| matches!(*m, "RemoveRepository" | "ReplicateRepository"))
}

fn update(path: &str) -> serde_json::Value {
    json!({"change": "update", "relative_path": path, "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"})
}

fn delete_replica(path: &str) -> serde_json::Value {
    json!({"change": "delete_replica", "relative_path": path, "target_node_storage": "gitaly-2"})
}

#[tokio::test]
async fn delete_replica_then_update_leaves_the_replica_replicated() {
    for run in RUNS {
        let c = Cluster::start(2).await;
        seed_outdated_replica(&c).await;
        run_pair(
            &c,
            run,
            "RemoveRepository",
            [delete_replica("r.git"), update("r.git")],
        )
        .await;
        assert_eq!(target_rows(&c).await, [("r.git".to_owned(), 5)], "{run:?}");
        // On the target, the replication came after any removal.
        assert_eq!(
            last_remove_or_replicate(&c),
            Some("ReplicateRepository"),
            "{run:?}"
        );
    }
}

#[tokio::test]
async fn update_then_delete_replica_leaves_the_replica_gone() {
    for run in RUNS {
        let c = Cluster::start(2).await;
        seed_outdated_replica(&c).await;
        run_pair(
            &c,
            run,
            "ReplicateRepository",
            [update("r.git"), delete_replica("r.git")],
        )
        .await;
        assert_eq!(target_rows(&c).await, [], "{run:?}");
        assert_eq!(
            last_remove_or_replicate(&c),
            Some("RemoveRepository"),
            "{run:?}"
        );
    }
}

#[tokio::test]
async fn rename_then_update_of_the_new_path_leaves_only_the_new_path() {
    for run in RUNS {
        let c = Cluster::start(2).await;
        // The primary renamed p.git to q.git already; gitaly-2 still has p.git.
        c.db.store
            .create_repository(c.vs(), "q.git", "gitaly-1", 5, &["gitaly-1"])
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO storage_repositories
                (repository_id, virtual_storage, relative_path, storage, generation)
            SELECT repository_id, virtual_storage, 'p.git', 'gitaly-2', 5 FROM repositories
            WHERE virtual_storage = $1 AND relative_path = 'q.git'",
        )
        .bind(c.vs())
        .execute(c.db.store.pool())
        .await
        .unwrap();
        let rename = json!({"change": "rename", "relative_path": "p.git", "target_node_storage": "gitaly-2", "params": {"new_relative_path": "q.git"}});
        run_pair(&c, run, "RenameRepository", [rename, update("q.git")]).await;
        assert_eq!(target_rows(&c).await, [("q.git".to_owned(), 5)], "{run:?}");
        // p.git left the target: renamed away, or removed once q.git was
        // replicated by the later job.
        let calls = c.node(2).calls();
        let last_on_p = calls
            .iter()
            .rev()
            .find(|call| call.relative_path == "p.git")
            .map(|call| call.method);
        assert!(
            matches!(last_on_p, Some("RenameRepository" | "RemoveRepository")),
            "{run:?}: {last_on_p:?}"
        );
    }
}

/// Praefect's delete and re-create of `path`: the repository's rows go
/// (replicas with it), and a new repository with a new id starts on the
/// primary at generation 0. Returns the old id and the new one.
async fn delete_and_recreate(c: &Cluster, path: &str) -> (i64, i64) {
    let old =
        c.db.store
            .create_repository(c.vs(), path, "gitaly-1", 5, &["gitaly-1", "gitaly-2"])
            .await
            .unwrap();
    sqlx::query("DELETE FROM repositories WHERE repository_id = $1")
        .bind(old)
        .execute(c.db.store.pool())
        .await
        .unwrap();
    let new =
        c.db.store
            .create_repository(c.vs(), path, "gitaly-1", 0, &["gitaly-1"])
            .await
            .unwrap();
    assert_ne!(old, new);
    (old, new)
}

#[tokio::test]
async fn delete_then_update_after_the_repository_is_recreated_leaves_the_new_replica() {
    for run in RUNS {
        let c = Cluster::start(2).await;
        let (old, new) = delete_and_recreate(&c, "r.git").await;
        let mut delete = json!({"change": "delete", "relative_path": "r.git", "target_node_storage": "gitaly-2"});
        delete["repository_id"] = old.into();
        let mut update = update("r.git");
        update["repository_id"] = new.into();
        run_pair(&c, run, "RemoveRepository", [delete, update]).await;
        assert_eq!(
            c.db.repository_id(c.vs(), "r.git").await,
            Some(new),
            "{run:?}"
        );
        assert_eq!(target_rows(&c).await, [("r.git".to_owned(), 0)], "{run:?}");
        assert_eq!(
            last_remove_or_replicate(&c),
            Some("ReplicateRepository"),
            "{run:?}"
        );
    }
}

#[tokio::test]
async fn jobs_for_a_repository_since_recreated_at_their_path_change_nothing() {
    let c = Cluster::start(2).await;
    let (old, new) = delete_and_recreate(&c, "s.git").await;
    c.db.store
        .set_generation(c.vs(), "s.git", "gitaly-2", 0)
        .await
        .unwrap();
    for change in ["delete", "delete_replica", "update"] {
        let mut job =
            json!({"change": change, "relative_path": "s.git", "target_node_storage": "gitaly-2"});
        if change == "update" {
            job["source_node_storage"] = "gitaly-1".into();
        }
        job["repository_id"] = old.into();
        c.publish(&c.job(job)).await;
    }
    let consumer = c.consumer().await;
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    consumer.stop().await.unwrap();
    assert!(c.dead_letters().await.is_empty());
    // The new repository is untouched, on disk and in Postgres.
    let methods: Vec<_> = c.node(2).calls().iter().map(|call| call.method).collect();
    assert!(methods.is_empty(), "calls made: {methods:?}");
    assert_eq!(c.db.repository_id(c.vs(), "s.git").await, Some(new));
    assert_eq!(target_rows(&c).await, [("s.git".to_owned(), 0)]);
}

#[tokio::test]
async fn a_job_older_than_one_applied_is_superseded_without_a_call() {
    let c = Cluster::start(2).await;
    c.db.store
        .create_repository(c.vs(), "o.git", "gitaly-1", 5, &["gitaly-1"])
        .await
        .unwrap();
    // The delete fails until the update has run and completed.
    c.node(2).respond(
        "RemoveRepository",
        Behaviour::fail(Code::Unavailable, "restarting").times(1),
    );
    c.publish(&c.job(delete_replica("o.git"))).await;
    c.publish(&c.job(update("o.git"))).await;
    let consumer = c.consumer().await;
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    consumer.stop().await.unwrap();
    assert_eq!(target_rows(&c).await, [("o.git".to_owned(), 5)]);
    // The retried delete was superseded: its only call was the failed one,
    // unless it happened to run before the update.
    let removes = c.node(2).calls_to("RemoveRepository");
    let replicate = c.node(2).calls_to("ReplicateRepository");
    assert_eq!(replicate.len(), 1);
    assert!(
        removes
            .iter()
            .all(|r| r.received_at < replicate[0].received_at),
        "a removal ran after the replication"
    );
}

/// The backend holding a repository lock in the test's database, once one
/// does (one job at a time holds one here). Read from the lock sessions'
/// registry, which lists each session's repository keys before a job runs
/// under them: any other advisory lock of the database (a leadership lock)
/// is held by another backend, and killing that one interrupts no job.
async fn lock_holder_pid(c: &Cluster) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT s.pid FROM replication_lock_sessions s
        JOIN pg_locks l ON l.pid = s.pid AND l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                       AND ((l.classid::int8 << 32) | l.objid::int8) = ANY(s.keys)",
    )
    .fetch_optional(c.db.store.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn a_killed_lock_connection_never_lets_two_processes_call_gitaly_for_one_replica() {
    // One job per fetch, so the two processes each take one.
    let c = Cluster::start_with(2, |t| *t = t.replace("batch_size = 10", "batch_size = 1")).await;
    seed_outdated_replica(&c).await;
    for method in ["ReplicateRepository", "GarbageCollect"] {
        c.node(2)
            .respond(method, Behaviour::delay(Duration::from_millis(1500)));
    }
    let x = c.consumer().await;
    let y = c.consumer().await;
    // The update takes the lock first: its write is fenced however late its
    // process learns that its session is gone, so it must run again. (A
    // `gc` that took the lock first could finish before its process noticed
    // and, writing nothing, be done with one call.)
    c.publish(&c.job(update("r.git"))).await;
    assert!(c.node(2).wait_for_calls(1, WAIT).await);
    c.publish(&c.job(json!({"change": "gc", "relative_path": "r.git", "target_node_storage": "gitaly-2", "params": {"create_bitmap": false, "prune": false}}))).await;
    // The other process has the gc and waits for the lock; kill the session
    // of the update, in its Gitaly call.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = lock_holder_pid(&c)
        .await
        .expect("the running job holds the repository lock");
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(c.db.store.pool())
        .await
        .unwrap();
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    x.stop().await.unwrap();
    y.stop().await.unwrap();
    assert_eq!(c.node(2).max_overlap(), 1, "two Gitaly calls overlapped");
    // The interrupted update ran again: three calls for two jobs.
    assert_eq!(c.node(2).calls().len(), 3);
    assert_eq!(c.node(2).calls_to("ReplicateRepository").len(), 2);
    assert_eq!(target_rows(&c).await, [("r.git".to_owned(), 5)]);
    assert!(c.dead_letters().await.is_empty());
}

/// Order records of this test's virtual storage.
async fn order_records(c: &Cluster) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM replication_order WHERE virtual_storage = $1")
        .bind(c.vs())
        .fetch_one(c.db.store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn order_records_go_once_no_queued_or_dead_job_can_be_older() {
    let c = Cluster::start(2).await;
    c.db.store
        .create_repository(c.vs(), "life.git", "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();
    // A dead update of another replica holds its place: records from it
    // on stay while it may be replayed.
    c.node(2).respond(
        "ReplicateRepository",
        Behaviour::fail(Code::Unavailable, "down for now").times(1),
    );
    c.db.store
        .create_repository(c.vs(), "held.git", "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();
    // Pruning passes every second.
    let consumer = c
        .consumer_with(|config| {
            config.replication.completion_retention = Duration::from_secs(4);
            config.replication.attempts = 1;
        })
        .await;
    c.publish(&c.job(json!({"change": "update", "relative_path": "held.git", "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"})))
        .await;
    assert!(
        c.eventually(WAIT, || async { c.dead_letters().await.len() == 1 })
            .await
    );
    // A repository's life on the target: created, updated, renamed, deleted.
    let life = [
        json!({"change": "create", "relative_path": "life.git", "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}),
        json!({"change": "update", "relative_path": "life.git", "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}),
        json!({"change": "rename", "relative_path": "life.git", "target_node_storage": "gitaly-2", "params": {"new_relative_path": "moved.git"}}),
        json!({"change": "delete", "relative_path": "moved.git", "target_node_storage": "gitaly-2"}),
    ];
    for j in life {
        c.publish(&c.job(j)).await;
        assert!(
            c.eventually(WAIT, || async { c.work_messages().await == 0 })
                .await
        );
    }
    assert_eq!(c.node(2).calls_to("RemoveRepository").len(), 1);
    // The records of the life are all later than the dead job: they stay.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        order_records(&c).await,
        2,
        "the records later than a dead job that may be replayed went"
    );
    // Once the dead job is gone, nothing can be older than them: they go.
    gitaly_replicator::dead_letters::purge_all(&c.js, &c.layout)
        .await
        .unwrap();
    assert!(
        c.eventually(WAIT, || async { order_records(&c).await == 0 })
            .await,
        "{} order records left after the repository's life",
        order_records(&c).await
    );
    consumer.stop().await.unwrap();
}
