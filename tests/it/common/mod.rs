//! Fixtures of the service's integration tests, over the testkit's: clusters
//! of recording or git-backed nodes with streams and a database of the
//! test's own, the service run in this process or as a process. Each owns
//! real resources and cleans them up on drop.
#![allow(dead_code)]

pub mod chaos;
pub mod cluster;
pub mod db;
pub mod process;
pub mod service;
pub mod service_metrics;
pub mod storage_nodes;

pub use testkit::{eventually, git, http, nats_server};
