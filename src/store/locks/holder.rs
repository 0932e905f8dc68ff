//! The task that owns the lock connection: it answers lock and unlock
//! requests in batches, one statement each, keeps the session alive and
//! tells every guard when the session is lost, and keeps the registry of
//! lost sessions (see `store::lock_sessions`).

use super::{Answer, Completion, KEEPALIVE, KEEPALIVE_TIMEOUT, REFUSED, RETRY, Request, Session};
use crate::error_chain::display_error_chain;
use crate::store::{
    self, JobKey, LockSessionAnswers, LockSessionBatch, LockSessionId, ORPHAN_GRACE_SECONDS,
    StoreError,
};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The lock connection and what its session holds.
struct LockSession {
    conn: PgConnection,
    pid: i32,
    backend_start: OffsetDateTime,
    /// Keys this session holds, with their reentrancy count.
    held: HashMap<i64, u32>,
    lost: CancellationToken,
    guards: Arc<()>,
}

/// A lost session still in the registry: it bars new locks everywhere until
/// its jobs have stopped (its last guard is gone) and it is cleared.
struct Departed {
    pid: i32,
    backend_start: OffsetDateTime,
    guards: Weak<()>,
    since: tokio::time::Instant,
}

impl Departed {
    /// Its jobs have stopped, or others cleared it after the grace period
    /// (a guard kept for an abandoned call never goes).
    fn settled(&self) -> bool {
        self.guards.strong_count() == 0
            || self.since.elapsed() > Duration::from_secs(u64::from(ORPHAN_GRACE_SECONDS))
    }
}

impl LockSession {
    fn forget(&mut self, key: i64) {
        if let Some(n) = self.held.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&key);
            }
        }
    }

    /// Ends the session: every job holding one of its locks is told to stop.
    async fn lose(self, why: &str) -> Departed {
        if !self.held.is_empty() {
            tracing::error!(
                locks = self.held.len(),
                "{why}: its repository locks are gone; the jobs holding them stop and are redelivered"
            );
        }
        self.lost.cancel();
        let _ = self.conn.close().await;
        Departed {
            pid: self.pid,
            backend_start: self.backend_start,
            guards: Arc::downgrade(&self.guards),
            since: tokio::time::Instant::now(),
        }
    }
}

/// Clears from the registry the lost sessions whose jobs have stopped, and
/// when locks were barred, starts or ends the grace period of sessions other
/// processes lost.
async fn tidy_registry(s: &mut LockSession, departed: &mut Vec<Departed>, barred: &mut bool) {
    let mut left = Vec::new();
    for d in departed.drain(..) {
        if !d.settled() {
            left.push(d);
            continue;
        }
        if let Err(e) = store::unregister_lock_session(&mut s.conn, d.pid, d.backend_start).await {
            tracing::warn!(
                error = display_error_chain(&e),
                "cannot clear a lost lock session; retrying"
            );
            left.push(d);
        }
    }
    *departed = left;
    if std::mem::take(barred)
        && let Err(e) = store::expire_lock_sessions(&mut s.conn).await
    {
        tracing::warn!(
            error = display_error_chain(&e),
            "cannot expire lost lock sessions"
        );
    }
}

