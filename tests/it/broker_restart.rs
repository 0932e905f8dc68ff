//! The consumer against a private nats-server that is restarted (or killed)
//! under it.

use crate::common::cluster::Cluster;
use crate::common::http::get;
use crate::common::nats_server::PrivateNats;
use crate::common::process::{ReplicatorProcess, with_ops_on_any_port};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn a_pull_request_lost_in_a_broker_restart_is_detected_and_renewed() {
    let mut nats = PrivateNats::start().await;
    // A long expiry: without stall detection the lost request would leave
    // the consumer waiting for a minute.
    let c = Cluster::start_on(2, nats.url(), |t| {
        *t = t.replace("fetch_expires = \"1s\"", "fetch_expires = \"60s\"");
    })
    .await;
    let consumer = c
        .consumer_with(|config| config.nats.fetch_expires = Duration::from_secs(4))
        .await;
    c.publish(&c.job(json!({"change": "cleanup", "relative_path": "before.git", "target_node_storage": "gitaly-2"}))).await;
    assert!(c.node(2).wait_for_calls(1, Duration::from_secs(10)).await);
    // The server forgets the open pull request; no timeout status will come.
    nats.restart().await;
    assert!(c.eventually(Duration::from_secs(10), || async {
        c.publisher().publish(&c.job(json!({"change": "cleanup", "relative_path": "after.git", "target_node_storage": "gitaly-2"})), None).await.is_ok()
    }).await, "could not publish after the restart");
    // Heartbeats are every 2 s (half the 4 s expiry); a silent request is
    // renewed after two missed heartbeats and a second.
    assert!(
        c.node(2).wait_for_calls(2, Duration::from_secs(15)).await,
        "the job published after the restart was never fetched"
    );
    assert!(
        c.eventually(Duration::from_secs(10), || async {
            c.work_messages().await == 0
        })
        .await
    );
    consumer.stop().await.unwrap();
}

