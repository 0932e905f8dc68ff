//! The lock session: the connection that holds this process's advisory
//! locks, its lease, and how it ends.
//!
//! The lease is kept in Postgres time on the session's entry; here it is
//! judged from this process's clock, conservatively: Postgres renews it by
//! `lease` from when a statement ran, which is no earlier than when this
//! process sent it, so the lease lasts at least until send time + `lease`.
//! The session is given up when no statement has renewed it for half the
//! lease (many keepalives, however slow each one is), which leaves its jobs
//! the other half to stop before any peer may take their repositories.

use super::LOCK_CONNECTION_NAME;
use crate::error_chain::display_error_chain;
use crate::store::{self, LockSessionLease, StoreError};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The lease a session renews, and the spans derived from it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lease {
    pub length: Duration,
}

impl Lease {
    /// How long the session may go without a renewal before it is given up
    /// and its jobs are stopped: half the lease.
    pub fn lost_after(self) -> Duration {
        self.length / 2
    }

    /// How often a session that holds nothing renews its lease.
    pub fn idle_renewal(self) -> Duration {
        self.length / 6
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy)]
pub(super) enum Loss {
    /// The connection broke or a statement on it failed beyond repair.
    Broken,
    /// No statement renewed the lease for [`Lease::lost_after`].
    Unanswered,
    /// The lease ran out before it was renewed (the process was stopped or
    /// starved), or Postgres says so: peers may have taken its locks.
    LeaseRanOut,
}

impl Loss {
    fn describe(self) -> &'static str {
        match self {
            Loss::Broken => "the repository lock session was lost",
            Loss::Unanswered => "the repository lock session did not answer for half its lease",
            Loss::LeaseRanOut => {
                "the repository lock session's lease ran out (this process was stopped, \
                 starved or cut off); other processes may hold its repositories now"
            }
        }
    }
}

/// The lock connection and what its session holds.
pub(super) struct LockSession {
    pub conn: PgConnection,
    pub pid: i32,
    pub backend_start: OffsetDateTime,
    /// Keys this session holds, with their reentrancy count.
    pub held: HashMap<i64, u32>,
    pub lost: CancellationToken,
    pub guards: Arc<()>,
    /// When the last statement that renewed the lease was sent.
    pub renewed_at: Instant,
}

/// A lost session still in the registry: it bars the keys it held until its
/// jobs have stopped (its last guard is gone) and it is cleared, or its lease
/// runs out.
pub(super) struct Departed {
    pub pid: i32,
    pub backend_start: OffsetDateTime,
    guards: Weak<()>,
    lease_ends: Instant,
}

impl Departed {
    /// Its jobs have stopped, or its lease ran out (a guard kept for an
    /// abandoned call never goes; the lease bars nothing any more).
    pub fn settled(&self) -> bool {
        self.guards.strong_count() == 0 || Instant::now() >= self.lease_ends
    }
}

impl LockSession {
    pub fn forget(&mut self, key: i64) {
        if let Some(n) = self.held.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&key);
            }
        }
    }

    /// The keys held, each once, with the session's lease: what a lock
    /// statement records in the registry.
    pub fn lease<'a>(&self, held: &'a [i64], lease: Lease) -> LockSessionLease<'a> {
        LockSessionLease {
            held,
            backend_start: self.backend_start,
            lease: lease.length,
        }
    }

    /// The last moment a statement may still answer before the session is
    /// given up.
    pub fn deadline(&self, lease: Lease) -> Instant {
        self.renewed_at + lease.lost_after()
    }

    /// Whether the lease ran out by this process's clock.
    pub fn lease_ran_out(&self, lease: Lease) -> bool {
        Instant::now() >= self.renewed_at + lease.length
    }

    /// Why the session is lost when a statement went unanswered past its
    /// deadline: its lease ran out, or only its time to answer did.
    pub fn loss_when_unanswered(&self, lease: Lease) -> Loss {
        if self.lease_ran_out(lease) {
            Loss::LeaseRanOut
        } else {
            Loss::Unanswered
        }
    }

    /// Ends the session: every job holding one of its locks is told to stop.
    pub async fn lose(self, why: Loss, lease: Lease) -> Departed {
        if !self.held.is_empty() {
            tracing::error!(
                locks = self.held.len(),
                "{}: its jobs are fenced and stop without writing, to be redelivered; \
                 a new lock session takes their place",
                why.describe()
            );
        } else {
            tracing::warn!("{}; a new lock session takes its place", why.describe());
        }
        self.lost.cancel();
        let _ = self.conn.close().await;
        Departed {
            pid: self.pid,
            backend_start: self.backend_start,
            guards: Arc::downgrade(&self.guards),
            lease_ends: self.renewed_at + lease.length,
        }
    }
}

/// Opens the lock connection: a new session holding nothing. None when
/// Postgres cannot be reached.
pub(super) async fn connect(options: &PgConnectOptions, lease: Lease) -> Option<LockSession> {
    let opened = tokio::time::timeout(lease.lost_after(), async {
        let mut conn =
            PgConnection::connect_with(options)
                .await
                .map_err(|e| StoreError::Query {
                    operation: "connect_lock_session",
                    source: e,
                })?;
        let renewed_at = Instant::now();
        // The entry is written before commits are relaxed, durably: it is
        // what bars others from this session's locks if it is lost.
        let (pid, backend_start) = store::register_lock_session(&mut conn, lease.length).await?;
        // The session's other writes (its key list, completion records) only
        // save work or are covered after a crash (see `lock_sessions`), so
        // its commits need not wait for the disk, nor the lock requests
        // behind them. Set by statements rather than startup options, which
        // PgBouncer refuses.
        store::set_lock_session_options(&mut conn).await?;
        store::keep_connection_alive(&mut conn).await?;
        Ok::<_, StoreError>(LockSession {
            conn,
            pid,
            backend_start,
            held: HashMap::new(),
            lost: CancellationToken::new(),
            guards: Arc::new(()),
            renewed_at,
        })
    })
    .await;
    match opened {
        Ok(Ok(s)) => {
            tracing::debug!(
                pid = s.pid,
                name = LOCK_CONNECTION_NAME,
                "lock session opened"
            );
            Some(s)
        }
        Ok(Err(e)) => {
            tracing::warn!(
                error = display_error_chain(&e),
                "cannot set up the repository lock connection; retrying"
            );
            None
        }
        Err(_) => {
            tracing::warn!("the repository lock connection did not open in time; retrying");
            None
        }
    }
}

/// After a failed statement on a live connection, reads back which locks the
/// session holds (the statement may have taken or released some before it
/// failed) and puts that right: locks nobody asked for are released; if a
/// lock a job holds is gone, the session is no longer trustworthy.
pub(super) async fn resync(s: &mut LockSession, lease: Lease) -> Result<(), StoreError> {
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
    let held: Vec<i64> = s.held.keys().copied().collect();
    let sent = Instant::now();
    let entry = s.lease(&held, lease);
    let swap = store::swap_advisory_locks(&mut s.conn, &extra, &[], entry).await?;
    if swap.fenced {
        return Err(StoreError::Batch {
            operation: "resync_advisory_locks",
            message: "the lock session's lease ran out".into(),
            retryable: true,
            outage: false,
        });
    }
    s.renewed_at = sent;
    Ok(())
}
