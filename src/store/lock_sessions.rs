//! The registry of lock sessions (`replication_lock_sessions`): each session
//! lives by a lease it renews, and lists the repository lock keys it holds,
//! so that a session that is gone bars only those keys while its jobs may
//! still run (see the migrations' comments and `locks`).

use super::{StoreError, failed};
use std::time::Duration;
use time::OffsetDateTime;

/// How long a lost session of an older version (one with no lease) bars new
/// locks when its owner does not clear it.
pub const ORPHAN_GRACE_SECONDS: u32 = 5;

/// Whether listed session `s` still runs. Only the pid is always visible
/// across roles; `backend_start`, when visible, guards against a reused pid.
const ALIVE: &str = "SELECT FROM pg_stat_get_activity(s.pid) a
    WHERE a.backend_start IS NULL OR a.backend_start = s.backend_start";

/// A bool expression over listed session `s`: it is gone while its jobs may
/// still run, so the keys it lists stay barred. Its owner stops its jobs
/// before its lease ends, so a lease that ran out frees them.
pub(super) fn lost_sql() -> String {
    format!("NOT EXISTS ({ALIVE}) AND s.lease_until > now()")
}

/// A bool expression: some gone session bars every key, because what it held
/// is not known. Either a session of an older version (no lease, no keys)
/// within its grace period, or one that was alive when Postgres restarted:
/// its key list was written without waiting for the disk, so the crash may
/// have lost part of it; it bars everything for one lease after the restart.
pub(super) fn bars_all_sql() -> String {
    format!(
        "EXISTS (
            SELECT FROM replication_lock_sessions s
            WHERE NOT EXISTS ({ALIVE})
              AND ((s.lease_until IS NULL
                    AND (s.orphaned_at IS NULL
                         OR s.orphaned_at > now() - interval '{ORPHAN_GRACE_SECONDS} seconds'))
                OR (s.backend_start < pg_postmaster_start_time()
                    AND pg_postmaster_start_time() + s.lease > now())))"
    )
}

/// A bool expression: the lock session `pid`, started at `started` (SQL
/// expressions), still holds what it was granted: its backend runs and its
/// lease has not run out. The fence of state-changing writes: once a lease
/// ran out, peers may end the backend and grant its keys, so nothing of it
/// may be written any more, even while the backend still runs.
pub(super) fn holds_sql(pid: &str, started: &str) -> String {
    format!(
        "(EXISTS (SELECT FROM pg_stat_get_activity({pid}) a
                  WHERE a.backend_start IS NULL OR a.backend_start = {started})
          AND EXISTS (SELECT FROM replication_lock_sessions l
                      WHERE l.pid = {pid} AND l.backend_start = {started}
                        AND l.lease_until > now()))"
    )
}

/// A lease as a parameter: seconds, fractional.
pub(super) fn lease_seconds(lease: Duration) -> f64 {
    lease.as_secs_f64()
}

/// Lists the session on `conn` with a lease of `lease` from now; answers its
/// backend pid and start.
pub async fn register_lock_session(
    conn: &mut sqlx::PgConnection,
    lease: Duration,
) -> Result<(i32, OffsetDateTime), StoreError> {
    sqlx::query_as(
        "INSERT INTO replication_lock_sessions (pid, backend_start, lease, lease_until)
        SELECT pid, backend_start, make_interval(secs => $1),
               now() + make_interval(secs => $1)
        FROM pg_stat_get_activity(pg_backend_pid())
        ON CONFLICT DO NOTHING
        RETURNING pid, backend_start",
    )
    .bind(lease_seconds(lease))
    .fetch_one(conn)
    .await
    .map_err(failed("register_lock_session"))
}

/// Clears a session from the list: its jobs have stopped.
pub async fn unregister_lock_session(
    conn: &mut sqlx::PgConnection,
    pid: i32,
    backend_start: OffsetDateTime,
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM replication_lock_sessions WHERE pid = $1 AND backend_start = $2")
        .bind(pid)
        .bind(backend_start)
        .execute(conn)
        .await
        .map_err(failed("unregister_lock_session"))?;
    Ok(())
}

/// What [`renew_lock_session`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    /// The lease was still running and now runs `lease` from now; false
    /// when it had run out (or the entry was cleared): the session is fenced.
    pub renewed: bool,
    /// Sessions of others whose lease ran out, ended now.
    pub ended: i64,
}

/// The keepalive of the session on `conn` (pid `pid`, started at
/// `backend_start`): renews its lease if it has not run out, ends the
/// backends of other sessions whose lease ran out (which frees their locks),
/// and clears entries that bar nothing any more (gone, lease over; or of an
/// older version, gone past their grace period).
pub async fn renew_lock_session(
    conn: &mut sqlx::PgConnection,
    backend_start: OffsetDateTime,
    lease: Duration,
) -> Result<Renewal, StoreError> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH renewed AS (
                UPDATE replication_lock_sessions
                SET lease_until = now() + make_interval(secs => $2)
                WHERE pid = pg_backend_pid() AND backend_start = $1 AND lease_until > now()
                RETURNING 1
            ), ended AS (
                SELECT replication_end_lock_session(s.pid) AS ended
                FROM replication_lock_sessions s
                WHERE s.lease_until <= now() AND s.pid <> pg_backend_pid() AND EXISTS ({ALIVE})
            ), marked AS (
                UPDATE replication_lock_sessions s SET orphaned_at = now()
                WHERE s.lease_until IS NULL AND s.orphaned_at IS NULL AND NOT EXISTS ({ALIVE})
            ), cleared AS (
                DELETE FROM replication_lock_sessions s
                WHERE (s.lease_until <= now() AND NOT EXISTS ({ALIVE})
                       AND NOT (s.backend_start < pg_postmaster_start_time()
                                AND pg_postmaster_start_time() + s.lease > now()))
                   OR (s.lease_until IS NULL
                       AND s.orphaned_at < now() - interval '{ORPHAN_GRACE_SECONDS} seconds')
            )
            SELECT EXISTS (SELECT FROM renewed),
                   (SELECT count(*) FROM ended WHERE ended)"
        )
    });
    let (renewed, ended): (bool, i64) = sqlx::query_as(SQL.as_str())
        .bind(backend_start)
        .bind(lease_seconds(lease))
        .fetch_one(conn)
        .await
        .map_err(failed("renew_lock_session"))?;
    Ok(Renewal { renewed, ended })
}
