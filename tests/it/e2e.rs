//! End to end: real NATS, real Postgres, real storage nodes as processes
//! (the `storage-node` binary over git repositories in temporary
//! directories), and the replicator service run in this process. Each test
//! has its own streams, database and directories, and removes them.

use crate::common::eventually;
use crate::common::git;
use crate::common::service_metrics::{jobs_with_outcome, metric, samples};
use crate::common::storage_nodes::{NodeCluster, NodeSetup, call_context};
use gitaly_replicator::proto::gitaly as pb;
use serde_json::json;
use std::time::Duration;

// ------------------------------------------------------------- git helpers

/// A bare repository on one of the cluster's storage nodes.
struct Repo {
    path: std::path::PathBuf,
}

impl Repo {
    fn at(c: &NodeCluster, node: usize, relative_path: &str) -> Repo {
        Repo {
            path: c.node(node).repo(relative_path),
        }
    }

    fn git(&self, args: &[&str]) -> String {
        git::git(&self.path, args)
    }

    fn init(&self) {
        git::init_bare(&self.path);
    }

    /// A new commit on `branch` writing `content` to `file.txt`; returns its id.
    fn commit(&self, branch: &str, content: &str) -> String {
        git::commit(&self.path, branch, content)
    }

    fn populate(&self) {
        git::populate(&self.path);
    }

    fn refs(&self) -> String {
        git::refs(&self.path)
    }

    fn assert_fsck_clean(&self) {
        git::assert_fsck_clean(&self.path);
    }

    fn exists(&self) -> bool {
        self.path.exists()
    }
}

/// Rows of `repositories` at this path (0 or 1).
async fn repository_rows(c: &NodeCluster, relative_path: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM repositories WHERE virtual_storage = $1 AND relative_path = $2",
    )
    .bind(c.vs())
    .bind(relative_path)
    .fetch_one(c.db.store.pool())
    .await
    .unwrap()
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn updates_of_new_and_existing_repositories_leave_the_targets_refs_equal_to_the_sources() {
    let c = NodeCluster::start(3).await;
    let (a, b) = ("group/a.git", "group/b.git");
    let src_a = Repo::at(&c, 1, a);
    let src_b = Repo::at(&c, 1, b);
    src_a.populate();
    src_b.populate();
    c.record(a, 1).await;
    c.record(b, 1).await;
    let service = c.replicator();

    // New repositories: the targets have nothing yet.
    c.publish_update(a, "gitaly-2").await;
    c.publish_update(a, "gitaly-3").await;
    c.publish_update(b, "gitaly-2").await;
    c.wait_for_generation(a, "gitaly-2", 1).await;
    c.wait_for_generation(a, "gitaly-3", 1).await;
    c.wait_for_generation(b, "gitaly-2", 1).await;
    for node in [2, 3] {
        assert_eq!(Repo::at(&c, node, a).refs(), src_a.refs());
        Repo::at(&c, node, a).assert_fsck_clean();
    }
    assert_eq!(Repo::at(&c, 2, b).refs(), src_b.refs());

    // A write on the source: a branch added, one moved back, one deleted,
    // a tag added and one deleted, HEAD moved.
    src_a.commit("main", "three");
    let first = src_a.git(&["rev-list", "--max-parents=0", "main"]);
    src_a.git(&["update-ref", "refs/heads/feature", &first]);
    src_a.git(&["update-ref", "-d", "refs/heads/stale"]);
    src_a.git(&["update-ref", "-d", "refs/tags/light"]);
    src_a.git(&["tag", "-a", "v2", "-m", "release 2", "main"]);
    src_a.commit("topic/new", "new branch");
    src_a.git(&["symbolic-ref", "HEAD", "refs/heads/feature"]);
    c.record(a, 2).await;

    // Existing replicas of a, and b on a target that never had it.
    c.publish_update(a, "gitaly-2").await;
    c.publish_update(a, "gitaly-3").await;
    c.publish_update(b, "gitaly-3").await;
    c.wait_for_generation(a, "gitaly-2", 2).await;
    c.wait_for_generation(a, "gitaly-3", 2).await;
    c.wait_for_generation(b, "gitaly-3", 1).await;
    for node in [2, 3] {
        let replica = Repo::at(&c, node, a);
        let refs = replica.refs();
        assert_eq!(refs, src_a.refs());
        assert!(!refs.contains("refs/heads/stale") && !refs.contains("refs/tags/light"));
        assert!(refs.contains("refs/tags/v2") && refs.contains("refs/heads/topic/new"));
        replica.assert_fsck_clean();
    }
    assert_eq!(Repo::at(&c, 3, b).refs(), src_b.refs());
    c.wait_until_drained().await;
    assert!(c.dead_letters().await.is_empty());
    service.stop().await.unwrap();
}

