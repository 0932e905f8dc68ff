//! The configuration file: Praefect compatibility, validation errors that name
//! their key, environment overrides, and masking of secrets.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gitaly_replicator::{Config, ConfigError, LogFormat, NodeAddress, Secret, node_token_env_var};
use sqlx::postgres::PgSslMode;

const MINIMAL: &str = r#"
[[virtual_storage]]
name = "default"

[[virtual_storage.node]]
storage = "gitaly-1"
address = "tcp://127.0.0.1:8075"
token = "secret-token-1"
"#;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/config")
        .join(name)
}

fn read(name: &str) -> String {
    std::fs::read_to_string(data(name)).unwrap()
}

/// `top` goes before the tables (top-level keys), `rest` after the minimal virtual storage.
fn with_minimal(top: &str, rest: &str) -> String {
    format!("{top}\n{MINIMAL}\n{rest}")
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn error(toml: &str) -> ConfigError {
    Config::from_toml_str(toml).expect_err("the config should be rejected")
}

fn env_error(toml: &str, vars: &[(&str, &str)]) -> ConfigError {
    Config::from_toml_str_with_env(toml, env(vars)).expect_err("the config should be rejected")
}

#[test]
fn a_praefect_config_loads_as_is_and_lists_its_ignored_keys() {
    let config = Config::from_toml_str(&read("praefect.toml")).unwrap();

    assert_eq!(
        config.prometheus_listen_addr,
        Some("127.0.0.1:9652".parse().unwrap())
    );
    assert_eq!(config.graceful_stop_timeout, Duration::from_secs(60));
    assert_eq!(config.logging.format, LogFormat::Json);
    assert_eq!(config.logging.level, "warn");
    assert_eq!(config.replication.batch_size, 25);
    assert_eq!(config.replication.parallel_storage_processing_workers, 1);

    let names: Vec<&str> = config
        .virtual_storages
        .iter()
        .map(|vs| vs.name.as_str())
        .collect();
    assert_eq!(names, ["default", "storage-b"]);
    assert!(config.virtual_storages.iter().all(|vs| vs.nodes.len() == 3));
    assert_eq!(config.targets().count(), 6);

    let b = config.virtual_storage("storage-b").unwrap();
    assert_eq!(
        b.node("gitaly-b2").unwrap().address,
        NodeAddress::Tcp {
            host: "fd00::12".into(),
            port: Some(8075)
        }
    );
    assert_eq!(
        b.node("gitaly-b3").unwrap().address,
        NodeAddress::Unix {
            path: "/var/opt/gitlab/gitaly/gitaly.socket".into()
        }
    );
    let default = config.virtual_storage("default").unwrap();
    let gitaly_3 = default.node("gitaly-3").unwrap();
    assert_eq!(
        gitaly_3.address,
        NodeAddress::Tls {
            host: "gitaly-3.internal".into(),
            port: Some(9999)
        }
    );
    assert_eq!(gitaly_3.token.expose(), "gitaly-token-default-3");
    assert!(config.virtual_storage("nope").is_none());

    let db = &config.database;
    assert_eq!(db.host.as_deref(), Some("postgres.internal"));
    assert_eq!(db.port, Some(5432));
    assert_eq!(db.user.as_deref(), Some("praefect"));
    assert_eq!(
        db.password.as_ref().map(Secret::expose),
        Some("db-password-c41d")
    );
    assert_eq!(db.dbname.as_deref(), Some("praefect_production"));
    assert_eq!(db.sslmode.as_deref(), Some("require"));

    for key in [
        "auth.token",
        "auth.transitioning",
        "background_verification.delete_invalid_records",
        "failover.election_strategy",
        "failover.enabled",
        "listen_addr",
        "logging.dir",
        "prometheus.scrape_timeout",
        "prometheus_exclude_database_from_default_metrics",
        "socket_path",
        "virtual_storage[0].default_replication_factor",
    ] {
        assert!(
            config.ignored_keys.iter().any(|k| k == key),
            "{key} not in {:?}",
            config.ignored_keys
        );
    }
    let mut sorted = config.ignored_keys.clone();
    sorted.sort();
    assert_eq!(config.ignored_keys, sorted);
    assert!(
        !config
            .ignored_keys
            .iter()
            .any(|k| k.starts_with("replication") || k == "logging.level")
    );
}

#[test]
fn a_praefect_config_loads_from_its_file_path() {
    let config = Config::load(&data("praefect.toml")).unwrap();
    assert_eq!(config.virtual_storages.len(), 2);
}

#[test]
fn praefect_database_keys_become_connect_options() {
    let config = Config::from_toml_str(&read("praefect.toml")).unwrap();
    let options = config.database.connect_options().unwrap();
    assert_eq!(options.get_host(), "postgres.internal");
    assert_eq!(options.get_port(), 5432);
    assert_eq!(options.get_username(), "praefect");
    assert_eq!(options.get_database(), Some("praefect_production"));
    assert!(matches!(options.get_ssl_mode(), PgSslMode::Require));
    assert_eq!(options.get_application_name(), Some("gitaly-replicator"));
    // With [database.session_pooled], [database] is taken for PgBouncer in
    // transaction mode: the statement timeout is set per transaction, and
    // only the session connection sends it at startup.
    assert!(config.database.transaction_pooled());
    assert_eq!(options.get_options(), None);
    let session = config.database.session_connect_options().unwrap();
    assert!(
        session
            .get_options()
            .unwrap()
            .contains("statement_timeout=30000")
    );
}

#[test]
fn a_database_url_becomes_connect_options() {
    let toml = with_minimal(
        "",
        "[database]\nurl = \"postgres://replicator:pw-url-1@db.internal:5433/store?sslmode=disable\"\n\
         statement_timeout = \"0s\"",
    );
    let config = Config::from_toml_str(&toml).unwrap();
    let options = config.database.connect_options().unwrap();
    assert_eq!(options.get_host(), "db.internal");
    assert_eq!(options.get_port(), 5433);
    assert_eq!(options.get_username(), "replicator");
    assert_eq!(options.get_database(), Some("store"));
    assert!(matches!(options.get_ssl_mode(), PgSslMode::Disable));
    assert_eq!(options.get_options(), None, "no startup option at 0s");
}

#[test]
fn a_database_url_cannot_be_combined_with_host_or_dbname() {
    let err = error(&with_minimal(
        "",
        "[database]\nurl = \"postgres://u@db/store\"\nhost = \"other\"",
    ));
    assert_eq!(err.key, "database.host");
    assert!(err.message.contains("database.url"), "{err}");

    let err = error(&with_minimal(
        "",
        "[database]\nurl = \"postgres://u@db/store\"\ndbname = \"x\"",
    ));
    assert_eq!(err.key, "database.dbname");
}

#[test]
fn a_database_password_key_may_accompany_a_url_without_one() {
    let toml = with_minimal(
        "",
        "[database]\nurl = \"postgres://u@db/store\"\npassword = \"pw-key-2\"",
    );
    let config = Config::from_toml_str(&toml).unwrap();
    assert_eq!(
        config.database.password.as_ref().map(Secret::expose),
        Some("pw-key-2")
    );
    config.database.connect_options().unwrap();
}

#[test]
fn a_database_url_that_is_not_postgres_or_an_unknown_sslmode_is_an_error() {
    let err = error(&with_minimal(
        "",
        "[database]\nurl = \"mysql://u@db/store\"",
    ));
    assert_eq!(err.key, "database.url");

    let err = error(&with_minimal("", "[database]\nsslmode = \"sometimes\""));
    assert_eq!(err.key, "database.sslmode");
    assert!(err.message.contains("verify-full"), "{err}");
}

#[test]
fn an_unknown_key_is_an_error_naming_its_full_path() {
    let err = error(&with_minimal("", "[replication]\nbach_size = 20"));
    assert_eq!(err.key, "replication.bach_size");
    assert!(
        err.message.contains("batch_size"),
        "suggests the right key: {err}"
    );
    assert!(
        err.to_string().starts_with("replication.bach_size: "),
        "{err}"
    );

    let err = error(&with_minimal("listen_adr = \"0.0.0.0:2305\"", ""));
    assert_eq!(err.key, "listen_adr");

    let toml = MINIMAL.replace("token = ", "tokn = \"x\"\ntoken = ");
    assert_eq!(error(&toml).key, "virtual_storage[0].node[0].tokn");

    let err = error(&with_minimal("", "[nats.tls]\nca = \"x\""));
    assert_eq!(err.key, "nats.tls");
}

#[test]
fn a_key_of_the_wrong_type_is_an_error_naming_it() {
    let err = error(&with_minimal("", "[replication]\nbatch_size = \"ten\""));
    assert_eq!(err.key, "replication.batch_size");
    assert!(err.message.contains("integer"), "{err}");

    let err = error(&with_minimal("", "[replication]\nbatch_size = -1"));
    assert_eq!(err.key, "replication.batch_size");

    let err = error(&with_minimal("nats = 1", ""));
    assert_eq!(err.key, "nats");
}

#[test]
fn numbers_out_of_range_are_errors_naming_the_key() {
    for (section, key, value) in [
        ("replication", "batch_size", "0"),
        ("replication", "batch_size", "1001"),
        ("replication", "parallel_storage_processing_workers", "0"),
        ("replication", "max_concurrent_jobs", "0"),
        ("replication", "attempts", "0"),
        ("replication", "retry_delay", "\"0s\""),
        ("replication", "max_retry_delay", "\"1s\""),
        ("replication", "completion_retention", "\"500ms\""),
        ("replication", "lock_lease", "\"1s\""),
        ("replication", "lock_lease", "\"2h\""),
        ("nats", "replicas", "0"),
        ("nats", "replicas", "6"),
        ("nats", "ack_wait", "\"500ms\""),
        ("nats", "max_ack_pending", "0"),
        ("nats", "max_deliver", "1"),
        ("nats", "max_deliver", "-2"),
        ("nats", "max_bytes", "-2"),
        ("nats", "duplicate_window", "\"0s\""),
        ("database", "max_connections", "0"),
    ] {
        let err = error(&with_minimal("", &format!("[{section}]\n{key} = {value}")));
        assert_eq!(
            err.key,
            format!("{section}.{key}"),
            "{section}.{key} = {value}: {err}"
        );
    }
    let ok = with_minimal(
        "",
        "[replication]\nbatch_size = 1000\n[nats]\nreplicas = 5\nmax_bytes = -1",
    );
    Config::from_toml_str(&ok).unwrap();
}

#[test]
fn a_duplicate_storage_name_is_an_error_naming_the_key_and_the_name() {
    let toml = format!(
        "{MINIMAL}\n[[virtual_storage.node]]\nstorage = \"gitaly-1\"\naddress = \"tcp://h:1\"\ntoken = \"t\""
    );
    let err = error(&toml);
    assert_eq!(err.key, "virtual_storage[0].node[1].storage");
    assert!(err.message.contains("\"gitaly-1\""), "{err}");
}

#[test]
fn the_same_storage_name_may_appear_in_two_virtual_storages() {
    let toml = format!("{MINIMAL}\n{}", MINIMAL.replace("\"default\"", "\"other\""));
    let config = Config::from_toml_str(&toml).unwrap();
    assert_eq!(config.targets().count(), 2);
}

#[test]
fn a_duplicate_or_empty_virtual_storage_name_is_an_error() {
    let err = error(&format!("{MINIMAL}\n{MINIMAL}"));
    assert_eq!(err.key, "virtual_storage[1].name");
    assert!(err.message.contains("\"default\""), "{err}");

    let err = error(&MINIMAL.replace("name = \"default\"", "name = \"\""));
    assert_eq!(err.key, "virtual_storage[0].name");
}

#[test]
fn storage_names_are_free_text_but_not_empty_nor_too_long_for_a_subject() {
    let long = "x".repeat(255);
    for name in [
        "gitaly.3",
        "node~1",
        "störage",
        "a%41",
        "a b*>",
        long.as_str(),
    ] {
        let toml = MINIMAL.replace("\"gitaly-1\"", &format!("\"{name}\""));
        let config = Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("{name:?}: {e}"));
        assert_eq!(config.virtual_storages[0].nodes[0].storage, name);
    }
    let too_long = "x".repeat(256);
    for (name, message) in [
        ("", "must not be empty"),
        (too_long.as_str(), "more than 255"),
    ] {
        let err = error(&MINIMAL.replace("\"gitaly-1\"", &format!("\"{name}\"")));
        assert_eq!(err.key, "virtual_storage[0].node[0].storage", "{err}");
        assert!(err.message.contains(message), "{err}");
        let err = error(&MINIMAL.replace("\"default\"", &format!("\"{name}\"")));
        assert_eq!(err.key, "virtual_storage[0].name", "{err}");
        assert!(err.message.contains(message), "{err}");
    }
}

