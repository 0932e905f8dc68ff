//! The reconciler on git-backed storage nodes, real Postgres and NATS:
//! outdated and missing replicas are healed with no job published by hand,
//! also after the work stream was purged; `dataloss` lists them until then;
//! rounds within the duplicate window do not pile up; an unassigned replica
//! is deleted; of two processes one reconciles, and the other takes over
//! when it is killed.

use crate::cli::{all, cli, stdout};
use crate::common::eventually;
use crate::common::git;
use crate::common::process::ReplicatorProcess;
use crate::common::storage_nodes::{NodeCluster, NodeSetup};
use gitaly_replicator::{ChangeType, NodeSet, Reconciler};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn with_interval(interval: &str) -> impl FnOnce(&mut String) {
    let section = format!("\n[reconciliation]\nscheduling_interval = \"{interval}\"\n");
    move |toml: &mut String| toml.push_str(&section)
}

async fn cluster(interval: &str) -> NodeCluster {
    NodeCluster::start_with(vec![NodeSetup::default(); 3], with_interval(interval)).await
}

/// Sets `storage`'s replica row of `path` to `generation`, as a write the
/// storage never got would leave it.
async fn set_replica(c: &NodeCluster, path: &str, storage: &str, generation: i64) {
    sqlx::query(
        "INSERT INTO storage_repositories (repository_id, virtual_storage, relative_path, storage, generation)
        SELECT repository_id, virtual_storage, relative_path, $3, $4
        FROM repositories WHERE virtual_storage = $1 AND relative_path = $2
        ON CONFLICT (virtual_storage, relative_path, storage) DO UPDATE SET generation = $4",
    )
    .bind(c.vs())
    .bind(path)
    .bind(storage)
    .bind(generation)
    .execute(c.db.store.pool())
    .await
    .unwrap();
}

