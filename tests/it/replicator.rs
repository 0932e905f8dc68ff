//! GitalyReplicator against recording Gitaly nodes and a real Postgres: for
//! every change type, the exact request the target receives (and the source,
//! for updates), the repository-store rows afterwards, and the outcome; then
//! the skips and the failure paths. Each test owns its database and nodes.

use crate::common::gitaly::{
    SOURCE, SOURCE_TOKEN, Setup, TARGET, TARGET_TOKEN, TwoNodes, VIRTUAL_STORAGE as VS,
    closed_port_address,
};
use gitaly_replicator::event::{Change, Job, SplitStrategy};
use gitaly_replicator::gitaly::metadata::{ServerInfo, decode_gitaly_servers};
use gitaly_replicator::gitaly::{CallError, CallErrorKind, auth};
use gitaly_replicator::proto::gitaly as pb;
use gitaly_replicator::replicator::{JobOutcome, ReplicationError, Replicator, SkipReason};
use gitaly_replicator::store::RepositoryStore;
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use testkit::recording_gitaly::{Behaviour, RecordedCall, RecordedRequest};
use tokio::time::Instant;
use tonic::Code;

const REPO: &str = "@hashed/ab/cd/abcd.git";
/// A second repository that no job names: its rows must never change.
const OTHER: &str = "@hashed/ef/01/ef01.git";
const NEW_PATH: &str = "@hashed/12/34/1234.git";
const POOL: &str = "@pools/ab/cd/abcd.git";
const CORRELATION_ID: &str = "corr-7f3a9c";

// --- jobs and requests ---

fn job(change: Change) -> Job {
    let source = matches!(change, Change::Update | Change::Create).then(|| SOURCE.to_owned());
    Job {
        change,
        virtual_storage: VS.to_owned(),
        relative_path: REPO.to_owned(),
        target_node_storage: TARGET.to_owned(),
        source_node_storage: source,
        correlation_id: Some(CORRELATION_ID.to_owned()),
        created_at: None,
        repository_id: None,
        replica_path: None,
    }
}

/// A repository message with only fields 2 and 3 set.
fn repository(storage: &str, relative_path: &str) -> Option<pb::Repository> {
    Some(pb::Repository {
        storage_name: storage.to_owned(),
        relative_path: relative_path.to_owned(),
        git_object_directory: String::new(),
        git_alternate_object_directories: Vec::new(),
        gl_repository: String::new(),
        gl_project_path: String::new(),
    })
}

fn target_repo() -> Option<pb::Repository> {
    repository(TARGET, REPO)
}

fn source_repo() -> Option<pb::Repository> {
    repository(SOURCE, REPO)
}

fn requests(calls: &[RecordedCall]) -> Vec<RecordedRequest> {
    calls.iter().map(|c| c.request.clone()).collect()
}

fn methods(calls: &[RecordedCall]) -> Vec<&'static str> {
    calls.iter().map(|c| c.method).collect()
}

/// Signed with a fresh v2 token of the node's own token (the server checked
/// it), carrying the job's correlation id, and `gitaly-servers` only on
/// `ReplicateRepository`.
fn assert_decorated(call: &RecordedCall) {
    assert!(
        call.auth_valid,
        "{} not signed with the node's token: {call:?}",
        call.method
    );
    assert_eq!(
        call.correlation_id.as_deref(),
        Some(CORRELATION_ID),
        "{call:?}"
    );
    if call.method != "ReplicateRepository" {
        assert_eq!(call.gitaly_servers, None, "{call:?}");
    }
}

// --- outcomes ---

fn assert_completed(outcome: JobOutcome) {
    assert!(
        matches!(outcome, JobOutcome::Completed),
        "expected Completed, got {outcome:?}"
    );
}

fn skipped(outcome: JobOutcome) -> SkipReason {
    match outcome {
        JobOutcome::Skipped(reason) => reason,
        other => panic!("expected Skipped, got {other:?}"),
    }
}

fn failed_call(outcome: JobOutcome) -> CallError {
    match outcome {
        JobOutcome::Failed(ReplicationError::Call(e)) => e,
        other => panic!("expected a failed call, got {other:?}"),
    }
}

