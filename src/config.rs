//! The configuration: one TOML file in Praefect's shape, overridden key by key by
//! `GITALY_REPLICATOR_*` environment variables, parsed once into typed structs and
//! validated before anything connects. Every error names the key it is about.
//!
//! A Praefect `config.toml` loads as is: the keys Praefect and gitaly-replicator
//! share mean the same, Praefect's other keys are accepted and listed in
//! [`Config::ignored_keys`] (see [`PRAEFECT_IGNORED_KEYS`]), and a key neither
//! knows is an error naming its full path (`replication.bach_size`).
//!
//! The file is read as a plain [`toml::Table`] and walked by hand rather than
//! deserialized with serde, so that unknown keys, wrong types, environment
//! overrides and ignored Praefect keys are all decided in one place, by path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::queue::names::{MAX_NAME_LEN, is_valid_name};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use toml::{Table, Value};

/// Prefix of every environment variable that overrides a key.
pub const ENV_PREFIX: &str = "GITALY_REPLICATOR_";

/// Variables under [`ENV_PREFIX`] that are not configuration keys (the CLI reads
/// them), so a config load does not reject them as unknown.
pub const NON_CONFIG_ENV_VARS: &[&str] = &["GITALY_REPLICATOR_CONFIG"];

/// Praefect keys that are accepted and ignored. Paths leave out array indices
/// (`virtual_storage.default_replication_factor` covers every virtual storage);
/// a trailing `.*` covers a whole section. `logging.*` covers every logging key
/// except `format` and `level`, which are read first.
pub const PRAEFECT_IGNORED_KEYS: &[&str] = &[
    "listen_addr",
    "tls_listen_addr",
    "socket_path",
    "prometheus_exclude_database_from_default_metrics",
    "memory_queue_enabled",
    "postgres_queue_enabled",
    "i_understand_my_election_strategy_is_unsupported_and_will_be_removed_without_warning",
    "auth.*",
    "tls.*",
    "failover.*",
    "reconciliation.*",
    "background_verification.*",
    "prometheus.*",
    "sentry.*",
    "yamux.*",
    "logging.*",
    "database.session_pooled.*",
    "database.host_no_proxy",
    "database.port_no_proxy",
    "virtual_storage.default_replication_factor",
    "virtual_storage.node.primary",
];

/// What secrets are replaced with wherever they are printed.
pub const MASK: &str = "[masked]";

const DEFAULT_PROMETHEUS_LISTEN_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9652);
const ADDRESS_FORMS: &str = "expected tcp://HOST:PORT, tls://HOST:PORT or unix:/PATH";
const NODE_TOKEN_ENV_PREFIX: &str = "GITALY_REPLICATOR_VIRTUAL_STORAGE__";
const NODE_TOKEN_ENV_FORM: &str =
    "GITALY_REPLICATOR_VIRTUAL_STORAGE__<NAME>__NODE__<STORAGE>__TOKEN";
const LOG_LEVELS: &[&str] = &[
    "trace", "debug", "info", "warn", "warning", "error", "fatal", "panic",
];

/// A configuration problem, naming the key (`replication.batch_size`), the
/// environment variable, or, for syntax errors, the file position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct ConfigError {
    /// The file the configuration was loaded from, when the error is about it.
    pub file: Option<PathBuf>,
    /// Line and column (1-based) of a TOML syntax error.
    pub line_col: Option<(usize, usize)>,
    /// Full key path (`virtual_storage[0].node[1].storage`) or variable name;
    /// empty for errors about the whole file.
    pub key: String,
    /// What is wrong and, where it helps, what is accepted.
    pub message: String,
    from_env: bool,
}

impl ConfigError {
    /// An error about `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            line_col: None,
            key: key.into(),
            message: message.into(),
            from_env: false,
        }
    }

    fn env(var: &str, message: impl Into<String>) -> Self {
        ConfigError {
            from_env: true,
            ..ConfigError::new(var, message)
        }
    }

    fn syntax(text: &str, err: &toml::de::Error) -> Self {
        let line_col = err.span().map(|span| line_col(text, span.start));
        ConfigError {
            line_col,
            ..ConfigError::new("", format!("invalid TOML: {}", err.message().trim_end()))
        }
    }

    fn describe(&self) -> String {
        let mut out = match (&self.file, self.line_col) {
            (Some(file), Some((line, col))) => format!("{}:{line}:{col}: ", file.display()),
            (Some(file), None) => format!("{}: ", file.display()),
            (None, Some((line, col))) => format!("line {line}, column {col}: "),
            (None, None) => String::new(),
        };
        if !self.key.is_empty() {
            out.push_str(&self.key);
            out.push_str(": ");
        }
        out.push_str(&self.message);
        out
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// A value that must never be printed: `Debug` and `Display` show `[masked]`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that needs it (auth, connecting).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

/// A Gitaly node's gRPC address, in the forms Praefect accepts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NodeAddress {
    /// `tcp://HOST:PORT`, plaintext.
    Tcp { host: String, port: u16 },
    /// `tls://HOST:PORT`.
    Tls { host: String, port: u16 },
    /// `unix:/PATH` (also written `unix:///PATH`).
    Unix { path: PathBuf },
}

impl NodeAddress {
    /// The canonical address string (what `Display` prints), as Gitaly expects it,
    /// e.g. in the `gitaly-servers` metadata of `ReplicateRepository`.
    pub fn uri(&self) -> String {
        self.to_string()
    }

    /// Whether the connection uses TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, NodeAddress::Tls { .. })
    }
}

impl FromStr for NodeAddress {
    type Err = String;

    /// Parses an address; the error says what is wrong and which forms are accepted.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid address {s:?}: {why}; {ADDRESS_FORMS}");
        if let Some(rest) = s.strip_prefix("tcp://") {
            let (host, port) = host_port(rest).map_err(|why| bad(&why))?;
            Ok(NodeAddress::Tcp { host, port })
        } else if let Some(rest) = s.strip_prefix("tls://") {
            let (host, port) = host_port(rest).map_err(|why| bad(&why))?;
            Ok(NodeAddress::Tls { host, port })
        } else if let Some(rest) = s.strip_prefix("unix:") {
            let path = match rest.strip_prefix("//") {
                Some(p) if p.starts_with('/') => p,
                Some(_) => return Err(bad("unix:// must be followed by an absolute path")),
                None => rest,
            };
            if path.is_empty() {
                return Err(bad("the socket path is empty"));
            }
            Ok(NodeAddress::Unix {
                path: PathBuf::from(path),
            })
        } else if s.contains("://") {
            Err(bad("unsupported scheme"))
        } else {
            Err(bad("the scheme is missing"))
        }
    }
}

