//! Per-repository exclusion across processes: each `RepositoryLocks` stands
//! for one process, with its own lock connection to a real Postgres.

use super::{LOCK_CONNECTION_NAME, RepositoryLocks};
use crate::store::{JobKey, repository_lock_key};
use crate::test_database::TestDatabase;
use sqlx::postgres::PgConnectOptions;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

pub(super) fn process(db: &TestDatabase) -> (Arc<RepositoryLocks>, CancellationToken) {
    process_with_lease(db, super::DEFAULT_LOCK_LEASE)
}

/// A process whose lock sessions renew a lease of `lease`, with its lock
/// connection to `options`.
pub(super) fn process_on(
    options: PgConnectOptions,
    lease: Duration,
) -> (Arc<RepositoryLocks>, CancellationToken) {
    let stop = CancellationToken::new();
    (
        RepositoryLocks::start(
            options,
            lease,
            &tokio_util::task::TaskTracker::new(),
            stop.clone(),
        ),
        stop,
    )
}

pub(super) fn process_with_lease(
    db: &TestDatabase,
    lease: Duration,
) -> (Arc<RepositoryLocks>, CancellationToken) {
    process_on(PgConnectOptions::from_str(&db.url).unwrap(), lease)
}

/// Tries to take `key` for `wait`; true when it got it (and gives it back).
pub(super) async fn can_take(locks: &RepositoryLocks, key: i64, wait: Duration) -> bool {
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        c.cancel();
    });
    match locks.acquire(key, &cancel).await {
        Some(g) => {
            locks.release(g);
            true
        }
        None => false,
    }
}

