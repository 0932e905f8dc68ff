//! Praefect's replication_queue, captured: events Praefect writes with its
//! own Enqueue statement are published, replicated and settled here, while
//! Praefect's own Dequeue finds nothing; release hands the unsettled ones
//! back.

use crate::cli::{all, cli, stdout};
use crate::common::cluster::Cluster;
use crate::common::process::ReplicatorProcess;
use serde_json::json;
use sqlx::Row;
use std::time::Duration;
use testkit::praefect_queue::{
    DEQUEUE, ENQUEUE_V14, QUEUE_TABLES, RECONCILER_INSERT, VALID_PRIMARIES,
};
use testkit::recording_gitaly::Behaviour;

/// Runs Praefect's Enqueue for `job`; answers the event's id and state.
pub(crate) async fn enqueue(pool: &sqlx::PgPool, job: &serde_json::Value) -> (i64, String) {
    let row = sqlx::query(ENQUEUE_V14)
        .bind(job["virtual_storage"].as_str().unwrap())
        .bind(job["target_node_storage"].as_str().unwrap())
        .bind(job["relative_path"].as_str().unwrap())
        .bind(job.to_string())
        .bind(json!({"correlation_id": "capture-test"}).to_string())
        .fetch_one(pool)
        .await
        .unwrap();
    (row.get("id"), row.get("state"))
}

/// Praefect's `valid_primaries` view over our database, with `storages`
/// healthy (as Praefect's health checks would record them).
pub(crate) async fn install_valid_primaries(pool: &sqlx::PgPool, vs: &str, storages: &[&str]) {
    let rows: Vec<String> = storages
        .iter()
        .map(|s| format!("('{vs}', '{s}')"))
        .collect();
    let healthy = format!(
        "CREATE VIEW healthy_storages AS SELECT * FROM (VALUES {}) AS h (virtual_storage, storage)",
        rows.join(", ")
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(healthy))
        .execute(pool)
        .await
        .unwrap();
    sqlx::raw_sql(VALID_PRIMARIES).execute(pool).await.unwrap();
}

