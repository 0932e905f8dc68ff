//! gitaly-replicator: keeps the replicas of Git repositories in a Gitaly
//! Cluster in step, with NATS JetStream as the job queue and Postgres as the
//! repository store.

pub mod config;
pub mod deploy;
pub mod event;
pub mod gitaly;
pub mod metrics;
pub mod ops_server;
pub mod queue;
pub mod replicator;
pub mod retry_delay;
pub mod service;
pub mod stable_hash;
pub mod store;
pub mod subject;

pub use gitaly_wire::proto;
