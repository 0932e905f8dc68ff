//! Opening the repository store: the pool and the session connection, each
//! through the store's TLS relay when its server must be verified against
//! exactly the configured roots (`store::tls_relay`), and the text of a
//! refused connection, which names the keys to look at.

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use std::time::Duration;

use super::ServiceError;
use crate::config::{Config, ConfigError};
use crate::store::{
    self, EmptyDatabase, PgEndpoint, RepositoryStore, StatementPool, TlsSetupError,
};

/// Connects to Postgres with the configured pool and applies migrations, on
/// the session connection (they take a session lock), once the database's
/// schema is one the store can use (see [`EmptyDatabase`]).
pub async fn connect_store(
    config: &Config,
    empty: EmptyDatabase,
) -> Result<RepositoryStore, ServiceError> {
    let (store, applied) = connect_and_migrate(config, empty).await?;
    for migration in applied {
        tracing::info!(migration, "applied migration");
    }
    Ok(store)
}

/// [`connect_store`], answering the migrations it applied (`<version>_<name>`).
pub async fn connect_and_migrate(
    config: &Config,
    empty: EmptyDatabase,
) -> Result<(RepositoryStore, Vec<String>), ServiceError> {
    let db = &config.database;
    let target = db.pool_target()?;
    let fail = unreachable(config, "[database]", &target.options);
    let pool_endpoint = PgEndpoint::start(target, db.connect_timeout)
        .await
        .map_err(&fail)?;
    first_connection(pool_endpoint.options(), db.connect_timeout)
        .await
        .map_err(&fail)?;
    let pool = pool_options(db.max_connections)
        // Opened at start, so the first jobs do not wait for connections.
        .min_connections(db.max_connections.min(4))
        // A ping before every query would double the round trips; a broken
        // connection shows up as a retryable error on use instead.
        .test_before_acquire(false)
        .acquire_timeout(db.connect_timeout)
        .connect_with(pool_endpoint.options().clone())
        .await
        .map_err(&fail)?;
    let pool = if db.transaction_pooled() {
        StatementPool::transaction_pooled(pool, db.per_transaction_statement_timeout_ms())
    } else {
        StatementPool::direct(pool)
    };
    let store = RepositoryStore::with_statement_pool(pool);
    let session = if db.has_session_connection() {
        "[database.session_pooled]"
    } else {
        "[database]"
    };
    let target = db.session_target()?;
    let fail = unreachable(config, session, &target.options);
    let session_endpoint = PgEndpoint::start(target, db.connect_timeout)
        .await
        .map_err(&fail)?;
    let mut conn = connect_within(session_endpoint.options(), db.connect_timeout)
        .await
        .map_err(&fail)?;
    let migrated = store::migrate_on(&mut conn, empty).await;
    let _ = conn.close().await;
    let applied = migrated?;
    Ok((
        store.with_endpoints(pool_endpoint, Some(session_endpoint)),
        applied,
    ))
}

/// A pool of at most `max_connections` whose every connection asks the server
/// for TCP keepalives, so a half-open one is found (see
/// `store::keep_connection_alive`).
fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .after_connect(|conn, _| {
            Box::pin(async move {
                store::keep_connection_alive(conn)
                    .await
                    .map_err(|e| sqlx::Error::Protocol(e.to_string()))
            })
        })
}

/// A store on a pool of at most `max_connections`, without migrations, for
/// the commands that only read.
pub async fn open_store(
    config: &Config,
    max_connections: u32,
) -> Result<RepositoryStore, ServiceError> {
    let db = &config.database;
    let target = db.pool_target()?;
    let fail = unreachable(config, "[database]", &target.options);
    let endpoint = PgEndpoint::start(target, db.connect_timeout)
        .await
        .map_err(&fail)?;
    first_connection(endpoint.options(), db.connect_timeout)
        .await
        .map_err(&fail)?;
    let pool = pool_options(max_connections)
        .acquire_timeout(db.connect_timeout)
        .connect_with(endpoint.options().clone())
        .await
        .map_err(&fail)?;
    Ok(RepositoryStore::new(pool).with_endpoints(endpoint, None))
}

