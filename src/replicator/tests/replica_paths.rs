//! Replica paths (Praefect 14.5 and later).

use super::fixture::{SOURCE, TARGET, TwoNodes};
use super::*;

// --- replica paths (Praefect 14.5 and later) ---

const REPLICA_PATH: &str = "@cluster/ab/cd/42";

fn job_at_replica_path(change: Change, repository_id: i64) -> Job {
    Job {
        repository_id: Some(repository_id),
        replica_path: Some(REPLICA_PATH.to_owned()),
        ..job(change)
    }
}

#[tokio::test]
async fn a_job_with_a_replica_path_calls_both_nodes_at_the_replica_path_and_records_by_relative_path()
 {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;

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
