//! Jobs as Praefect writes them, and updates whose source is down, end to
//! end on git-backed storage nodes: the service run in this process, jobs
//! published by a plain NATS client.

use crate::common::eventually;
use crate::common::git;
use crate::common::service_metrics::{jobs_with_outcome, metric};
use crate::common::storage_nodes::{NodeCluster, NodeSetup};
use gitaly_replicator::job_subject;
use std::path::Path;
use std::time::Duration;

const PRAEFECT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/events/praefect");

/// The paths of the Praefect-shaped files, to be replaced by a test's own.
const FILE_PATH: &str =
    "@hashed/4b/22/4b227777d4dd1fc61c6f884f48641d02b4d121d3fd328cb08b5531fcacdabf8a.git";
const FILE_REPLICA_PATH: &str = "@cluster/repositories/4b/22/2";
const FILE_NEW_PATH: &str =
    "@hashed/ef/2d/ef2d127de37b942baad06145e54b0c619a1f22327b2ebbcfbec78f5564afe39d.git";

/// Waits until the service has seen `storage` as `healthy` (the gauge reads
/// 0 before the first check too: wait for healthy first).
async fn wait_for_health(c: &NodeCluster, storage: &str, healthy: bool) {
    let want = if healthy { 1.0 } else { 0.0 };
    let seen = eventually(Duration::from_secs(20), || async {
        metric(c.vs(), "gitaly_replicator_target_healthy", storage) == want
    })
    .await;
    assert!(seen, "{storage} never reported healthy = {healthy}");
}