#[test]
fn the_consumer_prefix_and_stream_names_hold_only_letters_digits_dash_and_underscore() {
    let long = "x".repeat(65);
    for (key, value) in [
        ("consumer_prefix", "gitaly~replicator"),
        ("consumer_prefix", "a%41"),
        ("consumer_prefix", "störage"),
        ("consumer_prefix", ""),
        ("consumer_prefix", long.as_str()),
        ("stream", "GITALY~REPLICATION"),
        ("stream", ""),
        ("dead_letter_stream", "DEAD%"),
    ] {
        let err = error(&with_minimal("", &format!("[nats]\n{key} = \"{value}\"")));
        assert_eq!(err.key, format!("nats.{key}"), "{value:?}: {err}");
        assert!(
            err.message.contains("A-Z, a-z, 0-9, '-' and '_'"),
            "{value:?}: {err}"
        );
    }
    let fine = "x".repeat(64);
    let toml = with_minimal("", &format!("[nats]\nconsumer_prefix = \"{fine}\""));
    assert_eq!(
        Config::from_toml_str(&toml).unwrap().nats.consumer_prefix,
        fine
    );
    let prefix = format!("{}.replication", "x".repeat(250));
    let err = error(&with_minimal(
        "",
        &format!("[nats]\nsubject_prefix = \"{prefix}\""),
    ));
    assert_eq!(err.key, "nats.subject_prefix", "{err}");
}

