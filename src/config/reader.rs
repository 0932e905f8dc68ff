//! Reads the parsed file into a [`Config`], section by section: each key's
//! name, type and default, and the Praefect conventions (an empty string is
//! unset, a zero port is no port). Unknown keys and overrides are handled by
//! [`Section`]; checks across keys wait for [`Config::validate`].

use toml::Table;

use super::address::{ADDRESS_FORMS, parse_listen_addr};
use super::section::{Ctx, Section};
use super::{
    Config, ConfigError, DatabaseConfig, LogFormat, LoggingConfig, NatsConfig, Node, PoolMode,
    PrometheusConfig, ReconciliationConfig, ReplicationConfig, Secret, SessionPooled,
    VerificationConfig, VirtualStorage,
};

/// The configuration in `table`, with the overrides in `ctx` applied; not yet validated.
pub(super) fn read(table: Table, ctx: &mut Ctx) -> Result<Config, ConfigError> {
    let defaults = Config::default();
    let mut root = Section::root(table);
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
    let startup_timeout = root.duration(ctx, "startup_timeout", defaults.startup_timeout)?;
    let logging = read_logging(ctx, root.table("logging")?)?;
    let virtual_storages = root
        .tables("virtual_storage")?
        .into_iter()
        .map(|vs| read_virtual_storage(ctx, vs))
        .collect::<Result<_, _>>()?;
    let database = read_database(ctx, root.table("database")?)?;
    let replication = read_replication(ctx, root.table("replication")?)?;
    let nats = read_nats(ctx, root.table("nats")?)?;
    let prometheus = read_prometheus(ctx, root.table("prometheus")?)?;
    let reconciliation = read_reconciliation(ctx, root.table("reconciliation")?)?;
    let background_verification = read_verification(ctx, root.table("background_verification")?)?;
    root.finish(ctx)?;
    let mut config = Config {
        prometheus_listen_addr,
        graceful_stop_timeout,
        startup_timeout,
        logging,
        virtual_storages,
        database,
        replication,
        nats,
        prometheus,
        reconciliation,
        background_verification,
        ignored_keys: Vec::new(),
    };
    ctx.env.apply_node_tokens(&mut config)?;
    ctx.env.check_all_used()?;
    config.ignored_keys = std::mem::take(&mut ctx.ignored).into_iter().collect();
    Ok(config)
}

fn read_logging(ctx: &mut Ctx, mut s: Section) -> Result<LoggingConfig, ConfigError> {
    let defaults = LoggingConfig::default();
    let format = match s.optional(ctx, "format")? {
        None => None,
        Some(name) => Some(LogFormat::parse(&name).ok_or_else(|| {
            ConfigError::new(
                "logging.format",
                format!("unknown format {name:?}; expected \"json\" or \"text\""),
            )
        })?),
    };
    let level = s
        .optional(ctx, "level")?
        .map(|l| super::logging::trim_directives(&l))
        .unwrap_or(defaults.level);
    s.finish(ctx)?;
    Ok(LoggingConfig {
        format: format.unwrap_or(defaults.format),
        format_set: format.is_some(),
        level,
    })
}

fn read_virtual_storage(ctx: &mut Ctx, mut s: Section) -> Result<VirtualStorage, ConfigError> {
    let name = s.string(ctx, "name")?.unwrap_or_default();
    let nodes = s
        .tables("node")?
        .into_iter()
        .map(|node| read_node(ctx, node))
        .collect::<Result<_, _>>()?;
    s.finish(ctx)?;
    Ok(VirtualStorage { name, nodes })
}

fn read_node(ctx: &mut Ctx, mut s: Section) -> Result<Node, ConfigError> {
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
    let token = Secret::from(s.string(ctx, "token")?.unwrap_or_default());
    s.finish(ctx)?;
    Ok(Node {
        storage,
        address,
        token,
    })
}

