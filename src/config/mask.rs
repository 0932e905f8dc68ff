//! The effective configuration as TOML with every secret masked
//! ([`Config::to_masked_toml`], what `check-config` prints).
//!
//! It is the config types' own `Serialize`, so a key cannot be added without
//! being printed: [`Secret`] serializes as [`MASK`], and the helpers here are
//! the `serialize_with` of the fields that need more than their type gives
//! (URLs that may hold a password, durations as humantime strings).
//! `toml` leaves out fields that are `None`.

use std::fmt::Write;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serializer;

use super::{Config, MASK, Secret};

impl Config {
    /// The effective configuration as TOML, every secret printed as `[masked]`,
    /// followed by a comment listing the ignored Praefect keys (`check-config`).
    pub fn to_masked_toml(&self) -> String {
        let mut out =
            String::from("# gitaly-replicator: effective configuration, secrets masked\n");
        match toml::to_string(self) {
            Ok(body) => out.push_str(&body),
            // Not reached by a configuration that was read from TOML: only a
            // value built in code (a path that is not UTF-8) fails to print.
            Err(e) => {
                let _ = writeln!(out, "# cannot be printed: {e}");
            }
        }
        out.push('\n');
        let lease = self.replication.lock_lease;
        let _ = writeln!(
            out,
            "# [replication] lock_lease = {}: a hung or cut-off process keeps its repositories \
             at most this long; a process whose database does not answer for {} (half of it) \
             stops its jobs and gives its locks up.",
            humantime::format_duration(lease),
            humantime::format_duration(lease / 2)
        );
        if self.ignored_keys.is_empty() {
            out.push_str("# Ignored Praefect keys: none\n");
        } else {
            out.push_str("# Ignored Praefect keys (accepted, not used by gitaly-replicator):\n");
            for key in &self.ignored_keys {
                let _ = writeln!(out, "#   {key}");
            }
        }
        out
    }
}

/// A database URL with its password (also a `password=` query parameter)
/// masked; all of it masked when it does not parse.
pub(super) fn database_url(raw: &str) -> String {
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

/// Comma-separated NATS server URLs with any credentials in them
/// (`user:password@`, `token@`) masked.
pub(super) fn nats_url(url: &str) -> String {
    let masked: Vec<String> = url.split(',').map(nats_server).collect();
    masked.join(",")
}

fn nats_server(server: &str) -> String {
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

pub(super) fn serialize_database_url<S: Serializer>(
    url: &Option<Secret>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => serializer.serialize_some(&database_url(url.expose())),
        None => serializer.serialize_none(),
    }
}

pub(super) fn serialize_nats_url<S: Serializer>(
    url: &str,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&nats_url(url))
}

/// `""` for no listener, as the file writes it.
pub(super) fn serialize_listen_addr<S: Serializer>(
    addr: &Option<SocketAddr>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match addr {
        Some(addr) => serializer.collect_str(addr),
        None => serializer.serialize_str(""),
    }
}

