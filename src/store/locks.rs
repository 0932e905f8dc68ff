//! Per-repository exclusion: at most one job per (virtual storage, relative
//! path, target) runs at a time, in this process (an async mutex per key) and
//! across processes (a Postgres session advisory lock on the key's hash).
//!
//! All of this process's advisory locks live on one dedicated connection owned
//! by a task that batches lock and unlock requests into one statement each, so
//! exclusion costs two round trips per burst of jobs rather than per job.
//!
//! Locks are fenced. If that connection dies, Postgres frees its locks and
//! another process may take them at once, so they are never taken back: every
//! guard of the lost session is told ([`RepositoryGuard::lost`]) and its job
//! stops and is redelivered. Until those jobs have stopped, the keys the lost
//! session held are granted to no one: each session lists in the registry
//! the keys it holds, written by the statement that takes them, and a listed
//! session that is gone bars those keys, and only those, until its owner
//! clears it or its lease runs out (see `store::lock_sessions`). Every other
//! repository keeps being granted.
//!
//! Each session lives by a lease (`[replication] lock_lease`) that every
//! statement on it renews, and a keepalive when nothing else does. A session
//! is given up only when nothing renewed it for half the lease, however slow
//! each round trip is, which leaves its jobs the other half to stop before
//! peers may take their repositories. Peers end (`pg_terminate_backend`) a
//! session whose lease ran out, so a hung process or a half-open connection
//! frees its repositories within the lease. Each guard names the session
//! (backend pid and start) that granted it, and the store's state-changing
//! writes check in the same statement that this session is alive and its
//! lease running, and so that it still holds the lock (see `store::order`).
//! A statement that fails while the connection stays up (a statement
//! timeout, say) does not end the session: what it holds is read back and
//! put right, and a session missing a lock a job holds is dropped.
//!
//! Completion dedup rides on the same statements: a lock request carries the
//! job's dedup check and an unlock carries its completion record, so a burst
//! of jobs costs one statement where separate check, record and lock
//! statements cost three (the pipeline bench's maintenance rate rose by about
//! 15 %).

mod holder;
mod session;

