//! Leases of lock sessions: a session that stops renewing is ended by its
//! peers, one that is slow is not lost, and one that cannot renew stops its
//! jobs before peers take its repositories.

use super::tests::{can_take, process, process_on, process_with_lease};
use crate::store::{
    self, Gated, GenerationRecord, LockSessionId, LockSessionLease, WriteOrder, repository_lock_key,
};
use crate::test_database::TestDatabase;
use sqlx::Connection;
use sqlx::postgres::PgConnectOptions;
use std::str::FromStr;
use std::time::{Duration, Instant};
use testkit::delay_proxy::DelayProxy;
use tokio_util::sync::CancellationToken;

/// A lock session that took `key` and then stopped renewing its lease, as a
/// hung process's does: its backend lives on and holds the lock.
async fn hung_session(
    db: &TestDatabase,
    key: i64,
    lease: Duration,
) -> (LockSessionId, sqlx::PgConnection) {
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let (pid, backend_start) = store::register_lock_session(&mut conn, lease)
        .await
        .unwrap();
    let swap = store::swap_advisory_locks(
        &mut conn,
        &[],
        &[key],
        LockSessionLease {
            held: &[],
            backend_start,
            lease,
        },
    )
    .await
    .unwrap();
    assert_eq!(swap.taken, [true]);
    (LockSessionId { pid, backend_start }, conn)
}

#[tokio::test]
async fn a_session_whose_lease_ran_out_is_ended_by_a_peer_and_can_write_nothing() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository("default", "hung.git", "gitaly-1", 2, &["gitaly-1"])
        .await
        .unwrap();
    let key = repository_lock_key("default", "hung.git", "gitaly-2");
    let lease = Duration::from_secs(3);
    let (hung, mut conn) = hung_session(&db, key, lease).await;
    let started = Instant::now();
    let (b, _sb) = process(&db);
    assert!(!can_take(&b, key, Duration::from_millis(500)).await);
    assert!(
        can_take(&b, key, lease + Duration::from_secs(15)).await,
        "the hung session's repository was never granted again"
    );
    let regranted = started.elapsed();
    assert!(
        regranted >= lease - Duration::from_millis(500),
        "{regranted:?}"
    );
    // Its backend was ended, and a write under its lock is refused.
    assert!(sqlx::query("SELECT 1").execute(&mut conn).await.is_err());
    let order = WriteOrder {
        stream: "work@1".into(),
        sequence: 1,
        lock_session: Some(hung),
        repository_id: None,
    };
    let written = db
        .store
        .set_generations(&[GenerationRecord {
            virtual_storage: "default",
            relative_path: "hung.git",
            storage: "gitaly-2",
            generation: 2,
            order: Some(&order),
        }])
        .await
        .unwrap();
    assert_eq!(written, [Gated::LockLost]);
}

#[tokio::test]
async fn a_write_under_a_session_whose_lease_ran_out_is_refused_while_its_backend_lives() {
    let db = TestDatabase::new().await;
    db.store
        .create_repository("default", "late.git", "gitaly-1", 2, &["gitaly-1"])
        .await
        .unwrap();
    let key = repository_lock_key("default", "late.git", "gitaly-2");
    let (session, _conn) = hung_session(&db, key, Duration::from_secs(60)).await;
    let order = WriteOrder {
        stream: "work@1".into(),
        sequence: 1,
        lock_session: Some(session),
        repository_id: None,
    };
    let record = GenerationRecord {
        virtual_storage: "default",
        relative_path: "late.git",
        storage: "gitaly-2",
        generation: 2,
        order: Some(&order),
    };
    // Its lease ran out (no peer has ended it yet).
    sqlx::query("UPDATE replication_lock_sessions SET lease_until = now() - interval '1 second' WHERE pid = $1")
        .bind(session.pid)
        .execute(db.store.pool())
        .await
        .unwrap();
    assert_eq!(
        db.store.set_generations(&[record]).await.unwrap(),
        [Gated::LockLost]
    );
    assert_eq!(
        db.store
            .delete_replica_in_order("default", "late.git", "gitaly-2", Some(&order))
            .await
            .unwrap(),
        Gated::LockLost
    );
}

