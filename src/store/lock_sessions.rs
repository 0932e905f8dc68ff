//! The registry of lock sessions (`replication_lock_sessions`): what keeps a
//! repository lock freed by a dead session from being granted while the jobs
//! that held it may still be running (see the migration's comment).

use super::{StoreError, failed};
use time::OffsetDateTime;

/// How long an orphaned session blocks new locks when its owner does not
/// clear it: well above the owner's detection time (a 250 ms keepalive with
/// a 1 s timeout) plus the time its jobs take to stop.
pub const ORPHAN_GRACE_SECONDS: u32 = 5;

/// A bool expression: some listed session is gone (its pid no longer runs
/// that backend) and has not been cleared, nor has its grace period passed.
/// Only the pid is always visible across roles; `backend_start`, when
/// visible, guards against a reused pid.
pub(super) fn orphan_blocks_sql() -> String {
    format!(
        "EXISTS (
            SELECT FROM replication_lock_sessions s
            WHERE (s.orphaned_at IS NULL
                   OR s.orphaned_at > now() - interval '{ORPHAN_GRACE_SECONDS} seconds')
              AND NOT EXISTS ({ALIVE}))"
    )
}

/// Whether listed session `s` still runs.
const ALIVE: &str = "SELECT FROM pg_stat_get_activity(s.pid) a
    WHERE a.backend_start IS NULL OR a.backend_start = s.backend_start";

/// Lists the session on `conn`; answers its backend pid and start.
pub async fn register_lock_session(
    conn: &mut sqlx::PgConnection,
) -> Result<(i32, OffsetDateTime), StoreError> {
    sqlx::query_as(
        "INSERT INTO replication_lock_sessions (pid, backend_start)
        SELECT pid, backend_start FROM pg_stat_get_activity(pg_backend_pid())
        ON CONFLICT DO NOTHING
        RETURNING pid, backend_start",
    )
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

/// Starts the grace period of every listed session that is gone, and clears
/// those whose grace period has passed.
pub async fn expire_lock_sessions(conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH marked AS (
                UPDATE replication_lock_sessions s SET orphaned_at = now()
                WHERE s.orphaned_at IS NULL AND NOT EXISTS ({ALIVE})
            )
            DELETE FROM replication_lock_sessions
            WHERE orphaned_at < now() - interval '{ORPHAN_GRACE_SECONDS} seconds'"
        )
    });
    sqlx::query(SQL.as_str())
        .execute(conn)
        .await
        .map_err(failed("expire_lock_sessions"))?;
    Ok(())
}
