//! Gitaly's wire protocol, shared by the replicator, the storage node and the
//! test fixtures: the gRPC services generated from the top-level `proto/`
//! (same package, service, method names and field numbers as Gitaly's), the
//! v2 authentication token, and the metadata Gitaly reads besides it.

pub mod auth;
pub mod codec;
pub mod metadata;

/// Code generated from `proto/`.
pub mod proto {
    pub mod gitaly {
        tonic::include_proto!("gitaly");
    }
    pub mod health {
        tonic::include_proto!("grpc.health.v1");
    }
}