fn host_port(s: &str) -> Result<(String, u16), String> {
    if s.contains(['/', '?', '#', '@']) || s.contains(char::is_whitespace) {
        return Err("only HOST:PORT may follow the scheme".into());
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed '['")?;
        (host, after.strip_prefix(':').ok_or("the port is missing")?)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or("the port is missing")?;
        if host.contains(':') {
            return Err("write IPv6 addresses in brackets, as [::1]:8075".into());
        }
        (host, port)
    };
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    match port.parse::<u16>() {
        Ok(port) if port != 0 => Ok((host.to_string(), port)),
        _ => Err(format!("{port:?} is not a port number")),
    }
}

impl fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, host, port) = match self {
            NodeAddress::Unix { path } => return write!(f, "unix:{}", path.display()),
            NodeAddress::Tcp { host, port } => ("tcp", host, port),
            NodeAddress::Tls { host, port } => ("tls", host, port),
        };
        if host.contains(':') {
            write!(f, "{scheme}://[{host}]:{port}")
        } else {
            write!(f, "{scheme}://{host}:{port}")
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where `/metrics`, `/health/live` and `/health/ready` listen; `None` (written
    /// `""`) disables the listener. Praefect's `localhost:PORT` and `:PORT` are
    /// accepted; other host names are not resolved.
    pub prometheus_listen_addr: Option<SocketAddr>,
    /// Praefect's key: how long running jobs may take to finish on shutdown.
    pub graceful_stop_timeout: Duration,
    /// `[logging]`.
    pub logging: LoggingConfig,
    /// `[[virtual_storage]]`: the clusters whose replicas are kept in step.
    pub virtual_storages: Vec<VirtualStorage>,
    /// `[database]`: the repository store.
    pub database: DatabaseConfig,
    /// `[replication]`.
    pub replication: ReplicationConfig,
    /// `[nats]`: the job queue.
    pub nats: NatsConfig,
    /// Praefect keys present in the file that gitaly-replicator accepts but does
    /// not use, as full paths, sorted.
    pub ignored_keys: Vec<String>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

impl LogFormat {
    /// The spelling used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        }
    }
}

/// `[logging]`: Praefect's `format` and `level`; its other logging keys are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggingConfig {
    /// `"json"` (default) or `"text"`.
    pub format: LogFormat,
    /// A level (`trace` … `error`, plus Praefect's `warning`, `fatal`, `panic`) or a
    /// `tracing` filter directive such as `info,gitaly_replicator=debug`.
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

impl LoggingConfig {
    /// The level as a `tracing` filter directive (Praefect's level names mapped).
    pub fn filter_directive(&self) -> String {
        match self.level.to_ascii_lowercase().as_str() {
            "warning" => "warn".into(),
            "fatal" | "panic" => "error".into(),
            level if LOG_LEVELS.contains(&level) => level.into(),
            _ => self.level.clone(),
        }
    }
}

/// One `[[virtual_storage]]`: a named cluster of storage nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualStorage {
    /// The virtual storage's name, as repositories and jobs refer to it.
    pub name: String,
    /// `[[virtual_storage.node]]`.
    pub nodes: Vec<Node>,
}

impl VirtualStorage {
    /// The node with this storage name.
    pub fn node(&self, storage: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.storage == storage)
    }
}

/// One `[[virtual_storage.node]]`: a Gitaly server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The storage name, unique within its virtual storage.
    pub storage: String,
    /// Its gRPC address.
    pub address: NodeAddress,
    /// Gitaly's auth token for this node; may come from
    /// [`node_token_env_var`] instead of the file.
    pub token: Secret,
}

/// `[database]`: either `url`, or Praefect's separate keys. With `url`, only
/// `password` and the `ssl*` keys may be given beside it; they override the url's.
/// Keys left unset fall back to libpq's environment (`PGHOST`, …) and defaults.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host:port/dbname?sslmode=…` (a secret: it may hold
    /// the password).
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
    pub connect_timeout: Duration,
    /// Server-side limit per statement, `0s` for none (default 30s). Sent as the
    /// `options` startup parameter, which PgBouncer refuses unless told to ignore it.
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

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &self.masked_url())
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("sslcert", &self.sslcert)
            .field("sslkey", &self.sslkey)
            .field("sslrootcert", &self.sslrootcert)
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
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
        self.url.as_ref().map(|url| mask_database_url(url.expose()))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.url {
            let parsed = url::Url::parse(url.expose())
                .map_err(|e| ConfigError::new("database.url", format!("not a valid URL: {e}")))?;
            if !matches!(parsed.scheme(), "postgres" | "postgresql") {
                return Err(ConfigError::new(
                    "database.url",
                    "must start with postgres:// or postgresql://",
                ));
            }
            let conflicting = [
                ("host", self.host.is_some()),
                ("port", self.port.is_some()),
                ("user", self.user.is_some()),
                ("dbname", self.dbname.is_some()),
            ];
            if let Some((key, _)) = conflicting.iter().find(|(_, set)| *set) {
                return Err(ConfigError::new(
                    format!("database.{key}"),
                    "cannot be combined with database.url: put it in the url, or drop the url",
                ));
            }
        }
        if let Some(mode) = &self.sslmode {
            parse_sslmode(mode)?;
        }
        if self.max_connections == 0 {
            return Err(ConfigError::new(
                "database.max_connections",
                "must be at least 1",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::new(
                "database.connect_timeout",
                "must be more than 0s",
            ));
        }
        self.connect_options().map(drop)
    }
}

fn parse_sslmode(mode: &str) -> Result<PgSslMode, ConfigError> {
    mode.parse().map_err(|_| {
        ConfigError::new(
            "database.sslmode",
            format!(
                "unknown mode {mode:?}; expected disable, allow, prefer, require, verify-ca or verify-full"
            ),
        )
    })
}

/// `[replication]`: Praefect's keys plus the knobs of the consumer loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// Jobs per fetch (default 10, 1..=1000).
    pub batch_size: usize,
    /// Praefect's name; here: targets fetched in parallel per process (default 1).
    pub parallel_storage_processing_workers: usize,
    /// Jobs in flight per process (default 64).
    pub max_concurrent_jobs: usize,
    /// Deliveries per job before it is dead-lettered (default 3; `delete_replica`
    /// is unlimited).
    pub attempts: u32,
    /// Per-job timeout; zero means none (default), as in Praefect.
    pub job_timeout: Duration,
    /// How often each node's gRPC health is checked (default 5s).
    pub health_check_interval: Duration,
    /// Delay before the second attempt of a failed job (default 5s); it doubles
    /// with each failure, with jitter.
    pub retry_delay: Duration,
    /// The longest delay between attempts (default 5m).
    pub max_retry_delay: Duration,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            batch_size: 10,
            parallel_storage_processing_workers: 1,
            max_concurrent_jobs: 64,
            attempts: 3,
            job_timeout: Duration::ZERO,
            health_check_interval: Duration::from_secs(5),
            retry_delay: Duration::from_secs(5),
            max_retry_delay: Duration::from_secs(300),
        }
    }
}