#[tokio::test]
async fn rename_and_delete_are_applied_on_disk_and_in_postgres() {
    let c = NodeCluster::start(2).await;
    let (old, new, doomed) = ("r/old.git", "r/moved/new.git", "r/doomed.git");
    Repo::at(&c, 1, old).populate();
    Repo::at(&c, 1, doomed).populate();
    c.record(old, 1).await;
    c.record(doomed, 1).await;
    let service = c.replicator();
    c.publish_update(old, "gitaly-2").await;
    c.publish_update(doomed, "gitaly-2").await;
    c.wait_for_generation(old, "gitaly-2", 1).await;
    c.wait_for_generation(doomed, "gitaly-2", 1).await;
    let before = Repo::at(&c, 1, old).refs();

    for target in ["gitaly-1", "gitaly-2"] {
        c.publish(&c.job(json!({"change": "rename", "relative_path": old, "target_node_storage": target, "params": {"new_relative_path": new}})))
            .await;
        c.publish(&c.job(
            json!({"change": "delete", "relative_path": doomed, "target_node_storage": target}),
        ))
        .await;
    }
    c.wait_until_drained().await;
    assert!(c.dead_letters().await.is_empty());

    for node in [1, 2] {
        assert!(
            !Repo::at(&c, node, old).exists(),
            "old path on gitaly-{node}"
        );
        assert_eq!(Repo::at(&c, node, new).refs(), before);
        assert!(
            !Repo::at(&c, node, doomed).exists(),
            "deleted repository on gitaly-{node}"
        );
        let storage = format!("gitaly-{node}");
        assert_eq!(c.generation(new, &storage).await, Some(1));
        assert_eq!(c.generation(old, &storage).await, None);
        assert_eq!(c.generation(doomed, &storage).await, None);
    }
    assert_eq!(repository_rows(&c, new).await, 1);
    assert_eq!(repository_rows(&c, old).await, 0);
    assert_eq!(repository_rows(&c, doomed).await, 0);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn every_maintenance_job_runs_on_a_replica_and_leaves_it_valid() {
    let c = NodeCluster::start(2).await;
    let path = "m/maintained.git";
    let source = Repo::at(&c, 1, path);
    source.populate();
    c.record(path, 1).await;
    let service = c.replicator();
    c.publish_update(path, "gitaly-2").await;
    c.wait_for_generation(path, "gitaly-2", 1).await;
    let replica = Repo::at(&c, 2, path);
    let has_pack_file = |ext: &str| {
        std::fs::read_dir(replica.path.join("objects/pack"))
            .map(|d| {
                d.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == ext))
            })
            .unwrap_or(false)
    };

    // One at a time, in the order a repository's housekeeping would take:
    // the repacks first, so that the multi-pack index has packs to index.
    let jobs = [
        json!({"change": "gc", "params": {"create_bitmap": true, "prune": true}}),
        json!({"change": "repack_full", "params": {"create_bitmap": true}}),
        json!({"change": "repack_incremental"}),
        json!({"change": "cleanup"}),
        json!({"change": "pack_refs", "params": {"all_refs": true}}),
        json!({"change": "write_commit_graph", "params": {"split_strategy": "size_multiple"}}),
        json!({"change": "midx_repack"}),
        json!({"change": "optimize_repository"}),
    ];
    for mut job in jobs {
        let change = job["change"].as_str().unwrap().to_owned();
        job["relative_path"] = path.into();
        job["target_node_storage"] = "gitaly-2".into();
        c.publish(&c.job(job)).await;
        c.wait_until_drained().await;
        assert!(
            c.dead_letters().await.is_empty(),
            "{change} failed: {:?}",
            c.dead_letter_errors().await
        );
        replica.assert_fsck_clean();
        assert_eq!(replica.refs(), source.refs(), "refs changed by {change}");
        // What each one leaves on disk, where it is visible.
        match change.as_str() {
            "gc" | "repack_full" => assert!(has_pack_file("bitmap"), "{change}: no bitmap"),
            "pack_refs" => assert!(replica.path.join("packed-refs").is_file()),
            "write_commit_graph" => assert!(
                replica
                    .path
                    .join("objects/info/commit-graphs/commit-graph-chain")
                    .is_file()
            ),
            "midx_repack" => assert!(replica.path.join("objects/pack/multi-pack-index").is_file()),
            _ => {}
        }
    }
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_pool_linked_repository_replicates_with_its_pool_link_on_the_target() {
    let c = NodeCluster::start(2).await;
    let pool = "@pools/ab/cd/pool.git";
    let fork = "@hashed/12/34/fork.git";
    let src_pool = Repo::at(&c, 1, pool);
    src_pool.populate();
    let src_fork = Repo::at(&c, 1, fork);
    src_fork.init();
    // Link on the source through the node's own RPC, then point the fork's
    // refs at objects that only the pool has, plus a commit of its own.
    let source = c.node(1);
    let client = crate::common::storage_nodes::client(source, &source.token);
    let ctx = call_context();
    let repo = |storage: &str, relative_path: &str| {
        Some(pb::Repository {
            storage_name: storage.to_owned(),
            relative_path: relative_path.to_owned(),
            ..Default::default()
        })
    };
    let link = client.request(
        pb::LinkRepositoryToObjectPoolRequest {
            object_pool: Some(pb::ObjectPool {
                repository: repo("gitaly-1", pool),
            }),
            repository: repo("gitaly-1", fork),
        },
        &ctx,
    );
    client
        .object_pool_service()
        .link_repository_to_object_pool(link)
        .await
        .unwrap();
    let pool_main = src_pool.git(&["rev-parse", "main"]);
    src_fork.git(&["update-ref", "refs/heads/main", &pool_main]);
    src_fork.commit("fork-only", "fork work");
    src_fork.assert_fsck_clean();
    c.record(pool, 1).await;
    c.record(fork, 1).await;

    let service = c.replicator();
    // The pool first, as Praefect's pool creation does, then the fork.
    c.publish_update(pool, "gitaly-2").await;
    c.wait_for_generation(pool, "gitaly-2", 1).await;
    c.publish_update(fork, "gitaly-2").await;
    c.wait_for_generation(fork, "gitaly-2", 1).await;

    let target = c.node(2);
    let replica = Repo::at(&c, 2, fork);
    assert_eq!(replica.refs(), src_fork.refs());
    replica.assert_fsck_clean();
    let alternates = std::fs::read_to_string(replica.path.join("objects/info/alternates")).unwrap();
    let linked = replica
        .path
        .join("objects")
        .join(alternates.trim())
        .canonicalize()
        .unwrap();
    assert_eq!(
        linked,
        target.repo(pool).join("objects").canonicalize().unwrap(),
        "alternates {alternates:?} do not point at the target's pool"
    );
    let client = crate::common::storage_nodes::client(target, &target.token);
    let get = client.request(
        pb::GetObjectPoolRequest {
            repository: repo("gitaly-2", fork),
        },
        &ctx,
    );
    let reported = client
        .object_pool_service()
        .get_object_pool(get)
        .await
        .unwrap()
        .into_inner()
        .object_pool
        .and_then(|p| p.repository)
        .expect("the target reports a pool");
    assert_eq!(
        (
            reported.storage_name.as_str(),
            reported.relative_path.as_str()
        ),
        ("gitaly-2", pool)
    );
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_target_killed_in_the_middle_of_a_batch_completes_its_jobs_after_a_restart() {
    let slow = NodeSetup {
        flags: vec!["--latency".into(), "300ms".into()],
        ..Default::default()
    };
    // Four jobs in flight at a time, so the kill lands in the middle of the work.
    let mut c = NodeCluster::start_with(vec![NodeSetup::default(), slow], |t| {
        *t = t.replace("batch_size = 10", "batch_size = 4\nmax_concurrent_jobs = 4");
    })
    .await;
    let paths: Vec<String> = (0..24).map(|i| format!("k/repo-{i}.git")).collect();
    for p in &paths {
        let r = Repo::at(&c, 1, p);
        r.populate();
        r.commit("main", p);
        c.record(p, 1).await;
    }
    let service = c.replicator();
    for p in &paths {
        c.publish_update(p, "gitaly-2").await;
    }
    assert!(
        eventually(Duration::from_secs(30), || async {
            c.replicated(&paths).await >= 4
        })
        .await
    );
    let done_before_kill = c.replicated(&paths).await;
    assert!(done_before_kill < paths.len(), "all done before the kill");

    c.node_mut(2).kill().await;
    // The jobs that were in flight fail on the dead node.
    let vs = c.vs().to_owned();
    assert!(
        eventually(Duration::from_secs(10), || async {
            jobs_with_outcome(&vs, "failed") >= 1.0
        })
        .await,
        "no job failed: none was in flight at the kill"
    );
    // Down for longer than the retry delays of all three attempts (0.2 s +
    // 0.4 s): the health check stops the fetching, so the jobs wait in the
    // stream instead of using up their attempts.
    assert!(
        eventually(Duration::from_secs(10), || async {
            metric(&vs, "gitaly_replicator_target_healthy", "gitaly-2") == 0.0
        })
        .await,
        "the consumer never saw the target go down"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.node_mut(2).restart().await;

    for p in &paths {
        c.wait_for_generation(p, "gitaly-2", 1).await;
    }
    c.wait_until_drained().await;
    assert!(
        c.dead_letters().await.is_empty(),
        "a job was lost to the dead letters"
    );
    for p in &paths {
        assert_eq!(Repo::at(&c, 2, p).refs(), Repo::at(&c, 1, p).refs(), "{p}");
    }
    Repo::at(&c, 2, &paths[0]).assert_fsck_clean();
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_target_with_a_wrong_token_dead_letters_its_jobs_with_the_unauthenticated_error() {
    let wrong = NodeSetup {
        config_token: Some("not-the-node-token".into()),
        ..Default::default()
    };
    let c = NodeCluster::start_with(vec![NodeSetup::default(), wrong], |_| {}).await;
    let path = "w/guarded.git";
    Repo::at(&c, 1, path).populate();
    c.record(path, 1).await;
    let service = c.replicator();
    c.publish_update(path, "gitaly-2").await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            !c.dead_letters().await.is_empty()
        })
        .await,
        "no dead letter"
    );
    let dead = c.dead_letters().await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    let error = d.header("Gitaly-Replicator-Error").unwrap_or_default();
    assert!(error.contains("Unauthenticated"), "{error}");
    assert!(error.contains("ReplicateRepository"), "{error}");
    assert_eq!(d.header("Gitaly-Replicator-Reason"), Some("dead"));
    assert_eq!(d.header("Gitaly-Replicator-Attempts"), Some("3"));
    c.wait_until_drained().await;
    assert!(!Repo::at(&c, 2, path).exists());
    assert_eq!(c.generation(path, "gitaly-2").await, None);
    service.stop().await.unwrap();
}