#[test]
fn a_config_without_virtual_storages_or_nodes_is_an_error() {
    assert_eq!(error("").key, "virtual_storage");
    assert_eq!(
        error("[[virtual_storage]]\nname = \"default\"").key,
        "virtual_storage[0].node"
    );
}

#[test]
fn a_bad_address_is_an_error_naming_the_key_and_the_accepted_forms() {
    for bad in [
        "127.0.0.1:8075",
        "http://gitaly:8075",
        "tcp://gitaly:http",
        "tcp://gitaly:0",
        "tcp://:8075",
        "tcp://gitaly:8075/path",
        "tcp://::1:8075",
        "unix:",
        "unix://relative/path",
        "",
    ] {
        let toml = format!(
            "{MINIMAL}\n[[virtual_storage.node]]\nstorage = \"gitaly-2\"\naddress = \"{bad}\"\ntoken = \"t\""
        );
        let err = error(&toml);
        assert_eq!(
            err.key, "virtual_storage[0].node[1].address",
            "{bad:?}: {err}"
        );
        assert!(
            err.message
                .contains("tcp://HOST:PORT, tls://HOST:PORT or unix:/PATH"),
            "{err}"
        );
    }
    let toml = MINIMAL.replace("address = \"tcp://127.0.0.1:8075\"", "");
    assert_eq!(error(&toml).key, "virtual_storage[0].node[0].address");
}

