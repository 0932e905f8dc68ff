//! `[database]` behind PgBouncer in transaction mode, the session connection
//! (`[database.session_pooled]`) straight to Postgres, as Praefect
//! deployments run: the store's statements survive server connections being
//! shared, and the repository locks still exclude. The whole consumer module
//! also runs this way with `REPLICATOR_TEST_VIA_PGBOUNCER` set (CI does).

use std::str::FromStr;
use std::time::Duration;

use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use testkit::pgbouncer::PgBouncer;
use testkit::recording_gitaly::Behaviour;

use crate::common::cluster::{Cluster, db_port};
use crate::common::db::TestDatabase;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn sqlx_statements_break_on_a_shared_server_connection_without_transaction_mode() {
    // Why the store runs each statement in a transaction of its own there:
    // with sqlx's defaults, clients that share PgBouncer's one server
    // connection trip over each other's prepared statements.
    let db = TestDatabase::new().await;
    let bouncer = PgBouncer::start(db_port(&db.url), "transaction", 1);
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_port(Some(bouncer.port)).unwrap();
    // PgBouncer refuses the startup parameter sqlx sends by default.
    let options = sqlx::postgres::PgConnectOptions::from_str(url.as_str())
        .unwrap()
        .extra_float_digits(None);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    let queries = (0..40).map(|i| {
        let pool = pool.clone();
        async move {
            let sql = ["SELECT $1::int", "SELECT $1::int + 1", "SELECT $1::int * 2"][i % 3];
            sqlx::query_scalar::<_, i32>(sql)
                .bind(i as i32)
                .fetch_one(&pool)
                .await
        }
    });
    let results = futures::future::join_all(queries).await;
    let broken: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| e.to_string()))
        .collect();
    assert!(
        broken.iter().any(|e| e.contains("prepared statement")),
        "expected prepared-statement errors, got {broken:?}"
    );
}

#[tokio::test]
async fn updates_and_deletes_through_one_shared_server_connection_all_take_effect() {
    // One server connection for every client: any statement that needed its
    // own session would break here.
    let c = Cluster::start_through_pgbouncer(2, 1).await;
    assert!(c.toml.contains("session_pooled"));
    for r in 0..20 {
        c.db.store
            .create_repository(
                c.vs(),
                &format!("r{r}.git"),
                "gitaly-1",
                r + 1,
                &["gitaly-1"],
            )
            .await
            .unwrap();
    }
    c.node(2)
        .respond("*", Behaviour::delay(Duration::from_millis(5)));
    let a = c.consumer().await;
    let b = c.consumer().await;
    let mut jobs = Vec::new();
    for r in 0..20 {
        jobs.push(c.job(
            json!({"change": "update", "relative_path": format!("r{r}.git"),
            "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}),
        ));
        jobs.push(c.job(
            json!({"change": "optimize_repository", "relative_path": format!("r{r}.git"),
            "target_node_storage": "gitaly-2"}),
        ));
    }
    for r in 15..20 {
        jobs.push(c.job(
            json!({"change": "delete_replica", "relative_path": format!("r{r}.git"),
            "target_node_storage": "gitaly-2"}),
        ));
    }
    for r in c.publisher().publish_many(&jobs, 100).await {
        r.unwrap();
    }
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    for r in 0..20i64 {
        let expected = (r < 15).then_some(r + 1);
        assert_eq!(
            c.db.store
                .generation(c.vs(), &format!("r{r}.git"), "gitaly-2")
                .await
                .unwrap(),
            expected,
            "r{r}.git"
        );
    }
    assert_eq!(
        c.node(2).max_overlap(),
        1,
        "two jobs of one repository overlapped: the locks did not exclude"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert!(c.dead_letters().await.is_empty());
}
