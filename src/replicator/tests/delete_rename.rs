//! Delete, delete_replica and rename, on the target and in the store.

use super::fixture::{SOURCE, TARGET, TwoNodes};
use super::*;

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
async fn rename_the_target_answers_not_found_completes_when_the_new_path_exists() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    n.target.gitaly.respond(
        "RenameRepository",
        Behaviour::fail(Code::NotFound, "repository does not exist"),
    );

    // A redelivery after the rename took effect: the repository is at the new path.
    assert_completed(n.replicator.replicate(&job(rename())).await);

    let calls = n.target.gitaly.calls();
    assert_eq!(methods(&calls), ["RenameRepository", "RepositoryExists"]);
    assert_eq!(calls[1].relative_path, NEW_PATH);
    assert_eq!(rows(&n.db.store).await, renamed_rows(&s));
}

#[tokio::test]
async fn rename_the_target_answers_not_found_fails_when_nothing_is_at_the_new_path() {
    let n = TwoNodes::start().await;
    let s = seed(&n.db.store).await;
    n.target.gitaly.respond(
        "RenameRepository",
        Behaviour::fail(Code::NotFound, "repository does not exist"),
    );
    n.target.gitaly.set_absent(NEW_PATH);

    // Nothing moved on disk: retried, and the records stay where they were.
    match n.replicator.replicate(&job(rename())).await {
        JobOutcome::Failed(e) => {
            let e = e.to_string();
            assert!(e.contains("NOT_FOUND"), "{e}");
            assert!(e.contains(NEW_PATH), "{e}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(rows(&n.db.store).await, seeded_rows(&s));
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
