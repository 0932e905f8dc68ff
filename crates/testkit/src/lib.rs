//! Fixtures for the workspace's tests and benchmarks. Each owns a real
//! resource and cleans it up on drop; none knows the replicator's internals,
//! so the service's own unit tests can use them too.
//! - [`recording_gitaly`]: a tonic server speaking Gitaly's protocol that
//!   records every call and answers as told;
//! - [`db`]: a Postgres database per test;
//! - [`delay_proxy`]: a TCP proxy that can hold traffic back, for a slow
//!   network or database;
//! - [`nats_server`]: a private nats-server, for tests that stop the broker;
//! - [`nats_cluster`]: a private 3-node nats-server cluster, for tests that
//!   kill one node;
//! - [`postgres_server`]: a private Postgres, for tests that stop the database;
//! - [`pgbouncer`]: a private PgBouncer in front of a Postgres;
//! - [`storage_node`]: `storage-node` processes over real repositories;
//! - [`git`]: bare repositories with commits, branches and tags;
//! - [`http`]: GETs to an operations endpoint;
//! - [`ports`]: ports for child processes that bind their own;
//! - [`tls`]: certificate authorities and certificates made for a test.

pub mod db;
pub mod delay_proxy;
pub mod git;
pub mod http;
pub mod metrics;
pub mod nats_cluster;
pub mod nats_server;
pub mod pgbouncer;
pub mod ports;
pub mod postgres_server;
pub mod praefect_queue;
pub mod recording_gitaly;
pub mod storage_node;
pub mod tls;

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