#[test]
fn addresses_parse_and_print_in_canonical_form() {
    for (input, canonical) in [
        ("tcp://gitaly-1:8075", "tcp://gitaly-1:8075"),
        ("tls://10.0.0.1:9999", "tls://10.0.0.1:9999"),
        ("tcp://[::1]:8075", "tcp://[::1]:8075"),
        ("unix:/var/run/gitaly.socket", "unix:/var/run/gitaly.socket"),
        (
            "unix:///var/run/gitaly.socket",
            "unix:/var/run/gitaly.socket",
        ),
    ] {
        let address: NodeAddress = input.parse().unwrap();
        assert_eq!(address.to_string(), canonical);
        assert_eq!(address.uri(), canonical);
        assert_eq!(canonical.parse::<NodeAddress>().unwrap(), address);
    }
    assert!("tls://h:1".parse::<NodeAddress>().unwrap().is_tls());
}

#[test]
fn an_empty_or_missing_token_loads_with_a_warning_naming_the_key() {
    for toml in [
        MINIMAL.replace("\"secret-token-1\"", "\"\""),
        MINIMAL.replace("token = \"secret-token-1\"", ""),
    ] {
        let warnings: Vec<_> = Config::from_toml_str(&toml)
            .unwrap()
            .warnings()
            .into_iter()
            .filter(|w| w.key.starts_with("virtual_storage"))
            .collect();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].key, "virtual_storage[0].node[0].token");
        assert!(
            warnings[0]
                .message
                .contains("GITALY_REPLICATOR_VIRTUAL_STORAGE__DEFAULT__NODE__GITALY_1__TOKEN"),
            "{}",
            warnings[0]
        );
    }
    assert!(
        !Config::from_toml_str(MINIMAL)
            .unwrap()
            .warnings()
            .iter()
            .any(|w| w.key.starts_with("virtual_storage"))
    );
}

#[test]
fn environment_variables_override_single_keys() {
    let toml = with_minimal(
        "",
        "[nats]\nurl = \"nats://from-file:4222\"\n[replication]\nbatch_size = 5",
    );
    let config = Config::from_toml_str_with_env(
        &toml,
        env(&[
            ("GITALY_REPLICATOR_NATS__URL", "nats://from-env:4222"),
            ("GITALY_REPLICATOR_DATABASE__URL", "postgres://env@db/store"),
            ("GITALY_REPLICATOR_PROMETHEUS_LISTEN_ADDR", "0.0.0.0:9999"),
            ("GITALY_REPLICATOR_REPLICATION__BATCH_SIZE", "20"),
            ("GITALY_REPLICATOR_REPLICATION__JOB_TIMEOUT", "90s"),
            ("GITALY_REPLICATOR_NATS__TLS_REQUIRED", "true"),
            ("GITALY_REPLICATOR_NATS__TOKEN", "nats-env-token"),
            ("GITALY_REPLICATOR_LOGGING__FORMAT", "text"),
            (
                "GITALY_REPLICATOR_CONFIG",
                "/etc/gitaly-replicator/config.toml",
            ),
            ("PATH", "/usr/bin"),
            ("NATS__URL", "not ours"),
        ]),
    )
    .unwrap();
    assert_eq!(config.nats.url, "nats://from-env:4222");
    assert_eq!(
        config.database.url.as_ref().map(Secret::expose),
        Some("postgres://env@db/store")
    );
    assert_eq!(
        config.prometheus_listen_addr,
        Some("0.0.0.0:9999".parse().unwrap())
    );
    assert_eq!(config.replication.batch_size, 20);
    assert_eq!(config.replication.job_timeout, Duration::from_secs(90));
    assert!(config.nats.tls_required);
    assert_eq!(
        config.nats.token.as_ref().map(Secret::expose),
        Some("nats-env-token")
    );
    assert_eq!(config.logging.format, LogFormat::Text);
}

