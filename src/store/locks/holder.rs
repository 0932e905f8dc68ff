//! The task that owns the lock connection: it answers lock and unlock
//! requests in batches, one statement each, keeps the session's lease
//! renewed and tells every guard when the session is lost, ends peers'
//! sessions whose lease ran out, and clears its own lost sessions from the
//! registry once their jobs have stopped (see `store::lock_sessions`).

use super::session::{self, Departed, Lease, LockSession, Loss};
use super::{Answer, Completion, KEEPALIVE, REFUSED, RETRY, Request, Session};
use crate::error_chain::display_error_chain;
use crate::store::{self, JobKey, LockSessionAnswers, LockSessionBatch, LockSessionId, StoreError};
use sqlx::postgres::PgConnectOptions;
use std::collections::HashMap;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Clears from the registry the lost sessions whose jobs have stopped.
async fn tidy_registry(s: &mut LockSession, departed: &mut Vec<Departed>) {
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
}

/// Renews the lease of `s` (and ends peers' sessions whose lease ran out);
/// answers the session back unless it is lost. A statement that fails on a
/// connection that stays up is not a loss: the next keepalive tries again,
/// until half the lease has passed without an answer.
async fn keep_alive(
    mut s: LockSession,
    lease: Lease,
    departed: &mut Vec<Departed>,
) -> Option<LockSession> {
    if s.lease_ran_out(lease) {
        departed.push(s.lose(Loss::LeaseRanOut, lease).await);
        return None;
    }
    let sent = Instant::now();
    let renewal = tokio::time::timeout_at(
        s.deadline(lease),
        store::renew_lock_session(&mut s.conn, s.backend_start, lease.length),
    )
    .await;
    match renewal {
        Ok(Ok(r)) if r.renewed => {
            s.renewed_at = sent;
            if r.ended > 0 {
                tracing::warn!(
                    sessions = r.ended,
                    "ended lock sessions of other processes whose lease ran out; \
                     their repositories are granted again"
                );
            }
            tidy_registry(&mut s, departed).await;
            Some(s)
        }
        Ok(Ok(_)) => {
            departed.push(s.lose(Loss::LeaseRanOut, lease).await);
            None
        }
        Ok(Err(e)) if e.connection_usable() => {
            tracing::warn!(
                error = display_error_chain(&e),
                "renewing the repository lock session's lease failed; retrying"
            );
            Some(s)
        }
        Ok(Err(e)) => {
            tracing::warn!(
                error = display_error_chain(&e),
                "repository lock connection lost"
            );
            departed.push(s.lose(Loss::Broken, lease).await);
            None
        }
        Err(_) => {
            let why = s.loss_when_unanswered(lease);
            departed.push(s.lose(why, lease).await);
            None
        }
    }
}

