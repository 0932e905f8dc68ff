//! The jobs a demo run publishes, in two waves.
//!
//! 1. Replication: an `update` from the source to each target, for every
//!    repository.
//! 2. Once the replicas exist: one of each maintenance change on a replica,
//!    a `rename` of the last repository and a `delete` of the one before it,
//!    each sent to every storage that holds it (as Praefect does for
//!    repository-wide changes).

use crate::MIN_REPOSITORIES;
use crate::error::DemoError;
use crate::nodes::{SOURCE, STORAGES, TARGETS, VIRTUAL_STORAGE};
use crate::repositories::RepositorySpec;
use gitaly_replicator::{Change, Job, SplitStrategy};

/// Every maintenance change, with the params the demo sends.
pub const MAINTENANCE: [Change; 8] = [
    Change::GarbageCollect {
        create_bitmap: true,
        prune: true,
    },
    Change::RepackFull {
        create_bitmap: true,
    },
    Change::RepackIncremental,
    Change::Cleanup,
    Change::PackRefs { all_refs: true },
    Change::WriteCommitGraph {
        split_strategy: SplitStrategy::SizeMultiple,
    },
    Change::MidxRepack,
    Change::OptimizeRepository,
];

/// What the second wave does to which repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowUp {
    /// (relative path, target storage, change) of each maintenance job.
    pub maintenance: Vec<(String, String, Change)>,
    /// (old, new) relative path.
    pub renamed: (String, String),
    pub deleted: String,
}

/// Both waves.
#[derive(Debug, Clone)]
pub struct JobPlan {
    pub replication: Vec<Job>,
    pub follow_up: Vec<Job>,
    pub what: FollowUp,
}

impl JobPlan {
    pub fn total(&self) -> usize {
        self.replication.len() + self.follow_up.len()
    }
}

fn job(change: Change, relative_path: &str, target: &str, correlation_id: String) -> Job {
    Job {
        source_node_storage: matches!(change, Change::Update).then(|| SOURCE.to_owned()),
        change,
        virtual_storage: VIRTUAL_STORAGE.to_owned(),
        relative_path: relative_path.to_owned(),
        target_node_storage: target.to_owned(),
        correlation_id: Some(correlation_id),
        // The publisher stamps it when the job is sent.
        created_at: None,
        repository_id: None,
        replica_path: None,
    }
}

/// The plan for `repositories` (at least [`MIN_REPOSITORIES`]: one is
/// renamed, one deleted, the others kept for maintenance). `run_id`
/// prefixes correlation ids.
pub fn plan(repositories: &[RepositorySpec], run_id: &str) -> Result<JobPlan, DemoError> {
    if repositories.len() < MIN_REPOSITORIES {
        return Err(DemoError::Usage(format!(
            "the demo needs at least {MIN_REPOSITORIES} repositories, not {}",
            repositories.len()
        )));
    }
    let mut n = 0usize;
    let mut correlation = || {
        n += 1;
        format!("demo-{run_id}-{n:04}")
    };
    let mut replication = Vec::new();
    for repo in repositories {
        for target in TARGETS {
            replication.push(job(
                Change::Update,
                &repo.relative_path,
                target,
                correlation(),
            ));
        }
    }

    let count = repositories.len();
    let renamed = &repositories[count - 1].relative_path;
    let new_path = match renamed.strip_suffix(".git") {
        Some(stem) => format!("{stem}-renamed.git"),
        None => format!("{renamed}-renamed"),
    };
    let deleted = &repositories[count - 2].relative_path;
    let kept = &repositories[..count - 2];

    let mut follow_up = Vec::new();
    let mut maintenance = Vec::new();
    for (i, change) in MAINTENANCE.iter().enumerate() {
        let path = &kept[i % kept.len()].relative_path;
        let target = TARGETS[i % TARGETS.len()];
        follow_up.push(job(change.clone(), path, target, correlation()));
        maintenance.push((path.clone(), target.to_owned(), change.clone()));
    }
    for storage in STORAGES {
        let rename = Change::Rename {
            new_relative_path: new_path.clone(),
        };
        follow_up.push(job(rename, renamed, storage, correlation()));
        follow_up.push(job(Change::Delete, deleted, storage, correlation()));
    }
    Ok(JobPlan {
        replication,
        follow_up,
        what: FollowUp {
            maintenance,
            renamed: (renamed.clone(), new_path),
            deleted: deleted.clone(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repositories;

    #[test]
    fn every_repository_goes_to_both_targets_and_the_follow_up_covers_every_storage() {
        let repos = repositories::plan(3);
        assert!(plan(&repos[..2], "abc").is_err());
        let plan = plan(&repos, "abc").unwrap();
        assert_eq!(plan.replication.len(), 6);
        assert!(
            plan.replication
                .iter()
                .all(|j| j.source_node_storage.as_deref() == Some(SOURCE))
        );
        assert_eq!(plan.follow_up.len(), 8 + 3 + 3);
        assert_eq!(plan.what.deleted, repos[1].relative_path);
        assert!(plan.what.renamed.1.ends_with("-renamed.git"));
        assert!(
            plan.what
                .maintenance
                .iter()
                .all(|(p, _, _)| *p == repos[0].relative_path)
        );
        // Every job validates as the consumer would decode it.
        for j in plan.replication.iter().chain(&plan.follow_up) {
            assert_eq!(Job::from_json(&j.to_json()).unwrap().change, j.change);
        }
    }
}