/// The paths `dataloss --partially-unavailable` lists for the cluster.
fn lagging_paths(c: &NodeCluster) -> Vec<String> {
    let o = cli(
        &c.toml,
        &["dataloss", "--json", "--partially-unavailable"],
        None,
    );
    assert!(o.status.success(), "{}", all(&o));
    let report: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let mut paths: Vec<String> = report["virtual_storages"][0]["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["relative_path"].as_str().unwrap().to_owned())
        .collect();
    paths.sort();
    paths
}

fn assert_same_refs(c: &NodeCluster, path: &str) {
    let source = git::refs(&c.node(1).repo(path));
    for i in [2, 3] {
        assert_eq!(
            git::refs(&c.node(i).repo(path)),
            source,
            "{path} on gitaly-{i}"
        );
    }
}

#[tokio::test]
async fn outdated_and_missing_replicas_are_healed_with_no_job_published_and_dataloss_empties() {
    let c = cluster("500ms").await;
    // a.git: written twice on gitaly-1; gitaly-2 recorded at the first
    // write, gitaly-3 without a replica. b.git: only on gitaly-1.
    c.create_on_source("a.git").await;
    git::commit(&c.node(1).repo("a.git"), "main", "second write");
    c.record("a.git", 2).await;
    set_replica(&c, "a.git", "gitaly-2", 1).await;
    c.create_on_source("b.git").await;
    // c.git is in step everywhere: nothing is scheduled for it.
    c.create_on_source("c.git").await;
    for i in [2, 3] {
        git::populate(&c.node(i).repo("c.git"));
        set_replica(&c, "c.git", &format!("gitaly-{i}"), 1).await;
    }
    assert_eq!(lagging_paths(&c), ["a.git", "b.git"]);

    let service = c.replicator();
    for (path, generation) in [("a.git", 2), ("b.git", 1)] {
        for target in ["gitaly-2", "gitaly-3"] {
            c.wait_for_generation(path, target, generation).await;
        }
    }
    c.wait_until_drained().await;
    service.stop().await.unwrap();
    assert_same_refs(&c, "a.git");
    assert_same_refs(&c, "b.git");
    assert!(lagging_paths(&c).is_empty());
    assert!(c.dead_letters().await.is_empty());
}

#[tokio::test]
async fn a_purged_work_stream_is_healed() {
    let c = cluster("500ms").await;
    c.create_on_source("purged.git").await;
    c.publish_update("purged.git", "gitaly-2").await;
    c.publish_update("purged.git", "gitaly-3").await;
    assert_eq!(c.work_messages().await, 2);
    c.js.get_stream(&c.layout.stream)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    assert_eq!(c.work_messages().await, 0);

    let service = c.replicator();
    c.wait_for_generation("purged.git", "gitaly-2", 1).await;
    c.wait_for_generation("purged.git", "gitaly-3", 1).await;
    service.stop().await.unwrap();
    assert_same_refs(&c, "purged.git");
}

/// A reconciler over the cluster with every node marked healthy, as the
/// health watchers of a running service would; no consumer runs.
fn reconciler(c: &NodeCluster, pending_scan_limit: u64) -> Reconciler {
    let mut config = c.config.clone();
    config.reconciliation.pending_scan_limit = pending_scan_limit;
    let nodes = NodeSet::from_config(&config).unwrap();
    for node in nodes.iter() {
        node.set_health(gitaly_replicator::Health::Healthy);
    }
    Reconciler::new(&config, c.db.store.clone(), c.js.clone(), nodes).unwrap()
}

#[tokio::test]
async fn rounds_within_the_duplicate_window_schedule_each_lagging_replica_once() {
    let c = cluster("0s").await;
    for path in ["p1.git", "p2.git"] {
        c.record(path, 3).await;
    }
    // Four lagging replicas: p1 and p2 on gitaly-2 and gitaly-3.
    let blind = reconciler(&c, 0);
    let first = blind.round().await.unwrap();
    assert_eq!(first.scheduled.get(&ChangeType::Update), Some(&4));
    assert_eq!(first.scanned, 2);
    // Without reading the stream, repeats are dropped by their message ids.
    for _ in 0..2 {
        let again = blind.round().await.unwrap();
        assert!(again.scheduled.is_empty(), "{again:?}");
        assert_eq!(again.duplicates, 4);
    }
    assert_eq!(c.work_messages().await, 4);

    // Reading the stream, the waiting jobs are seen and nothing is sent,
    // even after a new write (a new generation, a new message id).
    c.record("p1.git", 4).await;
    let seeing = reconciler(&c, 10_000);
    let report = seeing.round().await.unwrap();
    assert!(report.scheduled.is_empty(), "{report:?}");
    assert_eq!(report.duplicates, 0);
    assert_eq!(c.work_messages().await, 4);

    // What went out is an update from the primary with the repository's id.
    let stream = c.js.get_stream(&c.layout.stream).await.unwrap();
    let message = stream.get_raw_message(1).await.unwrap();
    let job: Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(job["change"], "update");
    assert_eq!(job["source_node_storage"], "gitaly-1");
    assert_eq!(
        job["repository_id"],
        json!(
            c.db.repository_id(c.vs(), job["relative_path"].as_str().unwrap())
                .await
        )
    );
}

#[tokio::test]
async fn an_unassigned_replica_is_deleted_once_the_assigned_ones_are_current() {
    let c = cluster("0s").await;
    // Praefect's assignments table; only gitaly-1 and gitaly-2 are assigned.
    sqlx::query(
        "CREATE TABLE repository_assignments (
            virtual_storage TEXT NOT NULL, relative_path TEXT NOT NULL, storage TEXT NOT NULL,
            repository_id BIGINT, PRIMARY KEY (virtual_storage, relative_path, storage))",
    )
    .execute(c.db.store.pool())
    .await
    .unwrap();
    c.record("assigned.git", 2).await;
    for storage in ["gitaly-2", "gitaly-3"] {
        set_replica(&c, "assigned.git", storage, 1).await;
    }
    for storage in ["gitaly-1", "gitaly-2"] {
        sqlx::query(
            "INSERT INTO repository_assignments SELECT virtual_storage, relative_path, $2, repository_id
            FROM repositories WHERE relative_path = $1",
        )
        .bind("assigned.git")
        .bind(storage)
        .execute(c.db.store.pool())
        .await
        .unwrap();
    }
    let r = reconciler(&c, 0);
    // gitaly-2 is behind: it is updated, gitaly-3 is left alone for now.
    let report = r.round().await.unwrap();
    assert_eq!(
        report.scheduled.into_iter().collect::<Vec<_>>(),
        [(ChangeType::Update, 1)]
    );
    set_replica(&c, "assigned.git", "gitaly-2", 2).await;
    let report = r.round().await.unwrap();
    assert_eq!(
        report.scheduled.into_iter().collect::<Vec<_>>(),
        [(ChangeType::DeleteReplica, 1)]
    );
    let stream = c.js.get_stream(&c.layout.stream).await.unwrap();
    let message = stream.get_raw_message(2).await.unwrap();
    let job: Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(job["change"], "delete_replica");
    assert_eq!(job["target_node_storage"], "gitaly-3");
}

fn leads(p: &ReplicatorProcess) -> bool {
    p.stderr
        .lock()
        .unwrap()
        .contains("this process is now the reconciler")
}

