//! What the reconciler schedules for one repository, decided from its
//! replicas, the nodes' health and the jobs already waiting, as Praefect's
//! reconciler decides it:
//! - an assigned replica that is outdated or missing gets an `update` from a
//!   healthy replica at the latest generation, the primary first;
//! - once every assigned replica is at the latest generation, one unassigned
//!   replica at a time gets a `delete_replica`.
//!
//! A replica with a job waiting, or on an unhealthy storage, gets nothing;
//! a source with a `delete_replica` waiting is not used. A repository with
//! any job waiting gets no `delete_replica` (the replica may be the source
//! of that job).

use crate::event::ChangeType;
use crate::store::LaggingRepository;
use std::collections::BTreeSet;

/// One job to schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub change: ChangeType,
    pub source: Option<String>,
    pub target: String,
    /// The repository's latest generation, part of the job's message id.
    pub generation: i64,
}

impl Planned {
    /// The job's `Nats-Msg-Id`: one per (repository, target, generation, change), so
    /// that rounds within the stream's duplicate window do not pile up.
    pub fn message_id(&self, repository: &LaggingRepository) -> String {
        format!(
            "reconcile:{}:{}:{}:{}:{}",
            self.change.as_str(),
            repository.virtual_storage,
            repository.repository_id,
            self.target,
            self.generation
        )
    }
}

