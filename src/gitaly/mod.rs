//! The Gitaly side: generated clients wrapped with Gitaly's auth token,
//! `gitaly-servers` metadata, error classification, per-node channels and a
//! recording Gitaly server for tests and benchmarks.

pub mod auth;
pub mod error;
pub mod health;
pub mod metadata;
pub mod node;
pub mod recording_server;

pub use error::{CallError, CallErrorKind};
pub use node::{CallContext, ChannelError, NodeClient, NodeSet};
