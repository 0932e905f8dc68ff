//! The replicator service of a demo run: `service::run` in a task of this
//! process, exactly as `gitaly-replicator run` runs it, stopped with the
//! same graceful shutdown.

use crate::error::DemoError;
use crate::metrics_text;
use gitaly_replicator::Config;
use gitaly_replicator::ServiceError;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct ServiceTask {
    stop: Option<oneshot::Sender<()>>,
    /// `None` once awaited.
    handle: Option<JoinHandle<Result<(), ServiceError>>>,
}

impl ServiceTask {
    /// Runs the service on `config`, serving `/metrics` on `ops`.
    pub fn start(config: Config, ops: std::net::TcpListener) -> ServiceTask {
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(gitaly_replicator::run_with_ops_listener(
            config,
            ops,
            async move {
                let _ = stopped.await;
            },
        ));
        ServiceTask {
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    /// The service's error when it stopped on its own.
    pub async fn failure(&mut self) -> Option<DemoError> {
        let handle = self.handle.take_if(|h| h.is_finished())?;
        Some(match handle.await {
            Ok(Ok(())) => DemoError::ServiceTask("the service stopped by itself".into()),
            Ok(Err(e)) => DemoError::Service(e),
            Err(e) => DemoError::ServiceTask(e.to_string()),
        })
    }

    /// Waits until `/health/ready` at `ops` answers 200: streams, consumers
    /// and the database are in use.
    pub async fn wait_ready(
        &mut self,
        ops: SocketAddr,
        timeout: Duration,
    ) -> Result<(), DemoError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.failure().await {
                return Err(e);
            }
            if let Ok((200, _)) = metrics_text::get(ops, "/health/ready").await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DemoError::ServiceTask(format!(
                    "not ready after {timeout:?} (http://{ops}/health/ready)"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Graceful shutdown: no new jobs, running ones finish.
    pub async fn stop(mut self) -> Result<(), DemoError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.handle.take() {
            Some(handle) => match handle.await {
                Ok(r) => r.map_err(DemoError::Service),
                Err(e) => Err(DemoError::ServiceTask(e.to_string())),
            },
            None => Ok(()),
        }
    }
}

impl Drop for ServiceTask {
    fn drop(&mut self) {
        // Not stopped gracefully (the demo failed or was interrupted):
        // unacknowledged jobs go back to the stream, which is deleted anyway.
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}