use crate::retry_delay::RetryPolicy;
use crate::store::{JobKey, LockSessionId};
use sqlx::postgres::PgConnectOptions;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{OwnedMutexGuard, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A job's completion key with a time: its creation for a dedup check, its
/// start for a completion record.
pub type Completion = (JobKey, OffsetDateTime);

#[derive(Debug, Clone)]
struct Answer {
    taken: bool,
    superseded: bool,
    session: Option<Session>,
}

/// The lock session that granted a lock.
#[derive(Debug, Clone)]
struct Session {
    id: LockSessionId,
    lost: CancellationToken,
    /// Held by every guard of the session: when the session is lost, its
    /// entry in the registry is cleared once the last guard is gone.
    guards: Arc<()>,
}

const REFUSED: Answer = Answer {
    taken: false,
    superseded: false,
    session: None,
};

enum Request {
    TryLock {
        key: i64,
        check: Option<Completion>,
        reply: oneshot::Sender<Answer>,
    },
    Unlock {
        key: i64,
        /// The session that granted the lock; a lock of an earlier session
        /// is gone already.
        pid: Option<i32>,
        record: Option<Completion>,
        done: Option<oneshot::Sender<()>>,
    },
}

/// The process's repository locks.
pub struct RepositoryLocks {
    local: Mutex<HashMap<i64, Arc<tokio::sync::Mutex<()>>>>,
    requests: mpsc::UnboundedSender<Request>,
}

/// Held while a job runs; release with [`RepositoryLocks::release`].
pub struct RepositoryGuard {
    key: i64,
    waited: bool,
    superseded: bool,
    session: LockSessionId,
    lost: CancellationToken,
    _session: Arc<()>,
    _local: OwnedMutexGuard<()>,
}

impl RepositoryGuard {
    /// Whether the lock was not free at once (another job of the repository
    /// ran first), so what was checked before may have changed.
    pub fn waited(&self) -> bool {
        self.waited
    }

    /// The answer to the dedup check asked with the lock: a twin job
    /// completed after this one was created.
    pub fn superseded(&self) -> bool {
        self.superseded
    }

    /// Backend pid of the Postgres session holding the lock.
    #[cfg(test)]
    pub fn session_pid(&self) -> i32 {
        self.session.pid
    }

    /// The Postgres session holding the lock: the fence the store's writes
    /// check.
    pub fn session(&self) -> LockSessionId {
        self.session
    }

    /// Cancelled when the session holding the lock is lost: the job must stop
    /// and write nothing.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }
}

/// `application_name` of the connection that holds the locks.
pub const LOCK_CONNECTION_NAME: &str = "gitaly-replicator repository locks";

/// While locks are held, the lease is renewed this often, so a broken
/// connection is noticed and the jobs of a lost session are stopped promptly.
const KEEPALIVE: Duration = Duration::from_millis(250);

/// The default of `[replication] lock_lease`, as Praefect's 30 s for a dead
/// worker's jobs.
pub const DEFAULT_LOCK_LEASE: Duration = Duration::from_secs(30);

/// How a lock request that was refused, or a lost lock connection, is tried
/// again: from 20 ms, doubling, up to 1 s.
const RETRY: RetryPolicy = RetryPolicy {
    initial: Duration::from_millis(20),
    max: Duration::from_secs(1),
    multiplier: 2.0,
    jitter: 0.2,
};

impl RepositoryLocks {
    /// Starts the lock-holding task in `tasks`, whose sessions renew a lease
    /// of `lease`; it stops when `shutdown` is cancelled and no guards
    /// remain.
    pub fn start(
        options: PgConnectOptions,
        lease: Duration,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<RepositoryLocks> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Named, so operators can tell it apart in pg_stat_activity.
        let options = options.application_name(LOCK_CONNECTION_NAME);
        let lease = session::Lease { length: lease };
        tasks.spawn(holder::lock_holder(options, lease, rx, shutdown));
        Arc::new(RepositoryLocks {
            local: Mutex::new(HashMap::new()),
            requests: tx,
        })
    }

    fn local_mutex(&self, key: i64) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.local.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key).or_default().clone()
    }

    /// Waits until this job may run on `key`. Returns `None` if `cancel`
    /// fires first. Waiting never fails the job: a busy or unreachable lock
    /// holder only means waiting longer.
    #[cfg(test)]
    pub async fn acquire(&self, key: i64, cancel: &CancellationToken) -> Option<RepositoryGuard> {
        self.acquire_checked(key, None, cancel).await
    }

    /// Like [`Self::acquire`], and asks with the lock whether `check` (the
    /// job's key and creation time) is superseded; see
    /// [`RepositoryGuard::superseded`].
    pub async fn acquire_checked(
        &self,
        key: i64,
        check: Option<Completion>,
        cancel: &CancellationToken,
    ) -> Option<RepositoryGuard> {
        let local = self.local_mutex(key);
        let mut waited = false;
        let local = match local.clone().try_lock_owned() {
            Ok(g) => g,
            Err(_) => {
                waited = true;
                tokio::select! {
                    g = local.lock_owned() => g,
                    _ = cancel.cancelled() => return None,
                }
            }
        };
        let mut refused = 0;
        loop {
            let (reply, answer) = oneshot::channel();
            let request = Request::TryLock {
                key,
                check: check.clone(),
                reply,
            };
            if self.requests.send(request).is_err() {
                return None;
            }
            let answer = tokio::select! {
                a = answer => a.unwrap_or(REFUSED),
                _ = cancel.cancelled() => {
                    // The request may still be granted; give it back.
                    let _ = self.requests.send(Request::Unlock { key, pid: None, record: None, done: None });
                    return None;
                }
            };
            if let (true, Some(session)) = (answer.taken, answer.session) {
                return Some(RepositoryGuard {
                    key,
                    waited,
                    superseded: answer.superseded,
                    session: session.id,
                    lost: session.lost,
                    _session: session.guards,
                    _local: local,
                });
            }
            waited = true;
            refused += 1;
            tokio::select! {
                _ = tokio::time::sleep(RETRY.delay_after(refused)) => {}
                _ = cancel.cancelled() => return None,
            }
        }
    }

    /// Gives the key back. The unlock is queued before the local mutex is
    /// released, so the next local job's lock request comes after it.
    pub fn release(&self, guard: RepositoryGuard) {
        drop(self.release_recording(guard, None));
    }

    /// Gives the key back and records `record` (the job's key and start
    /// time) as completed, in the same statement. The key is free for local
    /// jobs at once; the returned future ends when the record is written (or
    /// failed to be, which is only logged: it saves later work, it is not the
    /// job's effect).
    pub fn release_recording(
        &self,
        guard: RepositoryGuard,
        record: Option<Completion>,
    ) -> impl Future<Output = ()> + use<> {
        let (done, written) = match record {
            Some(_) => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let _ = self.requests.send(Request::Unlock {
            key: guard.key,
            pid: Some(guard.session.pid),
            record,
            done,
        });
        let key = guard.key;
        drop(guard);
        let mut map = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = map.get(&key)
            && Arc::strong_count(m) == 1
        {
            map.remove(&key);
        }
        async move {
            if let Some(w) = written {
                let _ = w.await;
            }
        }
    }
}

#[cfg(test)]
mod lease_tests;
#[cfg(test)]
mod tests;
