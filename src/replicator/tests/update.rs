//! Update and create: the replication request, the pool link, the
//! generation rule.

use super::fixture::{
    ClosedPort, SOURCE, SOURCE_TOKEN, Setup, TARGET, TwoNodes, VIRTUAL_STORAGE as VS,
};
use super::*;

// --- update and create ---

/// The target's ReplicateRepository names the target and source replicas and
/// carries the source's configured address and token in `gitaly-servers`.
fn assert_replicate_request(n: &TwoNodes, call: &RecordedCall) {
    assert_eq!(call.method, "ReplicateRepository");
    assert_eq!(
        call.request,
        RecordedRequest::ReplicateRepository(pb::ReplicateRepositoryRequest {
            repository: target_repo(),
            source: source_repo(),
        })
    );
    assert_decorated(call);
    let servers = decode_gitaly_servers(call.gitaly_servers.as_deref().unwrap()).unwrap();
    assert_eq!(
        servers,
        HashMap::from([(
            SOURCE.to_owned(),
            ServerInfo {
                address: n.source.address(),
                token: SOURCE_TOKEN.to_owned(),
            }
        )])
    );
}

/// The source was asked for the pool of its own replica, once.
fn assert_pool_asked_of_source(n: &TwoNodes) {
    let calls = n.source.gitaly.calls();
    assert_eq!(
        requests(&calls),
        [RecordedRequest::GetObjectPool(pb::GetObjectPoolRequest {
            repository: source_repo(),
        })]
    );
    assert_decorated(&calls[0]);
}

#[tokio::test]
async fn update_replicates_from_the_source_in_gitaly_servers_and_records_the_source_generation_on_the_target()
 {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;

    let outcome = n.replicator.replicate(&job(Change::Update)).await;

    assert_completed(outcome);
    let target_calls = n.target.gitaly.calls();
    assert_eq!(methods(&target_calls), ["ReplicateRepository"]);
    assert_replicate_request(&n, &target_calls[0]);
    assert_pool_asked_of_source(&n);
    assert!(target_calls[0].received_at <= n.source.gitaly.calls()[0].received_at);
    let mut expected = seeded_rows(&s);
    expected.replicas[1].generation = 3;
    assert_eq!(rows(&n.db.store).await, expected);
}

#[tokio::test]
async fn create_is_replicated_like_update_and_raises_the_repository_generation() {
    let n = TwoNodes::start().await;
    let repo =
        n.db.store
            .create_repository(VS, REPO, SOURCE, 3, &[SOURCE])
            .await
            .unwrap();
    // A repository row behind its newest replica, so the raise is visible.
    sqlx::query("UPDATE repositories SET generation = 1 WHERE relative_path = $1")
        .bind(REPO)
        .execute(n.db.store.pool())
        .await
        .unwrap();

    let outcome = n.replicator.replicate(&job(Change::Create)).await;

    assert_completed(outcome);
    let target_calls = n.target.gitaly.calls();
    assert_eq!(methods(&target_calls), ["ReplicateRepository"]);
    assert_replicate_request(&n, &target_calls[0]);
    assert_pool_asked_of_source(&n);
    assert_eq!(
        rows(&n.db.store).await,
        Rows {
            repositories: vec![repo_row(repo, REPO, 3)],
            replicas: vec![
                replica_row(repo, REPO, SOURCE, 3),
                replica_row(repo, REPO, TARGET, 3),
            ],
        }
    );
}

#[tokio::test]
async fn update_links_the_target_to_the_source_pool_moved_to_the_target_storage() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    n.source.gitaly.set_object_pool(
        REPO,
        pb::ObjectPool {
            repository: repository(SOURCE, POOL),
        },
    );

    let outcome = n.replicator.replicate(&job(Change::Update)).await;

    assert_completed(outcome);
    let target_calls = n.target.gitaly.calls();
    assert_eq!(
        methods(&target_calls),
        ["ReplicateRepository", "LinkRepositoryToObjectPool"]
    );
    assert_replicate_request(&n, &target_calls[0]);
    assert_eq!(
        target_calls[1].request,
        RecordedRequest::LinkRepositoryToObjectPool(pb::LinkRepositoryToObjectPoolRequest {
            object_pool: Some(pb::ObjectPool {
                repository: repository(TARGET, POOL),
            }),
            repository: target_repo(),
        })
    );
    assert_decorated(&target_calls[1]);
    assert_pool_asked_of_source(&n);
    let pool_asked_at = n.source.gitaly.calls()[0].received_at;
    assert!(target_calls[0].received_at <= pool_asked_at);
    assert!(pool_asked_at <= target_calls[1].received_at);
    let mut expected = seeded_rows(&s);
    expected.replicas[1].generation = 3;
    assert_eq!(rows(&n.db.store).await, expected);
}

