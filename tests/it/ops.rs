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
