//! Per-repository exclusion: at most one job per (virtual storage, relative
//! path, target) runs at a time, in this process (an async mutex per key) and
//! across processes (a Postgres session advisory lock on the key's hash).
//!
//! All of this process's advisory locks live on one dedicated connection owned
//! by a task that batches lock and unlock requests into one statement each, so
//! exclusion costs two round trips per burst of jobs rather than per job. If
//! that connection dies, Postgres frees its locks: the task reconnects and
//! takes back the locks of jobs still running.

use crate::store::{self, StoreError};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedMutexGuard, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

enum Request {
    TryLock {
        key: i64,
        reply: oneshot::Sender<bool>,
    },
    Unlock {
        key: i64,
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
    _local: OwnedMutexGuard<()>,
}

impl RepositoryGuard {
    /// Whether the lock was not free at once (another job of the repository
    /// ran first), so what was checked before may have changed.
    pub fn waited(&self) -> bool {
        self.waited
    }
}

/// `application_name` of the connection that holds the locks.
pub const LOCK_CONNECTION_NAME: &str = "gitaly-replicator repository locks";

/// While locks are held, the connection is checked this often, so a lost
/// session is noticed and its locks taken back promptly.
const KEEPALIVE: Duration = Duration::from_secs(1);

const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);

impl RepositoryLocks {
    /// Starts the lock-holding task; it stops when `shutdown` is cancelled
    /// and no guards remain.
    pub fn start(options: PgConnectOptions, shutdown: CancellationToken) -> Arc<RepositoryLocks> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Named, so operators can tell it apart in pg_stat_activity.
        let options = options.application_name(LOCK_CONNECTION_NAME);
        tokio::spawn(lock_holder(options, rx, shutdown));
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
    pub async fn acquire(&self, key: i64, cancel: &CancellationToken) -> Option<RepositoryGuard> {
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
        let mut wait = RETRY_MIN;
        loop {
            let (reply, answer) = oneshot::channel();
            if self.requests.send(Request::TryLock { key, reply }).is_err() {
                return None;
            }
            let locked = tokio::select! {
                a = answer => a.unwrap_or(false),
                _ = cancel.cancelled() => {
                    // The request may still be granted; give it back.
                    let _ = self.requests.send(Request::Unlock { key });
                    return None;
                }
            };
            if locked {
                return Some(RepositoryGuard {
                    key,
                    waited,
                    _local: local,
                });
            }
            waited = true;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return None,
            }
            wait = (wait * 2).min(RETRY_MAX);
        }
    }

    /// Gives the key back. The unlock is queued before the local mutex is
    /// released, so the next local job's lock request comes after it.
    pub fn release(&self, guard: RepositoryGuard) {
        let _ = self.requests.send(Request::Unlock { key: guard.key });
        let key = guard.key;
        drop(guard);
        let mut map = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = map.get(&key)
            && Arc::strong_count(m) == 1
        {
            map.remove(&key);
        }
    }
}

/// Owns the connection; answers requests in batches.
async fn lock_holder(
    options: PgConnectOptions,
    mut rx: mpsc::UnboundedReceiver<Request>,
    shutdown: CancellationToken,
) {
    // Keys this session holds, with their reentrancy count.
    let mut held: HashMap<i64, u32> = HashMap::new();
    let mut conn: Option<PgConnection> = None;
    let mut reconnect_wait = RETRY_MIN;
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => break },
            _ = shutdown.cancelled(), if held.is_empty() => break,
            _ = keepalive.tick(), if !held.is_empty() => {
                let alive = match conn.as_mut() {
                    Some(c) => store::swap_advisory_locks(c, &[], &[]).await.is_ok(),
                    None => false,
                };
                if !alive {
                    tracing::warn!("repository lock connection lost; reconnecting to take the locks back");
                    conn = None;
                    reconnect(&options, &mut conn, &held).await;
                }
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if conn.is_none() && !reconnect(&options, &mut conn, &held).await {
            deny(batch, &mut held);
            tokio::time::sleep(reconnect_wait).await;
            reconnect_wait = (reconnect_wait * 2).min(RETRY_MAX);
            continue;
        }
        reconnect_wait = RETRY_MIN;
        let Some(c) = conn.as_mut() else { continue };
        if let Err(e) = serve_batch(c, batch, &mut held).await {
            tracing::warn!(error = %e, "repository lock connection failed; reconnecting");
            conn = None;
        }
    }
    if let Some(c) = conn {
        let _ = c.close().await;
    }
}

/// Opens the lock connection and takes back the locks a lost session held.
/// False when Postgres cannot be reached.
async fn reconnect(
    options: &PgConnectOptions,
    conn: &mut Option<PgConnection>,
    held: &HashMap<i64, u32>,
) -> bool {
    let mut c = match PgConnection::connect_with(options).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot connect for repository locks; retrying");
            return false;
        }
    };
    let keys: Vec<i64> = held.keys().copied().collect();
    if !keys.is_empty() {
        match store::swap_advisory_locks(&mut c, &[], &keys).await {
            Ok(got) => {
                for (k, ok) in keys.iter().zip(got) {
                    if !ok {
                        tracing::error!(
                            lock_key = k,
                            "a repository lock was taken by another process while the lock connection was down"
                        );
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "re-taking repository locks failed");
                return false;
            }
        }
    }
    *conn = Some(c);
    true
}

/// Answers a batch when no connection is available: unlocks are recorded,
/// lock requests are refused (the jobs wait and ask again).
fn deny(batch: Vec<Request>, held: &mut HashMap<i64, u32>) {
    for r in batch {
        match r {
            Request::TryLock { reply, .. } => {
                let _ = reply.send(false);
            }
            Request::Unlock { key } => forget(held, key),
        }
    }
}

fn forget(held: &mut HashMap<i64, u32>, key: i64) {
    if let Some(n) = held.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            held.remove(&key);
        }
    }
}

async fn serve_batch(
    conn: &mut PgConnection,
    batch: Vec<Request>,
    held: &mut HashMap<i64, u32>,
) -> Result<(), StoreError> {
    let mut unlocks = Vec::new();
    let mut locks = Vec::new();
    for r in batch {
        match r {
            Request::Unlock { key } => unlocks.push(key),
            Request::TryLock { key, reply } => locks.push((key, reply)),
        }
    }
    for k in &unlocks {
        forget(held, *k);
    }
    let keys: Vec<i64> = locks.iter().map(|(k, _)| *k).collect();
    let taken = match store::swap_advisory_locks(conn, &unlocks, &keys).await {
        Ok(t) => t,
        Err(e) => {
            for (_, reply) in locks {
                let _ = reply.send(false);
            }
            return Err(e);
        }
    };
    let mut abandoned = Vec::new();
    for ((key, reply), ok) in locks.into_iter().zip(taken) {
        if ok {
            *held.entry(key).or_insert(0) += 1;
            // The job went away while asking: give the lock back.
            if reply.send(true).is_err() {
                forget(held, key);
                abandoned.push(key);
            }
        } else {
            let _ = reply.send(false);
        }
    }
    if !abandoned.is_empty() {
        store::swap_advisory_locks(conn, &abandoned, &[]).await?;
    }
    Ok(())
}
