//! The `run` command as a real process: killed mid-job, run twice on one
//! consumer, and stopped with signals.

use crate::common::cluster::Cluster;
use crate::common::process::ReplicatorProcess;
use gitaly_replicator::dead_letters::headers;
use serde_json::json;
use std::time::Duration;
use testkit::recording_gitaly::Behaviour;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

/// A killed process's jobs come back within a second, and the repository
/// locks its session held are granted again 5 s after the kill (its lease),
/// not after the default 30 s.
fn short_ack_wait(toml: &mut String) {
    *toml = toml
        .replace("ack_wait = \"5s\"", "ack_wait = \"1s\"")
        .replacen(
            "\n[replication]\n",
            "\n[replication]\nlock_lease = \"5s\"\n",
            1,
        );
}

#[tokio::test]
async fn a_consumer_killed_in_the_middle_of_a_job_loses_nothing() {
    let c = Cluster::start_with(2, short_ack_wait).await;
    c.db.store
        .create_repository(c.vs(), "k.git", "gitaly-1", 2, &["gitaly-1"])
        .await
        .unwrap();
    // The first call hangs long enough for the kill; the redelivery is quick.
    c.node(2).respond(
        "ReplicateRepository",
        Behaviour {
            delay: Duration::from_secs(30),
            status: None,
            times: None,
        },
    );
    let p = ReplicatorProcess::run(&c.toml);
    c.publish(&c.job(json!({"change": "update", "relative_path": "k.git", "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}))).await;
    assert!(
        c.node(2).wait_for_calls(1, WAIT).await,
        "the job never started"
    );
    p.signal("KILL");
    let (code, _) = p.wait().await;
    assert_eq!(code, None, "killed by a signal");
    assert_eq!(
        c.db.store
            .generation(c.vs(), "k.git", "gitaly-2")
            .await
            .unwrap(),
        None
    );
    c.node(2).respond("ReplicateRepository", Behaviour::ok());
    let p2 = ReplicatorProcess::run(&c.toml);
    assert!(
        c.eventually(WAIT, || async {
            c.db.store
                .generation(c.vs(), "k.git", "gitaly-2")
                .await
                .unwrap()
                == Some(2)
        })
        .await,
        "the job was not redelivered and completed"
    );
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    assert!(c.dead_letters().await.is_empty());
    p2.signal("TERM");
    assert_eq!(p2.wait().await.0, Some(0));
}

#[tokio::test]
async fn calls_cut_short_by_killed_processes_use_no_attempt_and_a_later_failure_is_retried() {
    let c = Cluster::start_with(2, |toml| {
        short_ack_wait(toml);
        *toml = toml.replacen("\n[replication]\n", "\n[replication]\nattempts = 3\n", 1);
    })
    .await;
    c.db.store
        .create_repository(c.vs(), "cut.git", "gitaly-1", 2, &["gitaly-1"])
        .await
        .unwrap();
    let replicate = || c.node(2).calls_to("ReplicateRepository").len();
    // Each call hangs until its process is killed.
    c.node(2).respond(
        "ReplicateRepository",
        Behaviour::delay(Duration::from_secs(120)),
    );
    c.publish(&c.job(json!({"change": "update", "relative_path": "cut.git", "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}))).await;
    for delivery in 1..=2 {
        let p = ReplicatorProcess::run(&c.toml);
        assert!(
            c.eventually(WAIT, || async { replicate() == delivery })
                .await,
            "delivery {delivery} never called ReplicateRepository"
        );
        p.signal("KILL");
        assert_eq!(p.wait().await.0, None, "killed by a signal");
    }
    // The third call is the first that fails; the fourth succeeds.
    c.node(2).respond(
        "ReplicateRepository",
        Behaviour::fail(Code::Unavailable, "restarting").times(1),
    );
    let p = ReplicatorProcess::run(&c.toml);
    let replicated = c
        .eventually(WAIT, || async {
            c.db.store
                .generation(c.vs(), "cut.git", "gitaly-2")
                .await
                .unwrap()
                == Some(2)
        })
        .await;
    let dead = c.dead_letters().await;
    assert!(
        replicated,
        "the job did not take effect; dead letters {:?}",
        dead.iter()
            .map(|d| d.header(headers::ERROR).unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    );
    assert!(dead.is_empty(), "one failure dead-lettered the job");
    assert_eq!(replicate(), 4, "two cut short, one failed, one completed");
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    p.signal("TERM");
    let (code, stderr) = p.wait().await;
    assert_eq!(code, Some(0), "{stderr}");
}

#[tokio::test]
async fn two_run_processes_share_one_consumer_and_never_overlap_on_a_repository() {
    let c = Cluster::start(2).await;
    c.node(2)
        .respond("*", Behaviour::delay(Duration::from_millis(20)));
    let a = ReplicatorProcess::run(&c.toml);
    let b = ReplicatorProcess::run(&c.toml);
    let changes = [
        json!({"change": "cleanup"}),
        json!({"change": "gc", "params": {"create_bitmap": false, "prune": false}}),
        json!({"change": "repack_incremental"}),
        json!({"change": "pack_refs", "params": {"all_refs": true}}),
        json!({"change": "midx_repack"}),
        json!({"change": "optimize_repository"}),
    ];
    let mut jobs = Vec::new();
    for change in &changes {
        for r in 0..20 {
            let mut v = change.clone();
            v["relative_path"] = format!("p{r}.git").into();
            v["target_node_storage"] = "gitaly-2".into();
            jobs.push(c.job(v));
        }
    }
    for r in c.publisher().publish_many(&jobs, 200).await {
        r.unwrap();
    }
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    let calls = c.node(2).calls();
    assert_eq!(calls.len(), 120, "every job ran exactly once");
    assert_eq!(
        c.node(2).max_overlap(),
        1,
        "a repository was worked on by both at once"
    );
    a.signal("TERM");
    b.signal("TERM");
    assert_eq!(a.wait().await.0, Some(0));
    assert_eq!(b.wait().await.0, Some(0));
}

#[tokio::test]
async fn sigterm_lets_the_running_job_finish_and_exits_zero() {
    let c = Cluster::start(2).await;
    c.node(2)
        .respond("Cleanup", Behaviour::delay(Duration::from_millis(1500)));
    let p = ReplicatorProcess::run(&c.toml);
    c.publish(&c.job(
        json!({"change": "cleanup", "relative_path": "t.git", "target_node_storage": "gitaly-2"}),
    ))
    .await;
    assert!(c.node(2).wait_for_calls(1, WAIT).await);
    p.signal("TERM");
    let (code, stderr) = p.wait().await;
    assert_eq!(code, Some(0), "{stderr}");
    // Acked before exit: nothing left to redeliver.
    assert_eq!(c.work_messages().await, 0);
    assert_eq!(c.node(2).calls().len(), 1);
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let c = Cluster::start(2).await;
    c.node(2)
        .respond("Cleanup", Behaviour::delay(Duration::from_secs(20)));
    let p = ReplicatorProcess::run(&c.toml);
    c.publish(&c.job(
        json!({"change": "cleanup", "relative_path": "t2.git", "target_node_storage": "gitaly-2"}),
    ))
    .await;
    assert!(c.node(2).wait_for_calls(1, WAIT).await);
    p.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    p.signal("INT");
    let (code, _) = p.wait().await;
    assert_eq!(code, Some(130));
    assert!(started.elapsed() < Duration::from_secs(5));
    // Not acked: the job is still queued for the next process.
    assert_eq!(c.work_messages().await, 1);
}

#[tokio::test]
async fn a_bad_config_exits_64_naming_the_key_before_touching_the_network() {
    let p = ReplicatorProcess::run("[replication]\nbach_size = 10\n");
    let (code, stderr) = p.wait().await;
    assert_eq!(code, Some(64));
    assert!(stderr.contains("replication.bach_size"), "{stderr}");
}

#[tokio::test]
async fn logs_are_json_lines_with_praefects_field_names_and_no_tokens() {
    let c = Cluster::start(2).await;
    c.db.store
        .create_repository(c.vs(), "log.git", "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();
    let p = ReplicatorProcess::run(&c.toml);
    let mut job = c.job(json!({"change": "update", "relative_path": "log.git", "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}));
    job.correlation_id = Some("corr-42".into());
    c.publish(&job).await;
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    p.signal("TERM");
    let (code, stderr) = p.wait().await;
    assert_eq!(code, Some(0));
    let finished = stderr
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"))
        })
        .find(|v| v["message"] == "replication job processing finished")
        .expect("no 'finished' line");
    assert_eq!(finished["virtual_storage"], c.vs());
    assert_eq!(finished["replication_job_target"], "gitaly-2");
    assert_eq!(finished["replication_job_source"], "gitaly-1");
    assert_eq!(finished["correlation_id"], "corr-42");
    assert_eq!(finished["new_state"], "completed");
    assert_eq!(finished["change_type"], "update");
    // Tokens travel in gitaly-servers metadata; never in logs.
    assert!(!stderr.contains("token-1") && !stderr.contains("token-2"));
}

/// A job that goes to the dead letters is logged once, at warn, with
/// Praefect's fields, its reason and its attempts.
#[tokio::test]
async fn a_dead_lettered_job_is_logged_once_with_its_fields_reason_and_attempts() {
    let c = Cluster::start_with(2, |toml| {
        *toml = toml.replacen("\n[replication]\n", "\n[replication]\nattempts = 2\n", 1);
    })
    .await;
    c.db.store
        .create_repository(c.vs(), "doomed.git", "gitaly-1", 2, &["gitaly-1"])
        .await
        .unwrap();
    c.node(2).respond(
        "ReplicateRepository",
        Behaviour::fail(Code::Unavailable, "down for good"),
    );
    let p = ReplicatorProcess::run(&c.toml);
    c.publish(&c.job(json!({"change": "update", "relative_path": "doomed.git", "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1", "correlation_id": "cid-doomed"}))).await;
    assert!(
        c.eventually(WAIT, || async { c.dead_letters().await.len() == 1 })
            .await
    );
    p.signal("TERM");
    let (_, stderr) = p.wait().await;
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["message"] == "job moved to the dead letters")
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let line = &lines[0];
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["relative_path"], "doomed.git", "{line}");
    assert_eq!(line["virtual_storage"], c.vs(), "{line}");
    assert_eq!(line["replication_job_target"], "gitaly-2", "{line}");
    assert_eq!(line["replication_job_source"], "gitaly-1", "{line}");
    assert_eq!(line["change_type"], "update", "{line}");
    assert_eq!(line["correlation_id"], "cid-doomed", "{line}");
    assert_eq!(line["reason"], "dead", "{line}");
    assert_eq!(line["attempts"], 2, "{line}");
}