#[tokio::test]
async fn update_skips_without_any_call_when_the_target_already_holds_the_source_generation() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    assert!(
        n.db.store
            .set_generation(VS, REPO, TARGET, 3)
            .await
            .unwrap()
    );

    let outcome = n.replicator.replicate(&job(Change::Update)).await;

    assert_eq!(skipped(outcome), SkipReason::UpToDate { generation: 3 });
    assert_eq!(n.target.gitaly.calls().len(), 0);
    assert_eq!(n.source.gitaly.calls().len(), 0);
    let mut expected = seeded_rows(&s);
    expected.replicas[1].generation = 3;
    assert_eq!(rows(&n.db.store).await, expected);
}

#[tokio::test]
async fn update_refuses_a_downgrade_without_any_call() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    assert!(
        n.db.store
            .set_generation(VS, REPO, TARGET, 5)
            .await
            .unwrap()
    );

    let outcome = n.replicator.replicate(&job(Change::Update)).await;

    assert_eq!(
        skipped(outcome),
        SkipReason::DowngradePrevented {
            target_generation: 5,
            source_generation: 3,
        }
    );
    assert_eq!(n.target.gitaly.calls().len(), 0);
    assert_eq!(n.source.gitaly.calls().len(), 0);
    let mut expected = seeded_rows(&s);
    expected.repositories[0].generation = Some(5);
    expected.replicas[1].generation = 5;
    assert_eq!(rows(&n.db.store).await, expected);
}

#[tokio::test]
async fn update_with_an_invalid_source_deletes_the_source_replica_record_and_keeps_the_repository()
{
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    n.target.gitaly.respond(
        "ReplicateRepository",
        Behaviour::fail(Code::NotFound, "invalid source repository"),
    );

    let outcome = n.replicator.replicate(&job(Change::Update)).await;

    assert_eq!(skipped(outcome), SkipReason::InvalidSource);
    assert_eq!(methods(&n.target.gitaly.calls()), ["ReplicateRepository"]);
    assert_eq!(n.source.gitaly.calls().len(), 0);
    let mut expected = seeded_rows(&s);
    // The source's replica row is gone; the target's (generation untouched)
    // keeps the repository row.
    expected.replicas.remove(0);
    assert_eq!(rows(&n.db.store).await, expected);
}

#[tokio::test]
async fn update_with_an_invalid_source_deletes_the_repository_record_with_its_last_replica() {
    let n = TwoNodes::start().await;
    n.db.store
        .create_repository(VS, REPO, SOURCE, 3, &[SOURCE])
        .await
        .unwrap();
    let other = seed_other(&n.db.store).await;
    n.target.gitaly.respond(
        "ReplicateRepository",
        Behaviour::fail(Code::NotFound, "invalid source repository"),
    );

    let outcome = n.replicator.replicate(&job(Change::Update)).await;

    assert_eq!(skipped(outcome), SkipReason::InvalidSource);
    assert_eq!(n.source.gitaly.calls().len(), 0);
    assert_eq!(rows(&n.db.store).await, other_rows(other));
}

#[tokio::test]
async fn update_without_generation_records_replicates_and_records_no_generation() {
    let n = TwoNodes::start().await;
    let other = seed_other(&n.db.store).await;

    let outcome = n.replicator.replicate(&job(Change::Update)).await;

    assert_completed(outcome);
    let target_calls = n.target.gitaly.calls();
    assert_eq!(methods(&target_calls), ["ReplicateRepository"]);
    assert_replicate_request(&n, &target_calls[0]);
    assert_pool_asked_of_source(&n);
    assert_eq!(rows(&n.db.store).await, other_rows(other));
}

#[tokio::test]
async fn update_the_target_fails_records_no_generation_and_succeeds_when_delivered_again() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    n.target.gitaly.respond(
        "ReplicateRepository",
        Behaviour::fail(Code::Unavailable, "storage is restarting").times(1),
    );

    let e = failed_call(n.replicator.replicate(&job(Change::Update)).await);

    assert_eq!(
        (
            e.method,
            e.storage.as_str(),
            e.code,
            e.kind,
            e.message.as_str()
        ),
        (
            "ReplicateRepository",
            TARGET,
            Code::Unavailable,
            CallErrorKind::Retryable,
            "storage is restarting"
        )
    );
    assert_eq!(
        n.source.gitaly.calls().len(),
        0,
        "no pool lookup after a failed replication"
    );
    assert_eq!(rows(&n.db.store).await, seeded_rows(&s));

    assert_completed(n.replicator.replicate(&job(Change::Update)).await);
    assert_eq!(
        methods(&n.target.gitaly.calls()),
        ["ReplicateRepository", "ReplicateRepository"]
    );
    let mut expected = seeded_rows(&s);
    expected.replicas[1].generation = 3;
    assert_eq!(rows(&n.db.store).await, expected);
}

#[tokio::test]
async fn update_whose_pool_link_fails_records_no_generation() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    n.source.gitaly.set_object_pool(
        REPO,
        pb::ObjectPool {
            repository: repository(SOURCE, POOL),
        },
    );
    n.target.gitaly.respond(
        "LinkRepositoryToObjectPool",
        Behaviour::fail(Code::Internal, "alternates file is locked"),
    );

    let e = failed_call(n.replicator.replicate(&job(Change::Update)).await);

    assert_eq!(
        (e.method, e.storage.as_str(), e.code, e.kind),
        (
            "LinkRepositoryToObjectPool",
            TARGET,
            Code::Internal,
            CallErrorKind::Retryable
        )
    );
    assert_eq!(rows(&n.db.store).await, seeded_rows(&s));
}

