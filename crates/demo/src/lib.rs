//! `gitaly-replicator-demo`: the whole system at work on this machine, with
//! nothing but its NATS (JetStream) and Postgres.
//!
//! A run:
//! 1. checks that NATS (with JetStream) and Postgres answer, and says how to
//!    start the one that does not ([`preflight`]);
//! 2. starts three git-backed storage nodes in this process on 127.0.0.1,
//!    one virtual storage `default` with `gitaly-1`, `gitaly-2`, `gitaly-3`,
//!    each with its own directory and token ([`nodes`]);
//! 3. creates a database of its own and builds repositories with real
//!    commits, branches and tags on `gitaly-1`, recorded at generation 1
//!    ([`database`], [`repositories`]);
//! 4. publishes an `update` per repository and target on streams, subjects
//!    and consumers named for the run, and runs the replicator service in
//!    this process with metrics on a free port; once those are done, one of
//!    each maintenance change, a rename and a delete ([`jobs`],
//!    [`service_task`]), showing progress on stderr ([`progress`]);
//! 5. checks every replica against its source, on disk and in Postgres
//!    ([`verify`]), and reports jobs by outcome, time and metrics
//!    ([`measurements`], [`report`]);
//! 6. removes its streams, database and directory unless told to keep them.
//!
//! Everything is named after a run id ([`workspace`]), so a run never
//! touches real data or another run. [`run`] is what the CLI calls and what
//! the end-to-end test calls.

pub mod config;
pub mod database;
pub mod error;
pub mod git;
pub mod jobs;
pub mod measurements;
pub mod metrics_text;
pub mod nodes;
pub mod preflight;
pub mod progress;
pub mod report;
pub mod repositories;
pub mod service_task;
pub mod session;
pub mod tls;
pub mod verify;
pub mod workspace;

pub use error::{DemoError, Unreachable};
pub use progress::ProgressStyle;
pub use report::DemoReport;
pub use session::{clean, run};
pub use tls::DemoTls;

use std::time::Duration;

/// The fewest repositories a run works with: one is renamed, one deleted,
/// at least one kept.
pub const MIN_REPOSITORIES: usize = 3;

/// How a run is done.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Repositories created on `gitaly-1`.
    pub repositories: usize,
    /// Keep streams, database and directories, and report where they are.
    pub keep: bool,
    pub nats_url: String,
    /// The Postgres server the run creates its database on (any database of
    /// it to connect to for `CREATE DATABASE`).
    pub database_url: String,
    pub progress: ProgressStyle,
    /// How long to wait for the jobs before reporting them unfinished.
    pub timeout: Duration,
    /// The storage nodes serve TLS with these certificates, and the config
    /// names them `tls://`. The process must trust `ca_pem` (the binary's
    /// `--tls` puts it in `SSL_CERT_FILE` before anything starts).
    pub tls: Option<DemoTls>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            repositories: 20,
            keep: false,
            nats_url: "nats://127.0.0.1:4222".into(),
            database_url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            progress: ProgressStyle::Quiet,
            timeout: Duration::from_secs(120),
            tls: None,
        }
    }
}