/// Owns the connection; answers requests in batches.
pub(super) async fn lock_holder(
    options: PgConnectOptions,
    lease: Lease,
    mut rx: mpsc::UnboundedReceiver<Request>,
    shutdown: CancellationToken,
) {
    let mut session: Option<LockSession> = None;
    let mut departed: Vec<Departed> = Vec::new();
    // A lock statement refused a key (held elsewhere, or barred by a lost
    // session): keep renewing at the keepalive's pace, which also ends
    // peers' sessions whose lease ran out.
    let mut refused = false;
    let mut reconnect_failures = 0;
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let holding = session.as_ref().is_some_and(|s| !s.held.is_empty());
        let tending = holding || refused || !departed.is_empty();
        let first = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => break },
            _ = shutdown.cancelled(), if !holding => break,
            _ = keepalive.tick(), if tending || session.is_some() => {
                if session.is_none() && !departed.is_empty() {
                    session = session::connect(&options, lease).await;
                }
                // A session that holds nothing renews only now and then.
                let due = tending
                    || session.as_ref().is_some_and(|s| s.renewed_at.elapsed() >= lease.idle_renewal());
                if let Some(s) = session.take() {
                    session = if due { keep_alive(s, lease, &mut departed).await } else { Some(s) };
                }
                refused = false;
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
        if session.as_ref().is_some_and(|s| s.lease_ran_out(lease)) {
            // Stopped or starved past the lease: peers may hold these keys.
            if let Some(s) = session.take() {
                departed.push(s.lose(Loss::LeaseRanOut, lease).await);
            }
        }
        if session.is_none() {
            session = session::connect(&options, lease).await;
        }
        let Some(mut s) = session.take() else {
            deny(batch);
            reconnect_failures += 1;
            tokio::time::sleep(RETRY.delay_after(reconnect_failures)).await;
            continue;
        };
        reconnect_failures = 0;
        // However slow, a statement is waited for until half the lease has
        // passed without a renewal: slow is not lost.
        let served =
            tokio::time::timeout_at(s.deadline(lease), serve_batch(&mut s, lease, batch)).await;
        match served {
            Ok(Ok(Served::Answered { refused: r })) => {
                refused |= r;
                session = Some(s);
            }
            Ok(Ok(Served::Fenced)) => {
                departed.push(s.lose(Loss::LeaseRanOut, lease).await);
            }
            Ok(Err(e)) if e.connection_usable() => {
                let deadline = s.deadline(lease);
                match tokio::time::timeout_at(deadline, session::resync(&mut s, lease)).await {
                    Ok(Ok(())) => session = Some(s),
                    Ok(Err(e)) => {
                        tracing::warn!(
                            error = display_error_chain(&e),
                            "repository lock connection failed"
                        );
                        departed.push(s.lose(Loss::Broken, lease).await);
                    }
                    Err(_) => departed.push(s.lose(Loss::Unanswered, lease).await),
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(
                    error = display_error_chain(&e),
                    "repository lock connection failed"
                );
                departed.push(s.lose(Loss::Broken, lease).await);
            }
            Err(_) => {
                let why = s.loss_when_unanswered(lease);
                departed.push(s.lose(why, lease).await);
            }
        }
    }
    if let Some(mut s) = session {
        s.lost.cancel();
        // With locks still held (calls abandoned at shutdown that may still
        // run), the entry stays: its keys wait for its lease.
        if s.held.is_empty()
            && let Err(e) =
                store::unregister_lock_session(&mut s.conn, s.pid, s.backend_start).await
        {
            tracing::warn!(
                error = display_error_chain(&e),
                "cannot clear the lock session at shutdown"
            );
        }
        let _ = sqlx::Connection::close(s.conn).await;
    }
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

/// What a served batch found.
enum Served {
    /// Answered; `refused` when a requested key was not granted.
    Answered { refused: bool },
    /// The session's lease had run out: nothing was granted.
    Fenced,
}

/// Answers a batch.
async fn serve_batch(
    s: &mut LockSession,
    lease: Lease,
    batch: Vec<Request>,
) -> Result<Served, StoreError> {
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
    let held: Vec<i64> = s.held.keys().copied().collect();
    let entry = s.lease(&held, lease);
    let sent = Instant::now();
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
        store::swap_advisory_locks(&mut s.conn, &exchange.unlock, &exchange.lock, entry)
            .await
            .map(|swap| LockSessionAnswers {
                superseded: vec![false; swap.taken.len()],
                taken: swap.taken,
                barred: swap.barred,
                fenced: swap.fenced,
            })
    } else {
        store::exchange_on_lock_session(&mut s.conn, &exchange, entry).await
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
    if answers.fenced {
        for (_, _, reply) in locks {
            let _ = reply.send(REFUSED);
        }
        for d in written {
            let _ = d.send(());
        }
        return Ok(Served::Fenced);
    }
    s.renewed_at = sent;
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
        let held: Vec<i64> = s.held.keys().copied().collect();
        let entry = s.lease(&held, lease);
        let swap = store::swap_advisory_locks(&mut s.conn, &abandoned, &[], entry).await?;
        if swap.fenced {
            return Ok(Served::Fenced);
        }
    }
    // A key held elsewhere may be held by a session whose lease ran out:
    // renewing at the keepalive's pace ends such sessions promptly.
    Ok(Served::Answered {
        refused: answers.barred || answers.taken.iter().any(|t| !t),
    })
}
