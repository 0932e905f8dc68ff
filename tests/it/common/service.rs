//! The real service, run in this process with its operations endpoint on a
//! free port, over a recording Gitaly cluster.

use super::cluster::Cluster;
use gitaly_replicator::Config;
use gitaly_replicator::ServiceError;
use serde_json::json;
use testkit::recording_gitaly::Behaviour;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct RunningService {
    pub cluster: Cluster,
    /// Port of the operations endpoint (`/metrics`, `/health/*`).
    pub port: u16,
    relative_path: String,
    service: ServiceTask,
}

impl RunningService {
    /// Three recording nodes; `relative_path` is recorded on gitaly-1 and
    /// gitaly-3 answers `Cleanup` with UNIMPLEMENTED, so the jobs of
    /// [`Self::publish_update_and_cleanup`] end completed and unsupported.
    pub async fn start(relative_path: &str) -> RunningService {
        // Bound here and handed over: no other process can take the port.
        let ops = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = ops.local_addr().unwrap().port();
        let cluster = Cluster::start(3).await;
        cluster
            .db
            .store
            .create_repository(cluster.vs(), relative_path, "gitaly-1", 1, &["gitaly-1"])
            .await
            .unwrap();
        cluster.node(3).respond(
            "Cleanup",
            Behaviour::fail(tonic::Code::Unimplemented, "gone"),
        );
        let service =
            ServiceTask::serving_ops_on(Config::from_toml_str(&cluster.toml).unwrap(), ops);
        RunningService {
            cluster,
            port,
            relative_path: relative_path.to_owned(),
            service,
        }
    }

    /// An update to gitaly-2 and a cleanup on gitaly-3.
    pub async fn publish_update_and_cleanup(&self) {
        let c = &self.cluster;
        let path = self.relative_path.as_str();
        c.publish(&c.job(json!({"change": "update", "relative_path": path, "target_node_storage": "gitaly-2", "source_node_storage": "gitaly-1"}))).await;
        c.publish(&c.job(
            json!({"change": "cleanup", "relative_path": path, "target_node_storage": "gitaly-3"}),
        ))
        .await;
    }

    /// Stops the service as a signal would; it must end cleanly.
    pub async fn stop(self) {
        self.service.stop().await.unwrap();
    }
}

/// `gitaly_replicator::run` over a test's config, in a task.
pub struct ServiceTask {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServiceError>>,
}

impl ServiceTask {
    pub fn start(config: Config) -> ServiceTask {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gitaly_replicator::run(config, async {
            let _ = stopped.await;
        }));
        ServiceTask { stop, task }
    }

    /// Like [`ServiceTask::start`], serving `/metrics` and `/health/*` on
    /// `ops` instead of the config's address.
    pub fn serving_ops_on(config: Config, ops: std::net::TcpListener) -> ServiceTask {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gitaly_replicator::run_with_ops_listener(
            config,
            ops,
            async {
                let _ = stopped.await;
            },
        ));
        ServiceTask { stop, task }
    }

    /// Whether the service is still running (it has not failed).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Stops the service as a signal would; returns how `run` ended.
    pub async fn stop(self) -> Result<(), ServiceError> {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}
