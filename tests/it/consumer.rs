//! The consumer against the real NATS, Postgres and recording Gitaly nodes:
//! every outcome row of the design's table, checked on the streams and in
//! Postgres.

use crate::common::cluster::{Cluster, nats_url, strand};
use crate::common::service::ServiceTask;
use gitaly_replicator::dead_letters::headers;
use gitaly_replicator::job_subject;
use serde_json::json;
use std::time::Duration;
use testkit::recording_gitaly::Behaviour;
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
        gitaly_replicator::Job::from_json(&dead.payload)
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

/// Two live copies of one job: its retry copy published, then the message
/// it replaced back in the stream (a broker killed before it saved the
/// removal, the leftover sweep requeuing it with its place). The second
/// copy ends at its first failure, its retry copy a duplicate, and the job
/// dies once.
#[tokio::test]
async fn a_second_copy_of_a_failing_job_ends_at_its_next_retry_and_the_job_dies_once() {
    let c = Cluster::start(2).await;
    c.node(2).respond(
        "Cleanup",
        Behaviour::fail(Code::Unavailable, "disk on fire"),
    );
    c.publish(&c.job(
        json!({"change": "cleanup", "relative_path": "twice.git", "target_node_storage": "gitaly-2"}),
    ))
    .await;
    let work = c.js.get_stream(&c.layout.stream).await.unwrap();
    let first = work.cached_info().state.first_sequence.max(1);
    let original = work.get_raw_message(first).await.unwrap();
    let consumer = c.consumer().await;
    // The original is removed once its retry copy is published.
    assert!(
        c.eventually(WAIT, || async {
            work.get_raw_message(first).await.is_err()
        })
        .await
    );
    // Another copy of the job, with its place and `failures` used, as the
    // leftover sweep publishes one.
    let publish_copy = |id: &'static str, failures: &'static str| {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", id);
        h.insert(
            "Gitaly-Replicator-Order-Sequence",
            first.to_string().as_str(),
        );
        h.insert(
            "Gitaly-Replicator-Order-Time",
            original.time.unix_timestamp_nanos().to_string().as_str(),
        );
        h.insert("Gitaly-Replicator-Failed-Attempts", failures);
        let (js, subject, payload) = (
            c.js.clone(),
            original.subject.to_string(),
            original.payload.clone(),
        );
        async move {
            js.publish_with_headers(subject, h, payload)
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    publish_copy("the original, requeued by a sweep", "0").await;
    assert!(
        c.eventually(WAIT, || async {
            c.work_messages().await == 0 && !c.dead_letters().await.is_empty()
        })
        .await
    );
    // Long enough for a second line of copies to use its three attempts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dead = c.dead_letters().await;
    assert_eq!(dead.len(), 1, "one dead letter for the one job");
    assert_eq!(dead[0].header(headers::ATTEMPTS), Some("3"));
    // Three attempts, and the second copy's one failed call.
    assert_eq!(c.node(2).calls_to("Cleanup").len(), 4);
    assert_eq!(c.work_messages().await, 0);

    // A copy on its last attempt, dying after the job died: its dead letter
    // is the job's, a duplicate, neither stored nor counted again.
    publish_copy("a copy on its last attempt", "2").await;
    assert!(
        c.eventually(WAIT, || async {
            c.node(2).calls_to("Cleanup").len() == 5 && c.work_messages().await == 0
        })
        .await
    );
    assert_eq!(c.dead_letters().await.len(), 1);
    let counted = crate::common::service_metrics::samples().sum(
        gitaly_replicator::metric_names::DEAD_LETTERS_TOTAL,
        &[
            ("virtual_storage", c.vs()),
            ("gitaly_storage", "gitaly-2"),
            ("reason", "dead"),
        ],
    );
    assert_eq!(counted, 1.0, "dead letters counted");
    consumer.stop().await.unwrap();
}

/// A replay starts a new line of copies: the replayed job's retries and its
/// dead letter are not taken for duplicates of the ones before it, however
/// soon after the first death it is replayed.
#[tokio::test]
async fn a_replayed_job_that_fails_again_gets_a_dead_letter_of_its_own() {
    let c = Cluster::start(2).await;
    c.node(2).respond(
        "Cleanup",
        Behaviour::fail(Code::Unavailable, "disk on fire"),
    );
    let consumer = c.consumer().await;
    c.publish(&c.job(
        json!({"change": "cleanup", "relative_path": "again.git", "target_node_storage": "gitaly-2"}),
    ))
    .await;
    assert!(
        c.eventually(WAIT, || async { c.dead_letters().await.len() == 1 })
            .await
    );
    let first = c.dead_letters().await.remove(0);
    assert_eq!(first.header(headers::REPLAYED_AT), None);
    gitaly_replicator::dead_letters::replay(&c.js, &c.layout, &first)
        .await
        .unwrap();
    assert!(
        c.eventually(WAIT, || async {
            let dead = c.dead_letters().await;
            dead.len() == 1 && dead[0].sequence != first.sequence
        })
        .await,
        "the replayed job has no dead letter: {} calls",
        c.node(2).calls_to("Cleanup").len()
    );
    let again = c.dead_letters().await.remove(0);
    assert_eq!(again.header(headers::ATTEMPTS), Some("3"));
    assert!(again.header(headers::REPLAYED_AT).is_some());
    assert_eq!(again.placement(), first.placement());
    assert_eq!(c.node(2).calls_to("Cleanup").len(), 6);
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

#[tokio::test]
async fn an_unimplemented_replicate_repository_is_retried_then_dead_lettered() {
    let c = Cluster::start(2).await;
    c.node(2).respond(
        "ReplicateRepository",
        Behaviour::fail(Code::Unimplemented, "unknown method ReplicateRepository"),
    );
    let consumer = c.consumer().await;
    c.publish(&c.job(json!({"change": "update", "relative_path": "ui.git", "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}))).await;
    assert!(
        c.eventually(WAIT, || async { c.dead_letters().await.len() == 1 })
            .await
    );
    // Every attempt reached the target: the job was not acked as unsupported.
    assert_eq!(
        c.node(2).calls_to("ReplicateRepository").len(),
        c.config.replication.attempts as usize
    );
    let dead = &c.dead_letters().await[0];
    let error = dead.header(headers::ERROR).unwrap_or_default();
    assert!(
        error.contains("unknown method ReplicateRepository"),
        "{error}"
    );
    assert_eq!(c.work_messages().await, 0);
    consumer.stop().await.unwrap();
}

fn short_ack_wait(toml: &mut String) {
    *toml = toml.replace("ack_wait = \"5s\"", "ack_wait = \"1s\"");
}

/// A short ack wait, and the server giving up after three deliveries, as
/// `strand` needs.
fn strandable(toml: &mut String) {
    short_ack_wait(toml);
    *toml = toml.replacen("\n[nats]\n", "\n[nats]\nmax_deliver = 3\n", 1);
}

#[tokio::test]
async fn an_update_for_a_target_already_at_the_generation_is_skipped_without_a_call() {
    let c = Cluster::start(2).await;
    c.db.store
        .create_repository(c.vs(), "s.git", "gitaly-1", 7, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();
    let consumer = c.consumer().await;
    c.publish(&c.job(json!({"change": "update", "relative_path": "s.git", "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}))).await;
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    assert!(c.node(2).calls().is_empty());
    assert!(c.dead_letters().await.is_empty());
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn a_job_whose_subject_disagrees_with_its_payload_is_invalid() {
    let c = Cluster::start(3).await;
    let consumer = c.consumer().await;
    // Published on gitaly-2's subject, but addressed to gitaly-3.
    let subject = c
        .layout
        .consumer(c.vs(), "gitaly-2")
        .unwrap()
        .filter_subject
        .clone();
    let job = c.job(
        json!({"change": "cleanup", "relative_path": "x.git", "target_node_storage": "gitaly-3"}),
    );
    c.js.publish(subject, job.to_json().into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        c.eventually(WAIT, || async { c.dead_letters().await.len() == 1 })
            .await
    );
    let dead = &c.dead_letters().await[0];
    assert_eq!(dead.header(headers::REASON), Some("invalid"));
    assert!(
        dead.header(headers::ERROR)
            .unwrap()
            .contains("the payload is for")
    );
    assert!(c.node(2).calls().is_empty() && c.node(3).calls().is_empty());
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn a_job_naming_an_unknown_source_storage_is_retried_then_dead_lettered() {
    let c = Cluster::start(2).await;
    let consumer = c.consumer().await;
    let subject = c
        .layout
        .consumer(c.vs(), "gitaly-2")
        .unwrap()
        .filter_subject
        .clone();
    let job = c.job(json!({"change": "update", "relative_path": "x.git", "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-9"}));
    c.js.publish(subject, job.to_json().into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        c.eventually(WAIT, || async { c.dead_letters().await.len() == 1 })
            .await
    );
    // During a rolling config change a newer process may know the source:
    // the job keeps its attempts, and dies only when they run out.
    let dead = &c.dead_letters().await[0];
    assert_eq!(dead.header(headers::REASON), Some("dead"));
    assert!(dead.header(headers::ERROR).unwrap().contains("gitaly-9"));
    let attempts = c.config.replication.attempts.to_string();
    assert_eq!(dead.header(headers::ATTEMPTS), Some(attempts.as_str()));
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn a_job_running_longer_than_ack_wait_is_kept_alive_and_not_redelivered() {
    let c = Cluster::start_with(2, short_ack_wait).await;
    c.node(2)
        .respond("RepackFull", Behaviour::delay(Duration::from_millis(3500)));
    let consumer = c.consumer().await;
    c.publish(&c.job(json!({"change": "repack_full", "relative_path": "slow.git", "target_node_storage": "gitaly-2", "params": {"create_bitmap": false}}))).await;
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    assert_eq!(
        c.node(2).calls_to("RepackFull").len(),
        1,
        "redelivered while running"
    );
    assert_eq!(c.node(2).max_overlap(), 1);
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn delete_replica_never_runs_out_of_attempts() {
    let c = Cluster::start(2).await;
    // Fails five times (more than the 3 attempts of other jobs), then works.
    c.node(2).respond(
        "RemoveRepository",
        Behaviour::fail(Code::Unavailable, "down").times(5),
    );
    c.db.store
        .create_repository(c.vs(), "dr.git", "gitaly-1", 1, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();
    let consumer = c.consumer().await;
    c.publish(&c.job(json!({"change": "delete_replica", "relative_path": "dr.git", "target_node_storage": "gitaly-2"}))).await;
    assert!(
        c.eventually(Duration::from_secs(40), || async {
            c.db.store
                .generation(c.vs(), "dr.git", "gitaly-2")
                .await
                .unwrap()
                .is_none()
        })
        .await
    );
    assert_eq!(c.node(2).calls_to("RemoveRepository").len(), 6);
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    assert!(c.dead_letters().await.is_empty());
    assert_eq!(
        c.db.store
            .generation(c.vs(), "dr.git", "gitaly-1")
            .await
            .unwrap(),
        Some(1)
    );
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn identical_updates_in_one_batch_are_dispatched_once() {
    let c = Cluster::start(2).await;
    c.db.store
        .create_repository(c.vs(), "dup.git", "gitaly-1", 3, &["gitaly-1"])
        .await
        .unwrap();
    let job = c.job(json!({"change": "update", "relative_path": "dup.git", "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}));
    // Queued before the consumer starts, so they arrive in one batch.
    for _ in 0..5 {
        c.publish(&job).await;
    }
    let consumer = c.consumer().await;
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    assert_eq!(c.node(2).calls_to("ReplicateRepository").len(), 1);
    assert_eq!(
        c.db.store
            .generation(c.vs(), "dup.git", "gitaly-2")
            .await
            .unwrap(),
        Some(3)
    );
    consumer.stop().await.unwrap();
}

fn gc(c: &Cluster, path: &str) -> gitaly_replicator::Job {
    c.job(json!({"change": "gc", "relative_path": path, "target_node_storage": "gitaly-2", "params": {"create_bitmap": false, "prune": true}}))
}

#[tokio::test]
async fn a_twin_published_before_the_completed_job_started_is_skipped_as_superseded() {
    let c = Cluster::start(2).await;
    // Both twins and a later job for another repository are queued before the
    // consumer starts, so they arrive in one batch: whichever twin runs first
    // started after the other was published.
    c.publish(&gc(&c, "sup.git")).await;
    c.publish(&gc(&c, "sup.git")).await;
    c.publish(&gc(&c, "other.git")).await;
    let consumer = c.consumer().await;
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let on = |path: &str| {
        c.node(2)
            .calls_to("GarbageCollect")
            .iter()
            .filter(|call| call.relative_path == path)
            .count()
    };
    assert_eq!(on("sup.git"), 1);
    assert_eq!(on("other.git"), 1);
    // A twin published after the completion still runs.
    c.publish(&gc(&c, "sup.git")).await;
    assert!(c.node(2).wait_for_calls(3, WAIT).await);
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn a_newer_twin_runs_whatever_time_its_publisher_wrote() {
    let c = Cluster::start(2).await;
    let consumer = c.consumer().await;
    c.publish(&gc(&c, "clock.git")).await;
    assert!(c.node(2).wait_for_calls(1, WAIT).await);
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    // A publisher whose clock runs ten minutes behind, and one that sends
    // Go's zero time: both publish after the twin completed, so both run.
    let mut behind = gc(&c, "clock.git");
    behind.created_at = Some(time::OffsetDateTime::now_utc() - time::Duration::minutes(10));
    c.publish(&behind).await;
    assert!(c.node(2).wait_for_calls(2, WAIT).await);
    let mut zero = gc(&c, "clock.git");
    zero.created_at = Some(time::macros::datetime!(0001-01-01 0:00 UTC));
    c.publish(&zero).await;
    assert!(c.node(2).wait_for_calls(3, WAIT).await);
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn a_collapsed_update_published_after_a_twin_completed_still_runs() {
    let c = Cluster::start(2).await;
    c.db.store
        .create_repository(c.vs(), "col.git", "gitaly-1", 4, &["gitaly-1"])
        .await
        .unwrap();
    let update = || {
        c.job(json!({"change": "update", "relative_path": "col.git", "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}))
    };
    // The target is down, so both updates wait and arrive in one batch.
    c.node(2).set_serving(false);
    let consumer = c.consumer().await;
    c.publish(&update()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A twin completed elsewhere between the two publications.
    sqlx::query(
        "INSERT INTO replication_completions
            (virtual_storage, relative_path, target_storage, change_type, source_storage,
             started_at)
        VALUES ($1, 'col.git', 'gitaly-2', 'update', 'gitaly-1', now())",
    )
    .bind(c.vs())
    .execute(c.db.store.pool())
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.publish(&update()).await;
    c.node(2).set_serving(true);
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    assert_eq!(c.node(2).calls_to("ReplicateRepository").len(), 1);
    assert_eq!(
        c.db.store
            .generation(c.vs(), "col.git", "gitaly-2")
            .await
            .unwrap(),
        Some(4)
    );
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn twins_delivered_while_their_replica_is_busy_join_one_dispatch_as_the_newest() {
    let c = Cluster::start(2).await;
    c.db.store
        .create_repository(c.vs(), "join.git", "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();
    let update = || {
        c.job(json!({"change": "update", "relative_path": "join.git", "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}))
    };
    // Each replication takes 400 ms, and each one the target receives raises
    // the source's generation: a twin that ran on its own after another
    // would find the target behind and call again.
    c.node(2).respond(
        "ReplicateRepository",
        Behaviour::delay(Duration::from_millis(400)),
    );
    let raising = {
        let node = c.node(2).clone();
        let store = c.db.store.clone();
        let vs = c.vs().to_owned();
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                let calls = node.calls_to("ReplicateRepository").len();
                if calls > seen {
                    seen = calls;
                    let generation = i64::try_from(calls).unwrap() + 1;
                    store
                        .set_generation(&vs, "join.git", "gitaly-1", generation)
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let consumer = c.consumer().await;
    c.publish(&update()).await;
    assert!(
        c.eventually(WAIT, || async {
            c.node(2).calls_to("ReplicateRepository").len() == 1
        })
        .await
    );
    // Four twins, each delivered on its own while the first runs.
    let mut newest = 0;
    for _ in 0..4 {
        newest = c
            .publisher()
            .publish(&update(), None)
            .await
            .unwrap()
            .sequence;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    raising.abort();
    // The first job, then one dispatch for the four: it read generation 2,
    // raised by the first call.
    assert_eq!(c.node(2).calls_to("ReplicateRepository").len(), 2);
    assert_eq!(
        c.db.store
            .generation(c.vs(), "join.git", "gitaly-2")
            .await
            .unwrap(),
        Some(2)
    );
    // It ran as the newest twin, so a job published before that one can no
    // longer undo it.
    let recorded: i64 = sqlx::query_scalar(
        "SELECT max(sequence) FROM replication_order
        WHERE virtual_storage = $1 AND relative_path = 'join.git'",
    )
    .bind(c.vs())
    .fetch_one(c.db.store.pool())
    .await
    .unwrap();
    assert_eq!(recorded, i64::try_from(newest).unwrap());
    assert!(c.dead_letters().await.is_empty());
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn twins_waiting_behind_a_busy_replica_leave_the_intake_to_other_repositories() {
    let c = Cluster::start(2).await;
    c.db.store
        .create_repository(c.vs(), "busy.git", "gitaly-1", 1, &["gitaly-1"])
        .await
        .unwrap();
    let update = || {
        c.job(json!({"change": "update", "relative_path": "busy.git", "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}))
    };
    c.node(2).respond(
        "ReplicateRepository",
        Behaviour::delay(Duration::from_secs(4)),
    );
    // Two job slots and one job per pull: the process holds 4 jobs at most
    // (slots plus one open request for each of the two targets).
    let consumer = c
        .consumer_with(|config| {
            config.replication.max_concurrent_jobs = 2;
            config.replication.batch_size = 1;
        })
        .await;
    c.publish(&update()).await;
    assert!(
        c.eventually(WAIT, || async {
            c.node(2).calls_to("ReplicateRepository").len() == 1
        })
        .await
    );
    // Six twins queue behind the running job, then another repository's job.
    for _ in 0..6 {
        c.publish(&update()).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // The six wait for the lock, in the gauge: the group's leader and the
    // twins that joined it.
    let locked_waiting = || {
        crate::common::service_metrics::samples().sum(
            "gitaly_replicator_jobs_waiting",
            &[("virtual_storage", c.vs()), ("reason", "repository_locked")],
        )
    };
    assert!(
        c.eventually(Duration::from_secs(2), || async { locked_waiting() == 6.0 })
            .await,
        "jobs waiting for the repository lock: {}",
        locked_waiting()
    );
    c.publish(&gc(&c, "elsewhere.git")).await;
    // It runs in the free slot while the replica's call still runs: the
    // twins that joined the waiting group gave their intake back.
    assert!(
        c.eventually(Duration::from_secs(2), || async {
            !c.node(2).calls_to("GarbageCollect").is_empty()
        })
        .await
    );
    assert_eq!(c.node(2).calls_to("ReplicateRepository").len(), 1);
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    // The twins ran as one group, which found the target up to date.
    assert_eq!(c.node(2).calls_to("ReplicateRepository").len(), 1);
    assert_eq!(locked_waiting(), 0.0);
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn jobs_for_an_unhealthy_target_wait_in_the_queue_with_attempts_intact() {
    let c = Cluster::start(2).await;
    c.node(2).set_serving(false);
    let consumer = c.consumer().await;
    for i in 0..3 {
        c.publish(&c.job(json!({"change": "cleanup", "relative_path": format!("h{i}.git"), "target_node_storage": "gitaly-2"}))).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(c.node(2).calls().is_empty());
    let info =
        c.js.get_stream(&c.layout.stream)
            .await
            .unwrap()
            .consumer_info(&c.layout.consumer(c.vs(), "gitaly-2").unwrap().durable_name)
            .await
            .unwrap();
    assert_eq!(info.num_pending, 3);
    assert_eq!(info.num_ack_pending, 0, "nothing was fetched");
    assert_eq!(
        info.delivered.stream_sequence, 0,
        "no delivery used up an attempt"
    );
    c.node(2).set_serving(true);
    assert!(c.node(2).wait_for_calls(3, WAIT).await);
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn two_consumers_never_work_on_one_repository_at_once() {
    let c = Cluster::start(2).await;
    c.node(2)
        .respond("*", Behaviour::delay(Duration::from_millis(30)));
    let a = c.consumer().await;
    let b = c.consumer().await;
    // Six repositories, eight maintenance jobs each; distinct change types,
    // so completion dedup does not skip any of them.
    let changes = [
        json!({"change": "cleanup"}),
        json!({"change": "gc", "params": {"create_bitmap": true, "prune": true}}),
        json!({"change": "repack_full", "params": {"create_bitmap": true}}),
        json!({"change": "repack_incremental"}),
        json!({"change": "pack_refs"}),
        json!({"change": "write_commit_graph"}),
        json!({"change": "midx_repack"}),
        json!({"change": "optimize_repository"}),
    ];
    let mut jobs = Vec::new();
    for change in &changes {
        for r in 0..6 {
            let mut v = change.clone();
            v["relative_path"] = format!("r{r}.git").into();
            v["target_node_storage"] = "gitaly-2".into();
            jobs.push(c.job(v));
        }
    }
    for r in c.publisher().publish_many(&jobs, 100).await {
        r.unwrap();
    }
    assert!(
        c.eventually(Duration::from_secs(30), || async {
            c.work_messages().await == 0
        })
        .await
    );
    assert_eq!(c.node(2).calls().len(), 48);
    assert_eq!(
        c.node(2).max_overlap(),
        1,
        "two jobs of one repository overlapped"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_in_the_middle_of_a_batch_loses_nothing() {
    let c = Cluster::start(2).await;
    c.node(2)
        .respond("*", Behaviour::delay(Duration::from_millis(300)));
    let two_slots =
        |config: &mut gitaly_replicator::Config| config.replication.max_concurrent_jobs = 2;
    let consumer = c.consumer_with(two_slots).await;
    let jobs: Vec<_> = (0..20)
        .map(|i| c.job(json!({"change": "cleanup", "relative_path": format!("s{i}.git"), "target_node_storage": "gitaly-2"})))
        .collect();
    for r in c.publisher().publish_many(&jobs, 100).await {
        r.unwrap();
    }
    assert!(c.node(2).wait_for_calls(2, WAIT).await);
    consumer.stop().await.unwrap();
    let done_first = c.node(2).calls().len();
    assert!(
        done_first < 20,
        "all jobs ran before the shutdown: {done_first}"
    );
    // What was fetched but not started went back at once (no ack-wait delay).
    let second = c.consumer_with(two_slots).await;
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    let mut paths: Vec<_> = c
        .node(2)
        .calls()
        .into_iter()
        .map(|c| c.relative_path)
        .collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), 20, "every job ran");
    assert!(c.dead_letters().await.is_empty());
    second.stop().await.unwrap();
}

#[tokio::test]
async fn a_job_stranded_at_max_deliver_is_moved_to_the_dead_letters_from_the_advisory() {
    let c = Cluster::start_with(2, strandable).await;
    c.publish(&c.job(json!({"change": "cleanup", "relative_path": "stranded.git", "target_node_storage": "gitaly-2"}))).await;
    // A process that takes the job and dies before acking, three times over.
    // The server gives up one ack wait after the third delivery; the advisory
    // stream keeps the advisory until a consumer runs.
    strand(&c.js, &c.layout, c.vs(), "gitaly-2", 1).await;
    assert_eq!(
        c.work_messages().await,
        1,
        "nats-server keeps the stranded job"
    );
    let consumer = c.consumer().await;
    assert!(
        c.eventually(WAIT, || async { c.dead_letters().await.len() == 1 })
            .await
    );
    let dead = &c.dead_letters().await[0];
    assert_eq!(dead.header(headers::REASON), Some("stranded"));
    // Three deliveries, each cut short: no call failed.
    assert_eq!(dead.header(headers::ATTEMPTS), Some("0"));
    assert_eq!(dead.header(headers::DELIVERIES), Some("3"));
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await
    );
    assert!(c.node(2).calls().is_empty());
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn jobs_the_server_keeps_but_never_delivers_again_are_requeued_or_removed_when_dead() {
    let c = Cluster::start_with(2, strandable).await;
    for path in ["kept.git", "dead.git"] {
        c.publish(&c.job(
            json!({"change": "cleanup", "relative_path": path, "target_node_storage": "gitaly-2"}),
        ))
        .await;
    }
    strand(&c.js, &c.layout, c.vs(), "gitaly-2", 2).await;
    // Their advisories lost (as with a broker killed before it stored
    // them), and a later job acked: the consumer's floor moves past both,
    // and the stream still holds them. (A broker killed right after acks
    // can leave the same: the floor saved, the removals lost.)
    let advisories = c.js.get_stream(&c.layout.advisory_stream).await.unwrap();
    advisories.purge().await.unwrap();
    c.publish(&c.job(json!({"change": "cleanup", "relative_path": "after.git", "target_node_storage": "gitaly-2"}))).await;
    let mut work = c.js.get_stream(&c.layout.stream).await.unwrap();
    let durable = &c.layout.consumer(c.vs(), "gitaly-2").unwrap().durable_name;
    let raw: async_nats::jetstream::consumer::PullConsumer =
        work.get_consumer(durable).await.unwrap();
    {
        use futures::StreamExt;
        let mut batch = raw
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(3))
            .messages()
            .await
            .unwrap();
        let after = batch.next().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&after.payload).contains("after.git"));
        after.double_ack().await.unwrap();
    }
    let info = work.consumer_info(durable).await.unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
    assert!(info.ack_floor.stream_sequence >= 3, "{info:?}");
    assert_eq!(work.info().await.unwrap().state.messages, 2);
    // One of them already made it to the dead letters before its removal
    // was lost.
    let dead_job = work.get_raw_message(2).await.unwrap();
    assert!(String::from_utf8_lossy(&dead_job.payload).contains("dead.git"));
    let mut h = async_nats::HeaderMap::new();
    h.insert(
        "Nats-Msg-Id",
        gitaly_replicator::dead_letters::dead_message_id(
            &gitaly_replicator::Incarnation::of(work.info().await.unwrap()),
            gitaly_replicator::dead_letters::Placement {
                sequence: 2,
                published: dead_job.time,
            },
            None,
        )
        .as_str(),
    );
    let dead_subject = dead_job.subject.replacen(
        &c.layout.subject_prefix,
        &gitaly_replicator::dead_letter_prefix(&c.layout.subject_prefix),
        1,
    );
    c.js.publish_with_headers(dead_subject, h, dead_job.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();

    let consumer = c.consumer().await;
    assert!(
        c.eventually(Duration::from_secs(30), || async {
            c.work_messages().await == 0
                && c.node(2)
                    .calls_to("Cleanup")
                    .iter()
                    .any(|call| call.relative_path == "kept.git")
        })
        .await,
        "the kept job was not requeued: {} messages, calls {:?}",
        c.work_messages().await,
        c.node(2).calls()
    );
    // The dead one is removed, not run again nor dead-lettered twice.
    assert!(
        c.node(2)
            .calls()
            .iter()
            .all(|call| call.relative_path != "dead.git")
    );
    assert_eq!(c.dead_letters().await.len(), 1);
    let settled = |result: &str| {
        crate::common::service_metrics::samples().sum(
            gitaly_replicator::metric_names::LEFTOVER_JOBS_TOTAL,
            &[
                ("virtual_storage", c.vs()),
                ("gitaly_storage", "gitaly-2"),
                ("result", result),
            ],
        )
    };
    assert_eq!((settled("requeued"), settled("removed")), (1.0, 1.0));
    consumer.stop().await.unwrap();
}

#[tokio::test]
async fn a_busy_process_holds_no_more_jobs_than_its_slots_and_one_batch() {
    // No server-side bound, so only the consumer limits what it holds.
    let c = Cluster::start_with(2, |t| t.push_str("max_ack_pending = -1\n")).await;
    c.node(2)
        .respond("*", Behaviour::delay(Duration::from_millis(100)));
    // Four job slots, and one batch of 10 for the one pull loop.
    let bound = 4 + 10;
    let jobs: Vec<_> = (0..150)
        .map(|i| c.job(json!({"change": "optimize_repository", "relative_path": format!("busy-{i}.git"), "target_node_storage": "gitaly-2"})))
        .collect();
    for r in c.publisher().publish_many(&jobs, 100).await {
        r.unwrap();
    }
    let consumer = c
        .consumer_with(|config| config.replication.max_concurrent_jobs = 4)
        .await;
    let durable = &c
        .layout
        .consumers
        .iter()
        .find(|s| s.target_storage == "gitaly-2")
        .unwrap()
        .durable_name;
    let stream = c.js.get_stream(&c.layout.stream).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut info = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(durable)
            .await
            .unwrap();
        held.push(info.info().await.unwrap().num_ack_pending);
    }
    let most = held.iter().copied().max().unwrap_or(0);
    assert!(most > 0, "the consumer never took a job: {held:?}");
    // The server applies acks asynchronously to the next pull request, so
    // its count may lag by up to one batch.
    assert!(
        most <= bound + 10,
        "held {most} jobs at once, more than {bound} and a batch: {held:?}"
    );
    assert!(
        c.eventually(Duration::from_secs(30), || async {
            c.work_messages().await == 0
        })
        .await
    );
    assert_eq!(c.node(2).calls().len(), 150);
    consumer.stop().await.unwrap();
}

/// Storage names that need escaping in a subject; `gitaly-1` and `gitaly_3`
/// are plain, the latter what `gitaly.3` reads as once sanitized.
fn awkward_storages() -> Vec<String> {
    [
        "gitaly-1", "gitaly.3", "node~1", "störage", "a%41", "gitaly_3",
    ]
    .map(String::from)
    .to_vec()
}

/// JetStream names: only `A-Z a-z 0-9 - _`.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The (storage, relative path) of every call node `i` received, sorted.
fn calls_of(c: &Cluster, i: usize) -> Vec<(String, String)> {
    let mut calls: Vec<_> = c
        .node(i)
        .calls()
        .into_iter()
        .map(|call| (call.storage, call.relative_path))
        .collect();
    calls.sort();
    calls
}

/// Waits until node `i` (storage `i - 1`) has received `calls` calls, for
/// every node, and the work stream is empty.
async fn every_target_has_calls_and_the_stream_drains(
    c: &Cluster,
    storages: &[String],
    calls: usize,
) {
    for (i, storage) in storages.iter().enumerate() {
        assert!(
            c.node(i + 1).wait_for_calls(calls, WAIT).await,
            "{storage}: got {:?}",
            calls_of(c, i + 1)
        );
    }
    assert!(
        c.eventually(WAIT, || async { c.work_messages().await == 0 })
            .await,
        "{} jobs left in the work stream",
        c.work_messages().await
    );
}

#[tokio::test]
async fn storages_with_any_name_get_their_jobs_through_the_running_service() {
    let storages = awkward_storages();
    let c = Cluster::start_named(&storages, nats_url(), |_| {}).await;
    let mut names: Vec<&str> = c
        .layout
        .consumers
        .iter()
        .map(|s| s.durable_name.as_str())
        .collect();
    names.push(&c.layout.advisory_consumer);
    for name in &names {
        assert!(is_plain_name(name), "consumer name {name:?}");
    }
    names.sort();
    names.dedup();
    assert_eq!(names.len(), storages.len() + 1, "consumer names are unique");

    let service = ServiceTask::start(c.config.clone());
    for (i, storage) in storages.iter().enumerate() {
        // As any publisher would: raw JSON on the escaped subject...
        let raw = json!({"change": "optimize_repository", "virtual_storage": c.vs(), "relative_path": format!("raw-{i}.git"), "target_node_storage": storage});
        let subject = job_subject(&c.names.subject_prefix, c.vs(), storage);
        c.js.publish(subject, serde_json::to_vec(&raw).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
        // ...and with the library's publisher, as the CLI does.
        c.publish(&c.job(json!({"change": "optimize_repository", "relative_path": format!("lib-{i}.git"), "target_node_storage": storage}))).await;
    }
    every_target_has_calls_and_the_stream_drains(&c, &storages, 2).await;
    for (i, storage) in storages.iter().enumerate() {
        assert_eq!(
            calls_of(&c, i + 1),
            [
                (storage.clone(), format!("lib-{i}.git")),
                (storage.clone(), format!("raw-{i}.git"))
            ],
            "each job reached its own target, once"
        );
    }
    // The connection survived: later jobs still flow, to every target.
    for storage in &storages {
        c.publish(&c.job(json!({"change": "cleanup", "relative_path": "later.git", "target_node_storage": storage}))).await;
    }
    every_target_has_calls_and_the_stream_drains(&c, &storages, 3).await;
    assert!(c.dead_letters().await.is_empty());
    assert!(service.is_running());
    service.stop().await.unwrap();
}

#[tokio::test]
async fn consumers_under_their_old_names_are_moved_at_start_and_lose_no_job() {
    let storages = awkward_storages();
    let c = Cluster::start_named(&storages, nats_url(), |_| {}).await;
    let renamed = c.rename_consumers_to_old_names().await;
    let mut jobs = Vec::new();
    for storage in &storages {
        for n in 0..3 {
            jobs.push(c.job(json!({"change": "pack_refs", "relative_path": format!("old-{n}.git"), "target_node_storage": storage})));
        }
    }
    for r in c.publisher().publish_many(&jobs, 100).await {
        r.unwrap();
    }
    // One job taken by a process of the old deployment and never acked: in
    // flight when its consumer goes. (gitaly-1's old name has no `%`, so this
    // client can take it.)
    let (old_gitaly_1, _) = &renamed[0];
    let old_consumer: async_nats::jetstream::consumer::PullConsumer =
        c.js.get_stream(&c.layout.stream)
            .await
            .unwrap()
            .get_consumer(old_gitaly_1)
            .await
            .unwrap();
    use futures::StreamExt;
    let mut batch = old_consumer
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .unwrap();
    let _unacked = batch.next().await.unwrap().unwrap();

    let service = ServiceTask::start(c.config.clone());
    if c.role_nats.is_some() {
        // As the consumer role the service may not move consumers: it
        // waits, refused, and takes no job, until the operator's `setup`.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(service.is_running());
        for i in 1..=storages.len() {
            assert_eq!(calls_of(&c, i), [], "{}", storages[i - 1]);
        }
        let moved = gitaly_replicator::provision(&c.client, &c.layout)
            .await
            .unwrap();
        assert!(
            moved
                .iter()
                .any(|m| matches!(m, gitaly_replicator::LayoutChange::Moved { .. })),
            "{moved:?}"
        );
    }
    every_target_has_calls_and_the_stream_drains(&c, &storages, 3).await;
    for (i, storage) in storages.iter().enumerate() {
        let paths: Vec<String> = calls_of(&c, i + 1).into_iter().map(|(_, p)| p).collect();
        assert_eq!(paths, ["old-0.git", "old-1.git", "old-2.git"], "{storage}");
    }
    assert!(c.dead_letters().await.is_empty());
    let mut work: Vec<String> = c
        .layout
        .consumers
        .iter()
        .map(|s| s.durable_name.clone())
        .collect();
    work.sort();
    assert_eq!(
        c.consumer_names(&c.layout.stream).await,
        work,
        "old consumers are gone"
    );
    assert_eq!(
        c.consumer_names(&c.layout.advisory_stream).await,
        std::slice::from_ref(&c.layout.advisory_consumer)
    );
    assert!(service.is_running());
    service.stop().await.unwrap();
}