#[test]
fn an_empty_prometheus_listen_addr_disables_the_listener() {
    let config = Config::from_toml_str_with_env(
        MINIMAL,
        env(&[("GITALY_REPLICATOR_PROMETHEUS_LISTEN_ADDR", "")]),
    )
    .unwrap();
    assert_eq!(config.prometheus_listen_addr, None);

    let config = Config::from_toml_str(&with_minimal("prometheus_listen_addr = \"\"", "")).unwrap();
    assert_eq!(config.prometheus_listen_addr, None);
}

#[test]
fn prometheus_listen_addr_accepts_praefect_forms_but_resolves_no_host_names() {
    for (input, expected) in [
        ("127.0.0.1:9652", "127.0.0.1:9652"),
        ("[::]:9652", "[::]:9652"),
        ("localhost:9100", "127.0.0.1:9100"),
        (":9652", "0.0.0.0:9652"),
    ] {
        let toml = with_minimal(&format!("prometheus_listen_addr = \"{input}\""), "");
        let config = Config::from_toml_str(&toml).unwrap();
        assert_eq!(
            config.prometheus_listen_addr,
            Some(expected.parse::<SocketAddr>().unwrap())
        );
    }
    let err = error(&with_minimal(
        "prometheus_listen_addr = \"metrics.internal:9652\"",
        "",
    ));
    assert_eq!(err.key, "prometheus_listen_addr");
}

#[test]
fn a_node_token_can_come_from_the_environment() {
    let toml = format!(
        "{}\n[[virtual_storage]]\nname = \"storage.b\"\n[[virtual_storage.node]]\n\
         storage = \"gitaly-b1\"\naddress = \"unix:/run/g.sock\"",
        MINIMAL.replace("token = \"secret-token-1\"", "")
    );
    assert_eq!(
        node_token_env_var("storage.b", "gitaly-b1"),
        "GITALY_REPLICATOR_VIRTUAL_STORAGE__STORAGE_B__NODE__GITALY_B1__TOKEN"
    );
    let config = Config::from_toml_str_with_env(
        &toml,
        env(&[
            (
                "GITALY_REPLICATOR_VIRTUAL_STORAGE__DEFAULT__NODE__GITALY_1__TOKEN",
                "env-token-1",
            ),
            (
                "GITALY_REPLICATOR_VIRTUAL_STORAGE__STORAGE_B__NODE__GITALY_B1__TOKEN",
                "env-token-b1",
            ),
        ]),
    )
    .unwrap();
    let token = |vs: &str, node: &str| {
        config
            .virtual_storage(vs)
            .unwrap()
            .node(node)
            .unwrap()
            .token
            .expose()
            .to_string()
    };
    assert_eq!(token("default", "gitaly-1"), "env-token-1");
    assert_eq!(token("storage.b", "gitaly-b1"), "env-token-b1");
}

#[test]
fn a_node_token_variable_that_matches_no_node_is_an_error_naming_it() {
    let var = "GITALY_REPLICATOR_VIRTUAL_STORAGE__DEFAULT__NODE__GITALY_9__TOKEN";
    let err = env_error(MINIMAL, &[(var, "x")]);
    assert_eq!(err.key, var);
    assert!(
        err.message
            .contains("GITALY_REPLICATOR_VIRTUAL_STORAGE__DEFAULT__NODE__GITALY_1__TOKEN"),
        "{err}"
    );
}

#[test]
fn an_environment_variable_naming_no_key_is_an_error_naming_it() {
    let err = env_error(
        MINIMAL,
        &[("GITALY_REPLICATOR_NATS__URLL", "nats://x:4222")],
    );
    assert_eq!(err.key, "GITALY_REPLICATOR_NATS__URLL");
    assert!(
        err.message.contains("GITALY_REPLICATOR_NATS__URL"),
        "suggests the right one: {err}"
    );

    let err = env_error(
        MINIMAL,
        &[("GITALY_REPLICATOR_LISTEN_ADDR", "0.0.0.0:2305")],
    );
    assert_eq!(err.key, "GITALY_REPLICATOR_LISTEN_ADDR");
    assert!(err.message.contains("Praefect"), "{err}");

    let err = env_error(MINIMAL, &[("GITALY_REPLICATOR_NATS", "x")]);
    assert_eq!(err.key, "GITALY_REPLICATOR_NATS");
}

#[test]
fn a_bad_value_from_the_environment_names_the_key_and_the_variable() {
    let err = env_error(
        MINIMAL,
        &[("GITALY_REPLICATOR_REPLICATION__BATCH_SIZE", "lots")],
    );
    assert_eq!(err.key, "replication.batch_size");
    assert!(
        err.message
            .contains("GITALY_REPLICATOR_REPLICATION__BATCH_SIZE"),
        "{err}"
    );

    let err = env_error(
        MINIMAL,
        &[("GITALY_REPLICATOR_REPLICATION__BATCH_SIZE", "0")],
    );
    assert_eq!(err.key, "replication.batch_size");
    assert!(
        err.message
            .contains("GITALY_REPLICATOR_REPLICATION__BATCH_SIZE"),
        "{err}"
    );

    let err = env_error(
        MINIMAL,
        &[("GITALY_REPLICATOR_NATS__TLS_REQUIRED", "yes please")],
    );
    assert_eq!(err.key, "nats.tls_required");
}

