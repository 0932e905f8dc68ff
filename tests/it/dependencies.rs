//! `run` waits for NATS and Postgres instead of exiting: at start, and when
//! either goes away later. The binary runs as a process against a private
//! nats-server and a private Postgres, both stopped and started here.

use crate::common::cluster::{NodeSpec, TestNames, config_toml, dead_letters, work_messages};
use crate::common::nats_server::PrivateNats;
use crate::common::process::{ReplicatorProcess, with_ops_on_any_port};
use gitaly_replicator::{Config, Job, Layout, Publisher, RepositoryStore};
use serde_json::json;
use std::time::Duration;
use testkit::eventually;
use testkit::http::{get, get_when_up};
use testkit::metrics::Samples;
use testkit::postgres_server::PrivatePostgres;
use testkit::recording_gitaly::{Behaviour, RecordingGitaly, RunningGitaly};

struct Parts {
    names: TestNames,
    nodes: Vec<RunningGitaly>,
    toml: String,
}

async fn parts(nats: &PrivateNats, pg: &PrivatePostgres, extra_top_level: &str) -> Parts {
    let names = TestNames::new();
    let mut nodes = Vec::new();
    let mut specs = Vec::new();
    for i in 1..=2 {
        let token = format!("token-{i}");
        let node = RecordingGitaly::new(Some(&token)).serve().await.unwrap();
        specs.push(NodeSpec {
            storage: format!("gitaly-{i}"),
            address: node.address(),
            token,
        });
        nodes.push(node);
    }
    let toml = with_ops_on_any_port(&config_toml(&names, &specs, &pg.url(), &nats.url())).replace(
        "prometheus_listen_addr = \"127.0.0.1:0\"\n",
        &format!("prometheus_listen_addr = \"127.0.0.1:0\"\n{extra_top_level}"),
    );
    Parts { names, nodes, toml }
}

async fn dependency_up(port: u16, dependency: &str) -> f64 {
    let (_, body) = get(port, "/metrics").await;
    Samples::parse(&body).sum(
        "gitaly_replicator_dependency_up",
        &[("dependency", dependency)],
    )
}

/// Whether gitaly-2's replica of `path` is at `generation` in Postgres.
async fn replicated(store: &RepositoryStore, vs: &str, path: &str, generation: i64) -> bool {
    store.generation(vs, path, "gitaly-2").await.ok().flatten() == Some(generation)
}

fn update(vs: &str, path: &str) -> Job {
    Job::from_value(&json!({
        "change": "update",
        "virtual_storage": vs,
        "relative_path": path,
        "source_node_storage": "gitaly-1",
        "target_node_storage": "gitaly-2",
    }))
    .unwrap()
}

