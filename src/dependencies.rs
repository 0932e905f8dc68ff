//! What the service needs outside itself, NATS and Postgres: waiting for
//! them at start instead of exiting, watching them afterwards, and saying
//! which one is missing (`gitaly_replicator_dependency_up`,
//! `/health/ready`).
//!
//! Exiting when a dependency is down turns a short broker or database
//! restart into a supervisor's crash loop with growing backoff; waiting
//! resumes the moment it answers.

use crate::error_chain::display_error_chain;
use crate::metrics;
use crate::retry_delay::RetryPolicy;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A part of the deployment the service cannot work without.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    Nats,
    Postgres,
}

impl Dependency {
    /// The `dependency` label.
    pub fn label(self) -> &'static str {
        match self {
            Dependency::Nats => "nats",
            Dependency::Postgres => "postgres",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dependency::Nats => "NATS",
            Dependency::Postgres => "Postgres",
        }
    }
}

/// Whether each dependency answers, as last seen; cheap to clone.
#[derive(Clone)]
pub struct DependencyState {
    nats: Arc<watch::Sender<bool>>,
    postgres: Arc<watch::Sender<bool>>,
}

impl Default for DependencyState {
    /// Both down until seen up.
    fn default() -> Self {
        let state = DependencyState {
            nats: Arc::new(watch::Sender::new(false)),
            postgres: Arc::new(watch::Sender::new(false)),
        };
        for d in [Dependency::Nats, Dependency::Postgres] {
            metrics::dependency_up(d.label(), false);
        }
        state
    }
}

impl DependencyState {
    fn sender(&self, d: Dependency) -> &watch::Sender<bool> {
        match d {
            Dependency::Nats => &self.nats,
            Dependency::Postgres => &self.postgres,
        }
    }

    /// Records what was seen; logs a change after start-up.
    pub fn set(&self, d: Dependency, up: bool) {
        metrics::dependency_up(d.label(), up);
        let changed = self.sender(d).send_if_modified(|was| {
            let changed = *was != up;
            *was = up;
            changed
        });
        if changed && !up {
            tracing::warn!(
                dependency = d.label(),
                "{} stopped answering; jobs wait until it is back",
                d.name()
            );
        } else if changed {
            tracing::info!(dependency = d.label(), "{} answers", d.name());
        }
    }

    pub fn is_up(&self, d: Dependency) -> bool {
        *self.sender(d).borrow()
    }

    pub fn all_up(&self) -> bool {
        self.is_up(Dependency::Nats) && self.is_up(Dependency::Postgres)
    }

    /// Follows `d`, for waiting until it is up.
    pub fn watch(&self, d: Dependency) -> watch::Receiver<bool> {
        self.sender(d).subscribe()
    }
}

/// Why waiting ended without the dependency.
#[derive(Debug)]
pub enum WaitEnded<E> {
    /// The start-up timeout passed; the last error says why (none when the
    /// first try was still waiting for an answer).
    TimedOut(Option<E>),
    /// An error that waiting cannot cure (a refused password, say).
    Refused(E),
    /// Shutdown was asked for.
    Stopped,
}