#[tokio::test]
async fn of_two_processes_one_reconciles_and_the_other_takes_over_when_it_is_killed() {
    const INTERVAL: Duration = Duration::from_secs(1);
    let c = cluster("1s").await;
    let first = ReplicatorProcess::run(&c.toml);
    assert!(
        eventually(Duration::from_secs(30), || async { leads(&first) }).await,
        "{}",
        first.stderr.lock().unwrap()
    );
    let second = ReplicatorProcess::run(&c.toml);
    // Several of its rounds go by without the lock.
    assert!(
        eventually(Duration::from_secs(30), || async {
            second.stderr.lock().unwrap().contains("reconciler started")
        })
        .await
    );
    tokio::time::sleep(INTERVAL * 4).await;
    assert!(!leads(&second), "{}", second.stderr.lock().unwrap());

    // A lagging replica is healed by whichever leads: after the kill, the
    // second process.
    first.signal("KILL");
    let killed = Instant::now();
    assert!(
        eventually(Duration::from_secs(30), || async { leads(&second) }).await,
        "{}",
        second.stderr.lock().unwrap()
    );
    let took = killed.elapsed();
    assert!(took <= INTERVAL * 2, "took over after {took:?}");
    c.create_on_source("after.git").await;
    c.wait_for_generation("after.git", "gitaly-2", 1).await;
    c.wait_for_generation("after.git", "gitaly-3", 1).await;
    second.signal("TERM");
    let (code, _) = second.wait().await;
    assert_eq!(code, Some(0));
}

async fn verified_checksum(c: &NodeCluster, path: &str, storage: &str) -> Option<String> {
    sqlx::query_scalar(
        "SELECT v.checksum FROM replica_verifications v
        JOIN repositories r USING (repository_id)
        WHERE r.relative_path = $1 AND v.storage = $2",
    )
    .bind(path)
    .bind(storage)
    .fetch_optional(c.db.store.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn a_replica_changed_behind_our_back_is_found_by_verification_and_replicated_again() {
    let c = NodeCluster::start_with(vec![NodeSetup::default(); 2], |toml| {
        toml.push_str(
            "\n[reconciliation]\nscheduling_interval = \"300ms\"\n\
             [background_verification]\nverification_interval = \"1s\"\n",
        );
    })
    .await;
    c.create_on_source("v.git").await;
    let service = c.replicator();
    // The reconciler copies it, then verification finds it equal.
    c.wait_for_generation("v.git", "gitaly-2", 1).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            verified_checksum(&c, "v.git", "gitaly-2").await.is_some()
        })
        .await,
        "gitaly-2's replica was never verified"
    );
    let source_refs = git::refs(&c.node(1).repo("v.git"));
    assert_eq!(git::refs(&c.node(2).repo("v.git")), source_refs);

    // A ref moves on gitaly-2 with nothing in the store or the queue.
    git::commit(&c.node(2).repo("v.git"), "main", "written behind our back");
    assert_ne!(git::refs(&c.node(2).repo("v.git")), source_refs);
    assert!(
        eventually(Duration::from_secs(30), || async {
            git::refs(&c.node(2).repo("v.git")) == source_refs
        })
        .await,
        "gitaly-2's replica was never replicated again"
    );
    c.wait_for_generation("v.git", "gitaly-2", 1).await;
    let verifications = |result: &str| {
        crate::common::service_metrics::samples().sum(
            "gitaly_replicator_verifications_total",
            &[
                ("virtual_storage", c.vs()),
                ("gitaly_storage", "gitaly-2"),
                ("result", result),
            ],
        )
    };
    assert!(verifications("mismatch") >= 1.0);
    assert!(verifications("verified") >= 1.0);
    service.stop().await.unwrap();
    git::assert_fsck_clean(&c.node(2).repo("v.git"));
}

async fn verified_replicas(c: &NodeCluster, storage: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM replica_verifications v
        JOIN repositories r USING (repository_id)
        WHERE r.virtual_storage = $1 AND v.storage = $2",
    )
    .bind(c.vs())
    .bind(storage)
    .fetch_one(c.db.store.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn verification_goes_on_batch_after_batch_while_replicas_are_due() {
    const REPOSITORIES: i64 = 8;
    let c = NodeCluster::start_with(vec![NodeSetup::default(); 2], |toml| {
        toml.push_str(
            "\n[reconciliation]\nscheduling_interval = \"3s\"\n\
             [background_verification]\nverification_interval = \"1h\"\nbatch_size = 2\n",
        );
    })
    .await;
    for i in 0..REPOSITORIES {
        c.create_on_source(&format!("due-{i}.git")).await;
    }
    let service = c.replicator();
    for i in 0..REPOSITORIES {
        c.wait_for_generation(&format!("due-{i}.git"), "gitaly-2", 1)
            .await;
    }
    assert!(
        eventually(Duration::from_secs(30), || async {
            verified_replicas(&c, "gitaly-2").await > 0
        })
        .await,
        "no replica was ever verified"
    );
    // One batch of 2 per round would take three more rounds (9 s): the
    // rest of the pass comes in the same round.
    let first = Instant::now();
    assert!(
        eventually(Duration::from_secs(2), || async {
            verified_replicas(&c, "gitaly-2").await == REPOSITORIES
        })
        .await,
        "{} of {REPOSITORIES} replicas verified {:?} after the first",
        verified_replicas(&c, "gitaly-2").await,
        first.elapsed()
    );
    service.stop().await.unwrap();
}