impl ReplicationConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check(
            (1..=1000).contains(&self.batch_size),
            "replication.batch_size",
            format!("must be between 1 and 1000, got {}", self.batch_size),
        )?;
        check(
            self.parallel_storage_processing_workers >= 1,
            "replication.parallel_storage_processing_workers",
            "must be at least 1",
        )?;
        check(
            self.max_concurrent_jobs >= 1,
            "replication.max_concurrent_jobs",
            "must be at least 1",
        )?;
        check(
            self.attempts >= 1,
            "replication.attempts",
            "must be at least 1",
        )?;
        check(
            !self.health_check_interval.is_zero(),
            "replication.health_check_interval",
            "must be more than 0s",
        )?;
        check(
            !self.retry_delay.is_zero(),
            "replication.retry_delay",
            "must be more than 0s",
        )?;
        check(
            self.max_retry_delay >= self.retry_delay,
            "replication.max_retry_delay",
            "must not be less than replication.retry_delay",
        )
    }
}

/// `[nats]`: the JetStream connection and layout.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// Server URL, or several separated by commas (see [`NatsConfig::servers`]).
    pub url: String,
    /// A `.creds` file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    pub token: Option<Secret>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// CA bundle to verify the server with.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key, for mutual TLS (both or neither).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to connect without TLS.
    pub tls_required: bool,
    /// Subjects are `<subject_prefix>.<virtual_storage>.<target_storage>`.
    pub subject_prefix: String,
    /// The work stream.
    pub stream: String,
    /// The dead-letter stream.
    pub dead_letter_stream: String,
    /// Durable consumer names are derived from it.
    pub consumer_prefix: String,
    /// Stream replicas (1..=5; 3 in a cluster).
    pub replicas: usize,
    /// How long a delivered job may go unacknowledged (at least 1s).
    pub ack_wait: Duration,
    /// Unacknowledged jobs per consumer (-1 for unlimited).
    pub max_ack_pending: i64,
    /// Work stream size limit in bytes, discard new (-1 for unlimited).
    pub max_bytes: i64,
    /// Work stream limit in messages (discard new); -1 for unlimited.
    pub max_messages: i64,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    pub duplicate_window: Duration,
    /// How long dead letters are kept.
    pub dead_letter_max_age: Duration,
    /// Long-poll expiry of one fetch.
    pub fetch_expires: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            credentials_file: None,
            token: None,
            user: None,
            password: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
            subject_prefix: "gitaly.replication".into(),
            stream: "GITALY_REPLICATION".into(),
            dead_letter_stream: "GITALY_REPLICATION_DEAD".into(),
            consumer_prefix: "gitaly-replicator".into(),
            replicas: 1,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1000,
            max_bytes: -1,
            max_messages: 10_000_000,
            duplicate_window: Duration::from_secs(120),
            dead_letter_max_age: Duration::from_secs(30 * 24 * 3600),
            fetch_expires: Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.masked_url())
            .field("credentials_file", &self.credentials_file)
            .field("token", &self.token)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_required", &self.tls_required)
            .field("subject_prefix", &self.subject_prefix)
            .field("stream", &self.stream)
            .field("dead_letter_stream", &self.dead_letter_stream)
            .field("consumer_prefix", &self.consumer_prefix)
            .field("replicas", &self.replicas)
            .field("ack_wait", &self.ack_wait)
            .field("max_ack_pending", &self.max_ack_pending)
            .field("max_bytes", &self.max_bytes)
            .field("max_messages", &self.max_messages)
            .field("duplicate_window", &self.duplicate_window)
            .field("dead_letter_max_age", &self.dead_letter_max_age)
            .field("fetch_expires", &self.fetch_expires)
            .finish()
    }
}

impl NatsConfig {
    /// The server URLs in `url`, trimmed.
    pub fn servers(&self) -> impl Iterator<Item = &str> {
        self.url.split(',').map(str::trim).filter(|s| !s.is_empty())
    }

    /// `url` with any credentials in it (`user:password@`, `token@`) masked.
    pub fn masked_url(&self) -> String {
        let masked: Vec<String> = self.url.split(',').map(mask_nats_server).collect();
        masked.join(",")
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.servers().next().is_none() {
            return Err(ConfigError::new(
                "nats.url",
                "must name at least one server",
            ));
        }
        for server in self.url.split(',').map(str::trim) {
            let scheme_ok = match server.split_once("://") {
                Some((scheme, _)) => matches!(scheme, "nats" | "tls" | "ws" | "wss"),
                None => true,
            };
            if server.is_empty() || server.contains(char::is_whitespace) || !scheme_ok {
                return Err(ConfigError::new(
                    "nats.url",
                    "expected comma-separated servers such as nats://HOST:4222 \
                     (schemes nats, tls, ws, wss)",
                ));
            }
        }
        let methods = [
            ("nats.credentials_file", self.credentials_file.is_some()),
            ("nats.token", self.token.is_some()),
            ("nats.user", self.user.is_some()),
        ];
        let mut chosen = methods.iter().filter(|(_, set)| *set).map(|(k, _)| *k);
        if let (Some(first), Some(second)) = (chosen.next(), chosen.next()) {
            return Err(ConfigError::new(
                second,
                format!("cannot be combined with {first}: choose one way to authenticate"),
            ));
        }
        check(
            self.user.is_some() || self.password.is_none(),
            "nats.user",
            "must be set when nats.password is",
        )?;
        check(
            self.user.is_none() || self.password.is_some(),
            "nats.password",
            "must be set when nats.user is",
        )?;
        check(
            self.tls_cert_file.is_some() == self.tls_key_file.is_some(),
            if self.tls_cert_file.is_some() {
                "nats.tls_key_file"
            } else {
                "nats.tls_cert_file"
            },
            "nats.tls_cert_file and nats.tls_key_file go together",
        )?;
        check_subject_prefix(&self.subject_prefix)?;
        check_name("nats.stream", &self.stream)?;
        check_name("nats.dead_letter_stream", &self.dead_letter_stream)?;
        check_name("nats.consumer_prefix", &self.consumer_prefix)?;
        check(
            self.stream != self.dead_letter_stream,
            "nats.dead_letter_stream",
            "must differ from nats.stream",
        )?;
        check(
            (1..=5).contains(&self.replicas),
            "nats.replicas",
            format!("must be between 1 and 5, got {}", self.replicas),
        )?;
        check(
            self.ack_wait >= Duration::from_secs(1),
            "nats.ack_wait",
            "must be at least 1s",
        )?;
        check(
            self.max_ack_pending == -1 || self.max_ack_pending >= 1,
            "nats.max_ack_pending",
            "must be at least 1, or -1 for unlimited",
        )?;
        check(
            self.max_bytes == -1 || self.max_bytes >= 1,
            "nats.max_bytes",
            "must be at least 1, or -1 for unlimited",
        )?;
        check(
            self.max_messages == -1 || self.max_messages >= 1,
            "nats.max_messages",
            "must be at least 1, or -1 for unlimited",
        )?;
        for (key, value) in [
            ("nats.duplicate_window", self.duplicate_window),
            ("nats.dead_letter_max_age", self.dead_letter_max_age),
            ("nats.fetch_expires", self.fetch_expires),
        ] {
            check(!value.is_zero(), key, "must be more than 0s")?;
        }
        Ok(())
    }
}

