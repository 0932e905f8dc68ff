//! The consumer against a private nats-server that is restarted under it.

use crate::common::cluster::Cluster;
use crate::common::nats_server::PrivateNats;
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