#[tokio::test]
async fn a_repository_held_by_one_process_waits_in_another_until_released() {
    let db = TestDatabase::new().await;
    let (a, _sa) = process(&db);
    let (b, _sb) = process(&db);
    let key = repository_lock_key("default", "r.git", "gitaly-2");
    let never = CancellationToken::new();
    let held = a.acquire(key, &never).await.unwrap();
    assert!(!held.waited());
    assert!(!can_take(&b, key, Duration::from_millis(400)).await);
    // Other repositories and other targets of the same repository are free.
    assert!(
        can_take(
            &b,
            repository_lock_key("default", "other.git", "gitaly-2"),
            Duration::from_secs(2)
        )
        .await
    );
    assert!(
        can_take(
            &b,
            repository_lock_key("default", "r.git", "gitaly-3"),
            Duration::from_secs(2)
        )
        .await
    );
    let waiter = {
        let b = b.clone();
        tokio::spawn(async move {
            b.acquire(key, &CancellationToken::new()).await.map(|g| {
                let w = g.waited();
                b.release(g);
                w
            })
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished());
    a.release(held);
    let waited = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(waited, Some(true), "acquired after waiting");
}

#[tokio::test]
async fn jobs_of_one_repository_in_one_process_take_turns() {
    let db = TestDatabase::new().await;
    let (a, _s) = process(&db);
    let key = repository_lock_key("default", "same.git", "gitaly-2");
    let never = CancellationToken::new();
    let first = a.acquire(key, &never).await.unwrap();
    let second = {
        let a = a.clone();
        tokio::spawn(async move {
            a.acquire(key, &CancellationToken::new()).await.map(|g| {
                let w = g.waited();
                a.release(g);
                w
            })
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !second.is_finished(),
        "Postgres locks are reentrant; the local lock must exclude"
    );
    a.release(first);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .unwrap()
            .unwrap(),
        Some(true)
    );
}

pub(super) async fn lock_session_pid(db: &TestDatabase) -> i32 {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1 LIMIT 1",
    )
    .bind(LOCK_CONNECTION_NAME)
    .fetch_one(db.store.pool())
    .await
    .unwrap()
}

#[tokio::test]
async fn a_lost_lock_session_fences_its_guards_and_never_takes_their_locks_back() {
    let db = TestDatabase::new().await;
    let (a, _sa) = process(&db);
    let (b, _sb) = process(&db);
    let key = repository_lock_key("default", "kept.git", "gitaly-2");
    let held = a.acquire(key, &CancellationToken::new()).await.unwrap();
    let pid = lock_session_pid(&db).await;
    assert_eq!(held.session_pid(), pid);
    assert!(!held.lost().is_cancelled());
    // Kill a's lock session: Postgres frees its locks.
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(db.store.pool())
        .await
        .unwrap();
    // The guard is told within the keepalive.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), held.lost().cancelled())
            .await
            .is_ok(),
        "the guard of a lost session was not told"
    );
    // Postgres freed the lock, but a's job may still be running: nobody gets
    // it while a's guard lives (the grace period is longer than this wait).
    assert!(!can_take(&b, key, Duration::from_secs(2)).await);
    // Once a's job has stopped, b gets it promptly, and a never took it back.
    a.release(held);
    let in_b = tokio::time::timeout(
        Duration::from_secs(2),
        b.acquire(key, &CancellationToken::new()),
    )
    .await
    .expect("b waited for the grace period instead of a's release")
    .unwrap();
    assert!(!can_take(&a, key, Duration::from_millis(500)).await);
    b.release(in_b);
    assert!(can_take(&a, key, Duration::from_secs(3)).await);
}

#[tokio::test]
async fn a_session_lost_with_its_process_bars_only_its_repositories_until_its_lease_runs_out() {
    let db = TestDatabase::new().await;
    let lease = Duration::from_secs(4);
    let (a, _sa) = process_with_lease(&db, lease);
    let (b, _sb) = process(&db);
    let key = repository_lock_key("default", "gone.git", "gitaly-2");
    let held = a.acquire(key, &CancellationToken::new()).await.unwrap();
    let pid = held.session_pid();
    // The guard is never released, as if its process were hung or gone.
    std::mem::forget(held);
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(db.store.pool())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    // Every other repository is granted at once, to every process.
    let other = repository_lock_key("default", "elsewhere.git", "gitaly-2");
    assert!(can_take(&b, other, Duration::from_secs(2)).await);
    assert!(can_take(&a, other, Duration::from_secs(2)).await);
    // The one it held waits for its lease (its job may still be running).
    assert!(!can_take(&b, key, Duration::from_secs(1)).await);
    assert!(can_take(&b, key, lease + Duration::from_secs(10)).await);
    let waited = started.elapsed();
    assert!(
        waited >= lease - Duration::from_millis(1500) && waited < lease + Duration::from_secs(6),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_failed_statement_on_the_lock_session_keeps_the_session_and_its_locks() {
    let db = TestDatabase::new().await;
    let (a, _sa) = process(&db);
    let (b, _sb) = process(&db);
    let never = CancellationToken::new();
    let key = repository_lock_key("default", "stay.git", "gitaly-2");
    let held = a.acquire(key, &never).await.unwrap();
    let pid = held.session_pid();
    // A completion record Postgres refuses (text cannot hold NUL) fails the
    // statement that carries it, on a connection that stays up.
    let other = repository_lock_key("default", "bad.git", "gitaly-2");
    let bad = a.acquire(other, &never).await.unwrap();
    a.release_recording(bad, Some((job_key("bad\0.git"), at(0))))
        .await;
    let next = a
        .acquire(
            repository_lock_key("default", "next.git", "gitaly-2"),
            &never,
        )
        .await
        .unwrap();
    assert_eq!(next.session_pid(), pid, "the session was replaced");
    assert!(!held.lost().is_cancelled());
    assert!(!can_take(&b, key, Duration::from_millis(400)).await);
    // The key of the failed release was given back all the same.
    assert!(can_take(&b, other, Duration::from_secs(2)).await);
    a.release(next);
    a.release(held);
    assert!(can_take(&b, key, Duration::from_secs(2)).await);
}

#[tokio::test]
async fn cancelling_a_wait_leaves_no_lock_behind() {
    let db = TestDatabase::new().await;
    let (a, _sa) = process(&db);
    let (b, _sb) = process(&db);
    let key = repository_lock_key("default", "c.git", "gitaly-2");
    let held = a.acquire(key, &CancellationToken::new()).await.unwrap();
    assert!(!can_take(&b, key, Duration::from_millis(300)).await);
    a.release(held);
    // b gave up; a can take the key again at once, and so can b.
    assert!(can_take(&a, key, Duration::from_secs(2)).await);
    assert!(can_take(&b, key, Duration::from_secs(2)).await);
}

fn job_key(path: &str) -> JobKey {
    JobKey {
        virtual_storage: "default".into(),
        relative_path: path.into(),
        target_storage: "gitaly-2".into(),
        change_type: "optimize_repository",
        source_storage: String::new(),
    }
}

fn at(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_700_000_000 + seconds).unwrap()
}

#[tokio::test]
async fn a_completion_recorded_with_the_unlock_supersedes_older_twins_in_other_processes() {
    let db = TestDatabase::new().await;
    let (a, _sa) = process(&db);
    let (b, _sb) = process(&db);
    let key = repository_lock_key("default", "done.git", "gitaly-2");
    let never = CancellationToken::new();
    let first = a
        .acquire_checked(key, Some((job_key("done.git"), at(0))), &never)
        .await
        .unwrap();
    assert!(!first.superseded(), "nothing completed yet");
    // The job started at 10 s and completed.
    a.release_recording(first, Some((job_key("done.git"), at(10))))
        .await;
    // Twins created before it started are superseded, later ones are not;
    // another change type of the same repository is a different job.
    for (check, superseded) in [
        (Some((job_key("done.git"), at(9))), true),
        (Some((job_key("done.git"), at(10))), false),
        (Some((job_key("done.git"), at(11))), false),
        (
            Some((
                JobKey {
                    change_type: "gc",
                    ..job_key("done.git")
                },
                at(0),
            )),
            false,
        ),
        (None, false),
    ] {
        let g = b.acquire_checked(key, check.clone(), &never).await.unwrap();
        assert_eq!(g.superseded(), superseded, "{check:?}");
        b.release(g);
    }
    // The record is in the table that Praefect-style dedup reads.
    assert!(
        db.store
            .superseded(&job_key("done.git").as_key(), at(9))
            .await
            .unwrap()
    );
}

// On a current-thread runtime the lock task cannot run between the unlock
// and the twin's lock request, so both go in one statement, whose check
// cannot see the record it writes: the batch itself must answer.
#[tokio::test(flavor = "current_thread")]
async fn a_twin_asking_in_the_same_statement_as_the_record_is_superseded() {
    let db = TestDatabase::new().await;
    let (a, _sa) = process(&db);
    let key = repository_lock_key("default", "twin.git", "gitaly-2");
    let never = CancellationToken::new();
    let first = a
        .acquire_checked(key, Some((job_key("twin.git"), at(0))), &never)
        .await
        .unwrap();
    let written = a.release_recording(first, Some((job_key("twin.git"), at(10))));
    let twin = a
        .acquire_checked(key, Some((job_key("twin.git"), at(5))), &never)
        .await
        .unwrap();
    assert!(!twin.waited(), "the key was free for the twin at once");
    assert!(twin.superseded(), "the twin missed the record in its batch");
    a.release(twin);
    written.await;
    // A twin created after the recorded start is not superseded.
    let later = a
        .acquire_checked(key, Some((job_key("twin.git"), at(11))), &never)
        .await
        .unwrap();
    assert!(!later.superseded());
    a.release(later);
}