/// Publish order on real replicas: `delete_replica` then `update` leaves the
/// replica equal to its source, `update` then `delete_replica` leaves none,
/// whether one process or two run the pair (queued before they start, so
/// one batch or one job each).
#[tokio::test]
async fn state_changing_pairs_leave_each_replica_on_disk_as_the_last_job_asked() {
    for processes in [1, 2] {
        let c = NodeCluster::start(2).await;
        let (kept, dropped) = ("order/kept.git", "order/dropped.git");
        for path in [kept, dropped] {
            Repo::at(&c, 1, path).populate();
            c.record(path, 1).await;
        }
        let first = c.replicator();
        c.publish_update(kept, "gitaly-2").await;
        c.publish_update(dropped, "gitaly-2").await;
        c.wait_for_generation(kept, "gitaly-2", 1).await;
        c.wait_for_generation(dropped, "gitaly-2", 1).await;
        first.stop().await.unwrap();
        // A write on the source, then the pairs, with no process running.
        for path in [kept, dropped] {
            Repo::at(&c, 1, path).commit("main", "after");
            c.record(path, 2).await;
        }
        let delete_replica = |path: &str| {
            c.job(json!({"change": "delete_replica", "relative_path": path, "target_node_storage": "gitaly-2"}))
        };
        c.publish(&delete_replica(kept)).await;
        c.publish_update(kept, "gitaly-2").await;
        c.publish_update(dropped, "gitaly-2").await;
        c.publish(&delete_replica(dropped)).await;
        let services: Vec<_> = (0..processes).map(|_| c.replicator()).collect();
        c.wait_until_drained().await;
        for s in services {
            s.stop().await.unwrap();
        }
        assert!(c.dead_letters().await.is_empty());
        let replica = Repo::at(&c, 2, kept);
        assert!(replica.exists(), "{processes} process(es): replica removed");
        assert_eq!(replica.refs(), Repo::at(&c, 1, kept).refs());
        replica.assert_fsck_clean();
        assert_eq!(c.generation(kept, "gitaly-2").await, Some(2));
        assert!(
            !Repo::at(&c, 2, dropped).exists(),
            "{processes} process(es): replica left"
        );
        assert_eq!(c.generation(dropped, "gitaly-2").await, None);
    }
}