fn check(ok: bool, key: &str, message: impl Into<String>) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(key, message))
    }
}

fn check_subject_prefix(prefix: &str) -> Result<(), ConfigError> {
    let bad_token = |t: &str| {
        t.is_empty()
            || t.contains(|c: char| c.is_whitespace() || c.is_control() || "*>".contains(c))
    };
    check(
        !prefix.split('.').any(bad_token),
        "nats.subject_prefix",
        format!(
            "{prefix:?} is not a subject prefix: expected non-empty tokens separated by dots, \
             without spaces, '*' or '>'"
        ),
    )?;
    check(
        prefix.len() <= MAX_SUBJECT_PART_LEN,
        "nats.subject_prefix",
        format!(
            "is {} bytes long, more than {MAX_SUBJECT_PART_LEN}",
            prefix.len()
        ),
    )
}

/// Longest subject prefix and storage name, in bytes. A job's subject is the
/// prefix and both storage names, each byte of which may escape to three, and
/// nats-server closes a connection that sends a protocol line (a publish's
/// subject, reply subject and sizes) over 4 KiB (`max_control_line`): at this
/// length the longest dead-letter subject is 1,792 bytes, which leaves room.
const MAX_SUBJECT_PART_LEN: usize = 255;

/// A stream name or the consumer prefix: it becomes part of JetStream names,
/// which nats-server uses in subjects and as directory names.
fn check_name(key: &str, name: &str) -> Result<(), ConfigError> {
    check(
        is_valid_name(name),
        key,
        format!(
            "{name:?} is not a valid name: it must be 1 to {MAX_NAME_LEN} characters of \
             A-Z, a-z, 0-9, '-' and '_'"
        ),
    )
}

/// A virtual storage or storage name: free text (subjects escape it and
/// consumer names hash it), but not empty, and short enough for a subject.
fn check_storage_name(key: &str, name: &str) -> Result<(), ConfigError> {
    check(!name.is_empty(), key, "must not be empty")?;
    check(
        name.len() <= MAX_SUBJECT_PART_LEN,
        key,
        format!(
            "is {} bytes long, more than {MAX_SUBJECT_PART_LEN}: it goes into NATS subjects",
            name.len()
        ),
    )
}

impl Default for Config {
    /// Every key at its default, with no virtual storages: not valid until one is added.
    fn default() -> Self {
        Config {
            prometheus_listen_addr: Some(DEFAULT_PROMETHEUS_LISTEN_ADDR),
            graceful_stop_timeout: Duration::from_secs(60),
            logging: LoggingConfig::default(),
            virtual_storages: Vec::new(),
            database: DatabaseConfig::default(),
            replication: ReplicationConfig::default(),
            nats: NatsConfig::default(),
            ignored_keys: Vec::new(),
        }
    }
}