/// The plan for `repository`. `healthy` answers for a storage; `pending`
/// gives the change types of the jobs waiting for the repository on a
/// storage.
pub fn plan(
    repository: &LaggingRepository,
    healthy: impl Fn(&str) -> bool,
    pending: impl Fn(&str) -> BTreeSet<ChangeType>,
) -> Vec<Planned> {
    let latest = repository.generation;
    let waiting: Vec<(&str, BTreeSet<ChangeType>)> = repository
        .replicas
        .iter()
        .filter(|r| r.configured)
        .map(|r| (r.storage.as_str(), pending(&r.storage)))
        .collect();
    let waiting_on = |storage: &str| {
        waiting
            .iter()
            .find(|(s, _)| *s == storage)
            .map(|(_, w)| w.clone())
            .unwrap_or_default()
    };
    let mut sources: Vec<&str> = repository
        .replicas
        .iter()
        .filter(|r| r.configured && r.generation == Some(latest) && healthy(&r.storage))
        .filter(|r| !waiting_on(&r.storage).contains(&ChangeType::DeleteReplica))
        .map(|r| r.storage.as_str())
        .collect();
    // The primary first, then by name (the replicas come sorted).
    if let Some(primary) = &repository.primary
        && let Some(i) = sources.iter().position(|s| s == primary)
    {
        let p = sources.remove(i);
        sources.insert(0, p);
    }
    let mut planned = Vec::new();
    for replica in &repository.replicas {
        let behind = replica.generation.is_none_or(|g| g < latest);
        if !(replica.assigned && replica.configured && behind) {
            continue;
        }
        if !healthy(&replica.storage) || !waiting_on(&replica.storage).is_empty() {
            continue;
        }
        if let Some(source) = sources.iter().find(|s| **s != replica.storage) {
            planned.push(Planned {
                change: ChangeType::Update,
                source: Some((*source).to_owned()),
                target: replica.storage.clone(),
                generation: latest,
            });
        }
    }
    let assigned_settled = repository
        .replicas
        .iter()
        .filter(|r| r.assigned && r.configured)
        .all(|r| r.generation == Some(latest));
    let nothing_waiting = waiting.iter().all(|(_, w)| w.is_empty());
    if assigned_settled && nothing_waiting {
        let unassigned = repository
            .replicas
            .iter()
            .find(|r| !r.assigned && r.configured && r.generation.is_some() && healthy(&r.storage));
        if let Some(replica) = unassigned {
            planned.push(Planned {
                change: ChangeType::DeleteReplica,
                source: None,
                target: replica.storage.clone(),
                generation: latest,
            });
        }
    }
    planned
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ReplicaState;

    fn replica(storage: &str, generation: Option<i64>, assigned: bool) -> ReplicaState {
        ReplicaState {
            storage: storage.into(),
            generation,
            assigned,
            configured: true,
        }
    }

    fn repository(replicas: Vec<ReplicaState>) -> LaggingRepository {
        LaggingRepository {
            repository_id: 7,
            virtual_storage: "default".into(),
            relative_path: "a.git".into(),
            replica_path: None,
            primary: Some("gitaly-2".into()),
            generation: 5,
            replicas,
        }
    }

    fn all_healthy(_: &str) -> bool {
        true
    }

    fn nothing_pending(_: &str) -> BTreeSet<ChangeType> {
        BTreeSet::new()
    }

    fn summary(planned: &[Planned]) -> Vec<(ChangeType, Option<&str>, &str)> {
        planned
            .iter()
            .map(|p| (p.change, p.source.as_deref(), p.target.as_str()))
            .collect()
    }

    #[test]
    fn outdated_and_missing_replicas_get_an_update_from_the_primary_first() {
        let r = repository(vec![
            replica("gitaly-1", Some(5), true),
            replica("gitaly-2", Some(5), true),
            replica("gitaly-3", Some(4), true),
            replica("gitaly-4", None, true),
        ]);
        let planned = plan(&r, all_healthy, nothing_pending);
        assert_eq!(
            summary(&planned),
            [
                (ChangeType::Update, Some("gitaly-2"), "gitaly-3"),
                (ChangeType::Update, Some("gitaly-2"), "gitaly-4"),
            ]
        );
        assert_eq!(
            planned[0].message_id(&r),
            "reconcile:update:default:7:gitaly-3:5"
        );
    }

    #[test]
    fn unhealthy_targets_waiting_targets_and_sources_about_to_go_are_skipped() {
        let r = repository(vec![
            replica("gitaly-1", Some(5), true),
            replica("gitaly-2", Some(5), true),
            replica("gitaly-3", Some(4), true),
            replica("gitaly-4", None, true),
        ]);
        // gitaly-4 is down; gitaly-3 has a job waiting.
        let planned = plan(
            &r,
            |s| s != "gitaly-4",
            |s| match s {
                "gitaly-3" => BTreeSet::from([ChangeType::Update]),
                _ => BTreeSet::new(),
            },
        );
        assert!(planned.is_empty(), "{planned:?}");

        // The primary is down and gitaly-1 is about to lose its replica:
        // no source is left.
        let planned = plan(
            &r,
            |s| s != "gitaly-2",
            |s| match s {
                "gitaly-1" => BTreeSet::from([ChangeType::DeleteReplica]),
                _ => BTreeSet::new(),
            },
        );
        assert!(planned.is_empty(), "{planned:?}");

        // The primary is down: gitaly-1 serves.
        let planned = plan(&r, |s| s != "gitaly-2", nothing_pending);
        assert_eq!(
            summary(&planned),
            [
                (ChangeType::Update, Some("gitaly-1"), "gitaly-3"),
                (ChangeType::Update, Some("gitaly-1"), "gitaly-4"),
            ]
        );
    }

    #[test]
    fn one_unassigned_replica_is_deleted_once_every_assigned_one_is_current() {
        let lagging = repository(vec![
            replica("gitaly-1", Some(5), false),
            replica("gitaly-2", Some(5), true),
            replica("gitaly-3", Some(4), true),
            replica("gitaly-4", Some(5), false),
        ]);
        assert_eq!(
            summary(&plan(&lagging, all_healthy, nothing_pending)),
            [(ChangeType::Update, Some("gitaly-2"), "gitaly-3")]
        );

        let settled = repository(vec![
            replica("gitaly-1", Some(5), false),
            replica("gitaly-2", Some(5), true),
            replica("gitaly-3", Some(5), true),
            replica("gitaly-4", Some(5), false),
        ]);
        assert_eq!(
            summary(&plan(&settled, all_healthy, nothing_pending)),
            [(ChangeType::DeleteReplica, None, "gitaly-1")]
        );
        // Not while any job for the repository waits.
        let planned = plan(&settled, all_healthy, |s| match s {
            "gitaly-3" => BTreeSet::from([ChangeType::GarbageCollect]),
            _ => BTreeSet::new(),
        });
        assert!(planned.is_empty(), "{planned:?}");
    }
}
