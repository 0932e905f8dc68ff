//! TLS to Postgres, against a private Postgres serving TLS with a test CA:
//! every sslmode libpq knows, verification of the chain and of the host
//! name, client certificates, and refusals that name the key to fix. The
//! root file is the only trust anchor, as in libpq: the tests that prove it
//! run `migrate` as a process, with the platform's store (`SSL_CERT_FILE`,
//! `SSL_CERT_DIR`) and the home directory of their choosing.

use crate::common::process::ReplicatorProcess;
use gitaly_replicator::{Config, EmptyDatabase, ServiceError, connect_store, display_error_chain};
use std::path::Path;
use testkit::postgres_server::PrivatePostgres;
use testkit::tls::{Leaf, TestCa};

struct TlsPostgres {
    pg: PrivatePostgres,
    ca: TestCa,
    client: Leaf,
    other_ca: TestCa,
}

/// A private Postgres whose certificate, from `ca`, names `localhost` only
/// (not 127.0.0.1); the user `certuser` must show a client certificate of
/// `ca`, everyone else TLS and trust, and nobody gets in without TLS.
fn tls_postgres() -> TlsPostgres {
    let ca = TestCa::new("postgres-ca");
    let server = ca.leaf("server", &["localhost"]);
    let client = ca.leaf("certuser", &["certuser"]);
    let other_ca = TestCa::new("other-ca");
    let mut pg = PrivatePostgres::init();
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    pg.install_file("server.crt", &read(&server.cert_file));
    pg.install_file("server.key", &read(&server.key_file));
    pg.install_file("root.crt", &read(&ca.cert_file));
    pg.append_config(
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'",
    );
    pg.set_hba(
        "local all all trust\n\
         hostssl all certuser 127.0.0.1/32 cert\n\
         hostssl all all 127.0.0.1/32 trust\n\
         hostnossl all all 127.0.0.1/32 reject\n",
    );
    pg.start_again();
    TlsPostgres {
        pg,
        ca,
        client,
        other_ca,
    }
}

fn config(port: u16, database: &str) -> Config {
    Config::from_toml_str(&toml(port, database)).unwrap()
}

/// A configuration with `database` as the rest of `[database]`.
fn toml(port: u16, database: &str) -> String {
    format!(
        r#"
        [[virtual_storage]]
        name = "default"
        [[virtual_storage.node]]
        storage = "gitaly-1"
        address = "tcp://127.0.0.1:8075"
        token = "t"
        [database]
        port = {port}
        user = "postgres"
        dbname = "postgres"
        connect_timeout = "5s"
        {database}
        "#
    )
}

async fn connect(config: &Config) -> Result<(), String> {
    match connect_store(config, EmptyDatabase::CreateStandalone).await {
        Ok(store) => {
            let ssl: bool =
                sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                    .fetch_one(store.pool())
                    .await
                    .unwrap();
            assert!(ssl, "connected without TLS");
            Ok(())
        }
        Err(e) => Err(display_error_chain(&e)),
    }
}

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

#[tokio::test]
async fn every_sslmode_connects_as_libpq_would_and_verification_checks_chain_and_name() {
    let t = tls_postgres();
    let port = t.pg.port;
    let ca = path(&t.ca.cert_file);
    for (mode, host) in [
        ("prefer", "127.0.0.1"),
        ("require", "127.0.0.1"),
        ("verify-ca", "localhost"),
        // As libpq: verify-ca checks the chain, not the name (the
        // certificate names localhost only).
        ("verify-ca", "127.0.0.1"),
        ("verify-full", "localhost"),
    ] {
        let c = config(
            port,
            &format!("host = \"{host}\"\nsslmode = \"{mode}\"\nsslrootcert = \"{ca}\""),
        );
        connect(&c).await.unwrap_or_else(|e| panic!("{mode}: {e}"));
    }
    // `disable` and `allow` do not offer TLS, which this server requires.
    for mode in ["disable", "allow"] {
        let c = config(port, &format!("host = \"127.0.0.1\"\nsslmode = \"{mode}\""));
        let e = connect(&c).await.unwrap_err();
        assert!(e.contains("no encryption"), "{mode}: {e}");
    }
}