impl Config {
    /// Reads `path`, applies the process's `GITALY_REPLICATOR_*` variables, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let in_file = |mut err: ConfigError| {
            if !err.from_env {
                err.file = Some(path.to_path_buf());
            }
            err
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| in_file(ConfigError::new("", format!("cannot read the file: {e}"))))?;
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str().filter(|n| n.starts_with(ENV_PREFIX)) else {
                continue;
            };
            let value = value
                .into_string()
                .map_err(|_| ConfigError::env(name, "the value is not valid UTF-8"))?;
            env.push((name.to_string(), value));
        }
        Self::from_toml_str_with_env(&text, env).map_err(in_file)
    }

    /// Parses and validates `s`, without looking at the environment.
    pub fn from_toml_str(s: &str) -> Result<Config, ConfigError> {
        Self::from_toml_str_with_env(s, std::iter::empty())
    }

    /// Parses `s`, applies the `GITALY_REPLICATOR_*` variables among `env` (others
    /// are skipped), validates.
    pub fn from_toml_str_with_env(
        s: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let table: Table = s.parse().map_err(|e| ConfigError::syntax(s, &e))?;
        let mut ctx = Ctx::new(env);
        let result = parse(table, &mut ctx).and_then(|config| {
            config.validate()?;
            Ok(config)
        });
        result.map_err(|mut err| {
            if let Some(var) = ctx.origins.get(&err.key) {
                err.message = format!("{} (set by environment variable {var})", err.message);
                err.from_env = true;
            }
            err
        })
    }

    /// Checks everything the types do not: names present and unique, tokens set,
    /// numbers in range, NATS names well formed, database settings coherent.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let level = self.logging.level.to_ascii_lowercase();
        let directive_ok = level.contains('=')
            && tracing_subscriber::EnvFilter::try_new(&self.logging.level).is_ok();
        check(
            LOG_LEVELS.contains(&level.as_str()) || directive_ok,
            "logging.level",
            format!(
                "unknown level {:?}; expected trace, debug, info, warn, error \
                 or a filter directive such as info,gitaly_replicator=debug",
                self.logging.level
            ),
        )?;
        check(
            !self.virtual_storages.is_empty(),
            "virtual_storage",
            "at least one [[virtual_storage]] with [[virtual_storage.node]] entries is required",
        )?;
        let mut names = HashMap::new();
        for (i, vs) in self.virtual_storages.iter().enumerate() {
            let key = format!("virtual_storage[{i}]");
            check_storage_name(&format!("{key}.name"), &vs.name)?;
            if let Some(prev) = names.insert(vs.name.as_str(), i) {
                return Err(ConfigError::new(
                    format!("{key}.name"),
                    format!(
                        "duplicate virtual storage name {:?} (also virtual_storage[{prev}].name)",
                        vs.name
                    ),
                ));
            }
            check(
                !vs.nodes.is_empty(),
                &format!("{key}.node"),
                format!(
                    "virtual storage {:?} has no [[virtual_storage.node]]",
                    vs.name
                ),
            )?;
            let mut storages = HashMap::new();
            for (j, node) in vs.nodes.iter().enumerate() {
                let key = format!("{key}.node[{j}]");
                check_storage_name(&format!("{key}.storage"), &node.storage)?;
                if let Some(prev) = storages.insert(node.storage.as_str(), j) {
                    return Err(ConfigError::new(
                        format!("{key}.storage"),
                        format!(
                            "duplicate storage name {:?} in virtual storage {:?} \
                             (also virtual_storage[{i}].node[{prev}].storage)",
                            node.storage, vs.name
                        ),
                    ));
                }
                check(
                    !node.token.is_empty(),
                    &format!("{key}.token"),
                    format!(
                        "must not be empty; set it in the file or in {}",
                        node_token_env_var(&vs.name, &node.storage)
                    ),
                )?;
            }
        }
        self.database.validate()?;
        self.replication.validate()?;
        self.nats.validate()
    }

    /// The virtual storage with this name.
    pub fn virtual_storage(&self, name: &str) -> Option<&VirtualStorage> {
        self.virtual_storages.iter().find(|vs| vs.name == name)
    }

    /// Every (virtual storage, node) pair: the replication targets.
    pub fn targets(&self) -> impl Iterator<Item = (&VirtualStorage, &Node)> {
        self.virtual_storages
            .iter()
            .flat_map(|vs| vs.nodes.iter().map(move |node| (vs, node)))
    }

    /// The effective configuration as TOML, every secret printed as `[masked]`,
    /// followed by a comment listing the ignored Praefect keys (`check-config`).
    pub fn to_masked_toml(&self) -> String {
        let mut out = TomlOut::default();
        out.line("# gitaly-replicator: effective configuration, secrets masked");
        let addr = self.prometheus_listen_addr.map(|a| a.to_string());
        out.kv("prometheus_listen_addr", addr.unwrap_or_default());
        out.duration("graceful_stop_timeout", self.graceful_stop_timeout);

        out.header("[logging]");
        out.kv("format", self.logging.format.as_str());
        out.kv("level", self.logging.level.as_str());

        for vs in &self.virtual_storages {
            out.header("[[virtual_storage]]");
            out.kv("name", vs.name.as_str());
            for node in &vs.nodes {
                out.header("[[virtual_storage.node]]");
                out.kv("storage", node.storage.as_str());
                out.kv("address", node.address.to_string());
                out.kv("token", MASK);
            }
        }

        let db = &self.database;
        out.header("[database]");
        out.opt("url", db.masked_url());
        out.opt("host", db.host.as_deref());
        out.opt("port", db.port.map(i64::from));
        out.opt("user", db.user.as_deref());
        out.opt("password", db.password.as_ref().map(|_| MASK));
        out.opt("dbname", db.dbname.as_deref());
        out.opt("sslmode", db.sslmode.as_deref());
        out.path("sslcert", &db.sslcert);
        out.path("sslkey", &db.sslkey);
        out.path("sslrootcert", &db.sslrootcert);
        out.kv("max_connections", i64::from(db.max_connections));
        out.duration("connect_timeout", db.connect_timeout);
        out.duration("statement_timeout", db.statement_timeout);

        let r = &self.replication;
        out.header("[replication]");
        out.kv("batch_size", int(r.batch_size));
        let workers = int(r.parallel_storage_processing_workers);
        out.kv("parallel_storage_processing_workers", workers);
        out.kv("max_concurrent_jobs", int(r.max_concurrent_jobs));
        out.kv("attempts", i64::from(r.attempts));
        out.duration("job_timeout", r.job_timeout);
        out.duration("health_check_interval", r.health_check_interval);
        out.duration("retry_delay", r.retry_delay);
        out.duration("max_retry_delay", r.max_retry_delay);

        let n = &self.nats;
        out.header("[nats]");
        out.kv("url", n.masked_url());
        out.path("credentials_file", &n.credentials_file);
        out.opt("token", n.token.as_ref().map(|_| MASK));
        out.opt("user", n.user.as_deref());
        out.opt("password", n.password.as_ref().map(|_| MASK));
        out.path("tls_ca_file", &n.tls_ca_file);
        out.path("tls_cert_file", &n.tls_cert_file);
        out.path("tls_key_file", &n.tls_key_file);
        out.kv("tls_required", n.tls_required);
        out.kv("subject_prefix", n.subject_prefix.as_str());
        out.kv("stream", n.stream.as_str());
        out.kv("dead_letter_stream", n.dead_letter_stream.as_str());
        out.kv("consumer_prefix", n.consumer_prefix.as_str());
        out.kv("replicas", int(n.replicas));
        out.duration("ack_wait", n.ack_wait);
        out.kv("max_ack_pending", n.max_ack_pending);
        out.kv("max_bytes", n.max_bytes);
        out.kv("max_messages", n.max_messages);
        out.duration("duplicate_window", n.duplicate_window);
        out.duration("dead_letter_max_age", n.dead_letter_max_age);
        out.duration("fetch_expires", n.fetch_expires);

        out.line("");
        if self.ignored_keys.is_empty() {
            out.line("# Ignored Praefect keys: none");
        } else {
            out.line("# Ignored Praefect keys (accepted, not used by gitaly-replicator):");
            for key in &self.ignored_keys {
                out.line(&format!("#   {key}"));
            }
        }
        out.0
    }
}

/// The variable that sets the token of node `storage` in `virtual_storage`:
/// `GITALY_REPLICATOR_VIRTUAL_STORAGE__<NAME>__NODE__<STORAGE>__TOKEN`, names
/// upper-cased with every byte outside `[A-Z0-9]` written as `_`.
pub fn node_token_env_var(virtual_storage: &str, storage: &str) -> String {
    let mangle = |name: &str| -> String {
        name.bytes()
            .map(|b| match b.to_ascii_uppercase() {
                c @ (b'A'..=b'Z' | b'0'..=b'9') => char::from(c),
                _ => '_',
            })
            .collect()
    };
    format!(
        "{NODE_TOKEN_ENV_PREFIX}{}__NODE__{}__TOKEN",
        mangle(virtual_storage),
        mangle(storage)
    )
}

fn int(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn mask_database_url(raw: &str) -> String {
    // Alphanumeric, so the url crate leaves it unencoded and it can be swapped for MASK.
    const PLACEHOLDER: &str = "MASKEDe0d9c1b7";
    let Ok(mut url) = url::Url::parse(raw) else {
        return MASK.to_string();
    };
    if url.password().is_some() && url.set_password(Some(PLACEHOLDER)).is_err() {
        return MASK.to_string();
    }
    if url.query_pairs().any(|(k, _)| k == "password") {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "password" {
                    PLACEHOLDER.into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string().replace(PLACEHOLDER, MASK)
}

fn mask_nats_server(server: &str) -> String {
    let (scheme, rest) = match server.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), server),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}{MASK}{}", &rest[at..]),
        None => server.to_string(),
    }
}

/// A TOML writer for [`Config::to_masked_toml`]: values are formatted by `toml`
/// so strings are quoted and escaped correctly.
#[derive(Default)]
struct TomlOut(String);

