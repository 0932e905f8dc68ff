//! The configuration: one TOML file in Praefect's shape, overridden key by key by
//! `GITALY_REPLICATOR_*` environment variables, parsed once into typed structs and
//! validated before anything connects. Every error names the key it is about.
//!
//! A Praefect `config.toml` loads as is: the keys Praefect and gitaly-replicator
//! share mean the same, Praefect's other keys are accepted and listed in
//! [`Config::ignored_keys`] (see [`PRAEFECT_IGNORED_KEYS`]), and a key neither
//! knows is an error naming its full path (`replication.bach_size`).
//!
//! # Layout
//!
//! - Here: [`Config`] and the ways to load it.
//! - The sections' types and defaults: `logging`, `virtual_storage`, `database`
//!   (and `database_tls`, how each Postgres connection verifies its server),
//!   `replication`, `nats`; the values that need care: `secret` ([`Secret`]) and
//!   `address` ([`NodeAddress`]).
//! - Reading: the file is parsed as a plain [`toml::Table`] and walked by hand
//!   (`section`, `reader`) rather than deserialized with serde, because an
//!   override from `env` is a string that must be read as the key's type while
//!   the same string in the file is a type error, Praefect's ignored keys come
//!   from `praefect`, and errors must not quote values (they may be secrets).
//! - `validate`: what the types cannot express, checked after reading.
//! - `mask`: printing, through the types' own `Serialize`, so every key the
//!   types hold is printed and every [`Secret`] is masked.

mod address;
mod database;
mod database_tls;
mod env;
mod error;
mod logging;
mod mask;
mod nats;
mod praefect;
mod prometheus;
mod reader;
mod reconciliation;
mod replication;
mod secret;
mod section;
mod suggestion;
mod validate;
mod virtual_storage;
mod warning;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use toml::Table;

pub use address::NodeAddress;
pub use database::{DatabaseConfig, PoolMode, SessionPooled};
pub(crate) use database_tls::{Pem, PgTarget, Roots, ServerTrust, Verification};
pub use env::{ENV_PREFIX, node_token_env_var};
pub use error::ConfigError;
pub use logging::{LogFormat, LoggingConfig, trim_directives};
pub use nats::{NatsConfig, UrlCredentials};

pub use prometheus::{DEFAULT_LATENCY_BUCKETS, PrometheusConfig};
pub use reconciliation::{
    DEFAULT_RECONCILIATION_BUCKETS, ReconciliationConfig, VerificationConfig,
};
pub use replication::ReplicationConfig;
pub use secret::{MASK, Secret};
pub use virtual_storage::{Node, VirtualStorage};
pub use warning::ConfigWarning;

use section::Ctx;

const DEFAULT_PROMETHEUS_LISTEN_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9652);

/// The whole configuration. Its `Serialize` is the masked form that
/// [`Config::to_masked_toml`] prints: secrets come out as [`MASK`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// Where `/metrics`, `/health/live` and `/health/ready` listen; `None` (written
    /// `""`) disables the listener. Praefect's `localhost:PORT` and `:PORT` are
    /// accepted; other host names are not resolved.
    #[serde(serialize_with = "mask::serialize_listen_addr")]
    pub prometheus_listen_addr: Option<SocketAddr>,
    /// Praefect's key: how long running jobs may take to finish on shutdown.
    #[serde(serialize_with = "mask::serialize_duration")]
    pub graceful_stop_timeout: Duration,
    /// How long `run` waits at start for NATS and Postgres to answer before it
    /// exits 69 naming what is missing; zero (the default) waits for ever, as a
    /// service under a supervisor should.
    #[serde(serialize_with = "mask::serialize_duration")]
    pub startup_timeout: Duration,
    /// `[logging]`.
    pub logging: LoggingConfig,
    /// `[[virtual_storage]]`: the clusters whose replicas are kept in step.
    #[serde(rename = "virtual_storage", skip_serializing_if = "Vec::is_empty")]
    pub virtual_storages: Vec<VirtualStorage>,
    /// `[database]`: the repository store.
    pub database: DatabaseConfig,
    /// `[replication]`.
    pub replication: ReplicationConfig,
    /// `[nats]`: the job queue.
    pub nats: NatsConfig,
    /// `[prometheus]`: Praefect's histogram buckets.
    pub prometheus: PrometheusConfig,
    /// `[reconciliation]`: the reconciler.
    pub reconciliation: ReconciliationConfig,
    /// `[background_verification]`: checksums of replicas against their source.
    pub background_verification: VerificationConfig,
    /// Praefect keys present in the file that gitaly-replicator accepts but does
    /// not use, as full paths, sorted.
    #[serde(skip)]
    pub ignored_keys: Vec<String>,
}

impl Default for Config {
    /// Every key at its default, with no virtual storages: not valid until one is added.
    fn default() -> Self {
        Config {
            prometheus_listen_addr: Some(DEFAULT_PROMETHEUS_LISTEN_ADDR),
            graceful_stop_timeout: Duration::from_secs(60),
            startup_timeout: Duration::ZERO,
            logging: LoggingConfig::default(),
            virtual_storages: Vec::new(),
            database: DatabaseConfig::default(),
            replication: ReplicationConfig::default(),
            nats: NatsConfig::default(),
            prometheus: PrometheusConfig::default(),
            reconciliation: ReconciliationConfig::default(),
            background_verification: VerificationConfig::default(),
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
        let env = env::process_vars()?;
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
        let result = reader::read(table, &mut ctx).and_then(|config| {
            config.validate()?;
            Ok(config)
        });
        result.map_err(|err| ctx.env.blame(err))
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
}