#[tokio::test]
async fn run_waits_for_nats_and_postgres_and_loses_nothing_when_postgres_stops() {
    let mut nats = PrivateNats::not_started();
    let mut pg = PrivatePostgres::init();
    // The store's tables first: `run` does not create them.
    pg.start_again();
    let store = RepositoryStore::new(sqlx::PgPool::connect(&pg.url()).await.unwrap());
    store.migrate().await.unwrap();
    store.pool().close().await;
    pg.stop();
    let p = parts(&nats, &pg, "").await;
    let process = ReplicatorProcess::run(&p.toml);
    let ops_port = process.ops_port().await;

    // Both down: alive, not ready, and the metric says what is missing.
    let (status, _) = get_when_up(ops_port, "/health/ready").await;
    assert_eq!(status, 503);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(get(ops_port, "/health/live").await.0, 200);
    assert_eq!(get(ops_port, "/health/ready").await.0, 503);
    assert_eq!(dependency_up(ops_port, "nats").await, 0.0);
    assert_eq!(dependency_up(ops_port, "postgres").await, 0.0);
    // Each try at Postgres lasts up to database.connect_timeout (5 s).
    assert!(
        eventually(Duration::from_secs(10), || async {
            let log = process.stderr.lock().unwrap().clone();
            log.contains("waiting for NATS") && log.contains("waiting for Postgres")
        })
        .await,
        "{}",
        process.stderr.lock().unwrap()
    );

    pg.start_again();
    nats.start_again().await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            get(ops_port, "/health/ready").await.0 == 200
        })
        .await,
        "not ready after both came up: {}",
        process.stderr.lock().unwrap()
    );
    assert_eq!(dependency_up(ops_port, "nats").await, 1.0);
    assert_eq!(dependency_up(ops_port, "postgres").await, 1.0);

    let config = Config::from_toml_str(&p.toml).unwrap();
    let vs = p.names.virtual_storage.clone();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let layout = Layout::from_config(&config);
    let publisher = Publisher::new(js.clone(), layout.clone());
    let store = RepositoryStore::new(sqlx::PgPool::connect(&pg.url()).await.unwrap());
    let paths: Vec<String> = (0..40).map(|i| format!("r-{i}.git")).collect();
    for (i, path) in paths.iter().enumerate() {
        let generation = i as i64 + 1;
        store
            .create_repository(&vs, path, "gitaly-1", generation, &["gitaly-1"])
            .await
            .unwrap();
    }
    for path in &paths[..10] {
        publisher.publish(&update(&vs, path), None).await.unwrap();
    }
    for (i, path) in paths[..10].iter().enumerate() {
        assert!(
            eventually(Duration::from_secs(20), || {
                replicated(&store, &vs, path, i as i64 + 1)
            })
            .await,
            "{path} was not replicated after start-up"
        );
    }

    // Postgres goes away for 5 s with jobs in their Gitaly call, and more
    // keep coming.
    let target = &p.nodes[1].gitaly;
    target.respond(
        "ReplicateRepository",
        Behaviour::delay(Duration::from_millis(1500)).times(10),
    );
    let before = target.calls_to("ReplicateRepository").len();
    for path in &paths[10..20] {
        publisher.publish(&update(&vs, path), None).await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            target.calls_to("ReplicateRepository").len() >= before + 5
        })
        .await
    );
    pg.stop();
    assert!(
        eventually(Duration::from_secs(10), || async {
            get(ops_port, "/health/ready").await.0 == 503
        })
        .await
    );
    assert_eq!(dependency_up(ops_port, "postgres").await, 0.0);
    for path in &paths[20..] {
        publisher.publish(&update(&vs, path), None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    pg.start_again();
    assert!(pg.wait_ready(Duration::from_secs(10)).await);
    let store = RepositoryStore::new(sqlx::PgPool::connect(&pg.url()).await.unwrap());
    for (i, path) in paths.iter().enumerate() {
        let generation = i as i64 + 1;
        assert!(
            eventually(Duration::from_secs(60), || replicated(
                &store, &vs, path, generation
            ))
            .await,
            "{path} not replicated after Postgres came back: {}",
            process.stderr.lock().unwrap()
        );
    }
    assert!(
        eventually(Duration::from_secs(20), || async {
            work_messages(&js, &layout).await == 0
        })
        .await,
        "jobs left in the work stream"
    );
    let dead = dead_letters(&js, &layout).await;
    assert!(dead.is_empty(), "{} dead-lettered", dead.len());
    assert!(p.nodes[1].gitaly.calls_to("ReplicateRepository").len() >= paths.len());
    assert_eq!(get(ops_port, "/health/ready").await.0, 200);

    process.signal("TERM");
    let (code, stderr) = process.wait().await;
    assert_eq!(code, Some(0), "{stderr}");
}

#[tokio::test]
async fn past_startup_timeout_run_exits_69_naming_what_is_missing() {
    let nats = PrivateNats::not_started();
    let pg = PrivatePostgres::init();
    let p = parts(&nats, &pg, "startup_timeout = \"3s\"\n").await;
    let started = std::time::Instant::now();
    let (code, stderr) = ReplicatorProcess::run(&p.toml).wait().await;
    let took = started.elapsed();
    assert_eq!(code, Some(69), "{stderr}");
    // Honoured to within a second, not given up a backoff early.
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(4),
        "exited after {took:?}"
    );
    assert!(
        stderr.contains("NATS and Postgres did not answer within startup_timeout (3s)"),
        "{stderr}"
    );
    // Each one's cause, named once.
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(last.matches("cannot connect to NATS").count(), 1, "{last}");
    assert_eq!(
        last.matches("cannot connect to Postgres").count(),
        1,
        "{last}"
    );
    assert_eq!(last.matches("Connection refused").count(), 2, "{last}");

    // With Postgres up, only NATS is named.
    let db = crate::common::db::TestDatabase::new().await;
    let toml = p.toml.replace(&pg.url(), &db.url);
    let (code, stderr) = ReplicatorProcess::run(&toml).wait().await;
    assert_eq!(code, Some(69), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("NATS did not answer within startup_timeout (3s): cannot connect to NATS"),
        "{last}"
    );
    assert!(!last.contains("Postgres"), "{last}");
}