/// Owns the connection; answers requests in batches.
pub(super) async fn lock_holder(
    options: PgConnectOptions,
    mut rx: mpsc::UnboundedReceiver<Request>,
    shutdown: CancellationToken,
) {
    let mut session: Option<LockSession> = None;
    let mut departed: Vec<Departed> = Vec::new();
    // A lock statement answered that locks are barred: the registry needs
    // tidying (at most once per keepalive).
    let mut barred = false;
    let mut reconnect_failures = 0;
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let holding = session.as_ref().is_some_and(|s| !s.held.is_empty());
        let tending = holding || barred || !departed.is_empty();
        let first = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => break },
            _ = shutdown.cancelled(), if !holding => break,
            _ = keepalive.tick(), if tending => {
                if session.is_none() && !departed.is_empty() {
                    session = connect(&options).await;
                }
                if let Some(mut s) = session.take() {
                    // A connection that hangs (a network partition) is as
                    // lost as a closed one: its jobs must stop in time.
                    let ping = tokio::time::timeout(
                        KEEPALIVE_TIMEOUT,
                        store::swap_advisory_locks(&mut s.conn, &[], &[]),
                    )
                    .await;
                    match ping {
                        Ok(Ok(_)) => {
                            tidy_registry(&mut s, &mut departed, &mut barred).await;
                            session = Some(s);
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = display_error_chain(&e), "repository lock connection lost");
                            departed.push(s.lose("the repository lock session was lost").await);
                        }
                        Err(_) => {
                            tracing::warn!("repository lock connection does not answer");
                            departed.push(s.lose("the repository lock session stopped answering").await);
                        }
                    }
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
        if session.is_none() {
            session = connect(&options).await;
        }
        let Some(mut s) = session.take() else {
            deny(batch);
            reconnect_failures += 1;
            tokio::time::sleep(RETRY.delay_after(reconnect_failures)).await;
            continue;
        };
        reconnect_failures = 0;
        match serve_batch(&mut s, batch).await {
            Ok(was_barred) => {
                barred |= was_barred;
                session = Some(s);
            }
            Err(e) if e.connection_usable() => match resync(&mut s).await {
                Ok(()) => session = Some(s),
                Err(e) => {
                    tracing::warn!(
                        error = display_error_chain(&e),
                        "repository lock connection failed"
                    );
                    departed.push(s.lose("the repository lock session failed").await);
                }
            },
            Err(e) => {
                tracing::warn!(
                    error = display_error_chain(&e),
                    "repository lock connection failed"
                );
                departed.push(s.lose("the repository lock session was lost").await);
            }
        }
    }
    if let Some(mut s) = session {
        s.lost.cancel();
        // With locks still held (calls abandoned at shutdown that may still
        // run), the entry stays: others wait out the grace period.
        if s.held.is_empty()
            && let Err(e) =
                store::unregister_lock_session(&mut s.conn, s.pid, s.backend_start).await
        {
            tracing::warn!(
                error = display_error_chain(&e),
                "cannot clear the lock session at shutdown"
            );
        }
        let _ = s.conn.close().await;
    }
}

/// Opens the lock connection: a new session holding nothing. None when
/// Postgres cannot be reached.
async fn connect(options: &PgConnectOptions) -> Option<LockSession> {
    let mut conn = match PgConnection::connect_with(options).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                error = display_error_chain(&e),
                "cannot connect for repository locks; retrying"
            );
            return None;
        }
    };
    // The session's only writes are completion records, which only save
    // work: one lost in a Postgres crash means a job runs again, so its
    // commits need not wait for the disk, nor the lock requests behind them.
    // Set by a statement rather than a startup option, which PgBouncer refuses.
    // The registry entry is written before, durably: it is what bars others
    // from this session's locks if it is lost.
    let registered = match store::register_lock_session(&mut conn).await {
        Ok(r) => store::relax_commit_durability(&mut conn).await.map(|()| r),
        Err(e) => Err(e),
    };
    match registered {
        Ok((pid, backend_start)) => Some(LockSession {
            conn,
            pid,
            backend_start,
            held: HashMap::new(),
            lost: CancellationToken::new(),
            guards: Arc::new(()),
        }),
        Err(e) => {
            tracing::warn!(
                error = display_error_chain(&e),
                "cannot set up the repository lock connection; retrying"
            );
            None
        }
    }
}

/// After a failed statement on a live connection, reads back which locks the
/// session holds (the statement may have taken or released some before it
/// failed) and puts that right: locks nobody asked for are released; if a
/// lock a job holds is gone, the session is no longer trustworthy.
async fn resync(s: &mut LockSession) -> Result<(), StoreError> {
    let actual = store::advisory_locks_held(&mut s.conn).await?;
    let extra: Vec<i64> = actual
        .iter()
        .copied()
        .filter(|k| !s.held.contains_key(k))
        .collect();
    if s.held.keys().any(|k| !actual.contains(k)) {
        return Err(StoreError::Batch {
            operation: "resync_advisory_locks",
            message: "a held repository lock is gone".into(),
            retryable: true,
            outage: false,
        });
    }
    if !extra.is_empty() {
        store::swap_advisory_locks(&mut s.conn, &extra, &[]).await?;
    }
    Ok(())
}