/// The case that left replicas wrong: a `delete_replica` fails (its target
/// is restarting), the `update` published after it completes, then the
/// delete is retried. It must not remove the replica the update made.
#[tokio::test]
async fn a_retried_delete_replica_never_removes_the_replica_a_later_update_made() {
    let refuse_removal = vec![
        "--fail-method".to_owned(),
        "RemoveRepository=unavailable".to_owned(),
    ];
    let mut c = NodeCluster::start_with(
        vec![
            NodeSetup::default(),
            NodeSetup {
                flags: refuse_removal,
                ..NodeSetup::default()
            },
        ],
        |_| {},
    )
    .await;
    let path = "order/retried.git";
    let source = Repo::at(&c, 1, path);
    source.populate();
    c.record(path, 1).await;
    let service = c.replicator();
    c.publish(&c.job(json!({"change": "delete_replica", "relative_path": path, "target_node_storage": "gitaly-2"})))
        .await;
    c.publish_update(path, "gitaly-2").await;
    c.wait_for_generation(path, "gitaly-2", 1).await;
    // The target is back, removals work again: the delete's retry runs.
    c.node_mut(2).restart_with(&[]).await;
    c.wait_until_drained().await;
    service.stop().await.unwrap();
    assert!(c.dead_letters().await.is_empty());
    let replica = Repo::at(&c, 2, path);
    assert!(replica.exists(), "the retried delete removed the replica");
    assert_eq!(replica.refs(), source.refs());
    assert_eq!(c.generation(path, "gitaly-2").await, Some(1));
}

