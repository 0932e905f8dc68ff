//! Praefect's replication_queue, captured, on git-backed storage nodes:
//! events Praefect writes with its own Enqueue replicate real repositories
//! while its Dequeue finds nothing; a captured `delete_replica` keeps its
//! storage out of `valid_primaries` until the replica is gone from disk; a
//! dead-lettered job leaves Praefect's row `dead`; release hands back
//! exactly the events not yet settled; a capturing process SIGKILLed
//! mid-stream is taken over with no event lost or stored twice.

use crate::common::eventually;
use crate::common::git;
use crate::common::process::ReplicatorProcess;
use crate::common::service_metrics::metric;
use crate::common::storage_nodes::{NodeCluster, NodeSetup, call_context, client};
use crate::praefect_capture::{
    a_second_process_settles_every_row, captured_queue, enqueue, install_valid_primaries,
    praefect_dequeues, queue_rows, release_hands_back, valid_primaries,
};
use serde_json::json;
use std::time::Duration;

/// A job as Praefect's coordinator writes it into `replication_queue.job`.
fn praefect_job(
    c: &NodeCluster,
    change: &str,
    path: &str,
    target: &str,
    source: &str,
    repository_id: i64,
) -> serde_json::Value {
    json!({"change": change, "virtual_storage": c.vs(), "relative_path": path,
           "target_node_storage": target, "source_node_storage": source,
           "repository_id": repository_id, "replica_path": path, "params": null})
}

fn update(c: &NodeCluster, path: &str, target: &str) -> serde_json::Value {
    praefect_job(c, "update", path, target, "gitaly-1", 0)
}

/// `CalculateChecksum` of `path` as gitaly-`i` answers it.
async fn checksum(c: &NodeCluster, i: usize, path: &str) -> String {
    let node = c.node(i);
    client(node, &node.token)
        .checksum(path, &call_context())
        .await
        .unwrap()
}

#[tokio::test]
async fn captured_events_change_the_storage_nodes_settle_praefects_rows_and_release_hands_back_the_unsettled()
 {
    // gitaly-3 fails every replication: its job is dead-lettered.
    let failing = NodeSetup {
        flags: vec![
            "--fail-method".into(),
            "ReplicateRepository=internal".into(),
        ],
        ..Default::default()
    };
    let mut c = NodeCluster::start_with(
        vec![NodeSetup::default(), NodeSetup::default(), failing],
        |_| {},
    )
    .await;
    let pool = captured_queue(c.db.store.pool(), &c.toml).await;
    install_valid_primaries(&pool, c.vs(), &["gitaly-1", "gitaly-2", "gitaly-3"]).await;
    let updated = ["cap/a.git", "cap/b.git", "cap/c.git"];
    for p in updated {
        c.create_on_source(p).await;
    }
    // A repository on gitaly-1 and gitaly-2, both in step.
    let leaving = "cap/leaving.git";
    git::populate(&c.node(1).repo(leaving));
    let copy = c.node(2).repo(leaving);
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    git::git(
        &c.node(2).dir,
        &[
            "clone",
            "--mirror",
            "--quiet",
            c.node(1).repo(leaving).to_str().unwrap(),
            copy.to_str().unwrap(),
        ],
    );
    let leaving_id =
        c.db.store
            .create_repository(c.vs(), leaving, "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
            .await
            .unwrap();
    let doomed = "cap/doomed.git";
    c.create_on_source(doomed).await;
    assert_eq!(
        valid_primaries(&pool, leaving_id).await,
        ["gitaly-1", "gitaly-2"]
    );

    // Praefect's inserts, while no process of ours runs.
    for p in updated {
        let (_, state) = enqueue(&pool, &update(&c, p, "gitaly-2")).await;
        assert_eq!(state, "in_progress");
    }
    let delete = praefect_job(&c, "delete_replica", leaving, "gitaly-2", "", leaving_id);
    enqueue(&pool, &delete).await;
    let (dead_id, _) = enqueue(&pool, &update(&c, doomed, "gitaly-3")).await;
    // Pending in Praefect's eyes, and none for its workers.
    assert!(
        praefect_dequeues(&pool, c.vs(), "gitaly-2")
            .await
            .is_empty()
    );
    assert!(
        praefect_dequeues(&pool, c.vs(), "gitaly-3")
            .await
            .is_empty()
    );
    assert_eq!(
        valid_primaries(&pool, leaving_id).await,
        ["gitaly-1"],
        "the storage of a pending delete_replica"
    );

    let service = c.replicator();
    let settled = eventually(Duration::from_secs(30), || async {
        queue_rows(&pool).await == vec![(dead_id, "dead".to_owned())]
    })
    .await;
    assert!(
        settled,
        "Praefect's rows: {:?}; dead letters: {:?}",
        queue_rows(&pool).await,
        c.dead_letter_errors().await
    );
    for p in updated {
        assert_eq!(c.generation(p, "gitaly-2").await, Some(1), "{p}");
        let (source, replica) = (c.node(1).repo(p), c.node(2).repo(p));
        assert_eq!(git::refs(&replica), git::refs(&source), "{p}");
        assert_eq!(checksum(&c, 2, p).await, checksum(&c, 1, p).await, "{p}");
        git::assert_fsck_clean(&replica);
    }
    assert!(!c.node(2).repo(leaving).exists(), "the deleted replica");
    assert!(c.node(1).repo(leaving).exists());
    assert_eq!(c.generation(leaving, "gitaly-2").await, None);
    assert_eq!(valid_primaries(&pool, leaving_id).await, ["gitaly-1"]);
    let errors = c.dead_letter_errors().await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("ReplicateRepository"), "{errors:?}");
    assert!(!c.node(3).repo(doomed).exists());
    assert_eq!(c.generation(doomed, "gitaly-3").await, None);
    // A dead event stays Praefect's record, as its own dead ones do.
    assert!(
        praefect_dequeues(&pool, c.vs(), "gitaly-3")
            .await
            .is_empty()
    );

    // gitaly-2 goes down: the next events are published and wait in the
    // work stream for it, unsettled.
    c.node_mut(2).kill().await;
    let vs = c.vs().to_owned();
    assert!(
        eventually(Duration::from_secs(10), || async {
            metric(&vs, "gitaly_replicator_target_healthy", "gitaly-2") == 0.0
        })
        .await,
        "the consumer never saw gitaly-2 go down"
    );
    let mut unsettled = Vec::new();
    for p in &updated[..2] {
        git::commit(&c.node(1).repo(p), "main", "written after the first round");
        c.record(p, 2).await;
        unsettled.push(enqueue(&pool, &update(&c, p, "gitaly-2")).await.0);
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            let s = c.db.store.capture_status().await.unwrap();
            s.unpublished == 0 && s.unsettled == 2
        })
        .await,
        "{:?}",
        c.db.store.capture_status().await
    );
    assert_eq!(c.work_messages().await, 2);
    service.stop().await.unwrap();
    // Captured with no process running: never published.
    unsettled.push(enqueue(&pool, &update(&c, updated[2], "gitaly-2")).await.0);

    release_hands_back(&c.toml, 3);
    let mut expected = vec![(dead_id, "dead".to_owned())];
    expected.extend(unsettled.iter().map(|id| (*id, "ready".to_owned())));
    assert_eq!(queue_rows(&pool).await, expected);
    assert_eq!(
        praefect_dequeues(&pool, c.vs(), "gitaly-2").await,
        unsettled
    );
    // Nothing of ours ran them.
    for p in &updated[..2] {
        assert_eq!(c.generation(p, "gitaly-2").await, Some(1), "{p}");
    }
}