/// The storages Praefect's `valid_primaries` allows as the repository's
/// primary, by name.
pub(crate) async fn valid_primaries(pool: &sqlx::PgPool, repository_id: i64) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT storage FROM valid_primaries WHERE repository_id = $1 ORDER BY storage",
    )
    .bind(repository_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The ids of the events Praefect's own Dequeue hands its worker for
/// `target`.
pub(crate) async fn praefect_dequeues(pool: &sqlx::PgPool, vs: &str, target: &str) -> Vec<i64> {
    let mut tx = pool.begin().await.unwrap();
    let rows = sqlx::query(DEQUEUE)
        .bind(vs)
        .bind(target)
        .bind(100_i64)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    // Looked at, not taken.
    tx.rollback().await.unwrap();
    rows.iter().map(|r| r.get("id")).collect()
}

/// Praefect's rows: id and state, by id.
pub(crate) async fn queue_rows(pool: &sqlx::PgPool) -> Vec<(i64, String)> {
    sqlx::query_as("SELECT id, state::text FROM replication_queue ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Praefect's queue tables in the database at `pool`, captured by the
/// CLI; answers a pool of its own.
pub(crate) async fn captured_queue(pool: &sqlx::PgPool, toml: &str) -> sqlx::PgPool {
    sqlx::raw_sql(QUEUE_TABLES).execute(pool).await.unwrap();
    let o = cli(toml, &["praefect-queue", "capture"], None);
    assert!(o.status.success(), "{}", all(&o));
    pool.clone()
}

/// Releases the capture by the CLI, which must say it handed `n` events
/// back.
pub(crate) fn release_hands_back(toml: &str, n: usize) {
    let o = cli(toml, &["praefect-queue", "release"], None);
    assert!(o.status.success(), "{}", all(&o));
    assert!(
        stdout(&o).contains(&format!("{n} unsettled event(s) handed back")),
        "{}",
        all(&o)
    );
}

/// A short lock lease: a killed process's repositories are granted again
/// sooner.
fn short_lease(toml: &mut String) {
    *toml = toml.replacen(
        "\n[replication]\n",
        "\n[replication]\nlock_lease = \"3s\"\n",
        1,
    );
}

/// Runs a second `run` process until Praefect's rows are all settled
/// (after the first was killed), then stops it.
pub(crate) async fn a_second_process_settles_every_row(pool: &sqlx::PgPool, toml: &str) {
    let second = ReplicatorProcess::run(toml);
    let settled = crate::common::eventually(Duration::from_secs(60), || async {
        queue_rows(pool).await.is_empty()
    })
    .await;
    assert!(
        settled,
        "{} of Praefect's rows left; second process:\n{}",
        queue_rows(pool).await.len(),
        second.stderr.lock().unwrap()
    );
    second.signal("TERM");
    let _ = second.wait().await;
}

#[tokio::test]
async fn captured_events_replicate_and_settle_praefects_rows_and_release_hands_back_the_rest() {
    let c = Cluster::start(2).await;
    let pool = captured_queue(c.db.store.pool(), &c.toml).await;
    let update = |path: &str| {
        json!({"change": "update", "virtual_storage": c.vs(), "relative_path": path,
               "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1",
               "repository_id": 0, "replica_path": path, "params": null})
    };
    let paths: Vec<String> = (0..5).map(|i| format!("captured-{i}.git")).collect();
    for p in &paths {
        c.db.store
            .create_repository(c.vs(), p, "gitaly-1", 1, &["gitaly-1"])
            .await
            .unwrap();
    }
    // Praefect's inserts return their row, pending in Praefect's eyes.
    for p in &paths {
        let (_, state) = enqueue(&pool, &update(p)).await;
        assert_eq!(state, "in_progress");
    }
    // An update without a source is invalid: dead-lettered.
    let mut invalid = update("captured-invalid.git");
    invalid
        .as_object_mut()
        .unwrap()
        .remove("source_node_storage");
    let (dead_id, _) = enqueue(&pool, &invalid).await;
    assert!(
        praefect_dequeues(&pool, c.vs(), "gitaly-2")
            .await
            .is_empty()
    );

    let consumer = c.consumer().await;
    let settled = c
        .eventually(Duration::from_secs(20), || async {
            queue_rows(&pool).await == vec![(dead_id, "dead".to_owned())]
        })
        .await;
    assert!(settled, "Praefect's rows: {:?}", queue_rows(&pool).await);
    for p in &paths {
        assert_eq!(
            c.db.store.generation(c.vs(), p, "gitaly-2").await.unwrap(),
            Some(1),
            "{p} not replicated"
        );
    }
    assert_eq!(c.dead_letters().await.len(), 1);
    consumer.stop().await.unwrap();

    // Nothing runs now: the next events stay captured, and release hands
    // exactly those back to Praefect.
    let mut waiting = Vec::new();
    for p in &paths[..3] {
        waiting.push(enqueue(&pool, &update(p)).await.0);
    }
    let o = cli(&c.toml, &["praefect-queue", "status"], None);
    assert!(
        stdout(&o).contains("capture installed; 3 event(s) not yet published"),
        "{}",
        all(&o)
    );
    release_hands_back(&c.toml, 3);
    let mut expected: Vec<(i64, String)> =
        waiting.iter().map(|id| (*id, "ready".to_owned())).collect();
    expected.insert(0, (dead_id, "dead".to_owned()));
    assert_eq!(queue_rows(&pool).await, expected);
    assert_eq!(praefect_dequeues(&pool, c.vs(), "gitaly-2").await, waiting);
    // Released: Praefect's next insert is its own.
    let (_, state) = enqueue(&pool, &update("after-release.git")).await;
    assert_eq!(state, "ready");
}

#[tokio::test]
async fn with_praefect_15s_unique_jobs_an_identical_event_while_the_first_is_captured_still_inserts()
 {
    let c = Cluster::start(2).await;
    let pool = captured_queue(c.db.store.pool(), &c.toml).await;
    sqlx::raw_sql(testkit::praefect_queue::QUEUE_UNIQUE_V15)
        .execute(&pool)
        .await
        .unwrap();
    c.db.store
        .create_repository(c.vs(), "twice.git", "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();
    let job = json!({"change": "update", "virtual_storage": c.vs(), "relative_path": "twice.git",
                     "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1",
                     "repository_id": 0, "replica_path": "twice.git", "params": null});
    // Both pending at once: without the capture's mark the second would
    // break (job, state) uniqueness and Praefect's insert would fail.
    let (first, _) = enqueue(&pool, &job).await;
    let (second, state) = enqueue(&pool, &job).await;
    assert_ne!(first, second);
    assert_eq!(state, "in_progress");
    let consumer = c.consumer().await;
    assert!(
        c.eventually(Duration::from_secs(20), || async {
            queue_rows(&pool).await.is_empty()
        })
        .await,
        "Praefect's rows: {:?}",
        queue_rows(&pool).await
    );
    assert_eq!(
        c.db.store
            .generation(c.vs(), "twice.git", "gitaly-2")
            .await
            .unwrap(),
        Some(1)
    );
    assert!(c.dead_letters().await.is_empty());
    consumer.stop().await.unwrap();
}

/// Praefect's `valid_primaries` (its own view) leaves out a storage whose
/// captured `delete_replica` is pending, as for its own jobs; once the job
/// is done here, Praefect's row is gone and so is the replica.
#[tokio::test]
async fn a_captured_delete_replica_keeps_its_storage_out_of_valid_primaries_until_done() {
    let c = Cluster::start(2).await;
    let pool = captured_queue(c.db.store.pool(), &c.toml).await;
    install_valid_primaries(&pool, c.vs(), &["gitaly-1", "gitaly-2"]).await;
    let path = "leaving.git";
    let id =
        c.db.store
            .create_repository(c.vs(), path, "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
            .await
            .unwrap();
    let primaries = || valid_primaries(&pool, id);
    assert_eq!(primaries().await, ["gitaly-1", "gitaly-2"]);

    let delete = json!({"change": "delete_replica", "virtual_storage": c.vs(),
        "relative_path": path, "target_node_storage": "gitaly-2", "source_node_storage": "",
        "repository_id": id, "replica_path": path, "params": null});
    let (_, state) = enqueue(&pool, &delete).await;
    assert_eq!(state, "in_progress");
    assert_eq!(
        primaries().await,
        ["gitaly-1"],
        "a pending delete_replica's storage"
    );

    let consumer = c.consumer().await;
    let done = c
        .eventually(Duration::from_secs(20), || async {
            queue_rows(&pool).await.is_empty()
        })
        .await;
    consumer.stop().await.unwrap();
    assert!(done, "Praefect's rows: {:?}", queue_rows(&pool).await);
    assert_eq!(
        c.db.store
            .generation(c.vs(), path, "gitaly-2")
            .await
            .unwrap(),
        None
    );
    assert_eq!(primaries().await, ["gitaly-1"]);
}

/// Events Praefect's reconciler inserts (its own `INSERT … SELECT
/// to_jsonb(…)` in a CTE, `RETURNING` what it scheduled) are captured like
/// the coordinator's: the statement returns them, Praefect's Dequeue finds
/// nothing, and they replicate and settle here.
#[tokio::test]
async fn events_praefects_reconciler_inserts_are_captured_and_replicate() {
    let c = Cluster::start(3).await;
    let pool = captured_queue(c.db.store.pool(), &c.toml).await;
    let path = "reconciled.git";
    c.db.store
        .create_repository(c.vs(), path, "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();
    let vs = c.vs().to_owned();
    let scheduled = sqlx::query(RECONCILER_INSERT)
        .bind(vec![vs.clone(), vs.clone()])
        .bind(vec![path.to_owned(), path.to_owned()])
        .bind(vec![
            Some("gitaly-1".to_owned()),
            Some("gitaly-1".to_owned()),
        ])
        .bind(vec!["gitaly-2".to_owned(), "gitaly-3".to_owned()])
        .bind(vec!["update".to_owned(), "update".to_owned()])
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        scheduled.len(),
        2,
        "the reconciler's RETURNING still returns its rows"
    );
    let states: Vec<String> = sqlx::query_scalar("SELECT state::text FROM replication_queue")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(states, ["in_progress", "in_progress"]);
    assert!(
        praefect_dequeues(&pool, c.vs(), "gitaly-2")
            .await
            .is_empty()
    );

    let consumer = c.consumer().await;
    let settled = c
        .eventually(Duration::from_secs(20), || async {
            queue_rows(&pool).await.is_empty()
        })
        .await;
    consumer.stop().await.unwrap();
    assert!(settled, "Praefect's rows: {:?}", queue_rows(&pool).await);
    for target in ["gitaly-2", "gitaly-3"] {
        assert_eq!(
            c.db.store.generation(c.vs(), path, target).await.unwrap(),
            Some(1),
            "{target}"
        );
    }
}

/// The capturing process is SIGKILLed while Praefect keeps inserting: a
/// second process takes the capture over, every event is published and
/// settled, and none runs more often than a kill mid-call explains.
#[tokio::test]
async fn a_capturing_process_killed_mid_stream_is_taken_over_and_no_event_is_lost() {
    const EVENTS: usize = 120;
    // A short lease: the killed process's repositories are taken sooner.
    let c = Cluster::start_with(2, |toml| {
        short_lease(toml);
    })
    .await;
    let pool = captured_queue(c.db.store.pool(), &c.toml).await;
    let paths: Vec<String> = (0..EVENTS).map(|i| format!("taken-over-{i}.git")).collect();
    for p in &paths {
        c.db.store
            .create_repository(c.vs(), p, "gitaly-1", 1, &["gitaly-1"])
            .await
            .unwrap();
    }
    c.node(2).respond(
        "ReplicateRepository",
        Behaviour::delay(Duration::from_millis(30)),
    );
    let update = |path: &str| {
        json!({"change": "update", "virtual_storage": c.vs(), "relative_path": path,
               "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1",
               "repository_id": 0, "replica_path": path, "params": null})
    };
    let calls = || c.node(2).calls_to("ReplicateRepository");

    let first = ReplicatorProcess::run(&c.toml);
    for p in &paths[..EVENTS / 2] {
        enqueue(&pool, &update(p)).await;
    }
    assert!(
        c.eventually(Duration::from_secs(30), || async { calls().len() >= 10 })
            .await,
        "the first process never replicated"
    );
    first.signal("KILL");
    assert_eq!(first.wait().await.0, None, "killed by a signal");
    let called_before_kill: std::collections::HashSet<String> =
        calls().into_iter().map(|c| c.relative_path).collect();
    // Praefect goes on inserting while no process runs.
    for p in &paths[EVENTS / 2..] {
        enqueue(&pool, &update(p)).await;
    }
    a_second_process_settles_every_row(&pool, &c.toml).await;
    for p in &paths {
        assert_eq!(
            c.db.store.generation(c.vs(), p, "gitaly-2").await.unwrap(),
            Some(1),
            "{p}"
        );
    }
    // Each event went into the work stream once: a republication after the
    // kill carried the same message id and was dropped as a duplicate.
    let mut stream = c.js.get_stream(&c.layout.stream).await.unwrap();
    let stored = stream.info().await.unwrap().state.last_sequence;
    assert_eq!(stored, EVENTS as u64, "messages stored in the work stream");
    // A second call only for a job whose first call the kill cut short.
    let mut per_path: std::collections::HashMap<String, usize> = Default::default();
    for call in calls() {
        *per_path.entry(call.relative_path).or_default() += 1;
    }
    assert_eq!(per_path.len(), EVENTS);
    for (path, n) in &per_path {
        assert!(
            *n == 1 || (*n == 2 && called_before_kill.contains(path)),
            "{path} called {n} times"
        );
    }
}

/// Notifications on the capture's channel that arrived by now.
async fn notifications(listener: &mut sqlx::postgres::PgListener) -> usize {
    let mut n = 0;
    while let Ok(Ok(Some(_))) =
        tokio::time::timeout(Duration::from_millis(50), listener.try_recv()).await
    {
        n += 1;
    }
    n
}

async fn unpublished(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM replication_captured_events WHERE published_at IS NULL",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn while_events_keep_coming_praefects_inserts_send_no_notification_and_an_idle_publisher_is_woken_by_one()
 {
    // Postgres commits notifying transactions one at a time: a notification
    // per insert held Praefect's Enqueue to a fifth of its rate.
    const BURST: usize = 300;
    let c = Cluster::start(2).await;
    let pool = captured_queue(c.db.store.pool(), &c.toml).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener
        // The capture trigger's channel.
        .listen("replication_captured_events")
        .await
        .unwrap();
    let optimize = |i: usize| {
        json!({"change": "optimize_repository", "virtual_storage": c.vs(),
               "relative_path": format!("burst-{i}.git"), "target_node_storage": "gitaly-2",
               "source_node_storage": "", "repository_id": 0, "params": null})
    };
    let consumer = c.consumer().await;
    // An idle publisher is woken by the first insert's notification.
    enqueue(&pool, &optimize(0)).await;
    assert!(
        c.eventually(Duration::from_secs(5), || async {
            unpublished(&pool).await == 0
        })
        .await
    );
    assert_eq!(notifications(&mut listener).await, 1);
    // Events every 2 ms keep it publishing: the trigger stops notifying.
    for i in 1..=BURST {
        enqueue(&pool, &optimize(i)).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let sent = notifications(&mut listener).await;
    assert!(
        sent <= 5,
        "{sent} notifications for {BURST} inserts while the publisher polled"
    );
    assert!(
        c.eventually(Duration::from_secs(10), || async {
            unpublished(&pool).await == 0
        })
        .await,
        "captured events left unpublished"
    );
    // Idle again after a quiet second: the next insert notifies.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = notifications(&mut listener).await;
    enqueue(&pool, &optimize(BURST + 1)).await;
    assert_eq!(notifications(&mut listener).await, 1);
    assert!(
        c.eventually(Duration::from_secs(5), || async {
            unpublished(&pool).await == 0
        })
        .await
    );
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn a_captured_job_stranded_at_max_deliver_leaves_praefects_row_dead() {
    // A short ack wait, the server giving up after three deliveries, and a
    // short lease so a killed process's repository comes back soon.
    let c = Cluster::start_with(2, |toml| {
        *toml = toml
            .replace("ack_wait = \"5s\"", "ack_wait = \"1s\"")
            .replacen("\n[nats]\n", "\n[nats]\nmax_deliver = 3\n", 1);
        short_lease(toml);
    })
    .await;
    let pool = captured_queue(c.db.store.pool(), &c.toml).await;
    // Every call hangs: each process that takes the job dies during it.
    c.node(2).respond(
        "OptimizeRepository",
        Behaviour::delay(Duration::from_secs(120)),
    );
    let (event, _) = enqueue(
        &pool,
        &json!({"change": "optimize_repository", "virtual_storage": c.vs(),
                "relative_path": "stranded.git", "target_node_storage": "gitaly-2",
                "source_node_storage": "", "repository_id": 0, "params": null}),
    )
    .await;
    for delivery in 1..=3 {
        let p = ReplicatorProcess::run(&c.toml);
        assert!(
            c.eventually(Duration::from_secs(30), || async {
                c.node(2).call_count() >= delivery
            })
            .await,
            "delivery {delivery} never reached the node"
        );
        p.signal("KILL");
        assert_eq!(p.wait().await.0, None, "killed by a signal");
    }
    // The server gives up one ack wait after the third delivery; the next
    // process moves the job to the dead letters from the advisory.
    let consumer = c.consumer().await;
    let dead = c
        .eventually(Duration::from_secs(30), || async {
            queue_rows(&pool).await == vec![(event, "dead".to_owned())]
        })
        .await;
    assert!(dead, "Praefect's rows: {:?}", queue_rows(&pool).await);
    let letters = c.dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].header(gitaly_replicator::dead_letters::headers::REASON),
        Some("stranded")
    );
    assert_eq!(c.node(2).call_count(), 3);
    consumer.stop().await.unwrap();
}
