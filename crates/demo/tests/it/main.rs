//! The demo end to end, as `gitaly-replicator-demo` runs it: it passes on
//! this machine's NATS and Postgres and leaves nothing behind.

use demo::{DemoOptions, ProgressStyle};
use std::time::Duration;

fn nats_url() -> String {
    std::env::var("REPLICATOR_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

#[tokio::test]
async fn the_demo_replicates_verifies_every_replica_and_removes_what_it_created() {
    let database_url = std::env::var(testkit::db::SERVER_URL_ENV)
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let options = DemoOptions {
        repositories: 4,
        nats_url: nats_url(),
        database_url,
        progress: ProgressStyle::Quiet,
        timeout: Duration::from_secs(60),
        ..DemoOptions::default()
    };
    let report = demo::run(options, std::future::pending()).await.unwrap();
    assert!(report.passed(), "{report}");
    assert_eq!(report.unfinished, 0);
    assert_eq!(report.dead_letters, 0);
    assert_eq!(report.checks.len(), 4);
    assert_eq!(report.replica_tally(), (8, 8));
    assert_eq!(report.jobs_published(), 8 + 8 + 3 + 3);
    assert_eq!(report.measurements.total("completed"), 22);
    assert!(report.kept.is_none());

    // Nothing is left behind: directory, database, streams.
    let dir = std::env::temp_dir().join(format!("gitaly-replicator-demo-{}", report.run_id));
    assert!(!dir.exists(), "{} is left", dir.display());
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = format!("DEMO_{}", report.run_id.to_ascii_uppercase());
    assert!(
        js.get_stream(&stream).await.is_err(),
        "stream {stream} is left"
    );
    let admin = testkit::db::TestDatabase::new().await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(format!("gitaly_replicator_demo_{}", report.run_id))
        .fetch_one(&admin.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the demo database is left");
}

#[test]
fn with_tls_the_storage_nodes_are_reached_over_tls_and_every_replica_matches() {
    let database_url = std::env::var(testkit::db::SERVER_URL_ENV)
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gitaly-replicator-demo"))
        .args(["--tls", "--repositories", "3", "--nats-url", &nats_url()])
        .args(["--database-url", &database_url])
        // The CA is the run's own: nothing else may vouch for the nodes.
        .env_remove(gitaly_replicator::SSL_CERT_DIR)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stderr.matches("tls://127.0.0.1:").count(),
        3,
        "the nodes are listed with their tls:// addresses: {stderr}"
    );
    assert!(!stderr.contains("tcp://"), "{stderr}");
    assert!(stdout.contains("PASS: every replica matches"), "{stdout}");
}

/// Two demos at once, one with `--tls`, ten times in a row: each binds its
/// own ports (the metrics listener is bound once and handed to the service),
/// so neither can take a port the other chose.
#[test]
fn two_demos_run_at_once_and_both_pass_ten_times_in_a_row() {
    let database_url = std::env::var(testkit::db::SERVER_URL_ENV)
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let demo = |tls: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gitaly-replicator-demo"));
        if tls {
            command.arg("--tls");
        }
        command
            .args(["--repositories", "3", "--nats-url", &nats_url()])
            .args(["--database-url", &database_url])
            .env_remove(gitaly_replicator::SSL_CERT_DIR)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    for round in 1..=10 {
        let running = [demo(true), demo(false)];
        for (child, tls) in running.into_iter().zip([true, false]) {
            let out = child.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stdout.contains("PASS: every replica matches"),
                "round {round}, tls {tls}: {stdout}\n{stderr}"
            );
        }
    }
}

/// `--keep` keeps the run's config readable by its owner alone and its CA
/// with `--tls`, and prints the one command that removes what it kept;
/// that command removes the streams, the database and the directory.
#[test]
fn keep_prints_the_command_that_removes_what_it_kept_and_that_command_does() {
    let database_url = std::env::var(testkit::db::SERVER_URL_ENV)
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let demo = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_gitaly-replicator-demo"))
            .args(args)
            .args(["--nats-url", &nats_url(), "--database-url", &database_url])
            .output()
            .unwrap()
    };
    let out = demo(&["--keep", "--tls", "--repositories", "3"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = stdout
        .split("gitaly-replicator-demo --clean ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no --clean command in\n{stdout}"))
        .to_owned();
    let dir = std::env::temp_dir().join(format!("gitaly-replicator-demo-{id}"));
    let config = dir.join("config.toml");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", config.display());
    assert!(
        dir.join("ca.pem").exists(),
        "the CA of a --tls run is not kept"
    );
    assert!(
        stdout.contains(&format!("SSL_CERT_FILE={}", dir.join("ca.pem").display())),
        "{stdout}"
    );

    let out = demo(&["--clean", &id]);
    let cleaned = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cleaned}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        cleaned.contains(&format!("removed stream DEMO_{}", id.to_ascii_uppercase())),
        "{cleaned}"
    );
    assert!(
        cleaned.contains(&format!("removed database gitaly_replicator_demo_{id}")),
        "{cleaned}"
    );
    assert!(!dir.exists(), "{} is left", dir.display());
    let left = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = async_nats::connect(nats_url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut left = Vec::new();
        for stream in [
            format!("DEMO_{}", id.to_ascii_uppercase()),
            format!("DEMO_{}_DEAD", id.to_ascii_uppercase()),
        ] {
            if js.get_stream(&stream).await.is_ok() {
                left.push(stream);
            }
        }
        left
    });
    assert!(left.is_empty(), "{left:?}");
    // Again: nothing is left, and that is no error.
    let out = demo(&["--clean", &id]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing of run"));
}

/// A malformed URL is a usage mistake (64), not an outage (69).
#[test]
fn a_malformed_url_is_a_usage_error() {
    for args in [
        ["--nats-url", "bogus://x"],
        ["--database-url", "mysql://root@127.0.0.1/x"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gitaly-replicator-demo"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(args[0]), "{args:?}: {stderr}");
    }
}
