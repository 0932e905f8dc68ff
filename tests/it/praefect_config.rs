//! Praefect's own config files, as its releases 14.0 to 15.x wrote them,
//! load unchanged: unused keys are listed as ignored, addresses without a
//! port and nodes without a token load with a warning and behave as they do
//! for Praefect, and the database's two connections are read as Praefect
//! reads them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gitaly_replicator::proto::gitaly as pb;
use gitaly_replicator::{CallContext, Config, NodeClient};
use testkit::recording_gitaly::RecordingGitaly;

fn file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/praefect-config")
        .join(name)
}

fn load(name: &str) -> Config {
    let text = std::fs::read_to_string(file(name)).unwrap();
    Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `sections`, then one virtual storage with one node and no token.
fn with_one_node(sections: &str) -> Result<Config, gitaly_replicator::ConfigError> {
    Config::from_toml_str(&format!(
        "{sections}\n[[virtual_storage]]\nname = \"default\"\n[[virtual_storage.node]]\n\
         storage = \"gitaly-1\"\naddress = \"tcp://127.0.0.1:8075\"\n"
    ))
}

fn warning_keys(config: &Config) -> Vec<String> {
    config.warnings().into_iter().map(|w| w.key).collect()
}

/// The keys of the warnings about nodes and the database.
fn node_and_database_warning_keys(config: &Config) -> Vec<String> {
    warning_keys(config)
        .into_iter()
        .filter(|k| k.starts_with("virtual_storage") || k.starts_with("database"))
        .collect()
}

const FILES: [&str; 5] = [
    "praefect-14.0.toml",
    "praefect-14.3.toml",
    "praefect-14.6.toml",
    "praefect-14.8.toml",
    "praefect-15.11.toml",
];

#[test]
fn every_praefect_release_shape_loads_and_lists_the_keys_it_ignores() {
    // Each file's keys that only Praefect uses, one or more per release.
    let ignored: [(&str, &[&str]); 5] = [
        (
            "praefect-14.0.toml",
            &[
                "failover_enabled",
                "memory_queue_enabled",
                "failover.election_strategy",
                "auth.transitioning",
                "prometheus.scrape_timeout",
                "sentry.sentry_dsn",
                "tls.key_path",
                "virtual_storage[0].default_replication_factor",
            ],
        ),
        (
            "praefect-14.3.toml",
            &[
                "force_create_repositories_for_testing_purposes",
                "i_understand_my_election_strategy_is_unsupported_and_will_be_removed_without_warning",
                "socket_path",
            ],
        ),
        (
            "praefect-14.6.toml",
            &[
                "prometheus_exclude_database_from_default_metrics",
                "repositories_cleanup.check_interval",
                "repositories_cleanup.repositories_in_batch",
            ],
        ),
        (
            "praefect-14.8.toml",
            &[
                "repositories_cleanup.run_interval",
                "failover.write_error_threshold_count",
            ],
        ),
        (
            "praefect-15.11.toml",
            &[
                "background_verification.delete_invalid_records",
                "yamux.maximum_stream_window_size_bytes",
                "yamux.accept_backlog",
            ],
        ),
    ];
    for (name, keys) in ignored {
        let config = load(name);
        for key in keys {
            assert!(
                config.ignored_keys.iter().any(|k| k == key),
                "{name}: {key} not listed as ignored in {:?}",
                config.ignored_keys
            );
        }
        assert!(!config.virtual_storages.is_empty(), "{name}");
    }
}

#[test]
fn reconciliation_keys_are_read_as_praefect_writes_them() {
    // (file, scheduling_interval, histogram_buckets): a Go duration string,
    // a bare 0 (nanoseconds, as Go decodes it: disabled), and no section.
    let expected: [(&str, Duration, Vec<f64>); 3] = [
        (
            "praefect-14.0.toml",
            Duration::from_secs(300),
            gitaly_replicator::DEFAULT_RECONCILIATION_BUCKETS.to_vec(),
        ),
        (
            "praefect-14.3.toml",
            Duration::ZERO,
            gitaly_replicator::DEFAULT_RECONCILIATION_BUCKETS.to_vec(),
        ),
        (
            "praefect-14.8.toml",
            Duration::from_secs(60),
            vec![1.0, 2.0, 3.0, 4.0, 5.0],
        ),
    ];
    for (name, interval, buckets) in expected {
        let config = load(name);
        assert_eq!(
            config.reconciliation.scheduling_interval, interval,
            "{name}"
        );
        assert_eq!(config.reconciliation.histogram_buckets, buckets, "{name}");
        assert!(
            !config
                .ignored_keys
                .iter()
                .any(|k| k.starts_with("reconciliation.")),
            "{name}: {:?}",
            config.ignored_keys
        );
    }
    // Praefect 15's verification key is read too: verification is opt-in
    // here, so only a file that sets it turns it on.
    let v15 = load("praefect-15.11.toml");
    assert_eq!(
        v15.background_verification.verification_interval,
        Duration::from_secs(168 * 3600)
    );
    assert!(
        !v15.ignored_keys
            .iter()
            .any(|k| k == "background_verification.verification_interval")
    );
    assert_eq!(
        load("praefect-14.8.toml")
            .background_verification
            .verification_interval,
        Duration::ZERO
    );
    let descending = Config::from_toml_str(
        "[[virtual_storage]]\nname = \"default\"\n[[virtual_storage.node]]\nstorage = \"gitaly-1\"\naddress = \"tcp://127.0.0.1:8075\"\n[reconciliation]\nhistogram_buckets = [2.0, 1.0]\n",
    )
    .unwrap_err();
    assert_eq!(
        descending.key, "reconciliation.histogram_buckets",
        "{descending}"
    );
}

#[test]
fn addresses_without_a_port_and_nodes_without_a_token_load_with_a_warning_each() {
    let expected: [(&str, &[&str]); 5] = [
        ("praefect-14.0.toml", &["database.host_no_proxy"]),
        (
            "praefect-14.3.toml",
            &[
                "virtual_storage[0].node[0].address",
                "virtual_storage[0].node[1].address",
                "virtual_storage[0].node[2].address",
            ],
        ),
        ("praefect-14.6.toml", &["virtual_storage[0].node[1].token"]),
        (
            "praefect-14.8.toml",
            &[
                "virtual_storage[0].node[0].address",
                "virtual_storage[0].node[0].token",
                "virtual_storage[0].node[1].address",
                "virtual_storage[0].node[1].token",
                "virtual_storage[0].node[2].address",
                "virtual_storage[0].node[2].token",
            ],
        ),
        ("praefect-15.11.toml", &["virtual_storage[0].node[2].token"]),
    ];
    for (name, keys) in expected {
        assert_eq!(node_and_database_warning_keys(&load(name)), keys, "{name}");
    }
    let config = load("praefect-14.8.toml");
    let warnings = config.warnings();
    assert!(
        warnings[0].message.contains("has no port")
            && warnings[0].message.contains("as it does for Praefect"),
        "{}",
        warnings[0]
    );
    assert_eq!(
        config.virtual_storages[0].nodes[0].address.to_string(),
        "tcp://gitaly-internal-1.example.com"
    );
}

#[test]
fn the_direct_connection_is_read_as_praefect_reads_it_and_the_pool_goes_transaction_mode() {
    // 14.0: the older host_no_proxy/port_no_proxy; the rest from [database].
    let old = load("praefect-14.0.toml").database;
    let session = old.session_connect_options().unwrap();
    assert_eq!(session.get_host(), "postgres-direct.internal");
    assert_eq!(session.get_port(), 5432);
    assert_eq!(session.get_username(), "praefect");
    assert_eq!(session.get_database(), Some("praefect_production"));
    let pooled = old.connect_options().unwrap();
    assert_eq!(
        (pooled.get_host(), pooled.get_port()),
        ("postgres.internal", 6432)
    );
    assert!(old.transaction_pooled());

    // 14.8: every key of session_pooled over [database]'s.
    let new = load("praefect-14.8.toml").database;
    let session = new.session_connect_options().unwrap();
    assert_eq!((session.get_host(), session.get_port()), ("2.3.4.5", 6432));
    assert_eq!(session.get_username(), "praefect_sp");
    assert_eq!(session.get_database(), Some("praefect_production_sp"));
    assert_eq!(
        format!("{:?}", session.get_ssl_mode()),
        format!("{:?}", sqlx::postgres::PgSslMode::Prefer)
    );
    assert!(new.transaction_pooled());
    // The statement timeout cannot be a startup parameter through PgBouncer:
    // it is set in each transaction.
    assert_eq!(new.per_transaction_statement_timeout_ms(), Some(30_000));
    assert_eq!(new.connect_options().unwrap().get_options(), None);
    assert!(
        new.session_connect_options()
            .unwrap()
            .get_options()
            .is_some()
    );

    // Without a session connection apart, one pool in session mode.
    let plain = with_one_node("").unwrap().database;
    assert!(!plain.transaction_pooled());
    assert_eq!(plain.per_transaction_statement_timeout_ms(), None);
}

#[test]
fn transaction_mode_without_a_session_connection_is_refused() {
    let e = with_one_node("[database]\npool_mode = \"transaction\"").unwrap_err();
    assert_eq!(e.key, "database.pool_mode");
    assert!(e.to_string().contains("session_pooled"), "{e}");
}

#[test]
fn grpc_latency_buckets_are_read_and_must_ascend() {
    assert_eq!(
        load("praefect-14.8.toml").prometheus.grpc_latency_buckets,
        [0.1, 0.2, 0.3]
    );
    assert_eq!(
        load("praefect-14.3.toml").prometheus.grpc_latency_buckets,
        gitaly_replicator::DEFAULT_LATENCY_BUCKETS
    );
    let e = with_one_node("[prometheus]\ngrpc_latency_buckets = [1, 0.5]").unwrap_err();
    assert_eq!(e.key, "prometheus.grpc_latency_buckets");
}

#[tokio::test]
async fn a_node_without_a_port_is_unhealthy_and_says_why() {
    let config = load("praefect-14.8.toml");
    let node = NodeClient::new("praefect", &config.virtual_storages[0].nodes[0]).unwrap();
    let e = node
        .check_health(Duration::from_secs(2))
        .await
        .expect_err("a node without a port cannot be dialed");
    let text = gitaly_replicator::display_error_chain(&e);
    assert!(
        text.contains("tcp://gitaly-internal-1.example.com has no port"),
        "{text}"
    );
}

#[tokio::test]
async fn a_node_without_a_token_is_called_without_authorization() {
    let server = RecordingGitaly::new(None).serve().await.unwrap();
    let config = Config::from_toml_str(&format!(
        r#"
        [[virtual_storage]]
        name = "default"
        [[virtual_storage.node]]
        storage = "gitaly-1"
        address = "{}"
        "#,
        server.address()
    ))
    .unwrap();
    let node = NodeClient::new("default", &config.virtual_storages[0].nodes[0]).unwrap();
    let ctx = CallContext::new(None, Some(Duration::from_secs(5)));
    let request = node.request(
        pb::RepositoryExistsRequest {
            repository: Some(pb::Repository {
                storage_name: "gitaly-1".into(),
                relative_path: "a.git".into(),
                ..Default::default()
            }),
        },
        &ctx,
    );
    node.repository_service()
        .repository_exists(request)
        .await
        .unwrap();
    let calls = server.gitaly.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].authorization, None);
}

