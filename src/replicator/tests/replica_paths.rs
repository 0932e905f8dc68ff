//! Replica paths and repository ids (Praefect 14.5 and later).

use super::fixture::{SOURCE, TARGET, TwoNodes};
use super::*;
use crate::store::WriteOrder;

// --- replica paths (Praefect 14.5 and later) ---

const REPLICA_PATH: &str = "@cluster/ab/cd/42";

fn job_at_replica_path(change: Change, repository_id: i64) -> Job {
    Job {
        repository_id: Some(repository_id),
        replica_path: Some(REPLICA_PATH.to_owned()),
        ..job(change)
    }
}

fn order(sequence: i64) -> WriteOrder {
    WriteOrder {
        stream: "work@1".into(),
        sequence,
        lock_session: None,
    }
}

/// Records where Praefect put the repository on disk.
async fn record_replica_path(store: &RepositoryStore, id: i64, replica_path: &str) {
    sqlx::query("UPDATE repositories SET replica_path = $1 WHERE repository_id = $2")
        .bind(replica_path)
        .bind(id)
        .execute(store.pool())
        .await
        .unwrap();
}

/// As Praefect 15 renames: the repository row only.
async fn rename_in_store(store: &RepositoryStore, id: i64, relative_path: &str) {
    sqlx::query("UPDATE repositories SET relative_path = $1 WHERE repository_id = $2")
        .bind(relative_path)
        .bind(id)
        .execute(store.pool())
        .await
        .unwrap();
}

/// The repository row of `id` and its replica rows by storage.
async fn rows_of(store: &RepositoryStore, id: i64) -> (Option<RepositoryRow>, Vec<ReplicaRow>) {
    let repository = sqlx::query_as(
        "SELECT repository_id, virtual_storage, relative_path, generation, replica_path
        FROM repositories WHERE repository_id = $1",
    )
    .bind(id)
    .fetch_optional(store.pool())
    .await
    .unwrap();
    let replicas = sqlx::query_as(
        "SELECT repository_id, virtual_storage, relative_path, storage, generation
        FROM storage_repositories WHERE repository_id = $1 ORDER BY storage",
    )
    .bind(id)
    .fetch_all(store.pool())
    .await
    .unwrap();
    (repository, replicas)
}

fn at_replica_path(mut row: RepositoryRow) -> RepositoryRow {
    row.replica_path = Some(REPLICA_PATH.to_owned());
    row
}

#[tokio::test]
async fn a_job_with_a_replica_path_calls_both_nodes_at_the_replica_path_and_records_by_relative_path()
 {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    record_replica_path(&n.db.store, s.repo, REPLICA_PATH).await;

    let update = job_at_replica_path(Change::Update, s.repo);
    assert_completed(n.replicator.replicate(&update).await);
    let gc = Change::GarbageCollect {
        create_bitmap: false,
        prune: false,
    };
    assert_completed(
        n.replicator
            .replicate(&job_at_replica_path(gc, s.repo))
            .await,
    );

    let target_calls = n.target.gitaly.calls();
    assert_eq!(
        methods(&target_calls),
        ["ReplicateRepository", "GarbageCollect"]
    );
    assert_eq!(
        target_calls[0].request,
        RecordedRequest::ReplicateRepository(pb::ReplicateRepositoryRequest {
            repository: repository(TARGET, REPLICA_PATH),
            source: repository(SOURCE, REPLICA_PATH),
        })
    );
    assert_eq!(target_calls[1].relative_path, REPLICA_PATH);
    assert_eq!(
        requests(&n.source.gitaly.calls()),
        [RecordedRequest::GetObjectPool(pb::GetObjectPoolRequest {
            repository: repository(SOURCE, REPLICA_PATH),
        })]
    );
    // The store knows the repository by its relative path.
    let mut expected = seeded_rows(&s);
    expected.repositories[0] = at_replica_path(expected.repositories[0].clone());
    expected.replicas[1].generation = 3;
    assert_eq!(rows(&n.db.store).await, expected);

    assert_completed(
        n.replicator
            .replicate(&job_at_replica_path(Change::DeleteReplica, s.repo))
            .await,
    );
    let removal = n.target.gitaly.calls().pop().unwrap();
    assert_eq!(
        removal.request,
        RecordedRequest::RemoveRepository(pb::RemoveRepositoryRequest {
            repository: repository(TARGET, REPLICA_PATH),
        })
    );
    expected.replicas.remove(1);
    assert_eq!(rows(&n.db.store).await, expected);
}

