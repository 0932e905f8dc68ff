//! Fixtures shared by the integration tests; each owns a real resource and
//! cleans it up on drop.
#![allow(dead_code)]

pub mod cluster;
pub mod db;
pub mod git;
pub mod gitaly;
pub mod http;
pub mod nats_server;
pub mod process;
pub mod service;
pub mod storage_nodes;

/// Polls `check` every 50 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
