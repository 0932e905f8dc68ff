//! The state every handler of the node shares: its storages and the
//! per-repository locks, with the lookups handlers start with.

use crate::locks::{RepoGuard, RepoLocks};
use crate::storage::{RepoPath, Storages};
use gitaly_wire::proto::gitaly as pb;
use std::sync::Arc;
use tonic::Status;

/// The node's state; clones share it.
#[derive(Debug, Clone)]
pub struct StorageNode {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    storages: Storages,
    locks: RepoLocks,
}

impl StorageNode {
    pub fn new(storages: Storages) -> Self {
        StorageNode {
            inner: Arc::new(Inner {
                storages,
                locks: RepoLocks::default(),
            }),
        }
    }

    pub fn storages(&self) -> &Storages {
        &self.inner.storages
    }

    pub fn locks(&self) -> &RepoLocks {
        &self.inner.locks
    }

    /// Where the request's repository lives (it may not exist).
    pub fn repo(&self, repository: Option<&pb::Repository>) -> Result<RepoPath, Status> {
        self.inner.storages.resolve(repository)
    }

    /// The request's repository, locked, which must exist.
    pub async fn existing(
        &self,
        repository: Option<&pb::Repository>,
    ) -> Result<(RepoPath, RepoGuard), Status> {
        let repo = self.repo(repository)?;
        let guard = self.inner.locks.lock(&repo.path).await;
        repo.require()?;
        Ok((repo, guard))
    }
}
