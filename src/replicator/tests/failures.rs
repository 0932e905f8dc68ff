//! How failures are classified, and how calls are decorated (tokens,
//! correlation id, timeouts).

use super::fixture::{ClosedPort, SOURCE_TOKEN, Setup, TARGET, TARGET_TOKEN, TwoNodes};
use super::maintenance::maintenance_changes;
use super::*;

// --- failure classification ---

#[tokio::test]
async fn every_maintenance_rpc_the_target_does_not_implement_is_unsupported_with_its_method_name() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    n.target.gitaly.respond(
        "*",
        Behaviour::fail(Code::Unimplemented, "removed in Gitaly 15.1"),
    );

    for (change, expected_method) in maintenance_changes() {
        match n.replicator.replicate(&job(change)).await {
            JobOutcome::Unsupported { method, message } => {
                assert_eq!(
                    (method, message.as_str()),
                    (expected_method, "removed in Gitaly 15.1")
                );
            }
            other => panic!("{expected_method}: expected Unsupported, got {other:?}"),
        }
    }
    assert_eq!(
        methods(&n.target.gitaly.calls()),
        maintenance_changes().map(|(_, m)| m)
    );
    assert_eq!(rows(&n.db.store).await, seeded_rows(&s));
}

#[tokio::test]
async fn an_invalid_argument_from_the_target_makes_the_job_invalid() {
    let n = TwoNodes::start().await;
    n.target.gitaly.respond(
        "OptimizeRepository",
        Behaviour::fail(
            Code::InvalidArgument,
            "repository path is not a git directory",
        ),
    );

    let reason = invalid(
        n.replicator
            .replicate(&job(Change::OptimizeRepository))
            .await,
    );

    assert_eq!(
        reason,
        r#"OptimizeRepository on storage "gitaly-2": InvalidArgument: repository path is not a git directory"#
    );
}

#[tokio::test]
async fn a_retryable_error_from_the_target_fails_the_job_and_the_next_delivery_completes() {
    let n = TwoNodes::start().await;
    n.target.gitaly.respond(
        "Cleanup",
        Behaviour::fail(Code::ResourceExhausted, "too many concurrent calls").times(1),
    );

    let e = failed_call(n.replicator.replicate(&job(Change::Cleanup)).await);
    assert_eq!(
        (
            e.method,
            e.storage.as_str(),
            e.code,
            e.kind,
            e.message.as_str()
        ),
        (
            "Cleanup",
            TARGET,
            Code::ResourceExhausted,
            CallErrorKind::Retryable,
            "too many concurrent calls"
        )
    );

    assert_completed(n.replicator.replicate(&job(Change::Cleanup)).await);
    assert_eq!(methods(&n.target.gitaly.calls()), ["Cleanup", "Cleanup"]);
}

#[tokio::test]
async fn a_target_slower_than_the_job_timeout_fails_after_the_timeout_not_after_its_delay() {
    let n = TwoNodes::start_with(Setup {
        job_timeout: "300ms".to_owned(),
        ..Setup::default()
    })
    .await;
    n.target
        .gitaly
        .respond("GarbageCollect", Behaviour::delay(Duration::from_secs(10)));
    let gc = job(Change::GarbageCollect {
        create_bitmap: false,
        prune: false,
    });

    let started = Instant::now();
    let e = failed_call(n.replicator.replicate(&gc).await);
    let took = started.elapsed();

    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "took {took:?}"
    );
    assert_eq!(
        (e.method, e.storage.as_str(), e.kind),
        ("GarbageCollect", TARGET, CallErrorKind::Retryable)
    );
    assert_eq!(methods(&n.target.gitaly.calls()), ["GarbageCollect"]);
}

/// The job deadline races tonic's own enforcement of the `grpc-timeout` that
/// `NodeClient::request` sets from the same deadline: when tonic's timer
/// fires first (same millisecond tick; its future is polled first), the call
/// ends as `Cancelled: Timeout expired` instead of the job-timeout error.
/// Twenty calls on a warm channel make the race show almost surely.
#[tokio::test]
async fn every_call_cut_off_by_the_job_timeout_reports_deadline_exceeded_with_the_job_timeout() {
    let n = TwoNodes::start_with(Setup {
        job_timeout: "100ms".to_owned(),
        ..Setup::default()
    })
    .await;
    n.target
        .gitaly
        .respond("GarbageCollect", Behaviour::delay(Duration::from_secs(10)));
    let gc = job(Change::GarbageCollect {
        create_bitmap: false,
        prune: false,
    });

    let mut seen = Vec::new();
    for _ in 0..20 {
        let e = failed_call(n.replicator.replicate(&gc).await);
        seen.push((e.code, e.message));
    }

    let expected = (
        Code::DeadlineExceeded,
        "job timeout of 100ms reached".to_owned(),
    );
    assert!(seen.iter().all(|s| *s == expected), "{seen:?}");
}