impl TomlOut {
    fn line(&mut self, s: &str) {
        self.0.push_str(s);
        self.0.push('\n');
    }

    fn header(&mut self, s: &str) {
        self.line("");
        self.line(s);
    }

    fn kv(&mut self, key: &str, value: impl Into<Value>) {
        let value: Value = value.into();
        self.line(&format!("{key} = {value}"));
    }

    fn opt(&mut self, key: &str, value: Option<impl Into<Value>>) {
        if let Some(value) = value {
            self.kv(key, value);
        }
    }

    fn path(&mut self, key: &str, value: &Option<PathBuf>) {
        self.opt(key, value.as_ref().map(|p| p.display().to_string()));
    }

    fn duration(&mut self, key: &str, value: Duration) {
        self.kv(key, humantime::format_duration(value).to_string());
    }
}

// ---- Reading the file ------------------------------------------------------

/// State shared while the file is read: the environment and what came of it.
struct Ctx {
    /// `GITALY_REPLICATOR_*` variables, and whether a key used each.
    env: BTreeMap<String, (String, bool)>,
    /// Every variable name a key would have answered to, for suggestions.
    env_names: BTreeSet<String>,
    /// Key path → the variable that set it, so errors can say so.
    origins: BTreeMap<String, String>,
    ignored: BTreeSet<String>,
}

impl Ctx {
    fn new(env: impl IntoIterator<Item = (String, String)>) -> Self {
        let env = env
            .into_iter()
            .filter(|(k, _)| {
                k.starts_with(ENV_PREFIX) && !NON_CONFIG_ENV_VARS.contains(&k.as_str())
            })
            .map(|(k, v)| (k, (v, false)))
            .collect();
        Ctx {
            env,
            env_names: BTreeSet::new(),
            origins: BTreeMap::new(),
            ignored: BTreeSet::new(),
        }
    }
}

/// Where a key's value came from.
enum Raw {
    File(Value),
    Env(String),
}

/// One table of the file, whose keys are taken out as they are read; what is
/// left at [`Section::finish`] is either an ignored Praefect key or an error.
struct Section {
    path: String,
    table: Table,
    /// Whether `GITALY_REPLICATOR_<PATH>__<KEY>` overrides keys here (not inside arrays).
    env: bool,
    known: Vec<&'static str>,
}

impl Section {
    fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn raw(&mut self, ctx: &mut Ctx, key: &'static str) -> Option<Raw> {
        self.known.push(key);
        let from_file = self.table.remove(key);
        if self.env {
            let path = self.key(key);
            let var = format!(
                "{ENV_PREFIX}{}",
                path.to_ascii_uppercase().replace('.', "__")
            );
            ctx.env_names.insert(var.clone());
            if let Some((value, used)) = ctx.env.get_mut(&var) {
                *used = true;
                let value = value.clone();
                ctx.origins.insert(path, var);
                return Some(Raw::Env(value));
            }
        }
        from_file.map(Raw::File)
    }

    /// Names the type found, never the value: it may be a secret.
    fn wrong_type(&self, key: &str, expected: &str, got: &Value) -> ConfigError {
        ConfigError::new(
            self.key(key),
            format!("expected {expected}, got a {}", got.type_str()),
        )
    }

    fn string(&mut self, ctx: &mut Ctx, key: &'static str) -> Result<Option<String>, ConfigError> {
        match self.raw(ctx, key) {
            None => Ok(None),
            Some(Raw::Env(s) | Raw::File(Value::String(s))) => Ok(Some(s)),
            Some(Raw::File(other)) => Err(self.wrong_type(key, "a string", &other)),
        }
    }

    /// A string where, as in Praefect, empty means unset.
    fn optional(
        &mut self,
        ctx: &mut Ctx,
        key: &'static str,
    ) -> Result<Option<String>, ConfigError> {
        Ok(self.string(ctx, key)?.filter(|s| !s.is_empty()))
    }

    fn secret(&mut self, ctx: &mut Ctx, key: &'static str) -> Result<Option<Secret>, ConfigError> {
        Ok(self.optional(ctx, key)?.map(Secret))
    }

    fn path(&mut self, ctx: &mut Ctx, key: &'static str) -> Result<Option<PathBuf>, ConfigError> {
        Ok(self.optional(ctx, key)?.map(PathBuf::from))
    }

    fn integer(&mut self, ctx: &mut Ctx, key: &'static str) -> Result<Option<i64>, ConfigError> {
        match self.raw(ctx, key) {
            None => Ok(None),
            Some(Raw::File(Value::Integer(i))) => Ok(Some(i)),
            Some(Raw::Env(s)) => s.trim().parse().map(Some).map_err(|_| {
                ConfigError::new(self.key(key), format!("expected an integer, got {s:?}"))
            }),
            Some(Raw::File(other)) => Err(self.wrong_type(key, "an integer", &other)),
        }
    }

    /// A non-negative integer converted to `T`, or `default`.
    fn number<T: TryFrom<i64>>(
        &mut self,
        ctx: &mut Ctx,
        key: &'static str,
        default: T,
    ) -> Result<T, ConfigError> {
        match self.integer(ctx, key)? {
            None => Ok(default),
            Some(i) => T::try_from(i).map_err(|_| {
                let why = if i < 0 {
                    "must not be negative"
                } else {
                    "is too large"
                };
                ConfigError::new(self.key(key), format!("{why}: {i}"))
            }),
        }
    }

