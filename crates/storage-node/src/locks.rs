//! One lock per repository path: calls that change or read a whole
//! repository (maintenance, replication, snapshots, rename, removal) for the
//! same path run one at a time; calls for different repositories never wait
//! for each other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// Held while a call works on one repository.
pub type RepoGuard = OwnedMutexGuard<()>;

/// The lock table. Entries live as long as someone holds or waits for them.
#[derive(Debug, Default)]
pub struct RepoLocks {
    table: Mutex<HashMap<PathBuf, Weak<AsyncMutex<()>>>>,
}

impl RepoLocks {
    fn entry(&self, path: &Path) -> Arc<AsyncMutex<()>> {
        // The table is only touched for short, non-panicking updates.
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(lock) = table.get(path).and_then(Weak::upgrade) {
            return lock;
        }
        table.retain(|_, weak| weak.strong_count() > 0);
        let lock = Arc::new(AsyncMutex::new(()));
        table.insert(path.to_path_buf(), Arc::downgrade(&lock));
        lock
    }

    /// Waits for the repository at `path`.
    pub async fn lock(&self, path: &Path) -> RepoGuard {
        self.entry(path).lock_owned().await
    }

    /// Waits for two repositories, always in the same order so that two
    /// renames in opposite directions cannot deadlock.
    pub async fn lock_two(&self, a: &Path, b: &Path) -> (RepoGuard, Option<RepoGuard>) {
        if a == b {
            return (self.lock(a).await, None);
        }
        if a < b {
            let first = self.lock(a).await;
            (first, Some(self.lock(b).await))
        } else {
            let second = self.lock(b).await;
            (self.lock(a).await, Some(second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn same_path_waits_and_other_paths_do_not() {
        let locks = Arc::new(RepoLocks::default());
        let held = locks.lock(Path::new("/s/a.git")).await;
        let other =
            tokio::time::timeout(Duration::from_millis(50), locks.lock(Path::new("/s/b.git")));
        assert!(other.await.is_ok());
        let same =
            tokio::time::timeout(Duration::from_millis(50), locks.lock(Path::new("/s/a.git")));
        assert!(same.await.is_err());
        drop(held);
        let (_a, b) = locks
            .lock_two(Path::new("/s/b.git"), Path::new("/s/a.git"))
            .await;
        assert!(b.is_some());
    }
}
