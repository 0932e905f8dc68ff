//! A fleet of `run` processes on one consumer, where one is killed, stopped
//! or slowed down: only its own repositories wait, a stopped one's are taken
//! over within its lease and its late writes are fenced, and a slow database
//! drops no lock session.
//!
//! Each process reaches the target storage through a recording node of its
//! own (the same storage name, another address), so each process's calls
//! are counted by a node, not by the service's metrics.

use crate::common::cluster::Cluster;
use crate::common::process::ReplicatorProcess;
use serde_json::json;
use std::time::Duration;
use testkit::delay_proxy::DelayProxy;
use testkit::recording_gitaly::{Behaviour, RecordingGitaly, RunningGitaly};
use tokio::time::Instant;

/// Recording nodes for `gitaly-2`, one per process, the cluster's own first;
/// the extra servers run as long as this lives.
struct TargetNodes {
    nodes: Vec<RecordingGitaly>,
    addresses: Vec<String>,
    _extra: Vec<RunningGitaly>,
}

impl TargetNodes {
    async fn start(c: &Cluster, n: usize, answer_after: Duration) -> TargetNodes {
        let mut extra = Vec::new();
        for _ in 1..n {
            extra.push(RecordingGitaly::new(Some("token-2")).serve().await.unwrap());
        }
        let nodes: Vec<RecordingGitaly> = std::iter::once(c.node(2).clone())
            .chain(extra.iter().map(|r| r.gitaly.clone()))
            .collect();
        for node in &nodes {
            node.respond("*", Behaviour::delay(answer_after));
        }
        let addresses = std::iter::once(c.nodes[1].address())
            .chain(extra.iter().map(RunningGitaly::address))
            .collect();
        TargetNodes {
            nodes,
            addresses,
            _extra: extra,
        }
    }

    /// The cluster's TOML for process `i`: `gitaly-2` at its own node, and
    /// its `[database]` connections named `app` (for the audit of writes).
    fn toml(&self, c: &Cluster, i: usize, app: &str) -> String {
        let toml = c.toml.replace(&c.nodes[1].address(), &self.addresses[i]);
        toml.replacen(
            &format!("url = \"{}\"", c.db.url),
            &format!("url = \"{}?application_name={app}\"", c.db.url),
            1,
        )
    }
}

/// Calls `node` received in `[from, to)`.
fn calls_between(node: &RecordingGitaly, from: Instant, to: Instant) -> usize {
    node.calls()
        .iter()
        .filter(|c| c.received_at >= from && c.received_at < to)
        .count()
}

#[tokio::test]
async fn a_killed_process_stalls_only_its_own_repositories() {
    // Redeliveries of the killed process's jobs come after the measurement:
    // it measures what the killed process's lock session costs the others.
    let c = Cluster::start_with(2, |t| {
        *t = t.replace("ack_wait = \"5s\"", "ack_wait = \"60s\"");
    })
    .await;
    let t = TargetNodes::start(&c, 4, Duration::from_millis(50)).await;
    let jobs: Vec<_> = (0..40_000)
        .map(|r| {
            c.job(json!({"change": "cleanup", "relative_path": format!("k{r}.git"), "target_node_storage": "gitaly-2"}))
        })
        .collect();
    for r in c.publisher().publish_many(&jobs, 500).await {
        r.unwrap();
    }
    let processes: Vec<ReplicatorProcess> = (0..4)
        .map(|i| ReplicatorProcess::run(&t.toml(&c, i, &format!("fleet-{i}"))))
        .collect();
    // Every process works, then 6 s of steady draining.
    assert!(
        c.eventually(Duration::from_secs(60), || async {
            t.nodes.iter().all(|n| n.call_count() > 50)
        })
        .await,
        "not every process drained"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let killed_at = Instant::now();
    processes[0].signal("KILL");
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let window = Duration::from_secs(5);
    let others = &t.nodes[1..];
    let before: usize = others
        .iter()
        .map(|n| calls_between(n, killed_at - window, killed_at))
        .sum();
    let after: usize = others
        .iter()
        .map(|n| calls_between(n, killed_at, killed_at + window))
        .sum();
    let slowest_second = (0..5)
        .map(|s| {
            let from = killed_at + Duration::from_secs(s);
            others
                .iter()
                .map(|n| calls_between(n, from, from + Duration::from_secs(1)))
                .sum::<usize>()
        })
        .min()
        .unwrap_or(0);
    assert!(
        c.work_messages().await > 0,
        "the backlog ran out during the measurement"
    );
    let ratio = after as f64 / before.max(1) as f64;
    eprintln!(
        "others' rate: {:.0} jobs/s in the 5 s before the kill, {:.0} jobs/s in the 5 s after \
         (ratio {ratio:.2}, slowest second after: {slowest_second} jobs)",
        before as f64 / 5.0,
        after as f64 / 5.0
    );
    assert!(before > 0);
    assert!(
        ratio >= 0.7,
        "the others fell from {before} to {after} jobs in 5 s after one process was killed"
    );
}

/// Records every write to `storage_repositories` with the name of the
/// connection that made it and when.
async fn audit_writes(c: &Cluster) {
    sqlx::raw_sql(
        "CREATE TABLE write_audit (app TEXT, relative_path TEXT, generation BIGINT,
                                   at TIMESTAMPTZ DEFAULT clock_timestamp());
        CREATE FUNCTION audit_write() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO write_audit (app, relative_path, generation)
            VALUES (current_setting('application_name'), NEW.relative_path, NEW.generation);
            RETURN NEW;
        END $$;
        CREATE TRIGGER audit_write AFTER INSERT OR UPDATE ON storage_repositories
            FOR EACH ROW EXECUTE FUNCTION audit_write();",
    )
    .execute(c.db.store.pool())
    .await
    .unwrap();
}