fn invalid(outcome: JobOutcome) -> String {
    match outcome {
        JobOutcome::Invalid(reason) => reason,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

// --- rows ---

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct RepositoryRow {
    repository_id: i64,
    virtual_storage: String,
    relative_path: String,
    generation: Option<i64>,
    replica_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct ReplicaRow {
    repository_id: Option<i64>,
    virtual_storage: String,
    relative_path: String,
    storage: String,
    generation: i64,
}

/// Every row of both tables, in a stable order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rows {
    repositories: Vec<RepositoryRow>,
    replicas: Vec<ReplicaRow>,
}

async fn rows(store: &RepositoryStore) -> Rows {
    let repositories = sqlx::query_as(
        "SELECT repository_id, virtual_storage, relative_path, generation, replica_path
        FROM repositories ORDER BY relative_path",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let replicas = sqlx::query_as(
        "SELECT repository_id, virtual_storage, relative_path, storage, generation
        FROM storage_repositories ORDER BY relative_path, storage",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    Rows {
        repositories,
        replicas,
    }
}

fn repo_row(id: i64, relative_path: &str, generation: i64) -> RepositoryRow {
    RepositoryRow {
        repository_id: id,
        virtual_storage: VS.to_owned(),
        relative_path: relative_path.to_owned(),
        generation: Some(generation),
        replica_path: Some(relative_path.to_owned()),
    }
}

fn replica_row(id: i64, relative_path: &str, storage: &str, generation: i64) -> ReplicaRow {
    ReplicaRow {
        repository_id: Some(id),
        virtual_storage: VS.to_owned(),
        relative_path: relative_path.to_owned(),
        storage: storage.to_owned(),
        generation,
    }
}

/// Repository ids of the seeded rows.
struct Seeded {
    repo: i64,
    other: i64,
}

/// REPO at generation 3 with the source at 3 and the target behind at 1;
/// OTHER at 7 on both.
async fn seed(store: &RepositoryStore) -> Seeded {
    let repo = store
        .create_repository(VS, REPO, SOURCE, 1, &[SOURCE, TARGET])
        .await
        .unwrap();
    assert!(store.set_generation(VS, REPO, SOURCE, 3).await.unwrap());
    let other = seed_other(store).await;
    Seeded { repo, other }
}

/// Only OTHER, at 7 on both; returns its id.
async fn seed_other(store: &RepositoryStore) -> i64 {
    store
        .create_repository(VS, OTHER, SOURCE, 7, &[SOURCE, TARGET])
        .await
        .unwrap()
}

/// The rows `seed` writes.
fn seeded_rows(s: &Seeded) -> Rows {
    Rows {
        repositories: vec![repo_row(s.repo, REPO, 3), repo_row(s.other, OTHER, 7)],
        replicas: vec![
            replica_row(s.repo, REPO, SOURCE, 3),
            replica_row(s.repo, REPO, TARGET, 1),
            replica_row(s.other, OTHER, SOURCE, 7),
            replica_row(s.other, OTHER, TARGET, 7),
        ],
    }
}

/// Only OTHER's rows, as `seed_other` writes them.
fn other_rows(other: i64) -> Rows {
    Rows {
        repositories: vec![repo_row(other, OTHER, 7)],
        replicas: vec![
            replica_row(other, OTHER, SOURCE, 7),
            replica_row(other, OTHER, TARGET, 7),
        ],
    }
}

/// Runs a maintenance job on seeded rows, checks it completed with calls to
/// the target only and no row changed, and returns the target's calls.
async fn run_maintenance(changes: &[Change]) -> Vec<RecordedCall> {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    for change in changes {
        assert_completed(n.replicator.replicate(&job(change.clone())).await);
    }
    assert_eq!(
        n.source.gitaly.calls().len(),
        0,
        "{:?}",
        n.source.gitaly.calls()
    );
    assert_eq!(rows(&n.db.store).await, seeded_rows(&s));
    let calls = n.target.gitaly.calls();
    for call in &calls {
        assert_decorated(call);
        assert_eq!(
            (call.storage.as_str(), call.relative_path.as_str()),
            (TARGET, REPO)
        );
    }
    calls
}

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
    let unreachable = closed_port_address();
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

// --- delete, delete_replica, rename ---

fn remove_request() -> RecordedRequest {
    RecordedRequest::RemoveRepository(pb::RemoveRepositoryRequest {
        repository: target_repo(),
    })
}

fn rename_request() -> RecordedRequest {
    RecordedRequest::RenameRepository(pb::RenameRepositoryRequest {
        repository: target_repo(),
        relative_path: NEW_PATH.to_owned(),
    })
}

fn rename() -> Change {
    Change::Rename {
        new_relative_path: NEW_PATH.to_owned(),
    }
}

/// The rows after REPO's repository row and the target's replica row moved
/// to NEW_PATH, as Praefect's rename leaves them.
fn renamed_rows(s: &Seeded) -> Rows {
    Rows {
        repositories: vec![repo_row(s.repo, NEW_PATH, 3), repo_row(s.other, OTHER, 7)],
        replicas: vec![
            replica_row(s.repo, REPO, SOURCE, 3),
            replica_row(s.repo, NEW_PATH, TARGET, 1),
            replica_row(s.other, OTHER, SOURCE, 7),
            replica_row(s.other, OTHER, TARGET, 7),
        ],
    }
    .sorted()
}

impl Rows {
    fn sorted(mut self) -> Rows {
        self.repositories
            .sort_by(|a, b| a.relative_path.cmp(&b.relative_path));
        self.replicas
            .sort_by(|a, b| (&a.relative_path, &a.storage).cmp(&(&b.relative_path, &b.storage)));
        self
    }
}

#[tokio::test]
async fn delete_removes_the_repository_on_the_target_and_deletes_its_records() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;

    let outcome = n.replicator.replicate(&job(Change::Delete)).await;

    assert_completed(outcome);
    let calls = n.target.gitaly.calls();
    assert_eq!(requests(&calls), [remove_request()]);
    assert_decorated(&calls[0]);
    assert_eq!(n.source.gitaly.calls().len(), 0);
    // The repository row goes, and with it (on delete cascade) every replica row.
    assert_eq!(rows(&n.db.store).await, other_rows(s.other));
}

#[tokio::test]
async fn delete_replica_removes_the_repository_on_the_target_and_deletes_only_its_replica_record() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;

    let outcome = n.replicator.replicate(&job(Change::DeleteReplica)).await;

    assert_completed(outcome);
    let calls = n.target.gitaly.calls();
    assert_eq!(requests(&calls), [remove_request()]);
    assert_decorated(&calls[0]);
    assert_eq!(n.source.gitaly.calls().len(), 0);
    let mut expected = seeded_rows(&s);
    expected.replicas.remove(1);
    assert_eq!(rows(&n.db.store).await, expected);
}

