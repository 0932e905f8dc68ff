//! The service entry point with its operations endpoint: metrics under
//! Praefect's names, liveness and readiness.

use crate::common::http::{get, get_when_up};
use crate::common::service::RunningService;
use std::time::Duration;

#[tokio::test]
async fn metrics_use_praefects_names_and_health_endpoints_answer() {
    let service = RunningService::start("m.git").await;
    let (c, port) = (&service.cluster, service.port);
    let (code, body) = get_when_up(port, "/health/live").await;
    assert_eq!((code, body.trim()), (200, "ok"));
    assert!(
        c.eventually(Duration::from_secs(10), || async {
            get(port, "/health/ready").await.0 == 200
        })
        .await
    );
    service.publish_update_and_cleanup().await;
    assert!(
        c.eventually(Duration::from_secs(20), || async {
            c.work_messages().await == 0
        })
        .await
    );
    let vs = c.vs().to_owned();
    let scrape_has =
        |needle: String| async move { get(port, "/metrics").await.1.contains(&needle) };
    let completed = format!(
        "gitaly_replicator_jobs_total{{virtual_storage=\"{vs}\",gitaly_storage=\"gitaly-2\",change_type=\"update\",outcome=\"completed\"}} 1"
    );
    assert!(
        c.eventually(Duration::from_secs(5), || scrape_has(completed.clone()))
            .await
    );
    let (_, m) = get(port, "/metrics").await;
    assert!(m.contains(&format!(
        "gitaly_replicator_jobs_total{{virtual_storage=\"{vs}\",gitaly_storage=\"gitaly-3\",change_type=\"cleanup\",outcome=\"unsupported\"}} 1"
    )), "{m}");
    assert!(m.contains(&format!(
        "gitaly_praefect_replication_jobs{{virtual_storage=\"{vs}\",gitaly_storage=\"gitaly-2\",change_type=\"update\"}} 0"
    )), "in-flight gauge back to 0");
    assert!(
        m.contains("gitaly_praefect_replication_latency_bucket{type=\"update\",le=\"0.001\"}"),
        "Praefect's buckets"
    );
    assert!(m.contains("gitaly_praefect_replication_latency_bucket{type=\"update\",le=\"1500\"}"));
    assert!(m.contains("gitaly_praefect_replication_delay_bucket{type=\"cleanup\""));
    assert!(m.contains(&format!(
        "gitaly_replicator_target_healthy{{virtual_storage=\"{vs}\",gitaly_storage=\"gitaly-2\"}} 1"
    )));
    let depth = format!(
        "gitaly_praefect_replication_queue_depth{{virtual_storage=\"{vs}\",target_node=\"gitaly-2\",state=\"ready\"}} 0"
    );
    assert!(
        c.eventually(Duration::from_secs(15), || scrape_has(depth.clone()))
            .await,
        "queue depth gauge"
    );
    assert!(
        !m.contains("token-1") && !m.contains("token-2"),
        "a token leaked into metrics"
    );
    service.stop().await;
}

/// Praefect's metrics as Praefect exports them: the histogram buckets of
/// `[prometheus] grpc_latency_buckets`, latency observed for a job that
/// found nothing to do (Praefect observes every job that did not fail), and
/// the queue-depth states `ready`, `in_progress`, `failed`, `dead`. A process
/// of its own: the recorder, and so its buckets, is one per process.
#[tokio::test]
async fn praefect_metrics_take_the_configured_buckets_states_and_outcomes() {
    use crate::common::cluster::Cluster;
    use crate::common::process::{ReplicatorProcess, with_ops_on_any_port};
    use serde_json::json;

    let c = Cluster::start(2).await;
    // Both replicas at the repository's generation: the update is skipped.
    c.db.store
        .create_repository(c.vs(), "m.git", "gitaly-1", 4, &["gitaly-1", "gitaly-2"])
        .await
        .unwrap();
    let toml =
        with_ops_on_any_port(&c.toml) + "\n[prometheus]\ngrpc_latency_buckets = [0.05, 0.5, 7]\n";
    let service = ReplicatorProcess::run(&toml);
    let port = service.ops_port().await;
    c.publish(&c.job(json!({"change": "update", "relative_path": "m.git",
        "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"})))
        .await;
    let vs = c.vs().to_owned();
    let skipped = format!(
        "gitaly_replicator_jobs_total{{virtual_storage=\"{vs}\",gitaly_storage=\"gitaly-2\",change_type=\"update\",outcome=\"skipped\"}} 1"
    );
    let depth = |state: &str| {
        format!(
            "gitaly_praefect_replication_queue_depth{{virtual_storage=\"{vs}\",target_node=\"gitaly-2\",state=\"{state}\"}}"
        )
    };
    let mut m = String::new();
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            m = get(port, "/metrics").await.1;
            if m.contains(&skipped) && m.contains(&depth("failed")) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(m.contains(&skipped), "{m}");
    assert_eq!(c.node(2).calls_to("ReplicateRepository").len(), 0);
    assert!(
        m.contains("gitaly_praefect_replication_latency_count{type=\"update\"} 1"),
        "a skipped update is observed: {m}"
    );
    assert!(m.contains("gitaly_praefect_replication_latency_bucket{type=\"update\",le=\"7\"}"));
    assert!(m.contains("gitaly_praefect_replication_delay_bucket{type=\"update\",le=\"0.05\"}"));
    assert!(
        !m.contains("le=\"1500\""),
        "Praefect's default buckets despite the config"
    );
    for state in ["ready", "in_progress", "failed", "dead"] {
        assert!(m.contains(&depth(state)), "{state}: {m}");
    }
    assert!(!m.contains(&depth("redelivered")));
    service.signal("TERM");
    assert_eq!(service.wait().await.0, Some(0));
}