/// Tries `attempt` until it succeeds, fails in a way `transient` does not
/// accept, `deadline` passes or `stop` is cancelled, with capped backoff
/// between tries. Each failure is logged once, with its cause chain and the
/// delay before the next try.
pub async fn wait_for<T, E, F, Fut>(
    d: Dependency,
    state: &DependencyState,
    deadline: Option<Instant>,
    stop: &CancellationToken,
    transient: impl Fn(&E) -> bool,
    mut attempt: F,
) -> Result<T, WaitEnded<E>>
where
    E: std::error::Error + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let retry = RetryPolicy::reconnect();
    let mut failures = 0;
    let mut last = None;
    // A try still under way at the deadline ends there, with the error of
    // the try before it.
    let past_deadline = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(past_deadline);
    loop {
        let result = tokio::select! {
            // The try first: the one made at the deadline, whose sleep has
            // elapsed, still gets its answer if it comes at once.
            biased;
            r = attempt() => r,
            () = &mut past_deadline => return Err(WaitEnded::TimedOut(last)),
            () = stop.cancelled() => return Err(WaitEnded::Stopped),
        };
        match result {
            Ok(value) => {
                state.set(d, true);
                if failures > 0 {
                    tracing::info!(dependency = d.label(), "{} answers; starting", d.name());
                }
                return Ok(value);
            }
            Err(e) if !transient(&e) => return Err(WaitEnded::Refused(e)),
            Err(e) => {
                state.set(d, false);
                failures += 1;
                if deadline.is_some_and(|at| Instant::now() >= at) {
                    return Err(WaitEnded::TimedOut(Some(e)));
                }
                // The last try is made at the deadline, not a backoff before it.
                let delay = retry.delay_after(failures);
                let delay = deadline.map_or(delay, |at| {
                    delay.min(at.saturating_duration_since(Instant::now()))
                });
                tracing::warn!(
                    dependency = d.label(),
                    error = display_error_chain(&e),
                    retry_in = ?delay,
                    "waiting for {}",
                    d.name()
                );
                last = Some(e);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => return Err(WaitEnded::Stopped),
                }
            }
        }
    }
}

/// Watches the dependencies until `stop`: NATS by the client's connection
/// state, Postgres by a trivial query, every `interval`.
pub async fn watch_dependencies(
    state: DependencyState,
    client: async_nats::Client,
    pool: sqlx::PgPool,
    interval: Duration,
    query_timeout: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let nats_up = client.connection_state() == async_nats::connection::State::Connected;
        state.set(Dependency::Nats, nats_up);
        // The simple protocol: one message, so a transaction-mode pooler
        // cannot split it across server connections.
        let probe = sqlx::raw_sql("SELECT 1").execute(&pool);
        let postgres_up = matches!(tokio::time::timeout(query_timeout, probe).await, Ok(Ok(_)));
        state.set(Dependency::Postgres, postgres_up);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_retries_until_the_attempt_succeeds_and_gives_up_at_the_deadline() {
        let state = DependencyState::default();
        let stop = CancellationToken::new();
        let mut tries = 0;
        let any = |_: &std::io::Error| true;
        let got = wait_for(Dependency::Nats, &state, None, &stop, any, || {
            tries += 1;
            let n = tries;
            async move {
                if n < 3 {
                    Err(std::io::Error::other("refused"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert!(matches!(got, Ok(3)));
        assert!(state.is_up(Dependency::Nats));
        assert!(!state.all_up(), "Postgres was never seen");

        let deadline = Some(Instant::now() + Duration::from_millis(300));
        let started = Instant::now();
        let got: Result<(), _> = wait_for(
            Dependency::Postgres,
            &state,
            deadline,
            &stop,
            any,
            || async { Err(std::io::Error::other("refused")) },
        )
        .await;
        assert!(matches!(got, Err(WaitEnded::TimedOut(Some(_)))));
        // Honoured: not given up a backoff early, nor long after.
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(!state.is_up(Dependency::Postgres));

        // A try that never answers ends at the deadline too.
        let deadline = Some(Instant::now() + Duration::from_millis(200));
        let got = wait_for(Dependency::Nats, &state, deadline, &stop, any, || {
            std::future::pending::<Result<(), std::io::Error>>()
        })
        .await;
        assert!(matches!(got, Err(WaitEnded::TimedOut(None))));

        let none = |_: &std::io::Error| false;
        let got: Result<(), _> =
            wait_for(Dependency::Postgres, &state, None, &stop, none, || async {
                Err(std::io::Error::other("password refused"))
            })
            .await;
        assert!(matches!(got, Err(WaitEnded::Refused(_))));

        stop.cancel();
        let got: Result<(), _> =
            wait_for(Dependency::Postgres, &state, None, &stop, any, || async {
                Err(std::io::Error::other("refused"))
            })
            .await;
        assert!(matches!(got, Err(WaitEnded::Stopped)));
    }
}
