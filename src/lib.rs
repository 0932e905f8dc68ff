//! gitaly-replicator: keeps the replicas of Git repositories in a Gitaly
//! Cluster in step, with NATS JetStream as the job queue and Postgres as the
//! repository store. It does the job of Praefect's replication manager.
//!
//! # Layout
//! - `config/`: the one TOML file (Praefect's shape) and its environment
//!   overrides, parsed and validated before anything connects.
//! - `event`: the job contract, ours and Praefect's, decoded once at the
//!   edge into a [`Job`] with typed params; `subject`: the subjects jobs
//!   travel on, with reversibly escaped storage names.
//! - `queue/`: JetStream only. `layout` (streams, consumers, their names),
//!   `publisher`, `puller` (the pull protocol), `consumer` (the loop that
//!   carries a job from fetch to acknowledgement), `ack` (the one decision:
//!   outcome → ack, nak with delay, term, dead letter), `requeue`,
//!   `dead_letter`, `advisories` (stranded jobs), `leftovers` (jobs the
//!   server keeps below a consumer's floor), `depth`, `pending` (the
//!   jobs waiting for a target, read without consuming them).
//! - `replicator`: one job → Gitaly calls → an outcome; it never touches the
//!   queue.
//! - `gitaly/`: clients with the v2 token, `gitaly-servers` metadata, health,
//!   error classification (the wire itself is the `gitaly-wire` crate).
//! - `store/`: Postgres only. Praefect's repository store, the per-replica
//!   order and lock fence of state-changing writes, completion dedup, the
//!   repository locks and their session, the batching of many jobs' reads
//!   and writes into one statement, and the TLS relay for the connections
//!   whose server must be verified against exactly `sslrootcert`.
//! - `service`: `run`, which wires the above together and owns shutdown;
//!   `dependencies`: waiting for NATS and Postgres, and watching them;
//!   `metrics`, `ops_server`: Prometheus metrics and health endpoints.
//! - `deploy`: manifests generated from the config; `dataloss`: lagging
//!   replicas from the store and the jobs waiting for them; `reconciler`:
//!   the jobs no publisher sent, scheduled from the store by one process.
//!
//! A job's path, fetch to ack, is traced file by file in `ARCHITECTURE.md`.
//!
//! # Public API
//! The service ([`run`], [`Config`]), the job contract ([`Job`] and its
//! parts), publishing ([`Publisher`] over a [`Layout`]), the operator's
//! tools (setup, status, dead letters, dataloss, manifests), Praefect's repository
//! store ([`RepositoryStore`]) and Gitaly clients ([`NodeClient`]). Every
//! module is private; what is not named here is an internal.

mod config;
mod dataloss;
mod dependencies;
mod deploy;
mod error_chain;
mod event;
mod gitaly;
mod metrics;
mod ops_server;
mod queue;
mod reconciler;
mod replicator;
mod retry_delay;
mod service;
mod stable_hash;
mod store;
mod subject;

#[cfg(test)]
mod test_database;

#[cfg(test)]
mod fuzz_targets;

// The service and its configuration.
pub use config::{
    Config, ConfigError, ConfigWarning, DEFAULT_LATENCY_BUCKETS, DEFAULT_RECONCILIATION_BUCKETS,
    DatabaseConfig, LogFormat, LoggingConfig, NatsConfig, Node, NodeAddress, PoolMode,
    PrometheusConfig, ReconciliationConfig, ReplicationConfig, Secret, SessionPooled,
    UrlCredentials, VerificationConfig, VirtualStorage, node_token_env_var, trim_directives,
};
pub use error_chain::display_error_chain;
pub use service::{
    ServiceError, connect_and_migrate, connect_store, open_store, provision, run,
    run_with_ops_listener,
};

// The job contract.
pub use event::{Change, ChangeType, InvalidEvent, Job, MAX_TEXT_LEN, SplitStrategy};
pub use subject::{
    SubjectError, dead_letter_prefix, escape_token, job_subject, parse_job_subject, unescape_token,
};

// JetStream: the layout, connecting, publishing, what an operator reads.
pub use queue::connect::{ConnectError, connect as connect_nats};
pub use queue::depth::{TargetDepth, snapshot as queue_depth};
pub use queue::incarnation::Incarnation;
pub use queue::layout::{ConsumerSpec, Layout, LayoutChange, LayoutError, byte_limit_is_safe};
pub use queue::publisher::{PublishError, Published, Publisher};

// `dataloss`: the repositories whose replicas lag, and the jobs waiting
// for them.
pub use dataloss::{
    DatalossError, DatalossOptions, DatalossReport, ReplicaStatus, RepositoryReport, ScannedTarget,
    StorageReport, VirtualStorageReport, report as dataloss_report,
};
pub use queue::pending::{PendingJobs, PendingScanError, scan_target as scan_pending_jobs};

/// The dead-letter stream: what a dead job carries, and the operator's
/// list, replay, delete and purge.
pub mod dead_letters {
    pub use crate::queue::dead_letter::{
        DeadLetterError, DeadMessage, dead_message_id, delete, headers, list, purge_all, replay,
        replay_subject,
    };
    pub use crate::queue::replay::superseded;
    pub use crate::queue::requeue::Placement;
}

/// The metric names, Praefect's kept where dashboards expect them.
pub mod metric_names {
    pub use crate::metrics::{
        ALL, DEAD_LETTERS_TOTAL, JOBS_TOTAL, LEFTOVER_JOBS_TOTAL, OUTCOMES, PULL_RENEWALS_TOTAL,
        QUEUE_DEPTH, RECONCILER_LEADER, RECONCILIATION_JOBS_TOTAL, RECONCILIATION_SCHEDULING,
        REPLICATION_DELAY, REPLICATION_JOBS, REPLICATION_LATENCY, STREAM_RECREATIONS_TOTAL,
        TARGET_HEALTHY, VERIFICATIONS_TOTAL,
    };
}
pub use metrics::install as install_metrics;

// The reconciler.
pub use reconciler::{
    Planned, RECONCILER_LOCK_KEY, ReconcileError, Reconciler, RoundReport, VerificationReport,
};

/// Manifests generated from the config: the JetStream objects as the nats
/// CLI's JSON, and the KEDA ScaledObject.
pub mod manifests {
    pub use crate::deploy::{
        ManifestFile, NATS_MONITORING_PORT, NATS_SCRIPT, PERMISSIONS_FILE, RolePermissions,
        SCALED_OBJECT_FILE, ScalingOptions, consumer_file_name, jetstream_files,
        load_config_without_secrets, nats_permissions, nats_permissions_conf, scaled_object,
        stream_file_name,
    };
}

// Praefect's repository store.
pub use store::{
    EmptyDatabase, LaggingRepository, REQUIRED_PRAEFECT_MIGRATION, REQUIRED_PRAEFECT_VERSION,
    ReconciliationBatch, ReplicaState, ReplicatedGeneration, RepositoryStore, StatementPool,
    StoreError, VerificationCursor,
};

// Gitaly: the protocol and clients of its nodes.
pub use gitaly::{
    CallContext, CallError, CallErrorKind, ChannelError, Health, NodeClient, NodeSet, SSL_CERT_DIR,
    SSL_CERT_FILE, TrustRoots, TrustRootsError,
};
pub use gitaly_wire::{auth, metadata, proto};
