//! TLS to Postgres, against a private Postgres serving TLS with a test CA:
//! every sslmode libpq knows, verification of the chain and of the host
//! name, client certificates, and refusals that name the key to fix.

use gitaly_replicator::{Config, EmptyDatabase, ServiceError, connect_store, display_error_chain};
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
    Config::from_toml_str(&format!(
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
    ))
    .unwrap()
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