/// Writes by connections named `app` to replicas under `prefix` at or after
/// `since` (a Postgres time).
async fn writes_by(c: &Cluster, app: &str, prefix: &str, since: time::OffsetDateTime) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM write_audit WHERE app = $1 AND relative_path LIKE $2 AND at >= $3",
    )
    .bind(app)
    .bind(format!("{prefix}%"))
    .bind(since)
    .fetch_one(c.db.store.pool())
    .await
    .unwrap()
}

async fn replicas_written(c: &Cluster, prefix: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM storage_repositories
        WHERE storage = 'gitaly-2' AND relative_path LIKE $1 AND generation = 1",
    )
    .bind(format!("{prefix}%"))
    .fetch_one(c.db.store.pool())
    .await
    .unwrap()
}

/// Publishes an update to `gitaly-2` of `n` new repositories `<prefix><i>.git`.
async fn publish_updates(c: &Cluster, prefix: &str, n: usize) {
    let mut jobs = Vec::new();
    for r in 0..n {
        let path = format!("{prefix}{r}.git");
        c.db.store
            .create_repository(c.vs(), &path, "gitaly-1", 1, &["gitaly-1"])
            .await
            .unwrap();
        jobs.push(c.job(json!({"change": "update", "relative_path": path, "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"})));
    }
    for r in c.publisher().publish_many(&jobs, 200).await {
        r.unwrap();
    }
}

async fn db_now(c: &Cluster) -> time::OffsetDateTime {
    sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(c.db.store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_stopped_process_loses_its_repositories_within_its_lease_and_writes_nothing_late() {
    let lease = Duration::from_secs(5);
    let c = Cluster::start_with(2, |t| {
        *t = t.replace(
            "\n[replication]\n",
            "\n[replication]\nlock_lease = \"5s\"\nmax_concurrent_jobs = 8\n",
        );
    })
    .await;
    audit_writes(&c).await;
    let t = TargetNodes::start(&c, 3, Duration::from_millis(200)).await;
    publish_updates(&c, "s", 600).await;
    let processes: Vec<ReplicatorProcess> = (0..3)
        .map(|i| ReplicatorProcess::run(&t.toml(&c, i, &format!("fleet-{i}"))))
        .collect();
    let stopped = &processes[0];
    assert!(t.nodes[0].wait_for_calls(20, Duration::from_secs(60)).await);
    stopped.signal("STOP");
    let stopped_at = Instant::now();
    assert!(
        replicas_written(&c, "s").await < 600,
        "drained before the stop"
    );
    let deadline = lease + Duration::from_secs(30);
    assert!(
        c.eventually(deadline, || async {
            replicas_written(&c, "s").await == 600
        })
        .await,
        "{} of 600 replicas written {:?} after one process was stopped",
        replicas_written(&c, "s").await,
        stopped_at.elapsed()
    );
    eprintln!(
        "every job took effect {:?} after the stop",
        stopped_at.elapsed()
    );
    let continued = db_now(&c).await;
    stopped.signal("CONT");
    // It finds its session ended and says so, once.
    let said = "lock session's lease ran out";
    assert!(
        c.eventually(Duration::from_secs(30), || async {
            stopped.stderr.lock().unwrap().contains(said)
        })
        .await,
        "the stopped process never noticed its lease ran out"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        writes_by(&c, "fleet-0", "s", continued).await,
        0,
        "a write of the stopped process landed after it continued"
    );
    // It takes part again, with a new session.
    let calls_before = t.nodes[0].call_count();
    publish_updates(&c, "n", 300).await;
    assert!(
        c.eventually(Duration::from_secs(60), || async {
            writes_by(&c, "fleet-0", "n", continued).await > 0
        })
        .await,
        "the process that continued wrote nothing of the new jobs"
    );
    assert!(t.nodes[0].call_count() > calls_before);
    assert!(
        c.eventually(Duration::from_secs(60), || async {
            replicas_written(&c, "n").await == 300
        })
        .await
    );
    let stderr = stopped.stderr.lock().unwrap().clone();
    assert_eq!(stderr.matches(said).count(), 1, "{stderr}");
}

#[tokio::test]
async fn a_slow_lock_connection_interrupts_no_gitaly_call() {
    let c = Cluster::start(2).await;
    let upstream = format!("127.0.0.1:{}", crate::common::cluster::db_port(&c.db.url))
        .parse()
        .unwrap();
    let proxy = DelayProxy::start(upstream).await.unwrap();
    // The lock connection goes through the proxy, the pool does not.
    let toml = c.toml.replacen(
        "\n[replication]\n",
        &format!(
            "\n[database.session_pooled]\nhost = \"127.0.0.1\"\nport = {}\n\n[replication]\n",
            proxy.port()
        ),
        1,
    );
    c.node(2).respond(
        "ReplicateRepository",
        Behaviour::delay(Duration::from_secs(4)),
    );
    let p = ReplicatorProcess::run(&toml);
    publish_updates(&c, "d", 40).await;
    assert!(c.node(2).wait_for_calls(20, Duration::from_secs(60)).await);
    // 2 s each way for 5 s, while the calls are in flight.
    proxy
        .delay_for(Duration::from_secs(2), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        c.eventually(Duration::from_secs(90), || async {
            replicas_written(&c, "d").await == 40
        })
        .await,
        "not every job completed"
    );
    let calls = c.node(2).calls_to("ReplicateRepository").len();
    let stderr = p.stderr.lock().unwrap().clone();
    assert_eq!(calls, 40, "jobs were interrupted and ran again\n{stderr}");
    assert!(!stderr.contains("lock session"), "{stderr}");
}
