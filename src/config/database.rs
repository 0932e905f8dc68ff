//! `[database]`: where the repository store lives and how to connect to it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use super::database_tls::{self, PgTarget, ServerTrust, TlsSettings};
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
    /// `options` startup parameter, which PgBouncer refuses unless told to ignore
    /// it; with `pool_mode = "transaction"`, set in each transaction instead.
    #[serde(serialize_with = "mask::serialize_duration")]
    pub statement_timeout: Duration,
    /// `[database.session_pooled]`: Praefect's keys for the connection that
    /// needs a session of its own (the repository locks, migrations), when
    /// `[database]` is a pooler in transaction mode. Each key left unset falls
    /// back to `host_no_proxy`/`port_no_proxy` (host and port only), then to
    /// `[database]`'s.
    pub session_pooled: SessionPooled,
    /// Praefect's older spelling of `session_pooled.host`.
    pub host_no_proxy: Option<String>,
    /// Praefect's older spelling of `session_pooled.port`.
    pub port_no_proxy: Option<u16>,
    /// How `[database]` pools its server connections: `session` (Postgres
    /// itself, or PgBouncer in session mode) or `transaction` (PgBouncer in
    /// transaction mode: every statement then runs in a transaction of its own,
    /// without cached prepared statements). Unset, `transaction` when a
    /// session connection is configured apart (`session_pooled`,
    /// `host_no_proxy`, `port_no_proxy`), as Praefect's deployments do.
    pub pool_mode: Option<PoolMode>,
}

/// `[database.session_pooled]`; every key optional.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Debug)]
pub struct SessionPooled {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub dbname: Option<String>,
    pub sslmode: Option<String>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub sslrootcert: Option<PathBuf>,
}

impl SessionPooled {
    fn is_empty(&self) -> bool {
        *self == SessionPooled::default()
    }

    /// `options` with every key set here applied; `section` names the keys
    /// in errors (`database.session_pooled`).
    fn apply(
        &self,
        mut options: PgConnectOptions,
        section: &str,
    ) -> Result<PgConnectOptions, ConfigError> {
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
            options = options.ssl_mode(parse_sslmode(&format!("{section}.sslmode"), mode)?);
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
        Ok(options)
    }
}

/// See [`DatabaseConfig::pool_mode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    Session,
    Transaction,
}

impl PoolMode {
    pub(super) fn parse(s: &str) -> Option<PoolMode> {
        match s {
            "session" => Some(PoolMode::Session),
            "transaction" => Some(PoolMode::Transaction),
            _ => None,
        }
    }
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
            session_pooled: SessionPooled::default(),
            host_no_proxy: None,
            port_no_proxy: None,
            pool_mode: None,
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
            session_pooled,
            host_no_proxy,
            port_no_proxy,
            pool_mode,
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
            .field("session_pooled", session_pooled)
            .field("host_no_proxy", host_no_proxy)
            .field("port_no_proxy", port_no_proxy)
            .field("pool_mode", pool_mode)
            .finish()
    }
}

impl DatabaseConfig {
    /// Whether `[database]` is a transaction-mode pooler (see [`Self::pool_mode`]).
    pub fn transaction_pooled(&self) -> bool {
        match self.pool_mode {
            Some(mode) => mode == PoolMode::Transaction,
            None => self.has_session_connection(),
        }
    }

    /// Whether a session connection is configured apart from `[database]`.
    pub fn has_session_connection(&self) -> bool {
        !self.session_pooled.is_empty()
            || self.host_no_proxy.is_some()
            || self.port_no_proxy.is_some()
    }

    /// The options of the pool's connections: `[database]`, with
    /// `statement_timeout` applied (unless zero, or set per transaction when
    /// transaction-pooled) and the application name set to
    /// `gitaly-replicator` unless the url sets one. `connect_timeout` and
    /// `max_connections` belong to the pool.
    pub fn connect_options(&self) -> Result<PgConnectOptions, ConfigError> {
        let options = self.base_options()?;
        if self.transaction_pooled() {
            // A pooler in transaction mode hands each transaction to any of
            // its server connections, so a prepared statement kept on one is
            // missing on the next; and PgBouncer refuses startup parameters it
            // does not track.
            return Ok(options.statement_cache_capacity(0).extra_float_digits(None));
        }
        Ok(self.with_statement_timeout(options))
    }

    /// The options of the session connection (repository locks, migrations):
    /// `[database.session_pooled]` over `host_no_proxy`/`port_no_proxy` over
    /// `[database]`, key by key, as Praefect reads them.
    pub fn session_connect_options(&self) -> Result<PgConnectOptions, ConfigError> {
        let sp = &self.session_pooled;
        let keys = SessionPooled {
            host: sp.host.clone().or_else(|| self.host_no_proxy.clone()),
            port: sp.port.or(self.port_no_proxy),
            ..sp.clone()
        };
        let options = keys.apply(self.base_options()?, "database.session_pooled")?;
        Ok(self.with_statement_timeout(options))
    }