#[test]
fn durations_are_humantime_strings_and_a_bad_one_names_its_key() {
    let toml = with_minimal(
        "graceful_stop_timeout = \"1m30s\"",
        "[replication]\njob_timeout = \"2h\"\nhealth_check_interval = \"250ms\"\n\
         [nats]\nack_wait = \"2m\"\ndead_letter_max_age = \"30days\"\nfetch_expires = \"1s\"",
    );
    let config = Config::from_toml_str(&toml).unwrap();
    assert_eq!(config.graceful_stop_timeout, Duration::from_secs(90));
    assert_eq!(config.replication.job_timeout, Duration::from_secs(7200));
    assert_eq!(
        config.replication.health_check_interval,
        Duration::from_millis(250)
    );
    assert_eq!(config.nats.ack_wait, Duration::from_secs(120));
    assert_eq!(
        config.nats.dead_letter_max_age,
        Duration::from_secs(30 * 86400)
    );

    let err = error(&with_minimal("", "[nats]\nack_wait = \"30 parsecs\""));
    assert_eq!(err.key, "nats.ack_wait");
    assert!(err.message.contains("30 parsecs"), "{err}");

    let err = error(&with_minimal("graceful_stop_timeout = 60", ""));
    assert_eq!(err.key, "graceful_stop_timeout");
    assert!(err.message.contains("\"60s\""), "{err}");
    // A bare 0 is zero, as Praefect's files write a disabled interval.
    let config = Config::from_toml_str(&with_minimal("startup_timeout = 0", "")).unwrap();
    assert_eq!(config.startup_timeout, Duration::ZERO);
}

#[test]
fn the_defaults_are_those_of_the_design() {
    let config = Config::from_toml_str(MINIMAL).unwrap();
    assert_eq!(
        config.prometheus_listen_addr,
        Some("127.0.0.1:9652".parse().unwrap())
    );
    assert_eq!(config.graceful_stop_timeout, Duration::from_secs(60));
    assert_eq!(config.logging.format, LogFormat::Json);
    assert_eq!(config.logging.level, "info");
    let r = &config.replication;
    assert_eq!(
        (r.batch_size, r.parallel_storage_processing_workers),
        (10, 1)
    );
    assert_eq!((r.max_concurrent_jobs, r.attempts), (64, 3));
    assert_eq!(r.retry_delay, Duration::from_secs(5));
    assert_eq!(r.max_retry_delay, Duration::from_secs(300));
    assert_eq!(r.completion_retention, Duration::from_secs(24 * 3600));
    assert_eq!(r.lock_lease, Duration::from_secs(30));
    assert_eq!(
        (r.job_timeout, r.health_check_interval),
        (Duration::ZERO, Duration::from_secs(5))
    );
    let n = &config.nats;
    assert_eq!(n.url, "nats://127.0.0.1:4222");
    assert_eq!(n.subject_prefix, "gitaly.replication");
    assert_eq!(
        (n.stream.as_str(), n.dead_letter_stream.as_str()),
        ("GITALY_REPLICATION", "GITALY_REPLICATION_DEAD")
    );
    assert_eq!(n.consumer_prefix, "gitaly-replicator");
    assert_eq!(
        (n.replicas, n.max_ack_pending, n.max_bytes, n.max_messages),
        (1, 1000, -1, 10_000_000)
    );
    assert_eq!(n.ack_wait, Duration::from_secs(30));
    assert_eq!(n.max_deliver, 50);
    assert_eq!(n.duplicate_window, Duration::from_secs(120));
    assert_eq!(n.dead_letter_max_age, Duration::from_secs(720 * 3600));
    assert_eq!(n.fetch_expires, Duration::from_secs(5));
    assert_eq!(config.database.max_connections, 16);
    assert_eq!(config.database.connect_timeout, Duration::from_secs(5));
    assert_eq!(config.database.statement_timeout, Duration::from_secs(30));
    assert!(config.ignored_keys.is_empty());
}

#[test]
fn the_example_config_loads_and_sets_every_key_to_its_default() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml"))
            .unwrap();
    let example = Config::from_toml_str(&text).unwrap();
    let defaults = Config::from_toml_str(MINIMAL).unwrap();
    assert_eq!(
        example.prometheus_listen_addr,
        defaults.prometheus_listen_addr
    );
    assert_eq!(
        example.graceful_stop_timeout,
        defaults.graceful_stop_timeout
    );
    assert_eq!(example.logging, defaults.logging);
    assert_eq!(example.database, defaults.database);
    assert_eq!(example.replication, defaults.replication);
    assert_eq!(example.nats, defaults.nats);
    assert_eq!(example.prometheus, defaults.prometheus);
    assert!(example.ignored_keys.is_empty());
}