#[tokio::test]
async fn a_client_certificate_logs_in_where_the_server_demands_one() {
    let t = tls_postgres();
    let c = Config::from_toml_str(&format!(
        r#"
        [[virtual_storage]]
        name = "default"
        [[virtual_storage.node]]
        storage = "gitaly-1"
        address = "tcp://127.0.0.1:8075"
        [database]
        host = "localhost"
        port = {}
        user = "certuser"
        dbname = "postgres"
        sslmode = "verify-full"
        sslrootcert = "{}"
        sslcert = "{}"
        sslkey = "{}"
        "#,
        t.pg.port,
        path(&t.ca.cert_file),
        path(&t.client.cert_file),
        path(&t.client.key_file),
    ))
    .unwrap();
    // The role must exist; cert auth maps the certificate's CN to it.
    let admin = sqlx::PgPool::connect(&t.pg.url()).await.unwrap();
    sqlx::query("CREATE ROLE certuser LOGIN SUPERUSER")
        .execute(&admin)
        .await
        .unwrap();
    if let Err(e) = connect(&c).await {
        panic!("{e}\nserver log:\n{}", t.pg.log());
    }

    // Without the certificate the same user is refused.
    let mut without = c.clone();
    (without.database.sslcert, without.database.sslkey) = (None, None);
    let e = connect(&without).await.unwrap_err();
    assert!(e.contains("requires a valid client certificate"), "{e}");
}

#[tokio::test]
async fn a_wrong_ca_or_host_name_is_refused_naming_the_keys_to_fix_at_once() {
    let t = tls_postgres();
    let port = t.pg.port;
    let cases = [
        // Another CA's certificate cannot vouch for the server.
        (
            "verify-ca",
            "localhost",
            path(&t.other_ca.cert_file),
            "database.sslrootcert",
        ),
        // The certificate names localhost, not 127.0.0.1.
        (
            "verify-full",
            "127.0.0.1",
            path(&t.ca.cert_file),
            "database.host",
        ),
        // Another CA's certificate, connecting by a name it does not hold.
        (
            "verify-ca",
            "127.0.0.1",
            path(&t.other_ca.cert_file),
            "database.sslrootcert",
        ),
    ];
    for (mode, host, ca, key) in cases {
        let c = config(
            port,
            &format!("host = \"{host}\"\nsslmode = \"{mode}\"\nsslrootcert = \"{ca}\""),
        );
        let started = std::time::Instant::now();
        let e = connect_store(&c, EmptyDatabase::CreateStandalone)
            .await
            .expect_err("verification must refuse");
        assert!(matches!(e, ServiceError::Database { .. }), "{e:?}");
        let text = display_error_chain(&e);
        assert!(text.contains(key), "{mode}: {text}");
        assert!(text.contains("certificate"), "{mode}: {text}");
        assert_eq!(
            text.matches("invalid peer certificate").count(),
            1,
            "{text}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{mode}: waited"
        );
    }
}

/// `gitaly-replicator migrate --standalone` with `database` as the rest of
/// `[database]` (and any section after it), the platform's store holding
/// only `platform_ca`, and `home` as the home directory: (exit code, stderr).
async fn migrate(
    t: &TlsPostgres,
    database: &str,
    platform_ca: &Path,
    home: &Path,
) -> (Option<i32>, String) {
    let store = tempfile::tempdir().unwrap();
    std::fs::copy(platform_ca, store.path().join("ca.pem")).unwrap();
    let p = ReplicatorProcess::spawn_with_env(
        &toml(t.pg.port, database),
        &["migrate", "--standalone"],
        &[
            ("SSL_CERT_FILE", &path(platform_ca)),
            ("SSL_CERT_DIR", &path(store.path())),
            ("HOME", &path(home)),
        ],
    );
    tokio::time::timeout(std::time::Duration::from_secs(60), p.wait())
        .await
        .expect("migrate ends")
}

/// The error the command printed last (the log has it too).
fn last_line(stderr: &str) -> &str {
    stderr.trim_end().lines().last().unwrap_or_default()
}

/// A home directory whose `~/.postgresql/root.crt` is `ca`, or has none.
fn home_with_root_crt(ca: Option<&Path>) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    if let Some(ca) = ca {
        std::fs::create_dir(home.path().join(".postgresql")).unwrap();
        std::fs::copy(ca, home.path().join(".postgresql/root.crt")).unwrap();
    }
    home
}