fn read_database(ctx: &mut Ctx, mut s: Section) -> Result<DatabaseConfig, ConfigError> {
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
        session_pooled: read_session_pooled(ctx, s.table("session_pooled")?)?,
        host_no_proxy: s.optional(ctx, "host_no_proxy")?,
        port_no_proxy: Some(s.number(ctx, "port_no_proxy", 0u16)?).filter(|p| *p != 0),
        pool_mode: match s.optional(ctx, "pool_mode")? {
            None => None,
            Some(m) => Some(PoolMode::parse(&m).ok_or_else(|| {
                ConfigError::new(
                    "database.pool_mode",
                    format!("unknown mode {m:?}; expected \"session\" or \"transaction\""),
                )
            })?),
        },
    };
    s.finish(ctx)?;
    Ok(config)
}

fn read_session_pooled(ctx: &mut Ctx, mut s: Section) -> Result<SessionPooled, ConfigError> {
    let config = SessionPooled {
        host: s.optional(ctx, "host")?,
        port: Some(s.number(ctx, "port", 0u16)?).filter(|p| *p != 0),
        user: s.optional(ctx, "user")?,
        password: s.secret(ctx, "password")?,
        dbname: s.optional(ctx, "dbname")?,
        sslmode: s.optional(ctx, "sslmode")?,
        sslcert: s.path(ctx, "sslcert")?,
        sslkey: s.path(ctx, "sslkey")?,
        sslrootcert: s.path(ctx, "sslrootcert")?,
    };
    s.finish(ctx)?;
    Ok(config)
}

fn read_replication(ctx: &mut Ctx, mut s: Section) -> Result<ReplicationConfig, ConfigError> {
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
        completion_retention: s.duration(ctx, "completion_retention", d.completion_retention)?,
        verify_after_update: s.boolean(ctx, "verify_after_update", d.verify_after_update)?,
        lock_lease: s.duration(ctx, "lock_lease", d.lock_lease)?,
    };
    s.finish(ctx)?;
    Ok(config)
}

fn read_prometheus(ctx: &mut Ctx, mut s: Section) -> Result<PrometheusConfig, ConfigError> {
    let buckets = s
        .floats(ctx, "grpc_latency_buckets")?
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| PrometheusConfig::default().grpc_latency_buckets);
    s.finish(ctx)?;
    Ok(PrometheusConfig {
        grpc_latency_buckets: buckets,
    })
}

fn read_reconciliation(ctx: &mut Ctx, mut s: Section) -> Result<ReconciliationConfig, ConfigError> {
    let d = ReconciliationConfig::default();
    let config = ReconciliationConfig {
        scheduling_interval: s.duration(ctx, "scheduling_interval", d.scheduling_interval)?,
        histogram_buckets: s
            .floats(ctx, "histogram_buckets")?
            .filter(|b| !b.is_empty())
            .unwrap_or(d.histogram_buckets),
        scan_batch_size: s.number(ctx, "scan_batch_size", d.scan_batch_size)?,
        pending_scan_limit: s.number(ctx, "pending_scan_limit", d.pending_scan_limit)?,
    };
    s.finish(ctx)?;
    Ok(config)
}

fn read_verification(ctx: &mut Ctx, mut s: Section) -> Result<VerificationConfig, ConfigError> {
    let d = VerificationConfig::default();
    let config = VerificationConfig {
        verification_interval: s.duration(ctx, "verification_interval", d.verification_interval)?,
        batch_size: s.number(ctx, "batch_size", d.batch_size)?,
    };
    s.finish(ctx)?;
    Ok(config)
}

fn read_nats(ctx: &mut Ctx, mut s: Section) -> Result<NatsConfig, ConfigError> {
    let d = NatsConfig::default();
    let config = NatsConfig {
        url: s.optional(ctx, "url")?.unwrap_or(d.url),
        credentials_file: s.path(ctx, "credentials_file")?,
        nkey_seed_file: s.path(ctx, "nkey_seed_file")?,
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
        max_deliver: s.integer(ctx, "max_deliver")?.unwrap_or(d.max_deliver),
        max_bytes: s.integer(ctx, "max_bytes")?.unwrap_or(d.max_bytes),
        max_messages: s.integer(ctx, "max_messages")?.unwrap_or(d.max_messages),
        duplicate_window: s.duration(ctx, "duplicate_window", d.duplicate_window)?,
        dead_letter_max_age: s.duration(ctx, "dead_letter_max_age", d.dead_letter_max_age)?,
        fetch_expires: s.duration(ctx, "fetch_expires", d.fetch_expires)?,
    };
    s.finish(ctx)?;
    Ok(config)
}