/// The process publishing Praefect's captured events is SIGKILLed while
/// their jobs run, and Praefect goes on inserting; a second process takes
/// the capture over. The kill is also taken to have come between the
/// broker's acknowledgements and the process's record of them, so the
/// second process publishes again every event not yet settled: each must
/// still enter the work stream once.
#[tokio::test]
async fn a_capturing_process_killed_mid_stream_is_taken_over_and_each_event_enters_the_stream_once()
{
    const EVENTS: usize = 24;
    // A slow target and four jobs at a time, so the kill lands mid-stream;
    // a short lease, so the killed process's repositories are taken sooner.
    let slow = NodeSetup {
        flags: vec!["--latency".into(), "100ms".into()],
        ..Default::default()
    };
    let c = NodeCluster::start_with(vec![NodeSetup::default(), slow], |toml| {
        *toml = toml.replace(
            "batch_size = 10",
            "batch_size = 4\nmax_concurrent_jobs = 4\nlock_lease = \"3s\"",
        );
    })
    .await;
    let pool = captured_queue(c.db.store.pool(), &c.toml).await;
    let paths: Vec<String> = (0..EVENTS).map(|i| format!("kill/repo-{i}.git")).collect();
    for p in &paths {
        c.create_on_source(p).await;
    }

    let first = ReplicatorProcess::run(&c.toml);
    for p in &paths[..EVENTS / 2] {
        enqueue(&pool, &update(&c, p, "gitaly-2")).await;
    }
    assert!(
        eventually(Duration::from_secs(30), || async {
            c.replicated(&paths).await >= 2
        })
        .await,
        "the first process never replicated:\n{}",
        first.stderr.lock().unwrap()
    );
    first.signal("KILL");
    assert_eq!(first.wait().await.0, None, "killed by a signal");
    assert!(
        c.replicated(&paths).await < EVENTS / 2,
        "every job was done before the kill"
    );
    let republished = sqlx::query("UPDATE replication_captured_events SET published_at = NULL")
        .execute(&pool)
        .await
        .unwrap()
        .rows_affected();
    assert!(republished > 0, "every event was settled before the kill");
    // Praefect goes on inserting while no process runs.
    for p in &paths[EVENTS / 2..] {
        enqueue(&pool, &update(&c, p, "gitaly-2")).await;
    }

    a_second_process_settles_every_row(&pool, &c.toml).await;
    for p in &paths {
        assert_eq!(c.generation(p, "gitaly-2").await, Some(1), "{p}");
        assert_eq!(
            git::refs(&c.node(2).repo(p)),
            git::refs(&c.node(1).repo(p)),
            "{p}"
        );
    }
    for p in [&paths[0], &paths[EVENTS - 1]] {
        assert_eq!(checksum(&c, 2, p).await, checksum(&c, 1, p).await, "{p}");
    }
    // Each event went into the work stream once: what was published again
    // carried the same message id, inside the duplicate window.
    let mut stream = c.js.get_stream(&c.layout.stream).await.unwrap();
    let stored = stream.info().await.unwrap().state.last_sequence;
    assert_eq!(stored, EVENTS as u64, "messages stored in the work stream");
    assert_eq!(c.work_messages().await, 0);
    assert!(c.dead_letters().await.is_empty());
}