#[test]
fn nats_names_and_authentication_are_checked() {
    for (nats, key) in [
        ("subject_prefix = \"gitaly.*\"", "nats.subject_prefix"),
        (
            "subject_prefix = \"gitaly..replication\"",
            "nats.subject_prefix",
        ),
        (
            "subject_prefix = \"gitaly replication\"",
            "nats.subject_prefix",
        ),
        ("stream = \"GITALY.REPLICATION\"", "nats.stream"),
        (
            "dead_letter_stream = \"GITALY/DEAD\"",
            "nats.dead_letter_stream",
        ),
        (
            "dead_letter_stream = \"GITALY_REPLICATION\"",
            "nats.dead_letter_stream",
        ),
        (
            "consumer_prefix = \"gitaly replicator\"",
            "nats.consumer_prefix",
        ),
        ("url = \"http://nats:4222\"", "nats.url"),
        ("token = \"t\"\nuser = \"u\"\npassword = \"p\"", "nats.user"),
        ("user = \"u\"", "nats.password"),
        ("url = \"nats://u:p@a:4222\"\ntoken = \"t\"", "nats.token"),
        ("url = \"nats://u:p@a:4222,nats://u:q@b:4222\"", "nats.url"),
        ("tls_cert_file = \"/c.pem\"", "nats.tls_key_file"),
    ] {
        let err = error(&with_minimal("", &format!("[nats]\n{nats}")));
        assert_eq!(err.key, key, "{nats}: {err}");
    }
}

#[test]
fn several_nats_servers_may_be_given() {
    let toml = with_minimal("", "[nats]\nurl = \"nats://a:4222, tls://b:4222,c:4222\"");
    let config = Config::from_toml_str(&toml).unwrap();
    let servers: Vec<&str> = config.nats.servers().collect();
    assert_eq!(servers, ["nats://a:4222", "tls://b:4222", "c:4222"]);
}

#[test]
fn a_log_level_or_format_that_is_not_known_is_an_error() {
    assert_eq!(
        error(&with_minimal("", "[logging]\nlevel = \"loud\"")).key,
        "logging.level"
    );
    assert_eq!(
        error(&with_minimal("", "[logging]\nformat = \"xml\"")).key,
        "logging.format"
    );
    let config =
        Config::from_toml_str(&with_minimal("", "[logging]\nlevel = \"warning\"")).unwrap();
    assert_eq!(config.logging.filter_directive(), "warn");
    let directive = "info,gitaly_replicator=debug";
    let config = Config::from_toml_str(&with_minimal(
        "",
        &format!("[logging]\nlevel = \"{directive}\""),
    ))
    .unwrap();
    assert_eq!(config.logging.filter_directive(), directive);
}

const SECRETS: &[&str] = &[
    "node-token-aaa111",
    "node-token-bbb222",
    "url-password-ccc333",
    "nats-password-ddd444",
    "nats-token-eee555",
    "db-password-c41d",
    "gitaly-token-default-1",
    "gitaly-token-b-3",
];

#[test]
fn the_masked_toml_contains_no_secret() {
    let full = Config::from_toml_str(&read("full.toml")).unwrap();
    let praefect = Config::from_toml_str(&read("praefect.toml")).unwrap();
    let token = Config::from_toml_str_with_env(
        MINIMAL,
        env(&[(
            "GITALY_REPLICATOR_NATS__URL",
            "nats://nats-token-eee555@n1:4222",
        )]),
    )
    .unwrap();
    for config in [&full, &praefect, &token] {
        let masked = config.to_masked_toml();
        for secret in SECRETS {
            assert!(!masked.contains(secret), "{secret} leaked:\n{masked}");
        }
        assert!(masked.contains("token = \"[masked]\""), "{masked}");
    }
    let masked = full.to_masked_toml();
    assert!(
        masked.contains("postgres://replicator:[masked]@db.internal:5433/praefect"),
        "{masked}"
    );
    assert!(masked.contains("password = \"[masked]\""), "{masked}");
    assert!(token.to_masked_toml().contains("nats://[masked]@n1:4222"));

    let masked = praefect.to_masked_toml();
    assert!(masked.contains("# Ignored Praefect keys"), "{masked}");
    // What the lease trades is said beside its value.
    assert!(masked.contains("lock_lease = \"30s\""), "{masked}");
    assert!(
        masked.contains("# [replication] lock_lease = 30s: a hung or cut-off process"),
        "{masked}"
    );
    assert!(
        masked.contains("#   failover.election_strategy"),
        "{masked}"
    );
}

#[test]
fn a_password_in_the_database_url_query_is_masked_too() {
    let toml = with_minimal(
        "",
        "[database]\nurl = \"postgres://u@db/store?password=query-secret-9\"",
    );
    let config = Config::from_toml_str(&toml).unwrap();
    assert!(!config.to_masked_toml().contains("query-secret-9"));
    assert!(!format!("{config:?}").contains("query-secret-9"));
}