/// A repository deleted and created again at its path while its old
/// replica's `delete` was still queued (Praefect 14.5 and later give each a
/// new `repository_id`): the late delete must not remove the new
/// repository's replica or records, and the update for the new one leaves
/// the replica equal to the new source, with one process or two.
#[tokio::test]
async fn delete_then_update_after_the_repository_is_recreated_leaves_the_new_replica_on_disk() {
    for processes in [1, 2] {
        let c = NodeCluster::start(2).await;
        let path = "recreated/r.git";
        let source = Repo::at(&c, 1, path);
        source.populate();
        let store = &c.db.store;
        let old = store
            .create_repository(c.vs(), path, "gitaly-1", 1, &["gitaly-1"])
            .await
            .unwrap();
        let first = c.replicator();
        let mut update = json!({"change": "update", "relative_path": path, "source_node_storage": "gitaly-1", "target_node_storage": "gitaly-2", "repository_id": old});
        c.publish(&c.job(update.clone())).await;
        c.wait_for_generation(path, "gitaly-2", 1).await;
        first.stop().await.unwrap();

        // Deleted everywhere but on gitaly-2, whose removal is queued; then
        // created again with other content.
        sqlx::query("DELETE FROM repositories WHERE repository_id = $1")
            .bind(old)
            .execute(store.pool())
            .await
            .unwrap();
        std::fs::remove_dir_all(&source.path).unwrap();
        source.populate();
        source.commit("main", "the new repository");
        let new = store
            .create_repository(c.vs(), path, "gitaly-1", 0, &["gitaly-1"])
            .await
            .unwrap();
        c.publish(&c.job(json!({"change": "delete", "relative_path": path, "target_node_storage": "gitaly-2", "repository_id": old})))
            .await;
        update["repository_id"] = new.into();
        c.publish(&c.job(update)).await;

        let services: Vec<_> = (0..processes).map(|_| c.replicator()).collect();
        c.wait_until_drained().await;
        for s in services {
            s.stop().await.unwrap();
        }
        assert!(c.dead_letters().await.is_empty());
        let replica = Repo::at(&c, 2, path);
        assert!(replica.exists(), "{processes} process(es): replica removed");
        assert_eq!(replica.refs(), source.refs(), "{processes} process(es)");
        replica.assert_fsck_clean();
        assert_eq!(c.db.repository_id(c.vs(), path).await, Some(new));
        assert_eq!(c.generation(path, "gitaly-2").await, Some(0));
    }
}

