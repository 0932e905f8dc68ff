//! `[database]`: where the repository store lives and how to connect to it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use super::{ConfigError, Secret, mask};

/// `[database]`: either `url`, or Praefect's separate keys. With `url`, only
/// `password` and the `ssl*` keys may be given beside it; they override the url's.
/// Keys left unset fall back to libpq's environment (`PGHOST`, …) and defaults.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host:port/dbname?sslmode=…` (a secret: it may hold
    /// the password).
    #[serde(serialize_with = "mask::serialize_database_url")]
    pub url: Option<Secret>,
    /// Host name, IP address, or a directory holding the Unix socket.
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub dbname: Option<String>,
    /// `disable`, `allow`, `prefer`, `require`, `verify-ca` or `verify-full`.
    pub sslmode: Option<String>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub sslrootcert: Option<PathBuf>,
    /// Pool size (default 16).
    pub max_connections: u32,
    /// How long to wait for a connection (default 5s).
    #[serde(serialize_with = "mask::serialize_duration")]
    pub connect_timeout: Duration,
    /// Server-side limit per statement, `0s` for none (default 30s). Sent as the
    /// `options` startup parameter, which PgBouncer refuses unless told to ignore it.
    #[serde(serialize_with = "mask::serialize_duration")]
    pub statement_timeout: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            host: None,
            port: None,
            user: None,
            password: None,
            dbname: None,
            sslmode: None,
            sslcert: None,
            sslkey: None,
            sslrootcert: None,
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
        }
    }
}

/// Written out because `url` is shown masked rather than hidden; the
/// destructuring makes a new field a compile error here until it is shown.
impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let DatabaseConfig {
            url: _,
            host,
            port,
            user,
            password,
            dbname,
            sslmode,
            sslcert,
            sslkey,
            sslrootcert,
            max_connections,
            connect_timeout,
            statement_timeout,
        } = self;
        f.debug_struct("DatabaseConfig")
            .field("url", &self.masked_url())
            .field("host", host)
            .field("port", port)
            .field("user", user)
            .field("password", password)
            .field("dbname", dbname)
            .field("sslmode", sslmode)
            .field("sslcert", sslcert)
            .field("sslkey", sslkey)
            .field("sslrootcert", sslrootcert)
            .field("max_connections", max_connections)
            .field("connect_timeout", connect_timeout)
            .field("statement_timeout", statement_timeout)
            .finish()
    }
}

impl DatabaseConfig {
    /// The connection options, with `statement_timeout` applied (unless zero) and
    /// the application name set to `gitaly-replicator` unless the url sets one.
    /// `connect_timeout` and `max_connections` belong to the pool.
    pub fn connect_options(&self) -> Result<PgConnectOptions, ConfigError> {
        let mut options = match &self.url {
            Some(url) => PgConnectOptions::from_str(url.expose()).map_err(|e| {
                ConfigError::new("database.url", format!("not a valid PostgreSQL URL: {e}"))
            })?,
            None => PgConnectOptions::new(),
        };
        if let Some(host) = &self.host {
            options = options.host(host);
        }
        if let Some(port) = self.port {
            options = options.port(port);
        }
        if let Some(user) = &self.user {
            options = options.username(user);
        }
        if let Some(password) = &self.password {
            options = options.password(password.expose());
        }
        if let Some(dbname) = &self.dbname {
            options = options.database(dbname);
        }
        if let Some(mode) = &self.sslmode {
            options = options.ssl_mode(parse_sslmode(mode)?);
        }
        if let Some(path) = &self.sslrootcert {
            options = options.ssl_root_cert(path);
        }
        if let Some(path) = &self.sslcert {
            options = options.ssl_client_cert(path);
        }
        if let Some(path) = &self.sslkey {
            options = options.ssl_client_key(path);
        }
        if options.get_application_name().is_none() {
            options = options.application_name("gitaly-replicator");
        }
        // Sent as a startup parameter; skipped at zero because PgBouncer refuses
        // the `options` parameter unless configured to ignore it.
        if !self.statement_timeout.is_zero() {
            let timeout_ms = self.statement_timeout.as_millis();
            options = options.options([("statement_timeout", timeout_ms)]);
        }
        Ok(options)
    }

    /// `url` with its password (also a `password=` query parameter) masked.
    pub fn masked_url(&self) -> Option<String> {
        self.url
            .as_ref()
            .map(|url| mask::database_url(url.expose()))
    }
}

pub(super) fn parse_sslmode(mode: &str) -> Result<PgSslMode, ConfigError> {
    mode.parse().map_err(|_| {
        ConfigError::new(
            "database.sslmode",
            format!(
                "unknown mode {mode:?}; expected disable, allow, prefer, require, verify-ca or verify-full"
            ),
        )
    })
}