#[test]
fn the_masked_toml_reads_back_as_the_same_configuration_but_for_secrets() {
    for name in ["full.toml", "praefect.toml", "minimal.toml"] {
        let original = Config::from_toml_str(&read(name)).unwrap();
        let masked = original.to_masked_toml();
        let back =
            Config::from_toml_str(&masked).unwrap_or_else(|e| panic!("{name}: {e}\n{masked}"));

        assert_eq!(back.prometheus_listen_addr, original.prometheus_listen_addr);
        assert_eq!(back.graceful_stop_timeout, original.graceful_stop_timeout);
        assert_eq!(back.logging, original.logging);
        assert_eq!(back.replication, original.replication);
        assert!(back.ignored_keys.is_empty());

        assert_eq!(back.virtual_storages.len(), original.virtual_storages.len());
        for ((vs, node), (back_vs, back_node)) in original.targets().zip(back.targets()) {
            assert_eq!(vs.name, back_vs.name);
            assert_eq!(node.storage, back_node.storage);
            assert_eq!(node.address, back_node.address);
            assert_eq!(back_node.token.expose(), "[masked]");
        }

        let mask = |secret: &Option<Secret>| secret.as_ref().map(|_| Secret::new("[masked]"));
        let mut nats = original.nats.clone();
        nats.url = nats.masked_url();
        nats.token = mask(&nats.token);
        nats.password = mask(&nats.password);
        assert_eq!(back.nats, nats, "{name}");

        let mut db = original.database.clone();
        db.url = db.masked_url().map(Secret::new);
        db.password = mask(&db.password);
        db.session_pooled.password = mask(&db.session_pooled.password);
        assert_eq!(
            back.database.masked_url(),
            original.database.masked_url(),
            "{name}"
        );
        db.url = back.database.url.clone();
        assert_eq!(back.database, db, "{name}");
    }
}

#[test]
fn debug_output_of_a_config_contains_no_secret() {
    let full = Config::from_toml_str(&read("full.toml")).unwrap();
    let praefect = Config::from_toml_str(&read("praefect.toml")).unwrap();
    let with_token = Config::from_toml_str(&with_minimal(
        "",
        "[nats]\nurl = \"nats://n1:4222,nats://nats-token-eee555@n2:4222\"",
    ))
    .unwrap();
    for config in [full, praefect, with_token] {
        let debug = format!("{config:?} {config:#?}");
        for secret in SECRETS {
            assert!(!debug.contains(secret), "{secret} leaked:\n{debug}");
        }
        assert!(debug.contains("[masked]"));
    }
    assert_eq!(
        format!("{:?} {}", Secret::new("s3cr3t"), Secret::new("s3cr3t")),
        "[masked] [masked]"
    );
}

#[test]
fn a_syntax_error_names_the_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[replication]\nbatch_size = 10\nattempts = = 3\n").unwrap();
    let err = Config::load(&path).unwrap_err();
    assert_eq!(err.file.as_deref(), Some(path.as_path()));
    assert_eq!(err.line_col.map(|(line, _)| line), Some(3));
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("{}:3:", path.display())),
        "{shown}"
    );
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let path = data("does-not-exist.toml");
    let err = Config::load(&path).unwrap_err();
    assert_eq!(err.file.as_deref(), Some(path.as_path()));
    assert!(err.to_string().contains("does-not-exist.toml"), "{err}");
}

#[test]
fn a_validation_error_from_a_file_names_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, format!("{MINIMAL}\n[replication]\nbatch_size = 0\n")).unwrap();
    let err = Config::load(&path).unwrap_err();
    assert_eq!(err.key, "replication.batch_size");
    assert_eq!(err.file.as_deref(), Some(path.as_path()));
}

#[test]
fn an_error_about_a_value_of_the_wrong_type_does_not_print_the_value() {
    let toml = "[[virtual_storage]]\nname = \"default\"\n[virtual_storage.node]\n\
                storage = \"gitaly-1\"\ntoken = \"wrong-shape-secret-7\"";
    let err = error(toml);
    assert_eq!(err.key, "virtual_storage[0].node");
    assert!(
        !format!("{err} {err:?}").contains("wrong-shape-secret-7"),
        "{err}"
    );

    let err = error(&with_minimal("", "[nats]\npassword = 123456789"));
    assert_eq!(err.key, "nats.password");
    assert!(!err.to_string().contains("123456789"), "{err}");
}

#[test]
fn a_log_level_with_space_before_a_multibyte_character_is_an_answer_not_a_panic() {
    // tracing-subscriber slices such a directive at the wrong offsets; found
    // by the config loader's fuzz target.
    for level in [" é=info", "info, ü=debug", "\u{3000}x=warn"] {
        let toml = with_minimal("", &format!("[logging]\nlevel = {level:?}"));
        let loaded = std::panic::catch_unwind(|| Config::from_toml_str(&toml));
        assert!(loaded.is_ok(), "loading level {level:?} panicked");
    }
    let config = Config::from_toml_str(&with_minimal(
        "",
        "[logging]\nlevel = \" info , gitaly_replicator=debug \"",
    ))
    .unwrap();
    assert_eq!(config.logging.level, "info,gitaly_replicator=debug");
}
