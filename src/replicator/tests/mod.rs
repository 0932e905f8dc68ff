//! GitalyReplicator against recording Gitaly nodes and a real Postgres: for
//! every change type, the exact request the target receives (and the source,
//! for updates), the repository-store rows afterwards, and the outcome; then
//! the skips and the failure paths. Each test owns its database and nodes.

mod delete_rename;
mod failures;
mod fixture;
mod maintenance;
mod replica_paths;
mod sources;
mod update;

use crate::event::{Change, Job, SplitStrategy};
use crate::gitaly::metadata::{ServerInfo, decode_gitaly_servers};
use crate::gitaly::{CallError, CallErrorKind, auth};
use crate::proto::gitaly as pb;
use crate::replicator::{JobOutcome, ReplicationError, Replicator, SkipReason};
use crate::store::RepositoryStore;
use fixture::{SOURCE, TARGET, TwoNodes, VIRTUAL_STORAGE as VS};
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