/// Where the session connection (locks, reconciler) goes: the one `store`
/// opened, or straight from the config for a store made from a bare pool,
/// which is refused when the server must be verified.
pub(crate) fn session_endpoint(
    config: &Config,
    store: &RepositoryStore,
) -> Result<PgEndpoint, ConfigError> {
    match store.session_endpoint() {
        Some(endpoint) => Ok(endpoint.clone()),
        None => PgEndpoint::direct(config.database.session_target()?)
            .map_err(|e| ConfigError::new("", e.to_string())),
    }
}

/// A connection within `timeout`, or the driver's error; past it, an I/O
/// time-out that says so (not the pool's "timed out waiting for an open
/// connection", which names no cause).
async fn connect_within(
    options: &PgConnectOptions,
    timeout: Duration,
) -> Result<PgConnection, sqlx::Error> {
    tokio::time::timeout(timeout, PgConnection::connect_with(options))
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer within database.connect_timeout ({})",
                    humantime::format_duration(timeout)
                ),
            )))
        })
}

/// One connection made and closed before a pool is opened, so a server that
/// is down, unknown or refusing is reported with the driver's reason; the
/// pool would retry until its time-out and say only that.
async fn first_connection(
    options: &PgConnectOptions,
    timeout: Duration,
) -> Result<(), sqlx::Error> {
    let conn = connect_within(options, timeout).await?;
    let _ = conn.close().await;
    Ok(())
}

/// An error of `connection` (`[database]` or `[database.session_pooled]`),
/// naming where it went: the masked URL, else host, port and database.
fn unreachable(
    config: &Config,
    connection: &'static str,
    options: &PgConnectOptions,
) -> impl Fn(sqlx::Error) -> ServiceError + use<> {
    let url = config.database.masked_url().unwrap_or_else(|| {
        format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or_default()
        )
    });
    move |source| ServiceError::Database {
        connection,
        url: url.clone(),
        source,
    }
}

/// `[database.session_pooled]` → `database.session_pooled.`
pub(super) fn key_prefix(connection: &str) -> String {
    format!("{}.", connection.trim_matches(['[', ']']))
}

pub(super) fn url_part(url: &str) -> String {
    if url.is_empty() {
        String::new()
    } else {
        format!(" ({url})")
    }
}

/// The driver's reason, with the keys to look at when TLS is why; `keys` is
/// the prefix of the connection's keys (`database.`).
pub(super) fn database_reason(source: &sqlx::Error, keys: &str) -> String {
    let text = source.to_string();
    if is_tls_setup(source) || !is_tls_failure(source) {
        // A setup error names its key already.
        return text;
    }
    if text.contains("not valid for name") {
        format!(
            "{text}; set {keys}host to a name the server's certificate holds, or {keys}sslmode \
             to verify-ca (the chain only)"
        )
    } else if text.contains("certificate") && !text.contains("client") {
        format!(
            "{text}; check {keys}sslrootcert: the CA that signed the server's certificate must \
             be in it, as it is the only one trusted (the platform's roots are trusted only \
             with \"system\")"
        )
    } else {
        format!("{text}; check {keys}sslcert and {keys}sslkey (PEM), and {keys}sslmode")
    }
}

/// A root file, client certificate or key the relay could not load.
fn is_tls_setup(source: &sqlx::Error) -> bool {
    matches!(source, sqlx::Error::Configuration(e) if e.is::<TlsSetupError>())
}

/// Whether the TLS handshake (not the network) failed: a certificate or key
/// the server or this side refused. Configuration, so not worth waiting for.
pub(super) fn is_tls_failure(source: &sqlx::Error) -> bool {
    match source {
        sqlx::Error::Tls(_) => true,
        sqlx::Error::Io(e) => e
            .get_ref()
            .is_some_and(|inner| inner.to_string().contains("certificate")),
        sqlx::Error::Configuration(e) => e.is::<TlsSetupError>() || e.to_string().contains("pem"),
        _ => false,
    }
}
