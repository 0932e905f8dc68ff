//! 1,000 mixed jobs, 100 of them malformed or invalid, published while a
//! consumer runs: every valid job completes, every bad one is dead-lettered
//! with its reason, and the consumer keeps going.

use crate::common::cluster::Cluster;
use gitaly_replicator::dead_letters::headers;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn a_thousand_mixed_jobs_with_a_hundred_bad_ones_all_end_where_they_should() {
    let c = Cluster::start_with(3, |t| {
        *t = t.replace("batch_size = 10", "batch_size = 50");
    })
    .await;
    for i in 0..150 {
        c.db.store
            .create_repository(
                c.vs(),
                &format!("u{i}.git"),
                "gitaly-1",
                1 + i as i64,
                &["gitaly-1"],
            )
            .await
            .unwrap();
    }
    let consumer = c.consumer().await;
    let maintenance = [
        "cleanup",
        "repack_incremental",
        "midx_repack",
        "optimize_repository",
        "pack_refs",
        "write_commit_graph",
    ];
    let mut good = Vec::new();
    for i in 0..900usize {
        let target = if i % 2 == 0 { "gitaly-2" } else { "gitaly-3" };
        let v = if i < 150 {
            json!({"change": "update", "relative_path": format!("u{i}.git"), "target_node_storage": target, "source_node_storage": "gitaly-1"})
        } else {
            json!({"change": maintenance[i % maintenance.len()], "relative_path": format!("m{i}.git"), "target_node_storage": target})
        };
        good.push(c.job(v));
    }
    let subject2 = c
        .layout
        .consumer(c.vs(), "gitaly-2")
        .unwrap()
        .filter_subject
        .clone();
    let subject3 = c
        .layout
        .consumer(c.vs(), "gitaly-3")
        .unwrap()
        .filter_subject
        .clone();
    let mut bad: Vec<(String, Vec<u8>, &str)> = Vec::new();
    for i in 0..25 {
        bad.push((
            subject2.clone(),
            format!("{{\"change\": \"cleanup\", {i}").into_bytes(),
            "not valid JSON",
        ));
        bad.push((
            subject3.clone(),
            json!({"change": "defragment", "virtual_storage": c.vs(), "relative_path": format!("b{i}.git"), "target_node_storage": "gitaly-3"}).to_string().into_bytes(),
            "unknown change type",
        ));
        bad.push((
            subject2.clone(),
            c.job(json!({"change": "cleanup", "relative_path": format!("w{i}.git"), "target_node_storage": "gitaly-3"})).to_json(),
            "the payload is for",
        ));
        bad.push((
            subject3.clone(),
            c.job(json!({"change": "update", "relative_path": format!("n{i}.git"), "target_node_storage": "gitaly-3", "source_node_storage": "nowhere"})).to_json(),
            "is not configured",
        ));
    }
    // Interleave bad messages among the good ones, published while consuming.
    let publisher = c.publisher();
    let mut bad_iter = bad.iter();
    for chunk in good.chunks(9) {
        for r in publisher.publish_many(chunk, 100).await {
            r.unwrap();
        }
        if let Some((subject, payload, _)) = bad_iter.next() {
            c.js.publish(subject.clone(), payload.clone().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
    assert!(
        c.eventually(Duration::from_secs(90), || async {
            c.work_messages().await == 0
        })
        .await,
        "jobs left in the work stream"
    );
    let calls = c.node(2).calls().len() + c.node(3).calls().len();
    // Each update also asks the source for its object pool.
    let source_calls = c.node(1).calls_to("GetObjectPool").len();
    assert_eq!(source_calls, 150);
    assert_eq!(calls, 900, "every valid job dispatched exactly once");
    for i in 0..150 {
        let target = if i % 2 == 0 { "gitaly-2" } else { "gitaly-3" };
        assert_eq!(
            c.db.store
                .generation(c.vs(), &format!("u{i}.git"), target)
                .await
                .unwrap(),
            Some(1 + i as i64)
        );
    }
    let dead = c.dead_letters().await;
    assert_eq!(dead.len(), 100);
    for (_, payload, reason) in &bad {
        let d = dead
            .iter()
            .find(|d| d.payload.as_ref() == payload.as_slice())
            .expect("bad job not dead-lettered");
        // An unknown source may be known to a newer process: retried, then
        // dead when its attempts run out; the rest is invalid at once.
        let expected = if *reason == "is not configured" {
            "dead"
        } else {
            "invalid"
        };
        assert_eq!(d.header(headers::REASON), Some(expected));
        let error = d.header(headers::ERROR).unwrap();
        assert!(error.contains(reason), "{error} does not say {reason}");
    }
    consumer
        .stop()
        .await
        .expect("the consumer kept running and stopped cleanly");
}