#[test]
fn check_config_prints_the_warnings_and_the_ignored_keys() {
    for name in FILES {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gitaly-replicator"))
            .args(["check-config"])
            .arg(file(name))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {stderr}");
        assert!(
            stdout.contains("# Ignored Praefect keys"),
            "{name}: {stdout}"
        );
        for warning in load(name).warnings() {
            assert!(
                stderr.contains(&format!("warning: {warning}")),
                "{name}: {warning} not in {stderr}"
            );
        }
        // Praefect's passwords are secrets: masked, never printed.
        for secret in ["praefect-sql-password", "db-secret", "gitaly-token-1"] {
            assert!(
                !stdout.contains(secret) && !stderr.contains(secret),
                "{name}"
            );
        }
    }
}

/// The printed configuration without its comments.
fn printed_body(config: &Config) -> String {
    config
        .to_masked_toml()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn check_configs_output_fed_back_in_is_the_same_config_with_unset_secrets_still_unset() {
    let mut unset_tokens = 0;
    for name in FILES {
        let config = load(name);
        let printed = config.to_masked_toml();
        let back =
            Config::from_toml_str(&printed).unwrap_or_else(|e| panic!("{name}: {e}\n{printed}"));
        let warnings =
            |c: &Config| -> Vec<String> { c.warnings().iter().map(ToString::to_string).collect() };
        // A node without a token warns so, read back as well.
        assert_eq!(warnings(&back), warnings(&config), "{name}:\n{printed}");
        assert_eq!(printed_body(&back), printed_body(&config), "{name}");
        unset_tokens += warnings(&config)
            .iter()
            .filter(|w| w.contains("token"))
            .count();
    }
    assert!(unset_tokens > 0, "no file has a node without a token");
}

/// Next to Praefect: a file without [nats] warns that the default broker is
/// used, Praefect's own metrics port warns that both cannot share a host,
/// and a verification interval read from Praefect's file is named, in
/// check-config's output too.
#[test]
fn praefect_files_warn_of_the_default_nats_praefects_metrics_port_and_verification() {
    let expected: [(&str, &[&str]); 5] = [
        (
            "praefect-14.0.toml",
            &["nats.url", "prometheus_listen_addr"],
        ),
        ("praefect-14.3.toml", &["nats.url"]),
        (
            "praefect-14.6.toml",
            &["nats.url", "prometheus_listen_addr"],
        ),
        ("praefect-14.8.toml", &["nats.url"]),
        (
            "praefect-15.11.toml",
            &[
                "nats.url",
                "prometheus_listen_addr",
                "background_verification.verification_interval",
            ],
        ),
    ];
    for (name, keys) in expected {
        let config = load(name);
        let others: Vec<String> = warning_keys(&config)
            .into_iter()
            .filter(|k| !k.starts_with("virtual_storage") && !k.starts_with("database"))
            .collect();
        assert_eq!(others, keys, "{name}");
    }
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_gitaly-replicator"))
        .args(["check-config"])
        .arg(file("praefect-15.11.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("background_verification.verification_interval: 7days"),
        "{err}"
    );
    assert!(err.contains("prometheus_listen_addr: port 9652"), "{err}");
    assert!(
        err.contains("nats.url: nats://127.0.0.1:4222 is the default"),
        "{err}"
    );
}