/// Publishes raw bytes on the work subject of `target`, as a publisher
/// other than ours would.
async fn publish_raw(c: &NodeCluster, target: &str, payload: String) {
    let subject = job_subject(&c.names.subject_prefix, c.vs(), target);
    c.js.publish(subject, payload.into_bytes().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

fn update_json(c: &NodeCluster, path: &str, target: &str) -> String {
    serde_json::json!({
        "change": "update",
        "virtual_storage": c.vs(),
        "relative_path": path,
        "source_node_storage": "gitaly-1",
        "target_node_storage": target,
    })
    .to_string()
}

#[tokio::test]
async fn with_the_source_node_stopped_twenty_updates_replicate_from_another_up_to_date_replica() {
    let mut c = NodeCluster::start(3).await;
    let paths: Vec<String> = (0..20).map(|i| format!("fallback/r{i}.git")).collect();
    for p in &paths {
        c.create_on_source(p).await;
    }
    let service = c.replicator();
    // gitaly-2 becomes an up-to-date replica of each.
    for p in &paths {
        publish_raw(&c, "gitaly-2", update_json(&c, p, "gitaly-2")).await;
    }
    for p in &paths {
        c.wait_for_generation(p, "gitaly-2", 1).await;
    }
    wait_for_health(&c, "gitaly-1", true).await;
    c.node_mut(1).kill().await;
    wait_for_health(&c, "gitaly-1", false).await;
    let failed_before = jobs_with_outcome(c.vs(), "failed");

    for p in &paths {
        publish_raw(&c, "gitaly-3", update_json(&c, p, "gitaly-3")).await;
    }
    for p in &paths {
        c.wait_for_generation(p, "gitaly-3", 1).await;
        // The source's directory is still on disk: the copy read from
        // gitaly-2 has its refs.
        assert_eq!(
            git::refs(&c.node(3).repo(p)),
            git::refs(&c.node(1).repo(p)),
            "{p}"
        );
        git::assert_fsck_clean(&c.node(3).repo(p));
    }
    c.wait_until_drained().await;
    assert!(c.dead_letters().await.is_empty());
    // Not one attempt was spent on the stopped source.
    assert_eq!(jobs_with_outcome(c.vs(), "failed"), failed_before);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn with_no_other_up_to_date_replica_updates_wait_for_the_source_and_use_no_attempt() {
    let mut c = NodeCluster::start(2).await;
    let paths: Vec<String> = (0..5).map(|i| format!("waiting/r{i}.git")).collect();
    for p in &paths {
        c.create_on_source(p).await;
    }
    let service = c.replicator();
    wait_for_health(&c, "gitaly-1", true).await;
    c.node_mut(1).kill().await;
    wait_for_health(&c, "gitaly-1", false).await;
    for p in &paths {
        publish_raw(&c, "gitaly-2", update_json(&c, p, "gitaly-2")).await;
    }
    // Far longer than three attempts with the test's retry delays (200 ms
    // to 1 s) would take.
    let deferred = eventually(Duration::from_secs(20), || async {
        jobs_with_outcome(c.vs(), "deferred") >= (2 * paths.len()) as f64
    })
    .await;
    assert!(deferred, "the updates were not deferred");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(c.dead_letters().await.is_empty());
    assert_eq!(jobs_with_outcome(c.vs(), "failed"), 0.0);
    for p in &paths {
        assert_eq!(c.generation(p, "gitaly-2").await, None, "{p}");
    }

    c.node_mut(1).restart().await;
    for p in &paths {
        c.wait_for_generation(p, "gitaly-2", 1).await;
        assert_eq!(git::refs(&c.node(2).repo(p)), git::refs(&c.node(1).repo(p)));
    }
    c.wait_until_drained().await;
    assert!(c.dead_letters().await.is_empty());
    assert_eq!(jobs_with_outcome(c.vs(), "failed"), 0.0);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_healthy_source_answering_unavailable_is_retried_from_the_same_source_as_before() {
    let failing_source = NodeSetup {
        flags: vec![
            "--fail-method".to_owned(),
            "GetObjectPool=unavailable".to_owned(),
        ],
        ..NodeSetup::default()
    };
    // The source passes its health checks, so the failure is an ordinary
    // one. (That another up-to-date replica is not used then is shown on
    // recording nodes, in the replicator's own tests.)
    let mut c = NodeCluster::start_with(vec![failing_source, NodeSetup::default()], |toml| {
        *toml = toml.replacen("\n[replication]\n", "\n[replication]\nattempts = 20\n", 1)
    })
    .await;
    let path = "retried/r.git";
    c.create_on_source(path).await;
    let service = c.replicator();
    wait_for_health(&c, "gitaly-1", true).await;
    publish_raw(&c, "gitaly-2", update_json(&c, path, "gitaly-2")).await;
    let failed = eventually(Duration::from_secs(20), || async {
        jobs_with_outcome(c.vs(), "failed") >= 1.0
    })
    .await;
    assert!(failed, "the source's UNAVAILABLE did not fail the job");
    assert_eq!(c.generation(path, "gitaly-2").await, None);

    // The source answers again: the retry reads from it.
    c.node_mut(1).restart_with(&[]).await;
    c.wait_for_generation(path, "gitaly-2", 1).await;
    assert_eq!(
        git::refs(&c.node(2).repo(path)),
        git::refs(&c.node(1).repo(path))
    );
    c.wait_until_drained().await;
    assert!(c.dead_letters().await.is_empty());
    service.stop().await.unwrap();
}

/// One repository's paths in a run of the Praefect-shaped files.
struct Paths {
    relative: String,
    replica: String,
    new: String,
}

impl Paths {
    fn of(name: &str) -> Paths {
        Paths {
            relative: format!("praefect/{name}.git"),
            replica: format!("@cluster/repositories/{name}"),
            new: format!("praefect/{name}-renamed.git"),
        }
    }

    /// `text` (a job file) about this repository of `c`, repository `id`.
    fn apply(&self, c: &NodeCluster, id: i64, text: &str) -> String {
        text.replace(FILE_PATH, &self.relative)
            .replace(FILE_REPLICA_PATH, &self.replica)
            .replace(FILE_NEW_PATH, &self.new)
            .replace("\"repository_id\":2", &format!("\"repository_id\":{id}"))
            .replace("\"repository_id\": 2", &format!("\"repository_id\": {id}"))
            .replace("\"default\"", &format!("\"{}\"", c.vs()))
            .replace("default|", &format!("{}|", c.vs()))
    }
}

/// What gitaly-2 holds of one repository, on disk and in Postgres, in
/// terms that do not depend on which repository it is.
async fn replica_state(c: &NodeCluster, p: &Paths) -> Vec<String> {
    let mut out = Vec::new();
    for (what, path) in [
        ("relative", &p.relative),
        ("replica", &p.replica),
        ("new", &p.new),
    ] {
        let dir = c.node(2).repo(path);
        let source = c.node(1).repo(path);
        let exists = dir.exists();
        let has = |rel: &str| dir.join(rel).exists();
        let pack_has = |ext: &str| {
            std::fs::read_dir(dir.join("objects/pack"))
                .map(|d| {
                    d.flatten()
                        .any(|e| e.path().extension().is_some_and(|x| x == ext))
                })
                .unwrap_or(false)
        };
        out.push(format!(
            "{what}: exists {exists}, refs as source {}, packed-refs {}, bitmap {}, commit-graph {}, midx {}",
            exists && source.exists() && git::refs(&dir) == git::refs(&source),
            has("packed-refs"),
            pack_has("bitmap"),
            has("objects/info/commit-graphs/commit-graph-chain"),
            has("objects/pack/multi-pack-index"),
        ));
        out.push(format!(
            "{what}: generation on gitaly-2 {:?}",
            c.generation(path, "gitaly-2").await
        ));
    }
    out
}

#[tokio::test]
async fn every_praefect_shaped_file_replicates_as_its_twin_in_our_shape_does() {
    let c = NodeCluster::start(2).await;
    let (theirs, ours) = (Paths::of("theirs"), Paths::of("ours"));
    let mut ids = Vec::new();
    for p in [&theirs, &ours] {
        // The replica path is where the repository lives; a Praefect
        // 14.0 job (no replica path) reads the relative path.
        for path in [&p.replica, &p.relative] {
            git::populate(&c.node(1).repo(path));
        }
        let id =
            c.db.store
                .create_repository(c.vs(), &p.relative, "gitaly-1", 1, &["gitaly-1"])
                .await
                .unwrap();
        ids.push(id);
    }
    let service = c.replicator();
    // A repository's life: created, written to three times, maintained,
    // renamed, its replica removed, then the repository deleted.
    let files = [
        "job-create.json",
        "event-update.json",
        "job-update.json",
        "job-v14.0-update.json",
        "job-gc.json",
        "event-gc-no-meta.json",
        "job-repack-full.json",
        "job-repack-incremental.json",
        "job-cleanup.json",
        "job-pack-refs.json",
        "job-write-commit-graph.json",
        "job-write-commit-graph-float.json",
        "job-midx-repack.json",
        "job-optimize-repository.json",
        "job-rename.json",
        "job-delete-replica.json",
        "job-delete.json",
    ];
    let all: Vec<String> = std::fs::read_dir(PRAEFECT_DIR)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    for name in &all {
        assert!(files.contains(&name.as_str()), "{name} is not in the run");
    }
    let mut generation = 1;
    for name in files {
        if name.contains("update") {
            // A write on the source first, as Praefect records one.
            generation += 1;
            for p in [&theirs, &ours] {
                for path in [&p.replica, &p.relative] {
                    git::commit(&c.node(1).repo(path), "main", name);
                }
                c.record(&p.relative, generation).await;
            }
        }
        let praefects = std::fs::read_to_string(Path::new(PRAEFECT_DIR).join(name)).unwrap();
        let twin =
            std::fs::read_to_string(Path::new(PRAEFECT_DIR).join("ours").join(name)).unwrap();
        publish_raw(&c, "gitaly-2", theirs.apply(&c, ids[0], &praefects)).await;
        publish_raw(&c, "gitaly-2", ours.apply(&c, ids[1], &twin)).await;
        c.wait_until_drained().await;
        assert!(
            c.dead_letters().await.is_empty(),
            "{name}: {:?}",
            c.dead_letter_errors().await
        );
        assert_eq!(
            replica_state(&c, &theirs).await,
            replica_state(&c, &ours).await,
            "after {name}"
        );
    }
    service.stop().await.unwrap();
}