#[tokio::test]
async fn update_with_an_unreachable_source_fails_on_the_pool_lookup_and_records_no_generation() {
    let closed = ClosedPort::bind();
    let unreachable = closed.address();
    let n = TwoNodes::start_with(Setup {
        source_address: Some(unreachable.clone()),
        ..Setup::default()
    })
    .await;
    let s = seed(&n.db.store).await;

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
    // The target was told to reach the source where the config says it is.
    let call = &n.target.gitaly.calls()[0];
    let servers = decode_gitaly_servers(call.gitaly_servers.as_deref().unwrap()).unwrap();
    assert_eq!(servers[SOURCE].address, unreachable);
    assert_eq!(rows(&n.db.store).await, seeded_rows(&s));
}

#[tokio::test]
async fn update_whose_source_is_not_configured_fails_for_a_retry_and_calls_nothing() {
    let n = TwoNodes::start_with(Setup {
        source_in_config: false,
        ..Setup::default()
    })
    .await;
    let s = seed(&n.db.store).await;

    match n.replicator.replicate(&job(Change::Update)).await {
        JobOutcome::Failed(e) => assert_eq!(
            e.to_string(),
            r#"source storage "gitaly-1" is not configured in virtual storage "default""#
        ),
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(n.target.gitaly.calls().len(), 0);
    assert_eq!(n.source.gitaly.calls().len(), 0);
    assert_eq!(rows(&n.db.store).await, seeded_rows(&s));
}

#[tokio::test]
async fn a_job_for_a_storage_or_virtual_storage_not_configured_is_invalid_and_calls_nothing() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;

    let mut unknown_target = job(Change::Delete);
    unknown_target.target_node_storage = "gitaly-9".to_owned();
    let mut unknown_virtual_storage = job(Change::Update);
    unknown_virtual_storage.virtual_storage = "elsewhere".to_owned();

    assert_eq!(
        invalid(n.replicator.replicate(&unknown_target).await),
        r#"target storage "gitaly-9" is not configured in virtual storage "default""#
    );
    assert_eq!(
        invalid(n.replicator.replicate(&unknown_virtual_storage).await),
        r#"target storage "gitaly-2" is not configured in virtual storage "elsewhere""#
    );
    assert_eq!(n.target.gitaly.calls().len(), 0);
    assert_eq!(n.source.gitaly.calls().len(), 0);
    assert_eq!(rows(&n.db.store).await, seeded_rows(&s));
}

#[tokio::test]
async fn an_invalid_source_whose_replica_another_job_holds_keeps_its_record_and_fails_for_a_retry()
{
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    n.target.gitaly.respond(
        "ReplicateRepository",
        Behaviour::fail(Code::NotFound, "invalid source repository"),
    );
    // Another job (a rename of the source's replica, say) holds its lock,
    // as the lock session of any process would.
    let mut holder = n.db.store.pool().acquire().await.unwrap();
    let key = crate::store::repository_lock_key(VS, REPO, SOURCE);
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(&mut *holder)
        .await
        .unwrap();

    let outcome = n.replicator.replicate(&job(Change::Update)).await;

    assert!(
        matches!(
            &outcome,
            JobOutcome::Failed(ReplicationError::SourceReplicaBusy { storage }) if storage == SOURCE
        ),
        "{outcome:?}"
    );
    assert_eq!(rows(&n.db.store).await, seeded_rows(&s));

    // Once the other job is done, the same answer is an invalid source.
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut *holder)
        .await
        .unwrap();
    let outcome = n.replicator.replicate(&job(Change::Update)).await;
    assert_eq!(skipped(outcome), SkipReason::InvalidSource);
    let mut expected = seeded_rows(&s);
    expected.replicas.remove(0);
    assert_eq!(rows(&n.db.store).await, expected);
}

#[tokio::test]
async fn with_verify_after_update_an_update_completes_only_when_the_checksums_match() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    let replicator = n.replicator.clone().verifying_after_update(true);
    n.source.gitaly.set_checksum(REPO, "aaa1");
    n.target.gitaly.set_checksum(REPO, "bbb2");

    let outcome = replicator.replicate(&job(Change::Update)).await;
    match outcome {
        JobOutcome::Failed(e @ ReplicationError::ChecksumMismatch { .. }) => {
            let text = e.to_string();
            assert!(text.contains("aaa1") && text.contains("bbb2"), "{text}");
        }
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    assert_eq!(
        methods(&n.target.gitaly.calls()),
        ["ReplicateRepository", "CalculateChecksum"]
    );
    // Nothing recorded: the target keeps its generation and the job is retried.
    assert_eq!(rows(&n.db.store).await, seeded_rows(&s));

    n.target.gitaly.set_checksum(REPO, "aaa1");
    assert_completed(replicator.replicate(&job(Change::Update)).await);
    let mut expected = seeded_rows(&s);
    expected.replicas[1].generation = 3;
    assert_eq!(rows(&n.db.store).await, expected);
}