#[tokio::test]
async fn verify_ca_trusts_sslrootcert_alone_even_where_the_platform_trusts_the_server() {
    let t = tls_postgres();
    let (ca, other) = (path(&t.ca.cert_file), path(&t.other_ca.cert_file));
    let home = home_with_root_crt(None);
    // The platform's roots do hold the server's CA: "system" connects.
    let (code, err) = migrate(
        &t,
        "host = \"localhost\"\nsslmode = \"verify-full\"\nsslrootcert = \"system\"",
        &t.ca.cert_file,
        home.path(),
    )
    .await;
    assert_eq!(code, Some(0), "system with verify-full: {err}");
    let refused = [
        (
            format!("host = \"127.0.0.1\"\nsslmode = \"verify-ca\"\nsslrootcert = \"{other}\""),
            "database.sslrootcert",
        ),
        (
            format!("host = \"localhost\"\nsslmode = \"verify-full\"\nsslrootcert = \"{other}\""),
            "database.sslrootcert",
        ),
        // libpq verifies `require` against a root file it is given.
        (
            format!("host = \"127.0.0.1\"\nsslmode = \"require\"\nsslrootcert = \"{other}\""),
            "database.sslrootcert",
        ),
        // The session connection by its own keys.
        (
            format!(
                "host = \"localhost\"\nsslmode = \"verify-full\"\nsslrootcert = \"{ca}\"\n\
                 [database.session_pooled]\nhost = \"127.0.0.1\"\nsslmode = \"verify-ca\"\n\
                 sslrootcert = \"{other}\""
            ),
            "database.session_pooled.sslrootcert",
        ),
    ];
    for (database, key) in refused {
        let (code, err) = migrate(&t, &database, &t.ca.cert_file, home.path()).await;
        // A refused certificate: the server cannot be reached as configured.
        assert_eq!(code, Some(69), "{database}: {err}");
        let last = last_line(&err);
        assert!(last.contains(key), "{database}: {err}");
        assert_eq!(
            last.matches("invalid peer certificate: UnknownIssuer")
                .count(),
            1,
            "{err}"
        );
    }
}

#[tokio::test]
async fn verify_ca_connects_with_the_right_ca_named_or_in_libpqs_default_file() {
    let t = tls_postgres();
    let ca = path(&t.ca.cert_file);
    // The platform trusts another CA only: the root file alone vouches.
    let home = home_with_root_crt(Some(&t.ca.cert_file));
    for database in [
        format!("host = \"127.0.0.1\"\nsslmode = \"verify-ca\"\nsslrootcert = \"{ca}\""),
        // Unset: ~/.postgresql/root.crt, as libpq reads it.
        "host = \"127.0.0.1\"\nsslmode = \"verify-ca\"".to_owned(),
        "host = \"localhost\"\nsslmode = \"verify-full\"".to_owned(),
    ] {
        let (code, err) = migrate(&t, &database, &t.other_ca.cert_file, home.path()).await;
        assert_eq!(code, Some(0), "{database}: {err}");
    }
    // Unset and no such file: refused before connecting, as a bad config.
    let empty = home_with_root_crt(None);
    let (code, err) = migrate(
        &t,
        "host = \"127.0.0.1\"\nsslmode = \"verify-ca\"",
        &t.ca.cert_file,
        empty.path(),
    )
    .await;
    assert_eq!(code, Some(64), "{err}");
    let root_crt = empty.path().join(".postgresql/root.crt");
    assert!(
        err.contains(&format!(
            "root certificate file {} does not exist",
            root_crt.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("set database.sslrootcert to a file, or to \"system\""),
        "{err}"
    );
}

#[tokio::test]
async fn system_roots_with_any_mode_but_verify_full_are_a_config_error_naming_both_keys() {
    let t = tls_postgres();
    let home = home_with_root_crt(None);
    let ca = path(&t.ca.cert_file);
    for (database, keys) in [
        (
            "host = \"127.0.0.1\"\nsslmode = \"verify-ca\"\nsslrootcert = \"system\"".to_owned(),
            "database.",
        ),
        (
            "host = \"127.0.0.1\"\nsslmode = \"require\"\nsslrootcert = \"system\"".to_owned(),
            "database.",
        ),
        (
            format!(
                "host = \"localhost\"\nsslmode = \"verify-full\"\nsslrootcert = \"{ca}\"\n\
                 [database.session_pooled]\nsslmode = \"verify-ca\"\nsslrootcert = \"system\""
            ),
            "database.session_pooled.",
        ),
    ] {
        let database = database.as_str();
        let (code, err) = migrate(&t, database, &t.ca.cert_file, home.path()).await;
        assert_eq!(code, Some(64), "{database}: {err}");
        assert!(err.contains(&format!("{keys}sslrootcert: ")), "{err}");
        assert!(
            err.contains(&format!("{keys}sslmode = \"verify-full\"")),
            "{err}"
        );
        // In the library too, before anything connects.
        let e = Config::from_toml_str(&toml(t.pg.port, database)).unwrap_err();
        assert_eq!(e.key, format!("{keys}sslrootcert"), "{e}");
    }
}
