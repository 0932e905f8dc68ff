//! A small git-backed storage node that speaks Gitaly's gRPC protocol, for
//! demos, end-to-end tests and benchmarks (binary `storage-node`).
//!
//! Each storage is a directory of bare repositories at `DIR/<relative path>`;
//! every change runs the system `git` with explicit arguments and a clean
//! environment ([`git`]). The node serves `gitaly.RepositoryService`,
//! `gitaly.ObjectPoolService`, `gitaly.RefService` (the methods the
//! replicator calls, plus `RepositoryExists`, `CreateRepository`,
//! `GetSnapshot` and `CalculateChecksum`) and `grpc.health.v1.Health`. Every
//! call but health checks must carry Gitaly's v2 token ([`guard`]).
//!
//! # Replication transport
//! `ReplicateRepository` works as Gitaly's does: the target reads the source
//! node's address and token from the `gitaly-servers` metadata, dials it, and
//! asks `RepositoryExists` (no → `NotFound` "invalid source repository"). It
//! then pulls the source's `GetSnapshot` stream, a tar of the bare
//! repository's `HEAD`, refs and objects (alternates' objects included,
//! configuration and hooks never), into a scratch directory inside the target
//! storage (`+gitaly/tmp`), unpacks it keeping only regular files under those
//! names, and fetches from it with `git fetch --prune --force --atomic
//! +refs/*:refs/*`, then copies HEAD:
//! - a target that exists gets exactly the source's refs: added, moved and
//!   deleted alike; git checks that the objects are complete before moving
//!   any ref, and the ref update is one transaction;
//! - a missing target is built in scratch space (`git init --bare` + the same
//!   fetch) and renamed into place, so it appears whole or not at all;
//! - when refs and HEAD already agree nothing is written, so a second call
//!   changes nothing.
//!
//! Why a snapshot and not an upload-pack stream: the protocol has no
//! upload-pack RPC here, the snapshot is what Gitaly's own `GetSnapshot`
//! sends, and going through `git fetch` on the target (rather than swapping
//! directories) keeps the target's own files (object pool link, maintenance
//! results) and lets git verify the objects. The price is that every
//! replication moves the whole repository, which suits the demo-sized
//! repositories this node is for.
//!
//! # Concurrency
//! One async lock per repository path ([`locks`]) orders the calls that read
//! or change a whole repository; calls for different repositories run in
//! parallel, each in its own scratch directory. A replication downloads and
//! unpacks before taking the target's lock, and a snapshot is written to a
//! scratch file under the source's lock and streamed after releasing it.
//!
//! # Cancellation and lock files
//! A call whose client goes away (a deadline, a dropped connection) must not
//! stop git in the middle of a ref transaction: git would leave `HEAD.lock`,
//! `packed-refs.lock` or `refs/….lock` behind, and every later write to the
//! repository would fail. So every call that runs git to change a
//! repository does it in a task that owns the repository's lock
//! ([`StorageNode::change`]): dropping the call only stops the wait, the
//! task runs its git commands to their end, then releases the lock, and the
//! next call for the repository waits for it. A shutdown waits for these
//! tasks too. On Linux, git gets SIGTERM, which lets it remove its lock
//! files, if the node dies first, even by SIGKILL ([`git`]).
//!
//! Since every git of the node that writes to a repository runs under its
//! lock, a lock file found with the lock held belongs to no live git of the
//! node, whatever its age: each change first removes those it finds
//! ([`cleanup::remove_abandoned_locks`]) and logs a warning naming the
//! repository and the files. The age-based housekeeping of `Cleanup` stays
//! for temporary objects and empty ref directories.
//!
//! # Left out
//! Gitaly's transactions (voting), custom hooks, `git_object_directory` and
//! quarantine directories, the `+gitaly` cache, and SHA-256 snapshots (a
//! received snapshot is always read as SHA-1).

pub mod checksum;
pub mod cleanup;
pub mod config;
pub mod faults;
pub mod git;
pub mod guard;
pub mod health_service;
pub mod lifecycle;
pub mod locks;
pub mod maintenance;
pub mod node;
pub mod object_pool;
pub mod object_pool_service;
pub mod ref_service;
pub mod replicate;
pub mod repository_service;
pub mod server;
pub mod snapshot;
pub mod snapshot_stream;
pub mod storage;

pub use config::{NodeConfig, NodeConfigError, parse_storage};
pub use faults::{FailMethod, Faults, parse_code, parse_fail_method, parse_failure_rate};
pub use node::StorageNode;
pub use server::{NodeTls, OpenNode, ServeError, serve};
