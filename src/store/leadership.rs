//! Leadership: one process of a fleet does a job (the reconciler, the
//! capture of Praefect's queue) while it holds a Postgres session advisory
//! lock, on a session of its own (`[database.session_pooled]`: a session
//! advisory lock does not survive transaction pooling). The lock is gone
//! when that session ends, a killed process's included, and another process
//! takes it on its next try.

use crate::error_chain::display_error_chain;
use crate::store::PgEndpoint;
use sqlx::{ConnectOptions, PgConnection};
use std::time::Duration;

/// How long a leader check may take before the session counts as lost.
const LEADER_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// One process's claim on a leadership.
pub(crate) struct Leadership {
    session: PgEndpoint,
    key: i64,
    /// What the leader is, for the logs ("the reconciler").
    role: &'static str,
    connection: Option<PgConnection>,
    leading: bool,
}

impl Leadership {
    pub(crate) fn new(session: PgEndpoint, key: i64, role: &'static str) -> Leadership {
        Leadership {
            session,
            key,
            role,
            connection: None,
            leading: false,
        }
    }

    /// Whether this process led at its last check.
    pub(crate) fn leading(&self) -> bool {
        self.leading
    }

    /// Whether this process holds the lock now, trying to take it if not.
    pub(crate) async fn hold(&mut self) -> bool {
        let role = self.role;
        let checked = match self.connection.as_mut() {
            Some(c) if self.leading => Some(
                tokio::time::timeout(LEADER_CHECK_TIMEOUT, sqlx::query("SELECT 1").execute(c))
                    .await
                    .is_ok_and(|r| r.is_ok()),
            ),
            _ => None,
        };
        match checked {
            Some(true) => return true,
            Some(false) => {
                tracing::warn!(
                    "the lock session of {role} ended; another process may take the part now"
                );
                self.connection = None;
                self.leading = false;
            }
            None => {}
        }
        if self.connection.is_none() {
            match tokio::time::timeout(LEADER_CHECK_TIMEOUT, self.session.options().connect()).await
            {
                Ok(Ok(mut c)) => {
                    // A half-open session would keep leadership from others.
                    if let Err(e) = crate::store::keep_connection_alive(&mut c).await {
                        tracing::warn!(
                            error = display_error_chain(&e),
                            "cannot turn on TCP keepalives for the lock session of {role}"
                        );
                    }
                    self.connection = Some(c);
                }
                Ok(Err(e)) => {
                    tracing::warn!(
                        error = display_error_chain(&e),
                        "the lock session of {role} could not be opened"
                    );
                    return false;
                }
                Err(_) => return false,
            }
        }
        let Some(c) = self.connection.as_mut() else {
            return false;
        };
        let taken = tokio::time::timeout(
            LEADER_CHECK_TIMEOUT,
            sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                .bind(self.key)
                .fetch_one(c),
        )
        .await;
        match taken {
            Ok(Ok(true)) => {
                self.leading = true;
                tracing::info!("this process is now {role}");
                true
            }
            Ok(Ok(false)) => false,
            _ => {
                self.connection = None;
                false
            }
        }
    }
}