#[tokio::test]
async fn delete_and_delete_replica_the_target_answers_not_found_complete_and_still_delete_the_records()
 {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    n.target.gitaly.respond(
        "RemoveRepository",
        Behaviour::fail(Code::NotFound, "repository does not exist"),
    );

    assert_completed(n.replicator.replicate(&job(Change::DeleteReplica)).await);
    let mut expected = seeded_rows(&s);
    expected.replicas.remove(1);
    assert_eq!(rows(&n.db.store).await, expected);

    assert_completed(n.replicator.replicate(&job(Change::Delete)).await);
    assert_eq!(rows(&n.db.store).await, other_rows(s.other));
    assert_eq!(
        requests(&n.target.gitaly.calls()),
        [remove_request(), remove_request()]
    );
}

#[tokio::test]
async fn delete_and_delete_replica_without_records_complete() {
    let n = TwoNodes::start().await;
    let other = seed_other(&n.db.store).await;
    let others = other_rows(other);

    assert_completed(n.replicator.replicate(&job(Change::Delete)).await);
    assert_completed(n.replicator.replicate(&job(Change::DeleteReplica)).await);

    assert_eq!(
        requests(&n.target.gitaly.calls()),
        [remove_request(), remove_request()]
    );
    assert_eq!(rows(&n.db.store).await, others);
}