/// Answers a batch when no connection is available: unlocks are done (the
/// lost session freed them), lock requests are refused (the jobs wait and
/// ask again).
fn deny(batch: Vec<Request>) {
    for r in batch {
        match r {
            Request::TryLock { reply, .. } => {
                let _ = reply.send(REFUSED);
            }
            Request::Unlock { record, done, .. } => {
                if record.is_some() {
                    tracing::warn!(
                        "no repository lock connection: a completion record for dedup is dropped"
                    );
                }
                if let Some(d) = done {
                    let _ = d.send(());
                }
            }
        }
    }
}

/// Answers a batch; true when new locks were barred (see
/// `store::LockSwap::barred`).
async fn serve_batch(s: &mut LockSession, batch: Vec<Request>) -> Result<bool, StoreError> {
    let mut unlocks = Vec::new();
    let mut records: Vec<Completion> = Vec::new();
    let mut written = Vec::new();
    let mut locks = Vec::new();
    for r in batch {
        match r {
            Request::Unlock {
                key,
                pid,
                record,
                done,
            } => {
                // A lock granted by an earlier session is gone with it.
                if pid.is_none_or(|p| p == s.pid) && s.held.contains_key(&key) {
                    unlocks.push(key);
                }
                records.extend(record);
                written.extend(done);
            }
            Request::TryLock { key, check, reply } => locks.push((key, check, reply)),
        }
    }
    for k in &unlocks {
        s.forget(*k);
    }
    let exchange = LockSessionBatch {
        lock: locks.iter().map(|(k, _, _)| *k).collect(),
        check: locks
            .iter()
            .map(|(_, c, _)| c.as_ref().map(|(k, t)| (k.as_key(), *t)))
            .collect(),
        record: records.iter().map(|(k, t)| (k.as_key(), *t)).collect(),
        unlock: unlocks,
    };
    let answers = if exchange.record.is_empty() && exchange.check.iter().all(Option::is_none) {
        // Locks alone: the plain statement is cheaper.
        store::swap_advisory_locks(&mut s.conn, &exchange.unlock, &exchange.lock)
            .await
            .map(|swap| LockSessionAnswers {
                superseded: vec![false; swap.taken.len()],
                taken: swap.taken,
                barred: swap.barred,
            })
    } else {
        store::exchange_on_lock_session(&mut s.conn, &exchange).await
    };
    drop(exchange);
    let answers = match answers {
        Ok(a) => a,
        Err(e) => {
            for (_, _, reply) in locks {
                let _ = reply.send(REFUSED);
            }
            if !records.is_empty() {
                tracing::warn!(
                    error = display_error_chain(&e),
                    jobs = records.len(),
                    "recording completions for dedup failed"
                );
            }
            for d in written {
                let _ = d.send(());
            }
            return Err(e);
        }
    };
    // The statement's checks cannot see what it records itself: a job whose
    // twin's record came in the same batch is answered from the batch.
    let mut recorded: HashMap<&JobKey, OffsetDateTime> = HashMap::new();
    for (k, started) in &records {
        let latest = recorded.entry(k).or_insert(*started);
        *latest = (*latest).max(*started);
    }
    let mut abandoned = Vec::new();
    for (i, (key, check, reply)) in locks.into_iter().enumerate() {
        let taken = answers.taken.get(i).copied().unwrap_or(false);
        if !taken {
            let _ = reply.send(REFUSED);
            continue;
        }
        let superseded = answers.superseded.get(i).copied().unwrap_or(false)
            || check.as_ref().is_some_and(|(k, created)| {
                recorded.get(k).is_some_and(|started| started > created)
            });
        *s.held.entry(key).or_insert(0) += 1;
        let answer = Answer {
            taken,
            superseded,
            session: Some(Session {
                id: LockSessionId {
                    pid: s.pid,
                    backend_start: s.backend_start,
                },
                lost: s.lost.clone(),
                guards: s.guards.clone(),
            }),
        };
        // The job went away while asking: give the lock back.
        if reply.send(answer).is_err() {
            s.forget(key);
            abandoned.push(key);
        }
    }
    for d in written {
        let _ = d.send(());
    }
    if !abandoned.is_empty() {
        store::swap_advisory_locks(&mut s.conn, &abandoned, &[]).await?;
    }
    Ok(answers.barred)
}
