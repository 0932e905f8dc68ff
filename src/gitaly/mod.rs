//! The Gitaly side: generated clients wrapped with Gitaly's auth token,
//! `gitaly-servers` metadata, error classification and per-node channels.
//! The wire itself (generated code, the token, the metadata) is the
//! `gitaly-wire` crate's.

pub mod error;
pub mod health;
pub mod node;
pub mod tls;

pub use gitaly_wire::{auth, metadata};

pub use error::{CallError, CallErrorKind};
pub use health::Health;
pub use node::{CallContext, ChannelError, NodeClient, NodeSet};
pub use tls::{SSL_CERT_DIR, SSL_CERT_FILE, TrustRoots, TrustRootsError};
