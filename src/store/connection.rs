//! Settings every Postgres connection of the service gets, so that a
//! half-open connection (a host cut off, a NAT that forgot it) is found.
//!
//! sqlx 0.9 opens its sockets itself and offers no TCP keepalive option, so
//! the probes are asked of the server: Postgres's `tcp_keepalives_*` settings
//! make it probe an idle connection after 10 s, every 5 s, and give up after
//! 4 unanswered probes, so a backend whose client is gone ends within 30 s
//! and frees the advisory locks it held. From this side, the lock session's
//! lease bounds how long a silent connection is trusted (see `locks`). On a
//! Unix socket the settings do nothing, as there is no network to lose.

use super::{StoreError, failed};

/// Probe after 10 s idle, every 5 s, give up after 4: literal, so that the
/// simple protocol carries it (no prepared statement for PgBouncer to lose).
const KEEPALIVE_SQL: &str =
    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 4";

/// Turns on the server's TCP keepalive probes for the session on `conn`, in
/// one round trip (statements rather than startup options, which PgBouncer
/// refuses).
pub async fn keep_connection_alive(conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    sqlx::raw_sql(KEEPALIVE_SQL)
        .execute(conn)
        .await
        .map_err(failed("keep_connection_alive"))?;
    Ok(())
}
