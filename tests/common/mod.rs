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
pub mod storage_nodes;
