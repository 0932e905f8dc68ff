//! The checks the types cannot express: names present, unique and fit for NATS
//! subjects, tokens set, numbers in range, database and NATS settings coherent.
//! They run after the file is read and before anything connects; each error
//! names its key.

use std::collections::HashMap;
use std::time::Duration;

use crate::queue::names::{MAX_NAME_LEN, is_valid_name};

use super::database::{PoolMode, parse_sslmode};
use super::logging::LOG_LEVELS;
use super::{Config, ConfigError, DatabaseConfig, NatsConfig, ReplicationConfig};

/// Longest subject prefix and storage name, in bytes. A job's subject is the
/// prefix and both storage names, each byte of which may escape to three, and
/// nats-server closes a connection that sends a protocol line (a publish's
/// subject, reply subject and sizes) over 4 KiB (`max_control_line`): at this
/// length the longest dead-letter subject is 1,792 bytes, which leaves room.
const MAX_SUBJECT_PART_LEN: usize = 255;

impl Config {
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
            }
        }
        let buckets = &self.prometheus.grpc_latency_buckets;
        check(
            buckets.iter().all(|b| b.is_finite()) && buckets.windows(2).all(|w| w[0] < w[1]),
            "prometheus.grpc_latency_buckets",
            "must be finite numbers in ascending order",
        )?;
        let buckets = &self.reconciliation.histogram_buckets;
        check(
            buckets.iter().all(|b| b.is_finite()) && buckets.windows(2).all(|w| w[0] < w[1]),
            "reconciliation.histogram_buckets",
            "must be finite numbers in ascending order",
        )?;
        check(
            self.reconciliation.scan_batch_size >= 1,
            "reconciliation.scan_batch_size",
            "must be at least 1",
        )?;
        check(
            self.background_verification.batch_size >= 1,
            "background_verification.batch_size",
            "must be at least 1",
        )?;
        self.database.validate()?;
        self.replication.validate()?;
        self.nats.validate()
    }
}

impl DatabaseConfig {
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
            parse_sslmode("database.sslmode", mode)?;
        }
        if self.pool_mode == Some(PoolMode::Transaction) && !self.has_session_connection() {
            return Err(ConfigError::new(
                "database.pool_mode",
                "\"transaction\" needs [database.session_pooled]: the repository locks and \
                 migrations need a session of their own, which a pooler in transaction mode \
                 does not keep; point session_pooled at Postgres (or at a session-mode pooler)",
            ));
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
        // Also builds the options; reads libpq's default root file when
        // verification needs one and none is named.
        self.pool_target()?;
        self.session_target().map(drop)
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
        )?;
        check(
            self.completion_retention >= Duration::from_secs(1),
            "replication.completion_retention",
            "must be at least 1s",
        )?;
        // Half the lease is how long a slow database is waited for before a
        // process gives its locks up; under a second, one slow round trip
        // would drop them.
        check(
            self.lock_lease >= Duration::from_secs(2),
            "replication.lock_lease",
            "must be at least 2s",
        )?;
        check(
            self.lock_lease <= Duration::from_secs(3600),
            "replication.lock_lease",
            "must be at most 1h",
        )
    }
}

impl NatsConfig {
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
        let in_urls = self.url_credentials();
        if let Some(first) = in_urls.first() {
            check(
                in_urls.iter().all(|c| c == first),
                "nats.url",
                "its servers carry different credentials: give each the same, or set them \
                 with nats.user and nats.password or nats.token instead",
            )?;
        }
        let methods = [
            ("credentials in nats.url", !in_urls.is_empty()),
            ("nats.credentials_file", self.credentials_file.is_some()),
            ("nats.nkey_seed_file", self.nkey_seed_file.is_some()),
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
        // A retried job is delivered once before its retry time (and put
        // back) and once to run.
        check(
            self.max_deliver == -1 || self.max_deliver >= 2,
            "nats.max_deliver",
            "must be at least 2, or -1 for unlimited",
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
