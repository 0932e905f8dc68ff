//! `dataloss` as a process against real Postgres and NATS: outdated and
//! missing replicas are listed with the storages that hold the latest
//! generation and whether a job waits in the work stream for them.

use crate::cli::{all, cli, stderr, stdout};
use crate::common::cluster::Cluster;
use serde_json::{Value, json};
use std::time::Duration;
use testkit::recording_gitaly::Behaviour;

/// A repository row and its replica rows (storage, generation).
async fn repository(c: &Cluster, path: &str, generation: i64, replicas: &[(&str, i64)]) -> i64 {
    let pool = c.db.store.pool();
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO repositories (virtual_storage, relative_path, generation)
         VALUES ($1, $2, $3) RETURNING repository_id",
    )
    .bind(c.vs())
    .bind(path)
    .bind(generation)
    .fetch_one(pool)
    .await
    .unwrap();
    for (storage, g) in replicas {
        set_replica(c, id, path, storage, *g).await;
    }
    id
}

async fn set_replica(c: &Cluster, id: i64, path: &str, storage: &str, generation: i64) {
    sqlx::query(
        "INSERT INTO storage_repositories (repository_id, virtual_storage, relative_path, storage, generation)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (virtual_storage, relative_path, storage) DO UPDATE SET generation = $5",
    )
    .bind(id)
    .bind(c.vs())
    .bind(path)
    .bind(storage)
    .bind(generation)
    .execute(c.db.store.pool())
    .await
    .unwrap();
}

fn dataloss_json(c: &Cluster, args: &[&str]) -> Value {
    let mut argv = vec!["dataloss", "--json"];
    argv.extend_from_slice(args);
    let o = cli(&c.toml, &argv, None);
    assert!(o.status.success(), "{}", all(&o));
    serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", all(&o)))
}

/// The repositories listed for the cluster's virtual storage, by path.
fn listed(report: &Value, vs: &str) -> Vec<Value> {
    let storages = report["virtual_storages"].as_array().unwrap();
    assert_eq!(storages.len(), 1, "{report}");
    assert_eq!(storages[0]["name"], vs);
    storages[0]["repositories"].as_array().unwrap().clone()
}

fn by_path<'a>(repos: &'a [Value], path: &str) -> &'a Value {
    repos
        .iter()
        .find(|r| r["relative_path"] == path)
        .unwrap_or_else(|| panic!("{path} not listed: {repos:?}"))
}

fn storage<'a>(repo: &'a Value, name: &str) -> &'a Value {
    repo["storages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["storage"] == name)
        .unwrap_or_else(|| panic!("{name} not in {repo}"))
}

