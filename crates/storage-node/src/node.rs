//! The state every handler of the node shares: its storages, the
//! per-repository locks and the tasks changing repositories, with the
//! lookups handlers start with.

use crate::cleanup;
use crate::locks::{RepoGuard, RepoLocks};
use crate::storage::{RepoPath, Storages, io_status, is_git_dir};
use gitaly_wire::proto::gitaly as pb;
use std::future::Future;
use std::sync::Arc;
use tokio_util::task::TaskTracker;
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
    /// The tasks of [`StorageNode::change`], which a shutdown waits for.
    changes: TaskTracker,
}

impl StorageNode {
    pub fn new(storages: Storages) -> Self {
        StorageNode {
            inner: Arc::new(Inner {
                storages,
                locks: RepoLocks::default(),
                changes: TaskTracker::new(),
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

    /// Runs the future `work` makes of `repo`, a change under `guard`, to its
    /// end in a task of its own, and answers with its result. A caller that
    /// goes away (a client deadline, a client gone) only stops waiting: git
    /// is never stopped in the middle of a ref transaction, and the next
    /// call for the repository waits on the guard until the change is done.
    ///
    /// First, lock files in the repository are removed and logged: with the
    /// guard held, and every git of the node that writes to the repository
    /// running under it, they belong to a git that died (the node was
    /// killed, say), and would fail every write from now on.
    pub async fn change<T, W, F>(
        &self,
        repo: &RepoPath,
        guard: RepoGuard,
        work: W,
    ) -> Result<T, Status>
    where
        T: Send + 'static,
        W: FnOnce(RepoPath) -> F,
        F: Future<Output = Result<T, Status>> + Send + 'static,
    {
        let work = work(repo.clone());
        let repo = repo.clone();
        let task = self.inner.changes.spawn(async move {
            let _guard = guard;
            remove_abandoned_locks(&repo)?;
            work.await
        });
        task.await.map_err(|e| {
            Status::internal(format!("the task changing the repository failed: {e}"))
        })?
    }

    /// Waits for the changes under way, those of calls that went away
    /// included; for a node that takes no more calls.
    pub async fn changes_done(&self) {
        self.inner.changes.close();
        self.inner.changes.wait().await;
    }
}

fn remove_abandoned_locks(repo: &RepoPath) -> Result<(), Status> {
    if !is_git_dir(&repo.path) {
        return Ok(());
    }
    let removed = cleanup::remove_abandoned_locks(&repo.path)
        .map_err(|e| io_status("removing lock files left by a git that died", e))?;
    if !removed.is_empty() {
        tracing::warn!(
            storage = %repo.storage.name,
            relative_path = %repo.relative,
            files = ?removed,
            "removed lock files that no git process of this node holds"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn a_change_whose_caller_went_away_ends_before_the_next_call_gets_the_guard() {
        let dir = tempfile::tempdir().unwrap();
        let storages = Storages::open(&[("s".into(), dir.path().to_path_buf())]).unwrap();
        let node = StorageNode::new(storages);
        let repo = node
            .repo(Some(&pb::Repository {
                storage_name: "s".into(),
                relative_path: "r.git".into(),
                ..Default::default()
            }))
            .unwrap();
        let guard = node.locks().lock(&repo.path).await;
        let done = Arc::new(AtomicBool::new(false));
        let finished = done.clone();
        let call = node.change(&repo, guard, |_| async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            finished.store(true, Ordering::SeqCst);
            Ok(())
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(10), call)
                .await
                .is_err()
        );
        let _next = node.locks().lock(&repo.path).await;
        assert!(done.load(Ordering::SeqCst));
    }
}
