//! Jobs naming a repository_id and an `@cluster/…` replica path, as Praefect
//! 15 writes them, on git-backed storage nodes: the repository lives at its
//! replica path on every storage, a job published before a rename in
//! Praefect's store alone follows its repository_id to the new relative path
//! (its generation is recorded there), and a repository deleted and created
//! again does not take its predecessor's late jobs.

use crate::common::git;
use crate::common::service_metrics::jobs_with_outcome;
use crate::common::storage_nodes::NodeCluster;
use serde_json::json;

/// A repository created on gitaly-1 at `replica_path(id)`, recorded in the
/// store at `relative_path` with that replica path, as Praefect creates one.
async fn create(c: &NodeCluster, relative_path: &str) -> (i64, String) {
    let store = &c.db.store;
    let id = store
        .create_repository(c.vs(), relative_path, "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();
    let replica_path = format!("@cluster/ab/cd/{id}");
    sqlx::query("UPDATE repositories SET replica_path = $1 WHERE repository_id = $2")
        .bind(&replica_path)
        .bind(id)
        .execute(store.pool())
        .await
        .unwrap();
    git::populate(&c.node(1).repo(&replica_path));
    (id, replica_path)
}

/// A write on gitaly-1, recorded as Praefect records it (by id: the
/// replica row may be at an older relative path).
async fn write_on_source(c: &NodeCluster, id: i64, replica_path: &str, generation: i64) {
    git::commit(
        &c.node(1).repo(replica_path),
        "main",
        &format!("g{generation}"),
    );
    sqlx::query(
        "WITH r AS (UPDATE repositories SET generation = $2 WHERE repository_id = $1)
        UPDATE storage_repositories SET generation = $2
        WHERE repository_id = $1 AND storage = 'gitaly-1'",
    )
    .bind(id)
    .bind(generation)
    .execute(c.db.store.pool())
    .await
    .unwrap();
}

async fn publish(c: &NodeCluster, change: &str, relative_path: &str, id: i64, replica_path: &str) {
    let mut job = json!({
        "change": change,
        "relative_path": relative_path,
        "repository_id": id,
        "replica_path": replica_path,
        "target_node_storage": "gitaly-2",
    });
    if matches!(change, "create" | "update") {
        job["source_node_storage"] = "gitaly-1".into();
    }
    c.publish(&c.job(job)).await;
}

/// gitaly-2's replica at `replica_path` has the source's refs, and nothing
/// is at the relative paths.
fn assert_replicated(c: &NodeCluster, replica_path: &str, relative_paths: &[&str]) {
    let replica = c.node(2).repo(replica_path);
    assert_eq!(
        git::refs(&replica),
        git::refs(&c.node(1).repo(replica_path))
    );
    git::assert_fsck_clean(&replica);
    for p in relative_paths {
        assert!(!c.node(2).repo(p).exists(), "{p} exists on gitaly-2");
    }
}

#[tokio::test]
async fn jobs_with_cluster_replica_paths_follow_the_repository_id_through_a_rename_and_a_recreation()
 {
    let c = NodeCluster::start(2).await;
    let (old, new) = ("ids/project.git", "ids/renamed.git");
    let (id, replica_path) = create(&c, old).await;
    let service = c.replicator();

    publish(&c, "create", old, id, &replica_path).await;
    c.wait_for_generation(old, "gitaly-2", 1).await;
    assert_replicated(&c, &replica_path, &[old]);

    write_on_source(&c, id, &replica_path, 2).await;
    publish(&c, "update", old, id, &replica_path).await;
    c.wait_for_generation(old, "gitaly-2", 2).await;
    assert_replicated(&c, &replica_path, &[old]);

    // Renamed as Praefect 15 renames a repository with a replica path of its
    // own: the repository row and every replica row, in its store only
    // (nothing moves on disk). Then a write, and an update published before
    // the rename, naming the old relative path.
    sqlx::query(
        "WITH r AS (UPDATE repositories SET relative_path = $1 WHERE repository_id = $2)
        UPDATE storage_repositories SET relative_path = $1 WHERE repository_id = $2",
    )
    .bind(new)
    .bind(id)
    .execute(c.db.store.pool())
    .await
    .unwrap();
    write_on_source(&c, id, &replica_path, 3).await;
    publish(&c, "update", old, id, &replica_path).await;
    c.wait_for_generation(new, "gitaly-2", 3).await;
    assert_replicated(&c, &replica_path, &[old, new]);
    assert_eq!(c.db.repository_id(c.vs(), new).await, Some(id));

    // Deleted by a job also from before the rename (gitaly-2's removal
    // first; gitaly-1 still has its copy), then a new repository at the
    // same path.
    publish(&c, "delete", old, id, &replica_path).await;
    c.wait_until_drained().await;
    assert!(!c.node(2).repo(&replica_path).exists());
    assert_eq!(c.db.repository_id(c.vs(), new).await, None);
    let (new_id, new_replica_path) = create(&c, new).await;
    assert_ne!(new_replica_path, replica_path);
    publish(&c, "create", new, new_id, &new_replica_path).await;
    c.wait_for_generation(new, "gitaly-2", 1).await;
    assert_replicated(&c, &new_replica_path, &[new]);

    // The old repository's late jobs: an update that would copy its
    // directory back, a delete that would drop the new one's records.
    let skipped = jobs_with_outcome(c.vs(), "skipped");
    publish(&c, "update", new, id, &replica_path).await;
    publish(&c, "delete", new, id, &replica_path).await;
    c.wait_until_drained().await;
    service.stop().await.unwrap();
    assert_eq!(jobs_with_outcome(c.vs(), "skipped"), skipped + 2.0);
    assert!(
        c.dead_letters().await.is_empty(),
        "{:?}",
        c.dead_letter_errors().await
    );
    assert!(!c.node(2).repo(&replica_path).exists());
    assert_replicated(&c, &new_replica_path, &[new]);
    assert_eq!(c.db.repository_id(c.vs(), new).await, Some(new_id));
    assert_eq!(c.generation(new, "gitaly-2").await, Some(1));
}
