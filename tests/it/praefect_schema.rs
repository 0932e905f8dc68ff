//! The schema is Praefect's: `migrate` and `run` refuse an empty database
//! (Praefect's own migrations must create its tables) and one older than
//! Praefect 14.5, naming what to run; `migrate --standalone` sets up a
//! cluster without Praefect.

use crate::common::cluster::{NodeSpec, TestNames, config_toml};
use crate::common::db::TestDatabase;
use crate::common::process::ReplicatorProcess;

fn toml(db: &TestDatabase) -> String {
    let node = NodeSpec {
        storage: "gitaly-1".into(),
        address: "tcp://127.0.0.1:1".into(),
        token: "t".into(),
    };
    // No broker: nothing is provisioned there; the database decides first.
    config_toml(&TestNames::new(), &[node], &db.url, "nats://127.0.0.1:1")
}

#[tokio::test]
async fn migrate_refuses_an_empty_database_and_standalone_creates_the_store() {
    let db = TestDatabase::empty().await;
    let toml = toml(&db);

    let (code, stderr) = ReplicatorProcess::spawn(&toml, &["migrate"]).wait().await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("holds no Praefect schema"), "{stderr}");
    assert!(stderr.contains("sql-migrate"), "{stderr}");

    let (code, stderr) = ReplicatorProcess::spawn(&toml, &["migrate", "--standalone"])
        .wait()
        .await;
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = ReplicatorProcess::spawn(&toml, &["migrate"]).wait().await;
    assert_eq!(code, Some(0), "{stderr}");
}

#[tokio::test]
async fn run_refuses_at_start_a_praefect_schema_that_is_too_old() {
    let db = TestDatabase::empty().await;
    sqlx::raw_sql(
        "CREATE TABLE schema_migrations (id TEXT PRIMARY KEY, applied_at TIMESTAMPTZ);
         INSERT INTO schema_migrations VALUES ('20210727085659_repository_ids', now());",
    )
    .execute(db.store.pool())
    .await
    .unwrap();

    let started = std::time::Instant::now();
    let (code, stderr) = ReplicatorProcess::spawn(&toml(&db), &["run"]).wait().await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("older than Praefect 14.5"), "{stderr}");
    assert!(stderr.contains("20210727085659_repository_ids"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}
