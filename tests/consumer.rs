//! The consumer against the real NATS, Postgres and recording Gitaly nodes:
//! every outcome row of the design's table, checked on the streams and in
//! Postgres.

mod common;

use common::cluster::Cluster;
use gitaly_replicator::gitaly::recording_server::Behaviour;
use gitaly_replicator::queue::dead_letter::headers;
use serde_json::json;
use std::time::Duration;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_completed_job_is_acked_and_leaves_the_stream() {
    let c = Cluster::start(2).await;
    let consumer = c.consumer().await;
    let job = c.job(json!({"change": "optimize_repository", "relative_path": "a.git", "target_node_storage": "gitaly-2"}));
    c.publish(&job).await;
    assert!(c.node(2).wait_for_calls(1, WAIT).await);
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    let calls = c.node(2).calls_to("OptimizeRepository");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].relative_path, "a.git");
    assert!(calls[0].auth_valid);
    consumer.stop().await.unwrap();
    assert!(c.dead_letters().await.is_empty());
}

#[tokio::test]
async fn an_update_sets_the_target_generation_in_postgres() {
    let c = Cluster::start(2).await;
    c.db.store
        .create_repository(c.vs(), "r.git", "gitaly-1", 4, &["gitaly-1"])
        .await
        .unwrap();
    let consumer = c.consumer().await;
    c.publish(&c.job(json!({"change": "update", "relative_path": "r.git", "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}))).await;
    assert!(
        c.eventually(WAIT, || async {
            c.db.store
                .generation(c.vs(), "r.git", "gitaly-2")
                .await
                .unwrap()
                == Some(4)
        })
        .await
    );
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    assert_eq!(c.node(2).calls_to("ReplicateRepository").len(), 1);
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn a_failed_job_is_redelivered_after_the_delay_and_then_completes() {
    let c = Cluster::start(2).await;
    c.node(2).respond(
        "GarbageCollect",
        Behaviour::fail(Code::Unavailable, "busy").times(1),
    );
    let consumer = c.consumer().await;
    c.publish(&c.job(json!({"change": "gc", "relative_path": "g.git", "target_node_storage": "gitaly-2", "params": {"create_bitmap": true, "prune": false}}))).await;
    assert!(c.node(2).wait_for_calls(2, WAIT).await);
    let calls = c.node(2).calls_to("GarbageCollect");
    let gap = calls[1].received_at - calls[0].received_at;
    // Retry policy in the test settings: 200 ms ± 20 %.
    assert!(
        gap >= Duration::from_millis(150),
        "redelivered after {gap:?}"
    );
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    assert!(c.dead_letters().await.is_empty());
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn a_job_failing_on_its_last_attempt_goes_to_the_dead_letters_with_its_headers() {
    let c = Cluster::start(2).await;
    c.node(2).respond(
        "Cleanup",
        Behaviour::fail(Code::Unavailable, "disk on fire"),
    );
    let consumer = c.consumer().await;
    let job = c.job(
        json!({"change": "cleanup", "relative_path": "d.git", "target_node_storage": "gitaly-2"}),
    );
    c.publish(&job).await;
    assert!(
        c.eventually(WAIT, || async { c.dead_letters().await.len() == 1 })
            .await
    );
    assert_eq!(c.node(2).calls_to("Cleanup").len(), 3, "three attempts");
    let dead = &c.dead_letters().await[0];
    assert_eq!(dead.header(headers::REASON), Some("dead"));
    assert_eq!(dead.header(headers::ATTEMPTS), Some("3"));
    assert!(
        dead.header(headers::ERROR)
            .unwrap()
            .contains("disk on fire")
    );
    assert!(
        dead.header(headers::ORIGINAL_SUBJECT)
            .unwrap()
            .starts_with(&c.names.subject_prefix)
    );
    assert!(dead.header(headers::DEAD_AT).is_some());
    assert_eq!(
        gitaly_replicator::event::Job::from_json(&dead.payload)
            .unwrap()
            .relative_path,
        "d.git"
    );
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn a_malformed_message_is_dead_lettered_at_once_and_does_not_block_the_next_job() {
    let c = Cluster::start(2).await;
    let consumer = c.consumer().await;
    let subject = c
        .layout
        .consumer(c.vs(), "gitaly-2")
        .unwrap()
        .filter_subject
        .clone();
    c.js.publish(subject.clone(), "{not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    c.publish(&c.job(json!({"change": "midx_repack", "relative_path": "m.git", "target_node_storage": "gitaly-2"}))).await;
    assert!(
        c.eventually(WAIT, || async { c.dead_letters().await.len() == 1 })
            .await
    );
    assert!(c.node(2).wait_for_calls(1, WAIT).await);
    let dead = &c.dead_letters().await[0];
    assert_eq!(dead.header(headers::REASON), Some("invalid"));
    assert!(
        dead.header(headers::ERROR)
            .unwrap()
            .contains("not valid JSON")
    );
    assert_eq!(&dead.payload[..], b"{not json");
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn an_unimplemented_rpc_is_acked_as_unsupported_without_retry() {
    let c = Cluster::start(2).await;
    c.node(2).respond(
        "RepackIncremental",
        Behaviour::fail(Code::Unimplemented, "removed"),
    );
    let consumer = c.consumer().await;
    c.publish(&c.job(json!({"change": "repack_incremental", "relative_path": "u.git", "target_node_storage": "gitaly-2"}))).await;
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(c.node(2).calls_to("RepackIncremental").len(), 1);
    assert!(c.dead_letters().await.is_empty());
    consumer.stop().await.unwrap();
}
