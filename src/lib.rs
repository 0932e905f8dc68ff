//! gitaly-replicator: keeps the replicas of Git repositories in a Gitaly
//! Cluster in step, with NATS JetStream as the job queue and Postgres as the
//! repository store.

pub mod event;

/// Code generated from `proto/`.
pub mod proto {
    pub mod gitaly {
        tonic::include_proto!("gitaly");
    }
    pub mod health {
        tonic::include_proto!("grpc.health.v1");
    }
}