/// As humantime writes it (`"1m 30s"`), which is how the file spells durations.
pub(super) fn serialize_duration<S: Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_duration(*duration))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::{
        DatabaseConfig, LogFormat, LoggingConfig, NatsConfig, Node, NodeAddress, PoolMode,
        PrometheusConfig, ReconciliationConfig, ReplicationConfig, SessionPooled,
        VerificationConfig, VirtualStorage,
    };

    /// Every key away from its default. Struct literals without `..`, so a new
    /// key does not compile until it is added here, and so is checked below.
    fn every_key_set() -> Config {
        let masked = || Some(Secret::new(MASK));
        let path = |p: &str| Some(PathBuf::from(p));
        let node = |storage: &str, address: NodeAddress| Node {
            storage: storage.into(),
            address,
            token: Secret::new(MASK),
        };
        Config {
            prometheus_listen_addr: Some("[::1]:9700".parse().unwrap()),
            graceful_stop_timeout: Duration::from_millis(90_250),
            startup_timeout: Duration::from_secs(45),
            logging: LoggingConfig {
                format: LogFormat::Text,
                format_set: true,
                level: "info,gitaly_replicator=debug".into(),
            },
            virtual_storages: vec![VirtualStorage {
                name: "default \"quoted\" \\ 'x'".into(),
                nodes: vec![
                    node(
                        "gitaly-1",
                        NodeAddress::Tls {
                            host: "fd00::1".into(),
                            port: Some(8075),
                        },
                    ),
                    node(
                        "gitaly-2",
                        NodeAddress::Unix {
                            path: "/run/gitaly.socket".into(),
                        },
                    ),
                ],
            }],
            database: DatabaseConfig {
                url: None,
                host: Some("db.internal".into()),
                port: Some(5433),
                user: Some("replicator".into()),
                password: masked(),
                dbname: Some("store".into()),
                sslmode: Some("verify-full".into()),
                sslcert: path("/etc/pg/client.pem"),
                sslkey: path("/etc/pg/client-key.pem"),
                sslrootcert: path("/etc/pg/ca.pem"),
                max_connections: 7,
                connect_timeout: Duration::from_secs(3),
                statement_timeout: Duration::ZERO,
                session_pooled: SessionPooled {
                    host: Some("db-direct.internal".into()),
                    port: Some(5434),
                    user: Some("replicator_sp".into()),
                    password: masked(),
                    dbname: Some("store_sp".into()),
                    sslmode: Some("verify-ca".into()),
                    sslcert: path("/etc/pg/sp-client.pem"),
                    sslkey: path("/etc/pg/sp-client-key.pem"),
                    sslrootcert: path("/etc/pg/sp-ca.pem"),
                },
                host_no_proxy: Some("db-old-direct.internal".into()),
                port_no_proxy: Some(5435),
                pool_mode: Some(PoolMode::Transaction),
            },
            replication: ReplicationConfig {
                batch_size: 11,
                parallel_storage_processing_workers: 2,
                max_concurrent_jobs: 3,
                attempts: 4,
                job_timeout: Duration::from_secs(3600),
                health_check_interval: Duration::from_millis(250),
                retry_delay: Duration::from_secs(2),
                max_retry_delay: Duration::from_secs(120),
                completion_retention: Duration::from_secs(7200),
                verify_after_update: true,
                lock_lease: Duration::from_secs(45),
            },
            nats: NatsConfig {
                url: "nats://a:4222,tls://b:4222".into(),
                credentials_file: None,
                nkey_seed_file: None,
                token: None,
                user: Some("replicator".into()),
                password: masked(),
                tls_ca_file: path("/etc/nats/ca.pem"),
                tls_cert_file: path("/etc/nats/client.pem"),
                tls_key_file: path("/etc/nats/client-key.pem"),
                tls_required: true,
                subject_prefix: "gl.replication".into(),
                stream: "GL".into(),
                dead_letter_stream: "GL_DEAD".into(),
                consumer_prefix: "gl".into(),
                replicas: 3,
                ack_wait: Duration::from_secs(45),
                max_ack_pending: -1,
                max_deliver: 40,
                max_bytes: 1 << 31,
                max_messages: -1,
                duplicate_window: Duration::from_secs(300),
                dead_letter_max_age: Duration::from_secs(7 * 86400),
                fetch_expires: Duration::from_secs(9),
            },
            prometheus: PrometheusConfig {
                grpc_latency_buckets: vec![0.01, 0.5, 2.0],
            },
            reconciliation: ReconciliationConfig {
                scheduling_interval: Duration::from_secs(90),
                histogram_buckets: vec![0.1, 1.0],
                scan_batch_size: 500,
                pending_scan_limit: 2000,
            },
            background_verification: VerificationConfig {
                verification_interval: Duration::from_secs(3600),
                batch_size: 7,
            },
            ignored_keys: Vec::new(),
        }
    }

    #[test]
    fn every_key_the_printer_writes_reads_back_as_the_same_value() {
        let mut with_url = every_key_set();
        with_url.database.url = Some(Secret::new("postgres://u@db.internal:5433/store"));
        (with_url.database.host, with_url.database.port) = (None, None);
        (with_url.database.user, with_url.database.dbname) = (None, None);
        with_url.nats.token = Some(Secret::new(MASK));
        (with_url.nats.user, with_url.nats.password) = (None, None);
        let mut with_creds = every_key_set();
        with_creds.nats.credentials_file = Some(PathBuf::from("/etc/nats/x.creds"));
        (with_creds.nats.user, with_creds.nats.password) = (None, None);
        with_creds.prometheus_listen_addr = None;

        for config in [every_key_set(), with_url, with_creds] {
            let masked = config.to_masked_toml();
            let back = Config::from_toml_str(&masked).unwrap_or_else(|e| panic!("{e}\n{masked}"));
            assert_eq!(back, config, "{masked}");
        }
    }

    #[test]
    fn credentials_in_urls_are_masked_and_the_rest_kept() {
        for (url, masked) in [
            (
                "postgres://u:pw@db:5/s?sslmode=disable",
                "postgres://u:[masked]@db:5/s?sslmode=disable",
            ),
            (
                "postgres://u@db/s?password=pw&x=1",
                "postgres://u@db/s?password=[masked]&x=1",
            ),
            ("postgres://u@db/s", "postgres://u@db/s"),
            ("not a url pw", MASK),
        ] {
            assert_eq!(database_url(url), masked, "{url}");
        }
        for (url, masked) in [
            ("nats://a:4222", "nats://a:4222"),
            (
                "nats://tok@a:4222, tls://u:pw@b:4222",
                "nats://[masked]@a:4222, tls://[masked]@b:4222",
            ),
            ("u:pw@c:4222,d:4222/x@y", "[masked]@c:4222,d:4222/x@y"),
        ] {
            assert_eq!(nats_url(url), masked, "{url}");
        }
    }
}