#[tokio::test]
async fn delete_and_delete_replica_the_target_fails_keep_the_records() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    n.target.gitaly.respond(
        "RemoveRepository",
        Behaviour::fail(Code::Unavailable, "storage is restarting"),
    );

    for change in [Change::Delete, Change::DeleteReplica] {
        let e = failed_call(n.replicator.replicate(&job(change)).await);
        assert_eq!(
            (e.method, e.code, e.kind),
            (
                "RemoveRepository",
                Code::Unavailable,
                CallErrorKind::Retryable
            )
        );
    }

    assert_eq!(rows(&n.db.store).await, seeded_rows(&s));
}

#[tokio::test]
async fn rename_renames_on_the_target_and_moves_the_repository_and_target_replica_records() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;

    let outcome = n.replicator.replicate(&job(rename())).await;

    assert_completed(outcome);
    let calls = n.target.gitaly.calls();
    assert_eq!(requests(&calls), [rename_request()]);
    assert_decorated(&calls[0]);
    assert_eq!(n.source.gitaly.calls().len(), 0);
    assert_eq!(rows(&n.db.store).await, renamed_rows(&s));
}

#[tokio::test]
async fn rename_the_target_answers_not_found_completes_and_still_moves_the_records() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    n.target.gitaly.respond(
        "RenameRepository",
        Behaviour::fail(Code::NotFound, "repository does not exist"),
    );

    assert_completed(n.replicator.replicate(&job(rename())).await);

    assert_eq!(requests(&n.target.gitaly.calls()), [rename_request()]);
    assert_eq!(rows(&n.db.store).await, renamed_rows(&s));
}

#[tokio::test]
async fn rename_without_records_completes() {
    let n = TwoNodes::start().await;
    let other = seed_other(&n.db.store).await;

    assert_completed(n.replicator.replicate(&job(rename())).await);

    assert_eq!(requests(&n.target.gitaly.calls()), [rename_request()]);
    assert_eq!(rows(&n.db.store).await, other_rows(other));
}