/// The gitaly-2 row of `status`: pending, in flight, redelivered, dead.
fn status_row(toml: &str) -> Vec<String> {
    let o = crate::cli::cli(toml, &["status"], None);
    let out = crate::cli::all(&o);
    assert!(o.status.success(), "{out}");
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some("gitaly-2"))
        .unwrap_or_else(|| panic!("no row for gitaly-2 in\n{out}"))
        .split_whitespace()
        .skip(2)
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn status_and_the_depth_gauge_count_what_consumers_have_left_after_a_broker_killed_after_acks()
 {
    const JOBS: usize = 200;
    let mut nats = PrivateNats::start().await;
    let c = Cluster::start_on(2, nats.url(), |_| {}).await;
    let consumer = c.consumer().await;
    for i in 0..JOBS {
        c.publish(&c.job(json!({"change": "cleanup", "relative_path": format!("p{i}.git"), "target_node_storage": "gitaly-2"}))).await;
    }
    assert!(
        c.node(2)
            .wait_for_calls(JOBS, Duration::from_secs(30))
            .await
    );
    let work = c.js.get_stream(&c.layout.stream).await.unwrap();
    let durable = c.durable("gitaly-2");
    assert!(
        c.eventually(Duration::from_secs(10), || async {
            let info = work.consumer_info(&durable).await.unwrap();
            info.num_pending == 0 && info.num_ack_pending == 0
        })
        .await,
        "the jobs were never acknowledged"
    );
    // kill -9 right after the acks: what the server wrote of them by then
    // is all it knows when it comes back.
    nats.kill();
    nats.start_again().await;
    consumer.stop().await.unwrap();
    let mut raw = None;
    for _ in 0..100 {
        if let Ok(mut s) = c.js.get_stream(&c.layout.stream).await
            && let Ok(info) = s.info().await
        {
            raw = Some(info.state.messages);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Either may be off for a while: acknowledged jobs still in the stream
    // (nothing delivers them again), or acknowledgements the consumer forgot
    // for jobs no longer in the stream (dropped at their next redelivery,
    // within ack_wait).
    println!(
        "after the restart: {raw:?} messages in the work stream; status {:?}",
        status_row(&c.toml)
    );
    let mut row = Vec::new();
    for _ in 0..30 {
        row = status_row(&c.toml);
        if row[..2] == ["0", "0"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        row,
        ["0", "0", "0", "0"],
        "pending, in flight, redelivered, dead"
    );

    // A fresh process: its first reading of the depth is after the restart.
    let service = ReplicatorProcess::run(&with_ops_on_any_port(&c.toml));
    let port = service.ops_port().await;
    let vs = c.vs().to_owned();
    let depth = |state: &str| {
        format!(
            "gitaly_praefect_replication_queue_depth{{virtual_storage=\"{vs}\",target_node=\"gitaly-2\",state=\"{state}\"}}"
        )
    };
    let mut metrics = String::new();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            metrics = get(port, "/metrics").await.1;
            if metrics.contains(&depth("ready")) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for state in ["ready", "in_progress"] {
        assert!(
            metrics.contains(&format!("{} 0\n", depth(state))),
            "{state}: {metrics}"
        );
    }
    service.signal("TERM");
    assert_eq!(service.wait().await.0, Some(0));
}

/// Copies a directory tree (`cp -a`), the server stopped.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    let _ = std::fs::remove_dir_all(to);
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success(), "cp -a {from:?} {to:?}");
}

/// A broker killed between saving a job's removal and saving its consumer's
/// acknowledgement of it comes back with the consumer listing the job as
/// unacknowledged while the stream no longer has it; nats-server 2.9 never
/// clears that entry, and it holds the acknowledgement floor. The same kill
/// can keep another job the consumer counts as acknowledged above that
/// floor. Such a pair cannot be timed with a kill, so the test builds it
/// from the server's own files: the consumer's state saved after one job's
/// acknowledgement, the stream's saved after the other job's removal, each
/// by a server stopped cleanly. The leftover sweep must free the floor and
/// bring the kept job back to work.
#[tokio::test]
async fn an_unacknowledged_entry_whose_job_is_gone_does_not_hold_back_the_jobs_left_above_it() {
    use async_nats::jetstream::consumer::PullConsumer;
    use futures::StreamExt;
    let mut nats = PrivateNats::start().await;
    let c = Cluster::start_on(2, nats.url(), |_| {}).await;
    // A job for a storage no consumer serves stays first in the stream, so
    // the gone job is not below the stream's first sequence (the server
    // drops such entries itself).
    let parked = format!("{}.{}.gitaly-9", c.layout.subject_prefix, c.vs());
    c.js.publish(parked, "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    for path in ["gone.git", "kept.git"] {
        c.publish(&c.job(
            json!({"change": "cleanup", "relative_path": path, "target_node_storage": "gitaly-2"}),
        ))
        .await;
    }
    let durable = c.durable("gitaly-2");
    let work = c.js.get_stream(&c.layout.stream).await.unwrap();
    let consumer: PullConsumer = work.get_consumer(&durable).await.unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(2)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let mut delivered = Vec::new();
    while let Some(m) = batch.next().await {
        let m = m.unwrap();
        delivered.push((m.info().unwrap().stream_sequence, m.reply.clone().unwrap()));
    }
    let [(gone, _), (kept, kept_reply)] = <[_; 2]>::try_from(delivered).unwrap();
    let store = nats.dir().join("jetstream");
    let saved = tempfile::tempdir().unwrap();
    nats.stop();
    copy_tree(&store, &saved.path().join("both-delivered"));
    // The consumer's state once `kept` is acknowledged (and so removed).
    nats.start_again().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    client.publish(kept_reply, "+ACK".into()).await.unwrap();
    client.flush().await.unwrap();
    let acked = || async {
        let work = c.js.get_stream(&c.layout.stream).await.unwrap();
        work.consumer_info(&durable).await.unwrap().num_ack_pending
    };
    assert!(
        c.eventually(Duration::from_secs(10), || async { acked().await == 1 })
            .await
    );
    nats.stop();
    let consumers = store.join("$G/streams").join(&c.layout.stream).join("obs");
    copy_tree(&consumers, &saved.path().join("obs-kept-acked"));
    // The stream's state once `gone` is removed, `kept` still in it.
    copy_tree(&saved.path().join("both-delivered"), &store);
    nats.start_again().await;
    let work = c.js.get_stream(&c.layout.stream).await.unwrap();
    assert!(work.delete_message(gone).await.unwrap());
    nats.stop();
    copy_tree(&saved.path().join("obs-kept-acked"), &consumers);
    nats.start_again().await;
    // The stream keeps only `kept`, which its consumer will not deliver.
    let kept_stored = || async {
        let work = c.js.get_stream(&c.layout.stream).await.unwrap();
        work.get_raw_message(kept).await.is_ok()
    };
    assert!(kept_stored().await);
    assert_eq!(c.work_messages().await, 2);
    // Sweeps every 5 s: two to see the floor stand still, two to find and
    // settle the job left above it.
    let consumer = c
        .consumer_with(|config| config.nats.ack_wait = Duration::from_secs(1))
        .await;
    assert!(
        c.eventually(Duration::from_secs(40), || async {
            c.node(2)
                .calls()
                .iter()
                .any(|call| call.relative_path == "kept.git")
        })
        .await,
        "the job left above the held floor never ran again; server log:\n{}",
        nats.log()
    );
    assert!(
        c.eventually(Duration::from_secs(10), || async {
            c.work_messages().await == 1 && acked().await == 0
        })
        .await,
        "the work stream or the consumer's unacknowledged list did not empty"
    );
    assert!(c.dead_letters().await.is_empty());
    consumer.stop().await.unwrap();
}