#[tokio::test]
async fn an_update_slower_than_the_job_timeout_records_no_generation() {
    let n = TwoNodes::start_with(Setup {
        job_timeout: "300ms".to_owned(),
        ..Setup::default()
    })
    .await;
    let s = seed(&n.db.store).await;
    n.target.gitaly.respond(
        "ReplicateRepository",
        Behaviour::delay(Duration::from_secs(10)),
    );

    let started = Instant::now();
    let outcome = n.replicator.replicate(&job(Change::Update)).await;
    let took = started.elapsed();

    assert!(matches!(outcome, JobOutcome::Failed(_)), "{outcome:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(n.source.gitaly.calls().len(), 0);
    assert_eq!(rows(&n.db.store).await, seeded_rows(&s));
}

#[tokio::test]
async fn an_unreachable_target_fails_quickly_as_unavailable() {
    let closed = ClosedPort::bind();
    let n = TwoNodes::start_with(Setup {
        target_address: Some(closed.address()),
        ..Setup::default()
    })
    .await;
    let s = seed(&n.db.store).await;

    let started = Instant::now();
    let e = failed_call(n.replicator.replicate(&job(Change::Update)).await);
    let took = started.elapsed();

    // Well under the 5 s connect timeout: the port refuses at once.
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(
        (e.method, e.storage.as_str(), e.code, e.kind),
        (
            "ReplicateRepository",
            TARGET,
            Code::Unavailable,
            CallErrorKind::Retryable
        )
    );
    assert_eq!(n.target.gitaly.calls().len(), 0);
    assert_eq!(n.source.gitaly.calls().len(), 0);
    assert_eq!(rows(&n.db.store).await, seeded_rows(&s));
}

// --- call decoration ---

#[tokio::test]
async fn calls_carry_a_fresh_v2_token_signed_with_the_target_token() {
    let n = TwoNodes::start().await;
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();

    assert_completed(n.replicator.replicate(&job(Change::MidxRepack)).await);

    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let call = &n.target.gitaly.calls()[0];
    assert!(call.auth_valid);
    let header = call.authorization.as_deref().unwrap();
    let ts: u64 = header.rsplit('.').next().unwrap().parse().unwrap();
    assert!(
        (before..=after).contains(&ts),
        "{ts} not in {before}..={after}"
    );
    let expected = format!(
        "Bearer {}",
        auth::v2_token(TARGET_TOKEN, UNIX_EPOCH + Duration::from_secs(ts))
    );
    assert_eq!(header, expected);
    // Not the source's token.
    assert_ne!(
        header,
        format!(
            "Bearer {}",
            auth::v2_token(SOURCE_TOKEN, UNIX_EPOCH + Duration::from_secs(ts))
        )
    );
}

#[tokio::test]
async fn a_target_expecting_another_token_refuses_the_call_and_the_job_fails() {
    let n = TwoNodes::start_with(Setup {
        target_server_token: "rotated-token".to_owned(),
        ..Setup::default()
    })
    .await;
    let s = seed(&n.db.store).await;

    let e = failed_call(n.replicator.replicate(&job(Change::Update)).await);

    assert_eq!(
        (e.method, e.code, e.kind, e.message.as_str()),
        (
            "ReplicateRepository",
            Code::Unauthenticated,
            CallErrorKind::Retryable,
            "invalid token signature"
        )
    );
    let calls = n.target.gitaly.calls();
    assert_eq!(methods(&calls), ["ReplicateRepository"]);
    assert!(!calls[0].auth_valid);
    assert!(
        calls[0]
            .authorization
            .as_deref()
            .unwrap()
            .starts_with("Bearer v2.")
    );
    assert_eq!(rows(&n.db.store).await, seeded_rows(&s));
}

#[tokio::test]
async fn a_job_without_a_correlation_id_sends_no_correlation_header() {
    let n = TwoNodes::start().await;
    let mut cleanup = job(Change::Cleanup);
    cleanup.correlation_id = None;

    assert_completed(n.replicator.replicate(&cleanup).await);

    let call = &n.target.gitaly.calls()[0];
    assert_eq!(call.correlation_id, None);
    assert!(call.auth_valid);
}