    fn boolean(
        &mut self,
        ctx: &mut Ctx,
        key: &'static str,
        default: bool,
    ) -> Result<bool, ConfigError> {
        match self.raw(ctx, key) {
            None => Ok(default),
            Some(Raw::File(Value::Boolean(b))) => Ok(b),
            Some(Raw::Env(s)) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(ConfigError::new(
                    self.key(key),
                    format!("expected true or false, got {s:?}"),
                )),
            },
            Some(Raw::File(other)) => Err(self.wrong_type(key, "true or false", &other)),
        }
    }

    fn duration(
        &mut self,
        ctx: &mut Ctx,
        key: &'static str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(s) = self.string(ctx, key)? else {
            return Ok(default);
        };
        humantime::parse_duration(s.trim()).map_err(|e| {
            ConfigError::new(
                self.key(key),
                format!("invalid duration {s:?} ({e}); write e.g. \"30s\", \"2m\" or \"720h\""),
            )
        })
    }

    /// The sub-table `key`, empty when absent so that environment overrides still apply.
    fn table(&mut self, key: &'static str) -> Result<Section, ConfigError> {
        self.known.push(key);
        let table = match self.table.remove(key) {
            None => Table::new(),
            Some(Value::Table(t)) => t,
            Some(other) => return Err(self.wrong_type(key, "a table", &other)),
        };
        Ok(Section {
            path: self.key(key),
            table,
            env: self.env,
            known: Vec::new(),
        })
    }

    /// The array of tables `key` (`[[key]]`), empty when absent.
    fn tables(&mut self, key: &'static str) -> Result<Vec<Section>, ConfigError> {
        self.known.push(key);
        let items = match self.table.remove(key) {
            None => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(other) => return Err(self.wrong_type(key, "an array of tables", &other)),
        };
        let path = self.key(key);
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Table(table) => Ok(Section {
                    path: format!("{path}[{i}]"),
                    table,
                    env: false,
                    known: Vec::new(),
                }),
                other => Err(ConfigError::new(
                    format!("{path}[{i}]"),
                    format!("expected a table, got a {}", other.type_str()),
                )),
            })
            .collect()
    }

    /// Sorts out the keys nobody read: ignored Praefect keys, or the first unknown one.
    fn finish(self, ctx: &mut Ctx) -> Result<(), ConfigError> {
        let mut rest: Vec<(String, Value)> = self.table.into_iter().collect();
        rest.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, value) in rest {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            if is_ignored(&strip_indices(&path)) {
                leaves(&path, &value, &mut ctx.ignored);
                continue;
            }
            let hint = suggest(&key, self.known.iter().copied())
                .map(|k| format!("; did you mean `{k}`?"))
                .unwrap_or_default();
            return Err(ConfigError::new(
                path,
                format!("unknown key (neither gitaly-replicator nor Praefect has it){hint}"),
            ));
        }
        Ok(())
    }
}

fn is_ignored(pattern: &str) -> bool {
    PRAEFECT_IGNORED_KEYS
        .iter()
        .any(|ignored| match ignored.strip_suffix(".*") {
            Some(section) => {
                pattern == section
                    || pattern
                        .strip_prefix(section)
                        .is_some_and(|rest| rest.starts_with('.'))
            }
            None => pattern == *ignored,
        })
}

/// `virtual_storage[0].node[1].primary` → `virtual_storage.node.primary`.
fn strip_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => in_index = true,
            ']' => in_index = false,
            c if !in_index => out.push(c),
            _ => {}
        }
    }
    out
}

/// Every leaf key under `path`, for the list of ignored keys.
fn leaves(path: &str, value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Table(t) if !t.is_empty() => {
            for (k, v) in t {
                leaves(&format!("{path}.{k}"), v, out);
            }
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_table) => {
            for (i, v) in items.iter().enumerate() {
                leaves(&format!("{path}[{i}]"), v, out);
            }
        }
        _ => {
            out.insert(path.to_string());
        }
    }
}

fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= 3 && *d < word.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(b.len() + 1);
        cur.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur.push(substitute.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn parse(table: Table, ctx: &mut Ctx) -> Result<Config, ConfigError> {
    let defaults = Config::default();
    let mut root = Section {
        path: String::new(),
        table,
        env: true,
        known: Vec::new(),
    };
    let prometheus_listen_addr = match root.string(ctx, "prometheus_listen_addr")? {
        None => defaults.prometheus_listen_addr,
        Some(s) if s.trim().is_empty() => None,
        Some(s) => Some(
            parse_listen_addr(s.trim())
                .map_err(|m| ConfigError::new("prometheus_listen_addr", m))?,
        ),
    };
    let graceful_stop_timeout =
        root.duration(ctx, "graceful_stop_timeout", defaults.graceful_stop_timeout)?;
    let logging = parse_logging(ctx, root.table("logging")?)?;
    let virtual_storages = root
        .tables("virtual_storage")?
        .into_iter()
        .map(|vs| parse_virtual_storage(ctx, vs))
        .collect::<Result<_, _>>()?;
    let database = parse_database(ctx, root.table("database")?)?;
    let replication = parse_replication(ctx, root.table("replication")?)?;
    let nats = parse_nats(ctx, root.table("nats")?)?;
    root.finish(ctx)?;
    let mut config = Config {
        prometheus_listen_addr,
        graceful_stop_timeout,
        logging,
        virtual_storages,
        database,
        replication,
        nats,
        ignored_keys: Vec::new(),
    };
    apply_node_tokens(&mut config, ctx)?;
    check_unused_env(ctx)?;
    config.ignored_keys = std::mem::take(&mut ctx.ignored).into_iter().collect();
    Ok(config)
}

/// An IP socket address, or Praefect's `localhost:PORT` and `:PORT`. Other host
/// names are refused rather than resolved while reading the configuration.
fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let parsed = s.rsplit_once(':').and_then(|(host, port)| {
        let port = port.parse().ok()?;
        match host {
            "" => Some(SocketAddr::new(unspecified, port)),
            "localhost" => Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
            _ => None,
        }
    });
    parsed.ok_or_else(|| {
        format!(
            "{s:?} is not IP:PORT (e.g. \"127.0.0.1:9652\"; \"localhost:PORT\" and \":PORT\" \
             also work, other host names do not); \"\" disables the listener"
        )
    })
}

fn parse_logging(ctx: &mut Ctx, mut s: Section) -> Result<LoggingConfig, ConfigError> {
    let defaults = LoggingConfig::default();
    let format = match s.optional(ctx, "format")?.as_deref() {
        None | Some("json") => LogFormat::Json,
        Some("text") => LogFormat::Text,
        Some(other) => {
            return Err(ConfigError::new(
                "logging.format",
                format!("unknown format {other:?}; expected \"json\" or \"text\""),
            ));
        }
    };
    let level = s.optional(ctx, "level")?.unwrap_or(defaults.level);
    s.finish(ctx)?;
    Ok(LoggingConfig { format, level })
}

fn parse_virtual_storage(ctx: &mut Ctx, mut s: Section) -> Result<VirtualStorage, ConfigError> {
    let name = s.string(ctx, "name")?.unwrap_or_default();
    let nodes = s
        .tables("node")?
        .into_iter()
        .map(|node| parse_node(ctx, node))
        .collect::<Result<_, _>>()?;
    s.finish(ctx)?;
    Ok(VirtualStorage { name, nodes })
}

fn parse_node(ctx: &mut Ctx, mut s: Section) -> Result<Node, ConfigError> {
    let storage = s.string(ctx, "storage")?.unwrap_or_default();
    let address = match s.string(ctx, "address")? {
        Some(a) => a
            .trim()
            .parse()
            .map_err(|m| ConfigError::new(s.key("address"), m))?,
        None => {
            return Err(ConfigError::new(
                s.key("address"),
                format!("missing; {ADDRESS_FORMS}"),
            ));
        }
    };
    let token = Secret(s.string(ctx, "token")?.unwrap_or_default());
    s.finish(ctx)?;
    Ok(Node {
        storage,
        address,
        token,
    })
}