/// Praefect 15's replica paths: the repository lives at `@cluster/…` on
/// every storage, while the store knows it by its relative path.
#[tokio::test]
async fn an_update_with_a_replica_path_replicates_the_directory_at_that_path() {
    let c = NodeCluster::start(2).await;
    let (relative_path, replica_path) = ("group/project.git", "@cluster/5e/1b/7");
    let source = Repo::at(&c, 1, replica_path);
    source.populate();
    let id =
        c.db.store
            .create_repository(c.vs(), relative_path, "gitaly-1", 1, &["gitaly-1"])
            .await
            .unwrap();
    let service = c.replicator();
    c.publish(&c.job(json!({"change": "update", "relative_path": relative_path, "replica_path": replica_path, "repository_id": id, "source_node_storage": "gitaly-1", "target_node_storage": "gitaly-2"})))
        .await;
    c.wait_for_generation(relative_path, "gitaly-2", 1).await;
    service.stop().await.unwrap();
    let replica = Repo::at(&c, 2, replica_path);
    assert_eq!(replica.refs(), source.refs());
    replica.assert_fsck_clean();
    assert!(!Repo::at(&c, 2, relative_path).exists());
}

/// A rename whose target is slow to take it (its node refuses renames for
/// a while): the source's rename is done, the repository is written to at
/// its new path and the update for that target runs before the target's
/// rename. The update records the replica at the new path (its row moved
/// from the old one: one replica per repository and storage), and the
/// late rename then only removes the old path.
#[tokio::test]
async fn an_update_at_the_new_path_before_the_targets_rename_leaves_the_replica_there() {
    let refuse_renames = NodeSetup {
        flags: vec![
            "--fail-method".to_owned(),
            "RenameRepository=unavailable".to_owned(),
        ],
        ..NodeSetup::default()
    };
    // Attempts enough for the rename to outlast the refusals.
    let mut c = NodeCluster::start_with(vec![NodeSetup::default(), refuse_renames], |t| {
        *t = t.replace("batch_size = 10", "batch_size = 10\nattempts = 30");
    })
    .await;
    let (old, new) = ("moving/old.git", "moving/new.git");
    let source = Repo::at(&c, 1, old);
    source.populate();
    c.record(old, 1).await;
    let service = c.replicator();
    c.publish_update(old, "gitaly-2").await;
    c.wait_for_generation(old, "gitaly-2", 1).await;

    for target in ["gitaly-1", "gitaly-2"] {
        c.publish(&c.job(json!({"change": "rename", "relative_path": old, "target_node_storage": target, "params": {"new_relative_path": new}})))
            .await;
    }
    c.wait_for_generation(new, "gitaly-1", 1).await;
    let source = Repo::at(&c, 1, new);
    source.commit("main", "after the rename");
    c.record(new, 2).await;
    c.publish_update(new, "gitaly-2").await;
    c.wait_for_generation(new, "gitaly-2", 2).await;
    assert_eq!(c.generation(old, "gitaly-2").await, None);

    // Renames work again: the rename's retry finds the new path settled.
    c.node_mut(2).restart_with(&[]).await;
    c.wait_until_drained().await;
    service.stop().await.unwrap();
    assert!(
        c.dead_letters().await.is_empty(),
        "{:?}",
        c.dead_letter_errors().await
    );
    assert!(!Repo::at(&c, 2, old).exists(), "the old path is left");
    let replica = Repo::at(&c, 2, new);
    assert_eq!(replica.refs(), source.refs());
    replica.assert_fsck_clean();
    assert_eq!(c.generation(new, "gitaly-2").await, Some(2));
    assert_eq!(repository_rows(&c, old).await, 0);
    assert_eq!(repository_rows(&c, new).await, 1);
}

