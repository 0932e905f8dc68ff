//! What the writer did, and from it what every replica must end as: the
//! repositories it made, their generations, the paths renamed away or
//! deleted, every job it published, and the jobs meant for the dead letters.

use std::collections::{BTreeMap, BTreeSet};

/// Where the writer writes: Praefect's primary.
pub const SOURCE: &str = "gitaly-1";
/// The secondaries, which the updates go to.
pub const TARGETS: [&str; 2] = ["gitaly-2", "gitaly-3"];
pub const STORAGES: [&str; 3] = ["gitaly-1", "gitaly-2", "gitaly-3"];
/// Every repository the writer makes lives in this directory of a storage.
pub const DIR: &str = "chaos";

/// What a repository is used for. Maintenance jobs go only to repositories
/// whose replicas never go away, because a maintenance job that finds no
/// repository fails and is retried until it is dead (the poison jobs rely on
/// exactly that); the others get the replica-changing jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Maintained,
    Churned,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Active,
    /// Renames published; it is written to again once the source's took effect.
    Renaming {
        to: String,
    },
    Deleted,
}

#[derive(Debug, Clone)]
pub struct Repo {
    pub id: i64,
    pub path: String,
    pub kind: Kind,
    /// The source's generation, as the writer last raised it.
    pub generation: i64,
    pub phase: Phase,
}

/// One job as the stream took it.
#[derive(Debug, Clone)]
pub struct Published {
    pub sequence: u64,
    pub correlation_id: String,
    pub change: String,
    pub path: String,
    /// A rename's new path.
    pub new_path: Option<String>,
    pub target: String,
}

/// What a path must hold at the end, on every storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// The source's refs on every storage, and every replica at this generation.
    Live { generation: i64 },
    /// No directory on any storage, no rows in Postgres.
    Gone,
}

/// A job published to end in the dead letters.
#[derive(Debug, Clone)]
pub struct Poison {
    pub payload: Vec<u8>,
    /// The `Gitaly-Replicator-Reason` values it may carry.
    pub reasons: &'static [&'static str],
    pub what: &'static str,
}

#[derive(Debug, Default)]
pub struct Model {
    pub repos: Vec<Repo>,
    /// Paths deleted or renamed away.
    pub gone: BTreeSet<String>,
    /// Paths only poison jobs named; nothing may ever appear there.
    pub never_created: BTreeSet<String>,
    pub journal: Vec<Published>,
    pub poison: Vec<Poison>,
}

impl Model {
    /// Every path the run touched, with what the last jobs for it asked.
    /// A repository still being renamed counts as live at its new path: the
    /// final check then reports that the rename never took effect.
    pub fn expected(&self) -> BTreeMap<String, Expected> {
        let mut expected = BTreeMap::new();
        for path in self.gone.iter().chain(&self.never_created) {
            expected.insert(path.clone(), Expected::Gone);
        }
        for repo in &self.repos {
            let live = Expected::Live {
                generation: repo.generation,
            };
            match &repo.phase {
                Phase::Active => {
                    expected.insert(repo.path.clone(), live);
                }
                Phase::Renaming { to } => {
                    expected.insert(to.clone(), live);
                }
                Phase::Deleted => {}
            }
        }
        expected
    }

    /// Published jobs per change type, the poison ones apart.
    pub fn jobs_by_change(&self) -> BTreeMap<String, usize> {
        let mut by = BTreeMap::new();
        for p in &self.journal {
            *by.entry(p.change.clone()).or_default() += 1;
        }
        by
    }

    /// The journal's jobs for `path`, in publish order, for a report.
    pub fn history(&self, path: &str) -> Vec<&Published> {
        self.journal
            .iter()
            .filter(|p| p.path == path || p.new_path.as_deref() == Some(path))
            .collect()
    }
}
