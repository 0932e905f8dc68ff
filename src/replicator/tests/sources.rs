//! An update whose source storage is unhealthy: served from another healthy
//! replica that holds the repository's generation, or deferred without a
//! call when there is none. A healthy source's failing call is retried as
//! before, never redirected.

use super::fixture::{ClosedPort, SOURCE, SPARE, SPARE_TOKEN, Setup, TARGET, TwoNodes};
use super::*;
use crate::gitaly::health::Health;

async fn three_nodes() -> TwoNodes {
    TwoNodes::start_with(Setup {
        spare: true,
        ..Setup::default()
    })
    .await
}

fn spare(n: &TwoNodes) -> &testkit::recording_gitaly::RunningGitaly {
    n.spare.as_ref().unwrap()
}

fn set_health(n: &TwoNodes, storage: &str, health: Health) {
    n.replicator
        .nodes
        .get(VS, storage)
        .unwrap()
        .set_health(health);
}

/// REPO at generation 3 on the source, `spare_generation` on the spare and
/// 1 on the target.
async fn seed_three(store: &RepositoryStore, spare_generation: i64) -> i64 {
    let id = store
        .create_repository(VS, REPO, SOURCE, 1, &[SOURCE, TARGET, SPARE])
        .await
        .unwrap();
    assert!(store.set_generation(VS, REPO, SOURCE, 3).await.unwrap());
    if spare_generation > 1 {
        assert!(
            store
                .set_generation(VS, REPO, SPARE, spare_generation)
                .await
                .unwrap()
        );
    }
    id
}

async fn generation_of(store: &RepositoryStore, storage: &str) -> i64 {
    rows(store)
        .await
        .replicas
        .into_iter()
        .find(|r| r.relative_path == REPO && r.storage == storage)
        .map(|r| r.generation)
        .unwrap()
}

#[tokio::test]
async fn an_update_whose_source_is_unhealthy_replicates_from_an_up_to_date_replica_it_names_in_gitaly_servers()
 {
    let n = three_nodes().await;
    seed_three(&n.db.store, 3).await;
    set_health(&n, SOURCE, Health::Unhealthy);
    set_health(&n, SPARE, Health::Healthy);

    assert_completed(n.replicator.replicate(&job(Change::Update)).await);

    let calls = n.target.gitaly.calls();
    assert_eq!(methods(&calls), ["ReplicateRepository"]);
    assert_eq!(
        calls[0].request,
        RecordedRequest::ReplicateRepository(pb::ReplicateRepositoryRequest {
            repository: target_repo(),
            source: repository(SPARE, REPO),
        })
    );
    let servers = decode_gitaly_servers(calls[0].gitaly_servers.as_deref().unwrap()).unwrap();
    assert_eq!(
        servers,
        HashMap::from([(
            SPARE.to_owned(),
            ServerInfo {
                address: spare(&n).address(),
                token: SPARE_TOKEN.to_owned(),
            }
        )])
    );
    assert_eq!(
        requests(&spare(&n).gitaly.calls()),
        [RecordedRequest::GetObjectPool(pb::GetObjectPoolRequest {
            repository: repository(SPARE, REPO),
        })]
    );
    assert!(n.source.gitaly.calls().is_empty());
    // The generation recorded is the one the replica read from holds.
    assert_eq!(generation_of(&n.db.store, TARGET).await, 3);
}

#[tokio::test]
async fn with_no_healthy_replica_at_the_repository_generation_the_update_is_deferred_without_a_call()
 {
    for (spare_generation, spare_health) in [
        (2, Health::Healthy),
        (3, Health::Unhealthy),
        (3, Health::Unknown),
    ] {
        let n = three_nodes().await;
        seed_three(&n.db.store, spare_generation).await;
        let before = rows(&n.db.store).await;
        set_health(&n, SOURCE, Health::Unhealthy);
        set_health(&n, SPARE, spare_health);

        let outcome = n.replicator.replicate(&job(Change::Update)).await;

        assert!(
            matches!(&outcome, JobOutcome::SourceUnavailable { storage } if storage == SOURCE),
            "spare at {spare_generation}, {spare_health:?}: {outcome:?}"
        );
        assert_eq!(outcome.label(), "deferred");
        let all_calls = n.target.gitaly.calls().len()
            + n.source.gitaly.calls().len()
            + spare(&n).gitaly.calls().len();
        assert_eq!(all_calls, 0);
        assert_eq!(rows(&n.db.store).await, before);

        // Once the source is back, the same job replicates from it.
        set_health(&n, SOURCE, Health::Healthy);
        assert_completed(n.replicator.replicate(&job(Change::Update)).await);
        assert_eq!(methods(&n.source.gitaly.calls()), ["GetObjectPool"]);
        assert_eq!(generation_of(&n.db.store, TARGET).await, 3);
    }
}

#[tokio::test]
async fn an_unhealthy_source_is_not_needed_when_the_target_already_holds_its_generation() {
    let n = three_nodes().await;
    seed_three(&n.db.store, 3).await;
    assert!(
        n.db.store
            .set_generation(VS, REPO, TARGET, 3)
            .await
            .unwrap()
    );
    set_health(&n, SOURCE, Health::Unhealthy);

    let reason = skipped(n.replicator.replicate(&job(Change::Update)).await);

    assert_eq!(reason, SkipReason::UpToDate { generation: 3 });
    assert!(n.target.gitaly.calls().is_empty());
}

#[tokio::test]
async fn a_healthy_source_whose_call_fails_unavailable_fails_the_job_for_a_retry_and_is_not_replaced()
 {
    let closed = ClosedPort::bind();
    let n = TwoNodes::start_with(Setup {
        spare: true,
        source_address: Some(closed.address()),
        ..Setup::default()
    })
    .await;
    seed_three(&n.db.store, 3).await;
    set_health(&n, SOURCE, Health::Healthy);
    set_health(&n, SPARE, Health::Healthy);

    let e = failed_call(n.replicator.replicate(&job(Change::Update)).await);

    assert_eq!(
        (e.method, e.storage.as_str(), e.code, e.kind),
        (
            "GetObjectPool",
            SOURCE,
            Code::Unavailable,
            CallErrorKind::Retryable
        )
    );
    assert!(spare(&n).gitaly.calls().is_empty());
    assert_eq!(generation_of(&n.db.store, TARGET).await, 1);
}