/// A rename that moved the source's directory but failed to record it (its
/// database write refused, here by a trigger standing in for a database
/// outage at that moment), then an update from that source: the source
/// answers "no such repository" at the old path, and no job holds its lock.
/// The update must not drop the source's replica row as invalid: the
/// rename's retry records the move, and the replica keeps its generation at
/// the new path.
#[tokio::test]
async fn an_update_from_a_source_whose_rename_is_not_yet_recorded_keeps_the_sources_replica() {
    let c = NodeCluster::start_with(vec![NodeSetup::default(); 2], |t| {
        *t = t.replace("batch_size = 10", "batch_size = 10\nattempts = 20");
    })
    .await;
    let (old, new) = ("unrecorded/old.git", "unrecorded/new.git");
    let source = Repo::at(&c, 1, old);
    source.populate();
    c.db.store
        .create_repository(c.vs(), old, "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_renames() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'renames refused by the test'; END $$;
            CREATE TRIGGER refuse_renames BEFORE UPDATE OF relative_path ON repositories
        FOR EACH ROW EXECUTE FUNCTION refuse_renames();",
    )
    .execute(c.db.store.pool())
    .await
    .unwrap();
    let service = c.replicator();
    c.publish(&c.job(json!({"change": "rename", "relative_path": old, "target_node_storage": "gitaly-1", "params": {"new_relative_path": new}})))
        .await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            Repo::at(&c, 1, new).exists() && jobs_with_outcome(c.vs(), "failed") >= 1.0
        })
        .await,
        "the rename never moved the directory"
    );
    c.publish_update(old, "gitaly-2").await;
    // The update ran against the moved source: retried (or, were the move
    // not known, skipped after dropping the source's row).
    let updates = || {
        samples().sum(
            "gitaly_replicator_jobs_total",
            &[("virtual_storage", c.vs()), ("change_type", "update")],
        )
    };
    assert!(
        eventually(Duration::from_secs(20), || async { updates() >= 1.0 }).await,
        "the update never ran"
    );
    assert_eq!(c.generation(old, "gitaly-1").await, Some(1));

    sqlx::query("DROP TRIGGER refuse_renames ON repositories")
        .execute(c.db.store.pool())
        .await
        .unwrap();
    c.wait_for_generation(new, "gitaly-1", 1).await;
    c.wait_until_drained().await;
    service.stop().await.unwrap();
    assert!(
        c.dead_letters().await.is_empty(),
        "{:?}",
        c.dead_letter_errors().await
    );
    assert_eq!(repository_rows(&c, old).await, 0);
    assert_eq!(repository_rows(&c, new).await, 1);
    assert!(!Repo::at(&c, 2, old).exists());
}