#[tokio::test]
async fn the_replica_path_the_store_records_for_the_repository_id_wins_over_the_job_s() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    record_replica_path(&n.db.store, s.repo, REPLICA_PATH).await;
    // Published before Praefect recorded another replica path.
    let stale_path = |change| Job {
        replica_path: Some("@cluster/ff/ff/99".to_owned()),
        ..job_at_replica_path(change, s.repo)
    };

    assert_completed(n.replicator.replicate(&stale_path(Change::Update)).await);
    let gc = Change::GarbageCollect {
        create_bitmap: true,
        prune: true,
    };
    assert_completed(n.replicator.replicate(&stale_path(gc)).await);
    assert_completed(
        n.replicator
            .replicate(&stale_path(Change::DeleteReplica))
            .await,
    );

    let target_calls = n.target.gitaly.calls();
    assert_eq!(
        methods(&target_calls),
        ["ReplicateRepository", "GarbageCollect", "RemoveRepository"]
    );
    assert_eq!(
        target_calls[0].request,
        RecordedRequest::ReplicateRepository(pb::ReplicateRepositoryRequest {
            repository: repository(TARGET, REPLICA_PATH),
            source: repository(SOURCE, REPLICA_PATH),
        })
    );
    for call in &target_calls {
        assert_eq!(call.relative_path, REPLICA_PATH, "{}", call.method);
    }
    for call in &n.source.gitaly.calls() {
        assert_eq!(call.relative_path, REPLICA_PATH, "{}", call.method);
    }
}

#[tokio::test]
async fn an_update_published_before_a_rename_in_the_store_replicates_its_replica_path_and_records_the_renamed_repository()
 {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    record_replica_path(&n.db.store, s.repo, REPLICA_PATH).await;
    rename_in_store(&n.db.store, s.repo, NEW_PATH).await;

    // Still the old relative path: the replica path did not change.
    let update = job_at_replica_path(Change::Update, s.repo);
    assert_completed(
        n.replicator
            .replicate_in_order(&update, Some(&order(1)))
            .await,
    );

    assert_eq!(
        n.target.gitaly.calls()[0].request,
        RecordedRequest::ReplicateRepository(pb::ReplicateRepositoryRequest {
            repository: repository(TARGET, REPLICA_PATH),
            source: repository(SOURCE, REPLICA_PATH),
        })
    );
    let (repository, replicas) = rows_of(&n.db.store, s.repo).await;
    assert_eq!(
        repository,
        Some(at_replica_path(repo_row(s.repo, NEW_PATH, 3)))
    );
    // The target's row is the renamed repository's, at its path now; the
    // source's stays where Praefect left it.
    assert_eq!(
        replicas,
        [
            replica_row(s.repo, REPO, SOURCE, 3),
            replica_row(s.repo, NEW_PATH, TARGET, 3),
        ]
    );
    assert_eq!(rows_of(&n.db.store, s.other).await.1.len(), 2);

    // Again: the target holds the source's generation now.
    assert_eq!(
        skipped(
            n.replicator
                .replicate_in_order(&update, Some(&order(2)))
                .await
        ),
        SkipReason::UpToDate { generation: 3 }
    );
}

#[tokio::test]
async fn a_delete_naming_either_path_after_a_rename_in_the_store_removes_the_replica_path_and_the_repository_s_rows()
 {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    record_replica_path(&n.db.store, s.repo, REPLICA_PATH).await;
    rename_in_store(&n.db.store, s.repo, NEW_PATH).await;

    let delete_replica = Job {
        relative_path: NEW_PATH.to_owned(),
        ..job_at_replica_path(Change::DeleteReplica, s.repo)
    };
    assert_completed(
        n.replicator
            .replicate_in_order(&delete_replica, Some(&order(1)))
            .await,
    );
    assert_eq!(
        rows_of(&n.db.store, s.repo).await.1,
        [replica_row(s.repo, REPO, SOURCE, 3)]
    );

    let delete = Job {
        target_node_storage: SOURCE.to_owned(),
        ..job_at_replica_path(Change::Delete, s.repo)
    };
    assert_completed(
        n.replicator
            .replicate_in_order(&delete, Some(&order(2)))
            .await,
    );
    assert_eq!(rows_of(&n.db.store, s.repo).await, (None, vec![]));
    assert_eq!(rows(&n.db.store).await, other_rows(s.other));
    for calls in [n.target.gitaly.calls(), n.source.gitaly.calls()] {
        assert_eq!(
            requests(&calls),
            [RecordedRequest::RemoveRepository(
                pb::RemoveRepositoryRequest {
                    repository: repository(&calls[0].storage, REPLICA_PATH),
                }
            )]
        );
    }
}

#[tokio::test]
async fn jobs_of_a_repository_deleted_and_created_again_at_its_path_are_skipped_without_a_call() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    sqlx::query("DELETE FROM repositories WHERE repository_id = $1")
        .bind(s.repo)
        .execute(n.db.store.pool())
        .await
        .unwrap();
    let new =
        n.db.store
            .create_repository(VS, REPO, SOURCE, 1, &[SOURCE, TARGET])
            .await
            .unwrap();
    let before = rows(&n.db.store).await;

    let update = job_at_replica_path(Change::Update, s.repo);
    assert_eq!(
        skipped(n.replicator.replicate(&update).await),
        SkipReason::Recreated
    );
    for (sequence, change) in [(1, Change::DeleteReplica), (2, Change::Delete)] {
        let stale = job_at_replica_path(change, s.repo);
        assert_eq!(
            skipped(
                n.replicator
                    .replicate_in_order(&stale, Some(&order(sequence)))
                    .await
            ),
            SkipReason::Recreated
        );
    }

    assert!(n.target.gitaly.calls().is_empty());
    assert!(n.source.gitaly.calls().is_empty());
    assert_eq!(rows(&n.db.store).await, before);
    assert_eq!(rows_of(&n.db.store, new).await.1.len(), 2);
}
