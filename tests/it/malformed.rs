//! Malformed jobs on the work subjects, many of them, mixed with good ones:
//! each bad one goes to the dead letters with its reason, and none holds up
//! the good jobs behind it.

use crate::common::cluster::Cluster;
use gitaly_replicator::dead_letters::headers;
use gitaly_replicator::{Job, job_subject};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

/// A payload no consumer may accept on `subject`'s target (gitaly-2):
/// random bytes, JSON of the wrong shape, unknown fields or change types,
/// wrong types, cut-off jobs, huge fields, or a job for another target.
fn malformed(rng: &mut StdRng, vs: &str) -> Vec<u8> {
    let good = json!({"change": "cleanup", "virtual_storage": vs, "relative_path": "x.git", "target_node_storage": "gitaly-2"});
    match rng.random_range(0..8) {
        0 => {
            let mut bytes = vec![0u8; rng.random_range(0..200)];
            rng.fill_bytes(&mut bytes);
            bytes
        }
        1 => [json!(42), json!([1, 2]), json!("cleanup"), json!(null)][rng.random_range(0..4)]
            .to_string()
            .into_bytes(),
        2 => {
            let mut v = good.clone();
            v["surprise"] = json!(rng.random::<u32>());
            v.to_string().into_bytes()
        }
        3 => {
            let mut v = good.clone();
            v["change"] = json!(format!("change-{}", rng.random::<u16>()));
            v.to_string().into_bytes()
        }
        4 => {
            let bytes = good.to_string().into_bytes();
            let cut = rng.random_range(0..bytes.len() - 1);
            bytes[..cut].to_vec()
        }
        5 => {
            let mut v = good.clone();
            v["relative_path"] = json!(rng.random::<i32>());
            v.to_string().into_bytes()
        }
        6 => {
            let mut v = good.clone();
            v["relative_path"] = json!("a".repeat(70_000));
            v.to_string().into_bytes()
        }
        _ => {
            // Valid, but for another target than the subject's.
            let mut v = good.clone();
            v["target_node_storage"] = json!("gitaly-1");
            v.to_string().into_bytes()
        }
    }
}

#[tokio::test]
async fn ten_thousand_malformed_jobs_are_dead_lettered_and_a_thousand_good_ones_between_them_complete()
 {
    let c = Cluster::start_with(2, |t| {
        *t = t.replace("batch_size = 10", "batch_size = 100");
    })
    .await;
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let subject = job_subject(&c.names.subject_prefix, c.vs(), "gitaly-2");
    let consumer = c.consumer().await;
    let (mut bad, mut good) = (0, 0);
    let mut acks = Vec::new();
    while bad < 10_000 || good < 1_000 {
        // About one good job in eleven, at random places.
        let payload = if good < 1_000 && (bad == 10_000 || rng.random_range(0..11) == 0) {
            good += 1;
            json!({"change": "cleanup", "virtual_storage": c.vs(), "relative_path": format!("good-{good}.git"), "target_node_storage": "gitaly-2"}).to_string().into_bytes()
        } else {
            bad += 1;
            let p = malformed(&mut rng, c.vs());
            assert!(
                Job::from_json(&p).map_or(true, |j| j.target_node_storage != "gitaly-2"),
                "generated a valid job: {}",
                String::from_utf8_lossy(&p)
            );
            p
        };
        acks.push(c.js.publish(subject.clone(), payload.into()).await.unwrap());
        if acks.len() == 500 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let completed = || {
        c.node(2)
            .calls_to("Cleanup")
            .into_iter()
            .map(|call| call.relative_path)
            .collect::<HashSet<_>>()
    };
    assert!(
        c.eventually(Duration::from_secs(120), || async {
            completed().len() == 1_000 && c.work_messages().await == 0
        })
        .await,
        "{} of 1000 good jobs completed, {} messages left",
        completed().len(),
        c.work_messages().await
    );
    let mut dead = c.js.get_stream(&c.layout.dead_letter_stream).await.unwrap();
    assert_eq!(dead.info().await.unwrap().state.messages, 10_000);
    let sample = gitaly_replicator::dead_letters::list(&c.js, &c.layout, 1, 200)
        .await
        .unwrap();
    assert_eq!(sample.len(), 200);
    for m in &sample {
        assert_eq!(m.header(headers::REASON), Some("invalid"));
        assert!(
            !m.header(headers::ERROR).unwrap_or_default().is_empty(),
            "a dead letter without its reason"
        );
    }
    consumer.stop().await.unwrap();
}