fn parse_database(ctx: &mut Ctx, mut s: Section) -> Result<DatabaseConfig, ConfigError> {
    let d = DatabaseConfig::default();
    let config = DatabaseConfig {
        url: s.secret(ctx, "url")?,
        host: s.optional(ctx, "host")?,
        // Praefect writes an unset port as 0.
        port: Some(s.number(ctx, "port", 0u16)?).filter(|p| *p != 0),
        user: s.optional(ctx, "user")?,
        password: s.secret(ctx, "password")?,
        dbname: s.optional(ctx, "dbname")?,
        sslmode: s.optional(ctx, "sslmode")?,
        sslcert: s.path(ctx, "sslcert")?,
        sslkey: s.path(ctx, "sslkey")?,
        sslrootcert: s.path(ctx, "sslrootcert")?,
        max_connections: s.number(ctx, "max_connections", d.max_connections)?,
        connect_timeout: s.duration(ctx, "connect_timeout", d.connect_timeout)?,
        statement_timeout: s.duration(ctx, "statement_timeout", d.statement_timeout)?,
    };
    s.finish(ctx)?;
    Ok(config)
}

fn parse_replication(ctx: &mut Ctx, mut s: Section) -> Result<ReplicationConfig, ConfigError> {
    let d = ReplicationConfig::default();
    let config = ReplicationConfig {
        batch_size: s.number(ctx, "batch_size", d.batch_size)?,
        parallel_storage_processing_workers: s.number(
            ctx,
            "parallel_storage_processing_workers",
            d.parallel_storage_processing_workers,
        )?,
        max_concurrent_jobs: s.number(ctx, "max_concurrent_jobs", d.max_concurrent_jobs)?,
        attempts: s.number(ctx, "attempts", d.attempts)?,
        job_timeout: s.duration(ctx, "job_timeout", d.job_timeout)?,
        health_check_interval: s.duration(ctx, "health_check_interval", d.health_check_interval)?,
        retry_delay: s.duration(ctx, "retry_delay", d.retry_delay)?,
        max_retry_delay: s.duration(ctx, "max_retry_delay", d.max_retry_delay)?,
    };
    s.finish(ctx)?;
    Ok(config)
}

fn parse_nats(ctx: &mut Ctx, mut s: Section) -> Result<NatsConfig, ConfigError> {
    let d = NatsConfig::default();
    let config = NatsConfig {
        url: s.optional(ctx, "url")?.unwrap_or(d.url),
        credentials_file: s.path(ctx, "credentials_file")?,
        token: s.secret(ctx, "token")?,
        user: s.optional(ctx, "user")?,
        password: s.secret(ctx, "password")?,
        tls_ca_file: s.path(ctx, "tls_ca_file")?,
        tls_cert_file: s.path(ctx, "tls_cert_file")?,
        tls_key_file: s.path(ctx, "tls_key_file")?,
        tls_required: s.boolean(ctx, "tls_required", d.tls_required)?,
        subject_prefix: s.string(ctx, "subject_prefix")?.unwrap_or(d.subject_prefix),
        stream: s.string(ctx, "stream")?.unwrap_or(d.stream),
        dead_letter_stream: s
            .string(ctx, "dead_letter_stream")?
            .unwrap_or(d.dead_letter_stream),
        consumer_prefix: s
            .string(ctx, "consumer_prefix")?
            .unwrap_or(d.consumer_prefix),
        replicas: s.number(ctx, "replicas", d.replicas)?,
        ack_wait: s.duration(ctx, "ack_wait", d.ack_wait)?,
        max_ack_pending: s
            .integer(ctx, "max_ack_pending")?
            .unwrap_or(d.max_ack_pending),
        max_bytes: s.integer(ctx, "max_bytes")?.unwrap_or(d.max_bytes),
        max_messages: s.integer(ctx, "max_messages")?.unwrap_or(d.max_messages),
        duplicate_window: s.duration(ctx, "duplicate_window", d.duplicate_window)?,
        dead_letter_max_age: s.duration(ctx, "dead_letter_max_age", d.dead_letter_max_age)?,
        fetch_expires: s.duration(ctx, "fetch_expires", d.fetch_expires)?,
    };
    s.finish(ctx)?;
    Ok(config)
}

/// Sets node tokens from `GITALY_REPLICATOR_VIRTUAL_STORAGE__<NAME>__NODE__<STORAGE>__TOKEN`.
fn apply_node_tokens(config: &mut Config, ctx: &mut Ctx) -> Result<(), ConfigError> {
    for (var, (value, used)) in ctx.env.iter_mut() {
        if *used || !var.starts_with(NODE_TOKEN_ENV_PREFIX) {
            continue;
        }
        let mut hits = Vec::new();
        for (i, vs) in config.virtual_storages.iter().enumerate() {
            for (j, node) in vs.nodes.iter().enumerate() {
                if node_token_env_var(&vs.name, &node.storage) == *var {
                    hits.push((i, j));
                }
            }
        }
        let (i, j) = match hits[..] {
            [hit] => hit,
            [] => {
                let expected: Vec<String> = config
                    .targets()
                    .map(|(vs, node)| node_token_env_var(&vs.name, &node.storage))
                    .collect();
                return Err(ConfigError::env(
                    var,
                    format!(
                        "names no configured node; node tokens are set with {NODE_TOKEN_ENV_FORM} \
                         (configured: {})",
                        expected.join(", ")
                    ),
                ));
            }
            _ => {
                return Err(ConfigError::env(
                    var,
                    "matches several nodes whose names differ only outside [A-Za-z0-9]; \
                     set their tokens in the file",
                ));
            }
        };
        if let Some(node) = config
            .virtual_storages
            .get_mut(i)
            .and_then(|vs| vs.nodes.get_mut(j))
        {
            node.token = Secret(value.clone());
            *used = true;
            ctx.origins
                .insert(format!("virtual_storage[{i}].node[{j}].token"), var.clone());
        }
    }
    Ok(())
}

/// Fails on the first `GITALY_REPLICATOR_*` variable that no key answered to.
fn check_unused_env(ctx: &Ctx) -> Result<(), ConfigError> {
    let Some(var) = ctx.env.iter().find(|(_, (_, used))| !used).map(|(k, _)| k) else {
        return Ok(());
    };
    let path = var[ENV_PREFIX.len()..]
        .to_ascii_lowercase()
        .replace("__", ".");
    let message = if is_ignored(&path) {
        format!(
            "names `{path}`, a Praefect key that gitaly-replicator ignores; remove the variable"
        )
    } else {
        let hint = suggest(var, ctx.env_names.iter().map(String::as_str))
            .map(|name| format!("; did you mean {name}?"))
            .unwrap_or_default();
        format!("names no configuration key (it would be `{path}`){hint}")
    };
    Err(ConfigError::env(var, message))
}