fn through(proxy: &DelayProxy, db: &TestDatabase) -> PgConnectOptions {
    PgConnectOptions::from_str(&db.url)
        .unwrap()
        .host("127.0.0.1")
        .port(proxy.port())
}

async fn proxy_to(db: &TestDatabase) -> DelayProxy {
    let options = PgConnectOptions::from_str(&db.url).unwrap();
    let upstream = format!("127.0.0.1:{}", options.get_port()).parse().unwrap();
    DelayProxy::start(upstream).await.unwrap()
}

#[tokio::test]
async fn round_trips_slower_than_a_second_do_not_lose_the_session() {
    let db = TestDatabase::new().await;
    let proxy = proxy_to(&db).await;
    let (a, _sa) = process_on(through(&proxy, &db), Duration::from_secs(30));
    let never = CancellationToken::new();
    let key = repository_lock_key("default", "slow.git", "gitaly-2");
    let held = a.acquire(key, &never).await.unwrap();
    let pid = held.session_pid();
    // 2 s each way for 5 s: every keepalive meanwhile takes seconds.
    let slow = proxy.delay_for(Duration::from_secs(2), Duration::from_secs(5));
    let other = repository_lock_key("default", "slow-other.git", "gitaly-2");
    let second = a.acquire(other, &never).await.unwrap();
    slow.await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!held.lost().is_cancelled(), "a slow session was given up");
    assert_eq!(second.session_pid(), pid, "the session was replaced");
    a.release(second);
    a.release(held);
    let (b, _sb) = process(&db);
    assert!(can_take(&b, key, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_session_that_cannot_renew_stops_its_jobs_before_peers_take_its_repositories() {
    let db = TestDatabase::new().await;
    let proxy = proxy_to(&db).await;
    let lease = Duration::from_secs(4);
    let (a, _sa) = process_on(through(&proxy, &db), lease);
    let key = repository_lock_key("default", "cut.git", "gitaly-2");
    let held = a.acquire(key, &CancellationToken::new()).await.unwrap();
    // Nothing gets through for far longer than the lease: a half-open
    // connection whose backend still holds the lock.
    proxy.set_delay(Duration::from_secs(600));
    let cut = Instant::now();
    let (b, _sb) = process_with_lease(&db, lease);
    let taken_by_b = {
        let b = b.clone();
        tokio::spawn(async move {
            let g = b.acquire(key, &CancellationToken::new()).await;
            let at = Instant::now();
            if let Some(g) = g {
                b.release(g);
            }
            at
        })
    };
    tokio::time::timeout(lease * 3, held.lost().cancelled())
        .await
        .expect("the guard of a session that could not renew was never told");
    let lost_at = Instant::now();
    let taken_at = tokio::time::timeout(lease * 5, taken_by_b)
        .await
        .expect("the repository was never granted again")
        .unwrap();
    assert!(
        lost_at < taken_at,
        "a peer took the repository {:?} after the cut, before its job was told to stop ({:?})",
        taken_at - cut,
        lost_at - cut
    );
    assert!(taken_at - cut >= lease - Duration::from_millis(500));
    drop(held);
}

#[tokio::test]
async fn a_peer_lists_only_the_keys_a_session_holds() {
    let db = TestDatabase::new().await;
    let (a, _sa) = process_with_lease(&db, Duration::from_secs(30));
    let never = CancellationToken::new();
    let k1 = repository_lock_key("default", "one.git", "gitaly-2");
    let k2 = repository_lock_key("default", "two.git", "gitaly-2");
    let g1 = a.acquire(k1, &never).await.unwrap();
    let g2 = a.acquire(k2, &never).await.unwrap();
    let keys = || async {
        let mut k: Vec<i64> =
            sqlx::query_scalar("SELECT unnest(keys) FROM replication_lock_sessions")
                .fetch_all(db.store.pool())
                .await
                .unwrap();
        k.sort();
        k
    };
    let mut both = vec![k1, k2];
    both.sort();
    assert_eq!(keys().await, both);
    a.release(g1);
    assert!(testkit::eventually(Duration::from_secs(5), || async { keys().await == [k2] }).await);
    a.release(g2);
    assert!(
        testkit::eventually(Duration::from_secs(5), || async { keys().await.is_empty() }).await
    );
}