    /// [`Self::connect_options`] and how the server is verified: the pool's
    /// connections go through the store's TLS relay when it must be (see
    /// `database_tls`), since sqlx would trust the platform's roots too.
    pub(crate) fn pool_target(&self) -> Result<PgTarget, ConfigError> {
        let options = self.connect_options()?;
        let own = [&self.sslrootcert, &self.sslcert, &self.sslkey];
        let trust = self.trust(&options, own.map(Option::as_deref), "database.")?;
        Ok(PgTarget { options, trust })
    }

    /// [`Self::session_connect_options`] and how the server is verified.
    pub(crate) fn session_target(&self) -> Result<PgTarget, ConfigError> {
        let options = self.session_connect_options()?;
        let sp = &self.session_pooled;
        let own = [
            sp.sslrootcert.as_ref().or(self.sslrootcert.as_ref()),
            sp.sslcert.as_ref().or(self.sslcert.as_ref()),
            sp.sslkey.as_ref().or(self.sslkey.as_ref()),
        ];
        let keys = if self.has_session_connection() {
            "database.session_pooled."
        } else {
            "database."
        };
        let trust = self.trust(&options, own.map(|p| p.map(PathBuf::as_path)), keys)?;
        Ok(PgTarget { options, trust })
    }

    fn trust(
        &self,
        options: &PgConnectOptions,
        own: [Option<&std::path::Path>; 3],
        keys: &str,
    ) -> Result<ServerTrust, ConfigError> {
        let url = self.url.as_ref().map(|u| u.expose());
        let settings = TlsSettings::resolve(own, url, |var| std::env::var(var).ok());
        database_tls::decide(
            options,
            settings,
            keys,
            database_tls::default_root_file(),
            std::path::Path::exists,
        )
    }

    /// The server-side statement limit of a transaction-pooled connection,
    /// in milliseconds: set in each transaction, since the startup parameter
    /// would be refused. `None` when session-pooled or unlimited.
    pub fn per_transaction_statement_timeout_ms(&self) -> Option<u128> {
        (self.transaction_pooled() && !self.statement_timeout.is_zero())
            .then_some(self.statement_timeout.as_millis())
    }

    fn with_statement_timeout(&self, options: PgConnectOptions) -> PgConnectOptions {
        // Sent as a startup parameter; skipped at zero because PgBouncer refuses
        // the `options` parameter unless configured to ignore it.
        if self.statement_timeout.is_zero() {
            return options;
        }
        let timeout_ms = self.statement_timeout.as_millis();
        options.options([("statement_timeout", timeout_ms)])
    }

    /// `[database]`'s own keys (or its url), nothing per connection kind.
    fn base_options(&self) -> Result<PgConnectOptions, ConfigError> {
        let mut options = match &self.url {
            Some(url) => PgConnectOptions::from_str(url.expose()).map_err(|e| {
                ConfigError::new("database.url", format!("not a valid PostgreSQL URL: {e}"))
            })?,
            None => PgConnectOptions::new(),
        };
        let own = SessionPooled {
            host: self.host.clone(),
            port: self.port,
            user: self.user.clone(),
            password: self.password.clone(),
            dbname: self.dbname.clone(),
            sslmode: self.sslmode.clone(),
            sslcert: self.sslcert.clone(),
            sslkey: self.sslkey.clone(),
            sslrootcert: self.sslrootcert.clone(),
        };
        options = own.apply(options, "database")?;
        if options.get_application_name().is_none() {
            options = options.application_name("gitaly-replicator");
        }
        Ok(options)
    }

    /// Warnings about `[database]` (see [`super::ConfigWarning`]).
    pub(super) fn warnings(&self) -> Vec<super::ConfigWarning> {
        let mut out = Vec::new();
        if self.host_no_proxy.is_some() || self.port_no_proxy.is_some() {
            out.push(super::ConfigWarning {
                key: "database.host_no_proxy".into(),
                message: "Praefect's older key, still honoured: prefer [database.session_pooled] host and port".into(),
            });
        }
        out
    }

    /// `url` with its password (also a `password=` query parameter) masked.
    pub fn masked_url(&self) -> Option<String> {
        self.url
            .as_ref()
            .map(|url| mask::database_url(url.expose()))
    }
}

pub(super) fn parse_sslmode(key: &str, mode: &str) -> Result<PgSslMode, ConfigError> {
    mode.parse().map_err(|_| {
        ConfigError::new(
            key,
            format!(
                "unknown mode {mode:?}; expected disable, allow, prefer, require, verify-ca or verify-full"
            ),
        )
    })
}