#[tokio::test]
async fn dataloss_lists_outdated_and_missing_replicas_with_latest_holders_and_pending_jobs() {
    let c = Cluster::start(3).await;
    let vs = c.vs().to_owned();
    // gitaly-3 one generation behind; a job waits for it.
    let a = repository(
        &c,
        "a.git",
        2,
        &[("gitaly-1", 2), ("gitaly-2", 2), ("gitaly-3", 1)],
    )
    .await;
    // Only gitaly-1 holds it; no job for b.git (the job for gitaly-2 is another repository's).
    let b = repository(&c, "b.git", 1, &[("gitaly-1", 1)]).await;
    // Fully replicated.
    repository(
        &c,
        "c.git",
        3,
        &[("gitaly-1", 3), ("gitaly-2", 3), ("gitaly-3", 3)],
    )
    .await;
    // The latest generation only on a storage no longer configured: unavailable.
    let d = repository(
        &c,
        "d.git",
        4,
        &[
            ("gitaly-1", 3),
            ("gitaly-2", 3),
            ("gitaly-3", 3),
            ("gitaly-old", 4),
        ],
    )
    .await;
    for (path, target) in [("a.git", "gitaly-3"), ("c.git", "gitaly-2")] {
        c.publish(&c.job(json!({"change": "update", "relative_path": path,
            "target_node_storage": target, "source_node_storage": "gitaly-1"})))
            .await;
    }
    // A maintenance job waits for d.git on gitaly-2.
    c.publish(&c.job(
        json!({"change": "cleanup", "relative_path": "d.git", "target_node_storage": "gitaly-2"}),
    ))
    .await;

    // By default, as Praefect: only repositories no storage can serve.
    let report = dataloss_json(&c, &[]);
    let repos = listed(&report, &vs);
    assert_eq!(repos.len(), 1, "{report:#}");
    let dr = by_path(&repos, "d.git");
    assert_eq!(dr["repository_id"], d);
    assert_eq!(dr["unavailable"], true);
    assert_eq!(dr["generation"], 4);
    assert_eq!(dr["latest_generation_on"], json!(["gitaly-old"]));
    assert_eq!(dr["outdated"], json!(["gitaly-1", "gitaly-2", "gitaly-3"]));
    assert_eq!(dr["missing"], json!([]));
    assert_eq!(storage(dr, "gitaly-old")["configured"], false);
    assert_eq!(storage(dr, "gitaly-old")["assigned"], false);
    assert_eq!(storage(dr, "gitaly-2")["pending_job"], true);
    assert_eq!(
        storage(dr, "gitaly-2")["pending_changes"],
        json!(["cleanup"])
    );
    assert_eq!(storage(dr, "gitaly-1")["pending_job"], false);

    let report = dataloss_json(&c, &["--partially-unavailable", "--virtual-storage", &vs]);
    let repos = listed(&report, &vs);
    let paths: Vec<&str> = repos
        .iter()
        .map(|r| r["relative_path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["a.git", "b.git", "d.git"], "{report:#}");

    let ar = by_path(&repos, "a.git");
    assert_eq!(ar["repository_id"], a);
    assert_eq!(ar["unavailable"], false);
    assert_eq!(ar["generation"], 2);
    assert_eq!(ar["latest_generation_on"], json!(["gitaly-1", "gitaly-2"]));
    assert_eq!(ar["outdated"], json!(["gitaly-3"]));
    assert_eq!(ar["missing"], json!([]));
    let a3 = storage(ar, "gitaly-3");
    assert_eq!(a3["status"], "outdated");
    assert_eq!(a3["generation"], 1);
    assert_eq!(a3["behind_by"], 1);
    assert_eq!(a3["assigned"], true);
    assert_eq!(a3["pending_job"], true);
    assert_eq!(a3["pending_changes"], json!(["update"]));

    let br = by_path(&repos, "b.git");
    assert_eq!(br["repository_id"], b);
    assert_eq!(br["unavailable"], false);
    assert_eq!(br["latest_generation_on"], json!(["gitaly-1"]));
    assert_eq!(br["outdated"], json!([]));
    assert_eq!(br["missing"], json!(["gitaly-2", "gitaly-3"]));
    for s in ["gitaly-2", "gitaly-3"] {
        let missing = storage(br, s);
        assert_eq!(missing["status"], "missing");
        assert_eq!(missing["generation"], Value::Null);
        assert_eq!(missing["behind_by"], 2);
        assert_eq!(missing["pending_job"], false, "{missing}");
    }

    // The table shows the same lagging replicas, one row each.
    let o = cli(&c.toml, &["dataloss", "--partially-unavailable"], None);
    assert!(o.status.success(), "{}", all(&o));
    let table = stdout(&o);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(table.starts_with("VIRTUAL STORAGE"), "{table}");
    let row = |path: &str, storage: &str| {
        rows.iter()
            .find(|r| r[1] == path && r[5] == storage)
            .unwrap_or_else(|| panic!("no row for {path} on {storage}:\n{table}"))
            .clone()
    };
    assert_eq!(
        row("a.git", "gitaly-3"),
        [
            vs.as_str(),
            "a.git",
            "yes",
            "2",
            "gitaly-1,gitaly-2",
            "gitaly-3",
            "outdated",
            "1",
            "yes",
            "yes",
            "(update)",
            "no"
        ]
    );
    assert_eq!(
        row("b.git", "gitaly-2"),
        [
            vs.as_str(),
            "b.git",
            "yes",
            "1",
            "gitaly-1",
            "gitaly-2",
            "missing",
            "2",
            "yes",
            "no",
            "no"
        ]
    );
    assert_eq!(row("d.git", "gitaly-1")[2], "no");
    assert_eq!(rows.len(), 1 + 2 + 3, "{table}");

    // A scan limit of nothing leaves the pending flag unknown, and says so.
    let o = cli(
        &c.toml,
        &[
            "dataloss",
            "--json",
            "--partially-unavailable",
            "--scan-limit",
            "0",
        ],
        None,
    );
    assert!(o.status.success(), "{}", all(&o));
    let limited: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        storage(by_path(&listed(&limited, &vs), "a.git"), "gitaly-3")["pending_job"],
        Value::Null
    );
    assert!(all(&o).contains("--scan-limit"), "{}", all(&o));

    let o = cli(&c.toml, &["dataloss", "--virtual-storage", "nope"], None);
    assert!(!o.status.success());
    assert!(all(&o).contains("unknown virtual storage"), "{}", all(&o));

    // Brought up to date, nothing is listed.
    set_replica(&c, a, "a.git", "gitaly-3", 2).await;
    for s in ["gitaly-2", "gitaly-3"] {
        set_replica(&c, b, "b.git", s, 1).await;
    }
    for s in ["gitaly-1", "gitaly-2", "gitaly-3"] {
        set_replica(&c, d, "d.git", s, 4).await;
    }
    let report = dataloss_json(&c, &["--partially-unavailable"]);
    assert_eq!(listed(&report, &vs), Vec::<Value>::new(), "{report:#}");
    let o = cli(&c.toml, &["dataloss", "--partially-unavailable"], None);
    assert!(o.status.success(), "{}", all(&o));
    assert_eq!(stdout(&o).lines().count(), 1, "{}", all(&o));
    assert!(all(&o).contains("fully available"), "{}", all(&o));
}

#[tokio::test]
async fn dataloss_follows_praefects_repository_assignments() {
    let c = Cluster::start(3).await;
    let vs = c.vs().to_owned();
    // Praefect's table: with rows for a repository, only those storages are
    // assigned; without, every configured storage is.
    sqlx::query(
        "CREATE TABLE repository_assignments (
            virtual_storage TEXT NOT NULL,
            relative_path TEXT NOT NULL,
            storage TEXT NOT NULL,
            repository_id BIGINT NOT NULL REFERENCES repositories ON DELETE CASCADE,
            PRIMARY KEY (virtual_storage, relative_path, storage)
        )",
    )
    .execute(c.db.store.pool())
    .await
    .unwrap();
    let assigned = repository(&c, "assigned.git", 1, &[("gitaly-1", 1), ("gitaly-2", 1)]).await;
    repository(&c, "unassigned.git", 1, &[("gitaly-1", 1), ("gitaly-2", 1)]).await;
    for s in ["gitaly-1", "gitaly-2", "gitaly-elsewhere"] {
        sqlx::query(
            "INSERT INTO repository_assignments (virtual_storage, relative_path, storage, repository_id)
             VALUES ($1, 'assigned.git', $2, $3)",
        )
        .bind(&vs)
        .bind(s)
        .bind(assigned)
        .execute(c.db.store.pool())
        .await
        .unwrap();
    }
    let report = dataloss_json(&c, &["--partially-unavailable"]);
    let repos = listed(&report, &vs);
    // assigned.git has its replicas on its assigned storages (an assignment
    // to an unconfigured storage does not count); unassigned.git lacks gitaly-3.
    assert_eq!(repos.len(), 1, "{report:#}");
    let r = by_path(&repos, "unassigned.git");
    assert_eq!(r["missing"], json!(["gitaly-3"]));
    assert_eq!(storage(r, "gitaly-3")["assigned"], true);
}

#[tokio::test]
async fn a_replica_with_a_pending_delete_replica_cannot_serve_its_repository() {
    let c = Cluster::start(2).await;
    let vs = c.vs().to_owned();
    repository(&c, "e.git", 2, &[("gitaly-1", 2), ("gitaly-2", 1)]).await;
    // Available while gitaly-1 may serve it: listed only when asked for more.
    assert_eq!(listed(&dataloss_json(&c, &[]), &vs), Vec::<Value>::new());
    // As in Praefect's valid_primaries, a replica about to be deleted does not count.
    c.publish(&c.job(json!({"change": "delete_replica", "relative_path": "e.git", "target_node_storage": "gitaly-1"})))
        .await;
    let report = dataloss_json(&c, &[]);
    let repos = listed(&report, &vs);
    assert_eq!(repos.len(), 1, "{report:#}");
    let e = by_path(&repos, "e.git");
    assert_eq!(e["unavailable"], true);
    assert_eq!(e["latest_generation_on"], json!(["gitaly-1"]));
    assert_eq!(
        storage(e, "gitaly-1")["pending_changes"],
        json!(["delete_replica"])
    );
    assert_eq!(storage(e, "gitaly-2")["pending_job"], false);
}

/// A replica whose job went to the dead letters: `dataloss` says so (no
/// pending job, a dead one), in the table and in JSON, and `dead list
/// --json` gives its counts as numbers.
#[tokio::test]
async fn a_dead_lettered_job_shows_as_dead_not_as_nothing_pending() {
    let c = Cluster::start(2).await;
    let vs = c.vs().to_owned();
    repository(&c, "e.git", 2, &[("gitaly-1", 2), ("gitaly-2", 1)]).await;
    c.node(2).respond(
        "ReplicateRepository",
        Behaviour::fail(tonic::Code::InvalidArgument, "refused"),
    );
    let consumer = c.consumer().await;
    c.publish(&c.job(json!({"change": "update", "relative_path": "e.git",
        "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"})))
        .await;
    assert!(
        c.eventually(Duration::from_secs(10), || async {
            c.dead_letters().await.len() == 1
        })
        .await
    );
    consumer.stop().await.unwrap();

    let report = dataloss_json(&c, &["--partially-unavailable"]);
    let repos = listed(&report, &vs);
    let e = by_path(&repos, "e.git");
    assert_eq!(storage(e, "gitaly-2")["pending_job"], false, "{e:#}");
    assert_eq!(
        storage(e, "gitaly-2")["dead_changes"],
        json!(["update"]),
        "{e:#}"
    );
    assert_eq!(storage(e, "gitaly-1")["dead_changes"], json!([]), "{e:#}");

    let o = cli(&c.toml, &["dataloss", "--partially-unavailable"], None);
    assert!(o.status.success(), "{}", all(&o));
    let table = stdout(&o);
    assert!(
        table
            .lines()
            .next()
            .unwrap_or_default()
            .ends_with("DEAD JOB"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.contains("e.git"))
        .unwrap_or_default();
    assert!(
        row.split_whitespace()
            .collect::<Vec<_>>()
            .ends_with(&["no", "yes", "(update)"]),
        "{table}"
    );
    assert!(stderr(&o).contains("dead list"), "{}", stderr(&o));

    let o = cli(&c.toml, &["dead", "list", "--json"], None);
    assert!(o.status.success(), "{}", all(&o));
    let line: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert!(line["attempts"].is_u64(), "{line}");
    assert!(line["deliveries"].is_u64(), "{line}");
}