#[tokio::test]
async fn rename_the_target_no_longer_implements_fails_and_moves_no_records() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    n.target.gitaly.respond(
        "RenameRepository",
        Behaviour::fail(Code::Unimplemented, "unknown method RenameRepository"),
    );

    // The rename did not happen: a failure (retried, then dead-lettered),
    // never an acknowledgement without effect.
    match n.replicator.replicate(&job(rename())).await {
        JobOutcome::Failed(e) => {
            let e = e.to_string();
            assert!(e.contains("RenameRepository"), "{e}");
            assert!(e.contains("unknown method RenameRepository"), "{e}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(rows(&n.db.store).await, seeded_rows(&s));
}

// --- maintenance ---

#[tokio::test]
async fn gc_sends_garbage_collect_with_both_params_to_the_target_and_changes_no_rows() {
    let calls = run_maintenance(&[
        Change::GarbageCollect {
            create_bitmap: true,
            prune: false,
        },
        Change::GarbageCollect {
            create_bitmap: false,
            prune: true,
        },
    ])
    .await;

    assert_eq!(
        requests(&calls),
        [
            RecordedRequest::GarbageCollect(pb::GarbageCollectRequest {
                repository: target_repo(),
                create_bitmap: true,
                prune: false,
            }),
            RecordedRequest::GarbageCollect(pb::GarbageCollectRequest {
                repository: target_repo(),
                create_bitmap: false,
                prune: true,
            }),
        ]
    );
    assert_eq!(methods(&calls), ["GarbageCollect", "GarbageCollect"]);
}

#[tokio::test]
async fn repack_full_sends_create_bitmap_to_the_target_and_changes_no_rows() {
    let calls = run_maintenance(&[
        Change::RepackFull {
            create_bitmap: true,
        },
        Change::RepackFull {
            create_bitmap: false,
        },
    ])
    .await;

    assert_eq!(
        requests(&calls),
        [
            RecordedRequest::RepackFull(pb::RepackFullRequest {
                repository: target_repo(),
                create_bitmap: true,
            }),
            RecordedRequest::RepackFull(pb::RepackFullRequest {
                repository: target_repo(),
                create_bitmap: false,
            }),
        ]
    );
    assert_eq!(methods(&calls), ["RepackFull", "RepackFull"]);
}

#[tokio::test]
async fn repack_incremental_sends_repack_incremental_to_the_target_and_changes_no_rows() {
    let calls = run_maintenance(&[Change::RepackIncremental]).await;

    assert_eq!(
        requests(&calls),
        [RecordedRequest::RepackIncremental(
            pb::RepackIncrementalRequest {
                repository: target_repo(),
            }
        )]
    );
    assert_eq!(methods(&calls), ["RepackIncremental"]);
}

#[tokio::test]
async fn cleanup_sends_cleanup_to_the_target_and_changes_no_rows() {
    let calls = run_maintenance(&[Change::Cleanup]).await;

    assert_eq!(
        requests(&calls),
        [RecordedRequest::Cleanup(pb::CleanupRequest {
            repository: target_repo(),
        })]
    );
    assert_eq!(methods(&calls), ["Cleanup"]);
}

#[tokio::test]
async fn pack_refs_sends_all_refs_to_the_target_ref_service_and_changes_no_rows() {
    let calls = run_maintenance(&[
        Change::PackRefs { all_refs: true },
        Change::PackRefs { all_refs: false },
    ])
    .await;

    assert_eq!(
        requests(&calls),
        [
            RecordedRequest::PackRefs(pb::PackRefsRequest {
                repository: target_repo(),
                all_refs: true,
            }),
            RecordedRequest::PackRefs(pb::PackRefsRequest {
                repository: target_repo(),
                all_refs: false,
            }),
        ]
    );
    assert_eq!(methods(&calls), ["PackRefs", "PackRefs"]);
}

#[tokio::test]
async fn write_commit_graph_sends_the_size_multiple_split_strategy_to_the_target_and_changes_no_rows()
 {
    let calls = run_maintenance(&[Change::WriteCommitGraph {
        split_strategy: SplitStrategy::SizeMultiple,
    }])
    .await;

    assert_eq!(
        requests(&calls),
        [RecordedRequest::WriteCommitGraph(
            pb::WriteCommitGraphRequest {
                repository: target_repo(),
                // Gitaly's SplitStrategy enum: SizeMultiple = 0.
                split_strategy: 0,
            }
        )]
    );
    assert_eq!(methods(&calls), ["WriteCommitGraph"]);
}

#[tokio::test]
async fn midx_repack_sends_midx_repack_to_the_target_and_changes_no_rows() {
    let calls = run_maintenance(&[Change::MidxRepack]).await;

    assert_eq!(
        requests(&calls),
        [RecordedRequest::MidxRepack(pb::MidxRepackRequest {
            repository: target_repo(),
        })]
    );
    assert_eq!(methods(&calls), ["MidxRepack"]);
}

#[tokio::test]
async fn optimize_repository_sends_optimize_repository_to_the_target_and_changes_no_rows() {
    let calls = run_maintenance(&[Change::OptimizeRepository]).await;

    assert_eq!(
        requests(&calls),
        [RecordedRequest::OptimizeRepository(
            pb::OptimizeRepositoryRequest {
                repository: target_repo(),
            }
        )]
    );
    assert_eq!(methods(&calls), ["OptimizeRepository"]);
}

fn maintenance_changes() -> [(Change, &'static str); 8] {
    [
        (
            Change::GarbageCollect {
                create_bitmap: true,
                prune: true,
            },
            "GarbageCollect",
        ),
        (
            Change::RepackFull {
                create_bitmap: true,
            },
            "RepackFull",
        ),
        (Change::RepackIncremental, "RepackIncremental"),
        (Change::Cleanup, "Cleanup"),
        (Change::PackRefs { all_refs: true }, "PackRefs"),
        (
            Change::WriteCommitGraph {
                split_strategy: SplitStrategy::SizeMultiple,
            },
            "WriteCommitGraph",
        ),
        (Change::MidxRepack, "MidxRepack"),
        (Change::OptimizeRepository, "OptimizeRepository"),
    ]
}

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
    let n = TwoNodes::start_with(Setup {
        target_address: Some(closed_port_address()),
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
