//! `dataloss`, as Praefect's: per virtual storage, the repositories whose
//! assigned replicas lag (outdated or missing), which storages hold the
//! latest generation, and whether a job waits in the work stream for each
//! storage. Reads Postgres and JetStream only; contacts no Gitaly node.
//!
//! A repository is *unavailable* when no storage can serve it as Praefect's
//! `valid_primaries` decides: configured, assigned, at the latest
//! generation, with no `delete_replica` job pending for it. Praefect also
//! requires the storage to be healthy; without asking the nodes every
//! configured storage counts as healthy here. Praefect lists only
//! unavailable repositories unless asked for the partially unavailable ones
//! too; so does this.

use crate::config::Config;
use crate::event::ChangeType;
use crate::queue::layout::Layout;
use crate::queue::pending::{PendingJobs, PendingScanError, scan_dead, scan_target};
use crate::store::{LaggingRepository, RepositoryStore, StoreError};
use async_nats::jetstream::Context;
use serde::Serialize;
use std::collections::HashMap;
use std::collections::hash_map::Entry;

/// What to report.
#[derive(Debug, Clone)]
pub struct DatalossOptions {
    /// One virtual storage, or every configured one.
    pub virtual_storage: Option<String>,
    /// Also list repositories that some storage can still serve.
    pub partially_unavailable: bool,
    /// Most messages read from the work stream per target.
    pub scan_limit: u64,
}

/// Why the report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DatalossError {
    #[error("unknown virtual storage: {0:?}")]
    UnknownVirtualStorage(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] PendingScanError),
}

/// The report: every virtual storage asked for, sorted by name.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DatalossReport {
    pub virtual_storages: Vec<VirtualStorageReport>,
    /// Targets whose pending jobs were not all read (the scan limit).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub incomplete_scans: Vec<ScannedTarget>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ScannedTarget {
    pub virtual_storage: String,
    pub storage: String,
    pub scanned: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VirtualStorageReport {
    pub name: String,
    pub repositories: Vec<RepositoryReport>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RepositoryReport {
    pub repository_id: i64,
    pub relative_path: String,
    pub primary: Option<String>,
    /// The latest generation.
    pub generation: i64,
    pub unavailable: bool,
    /// Storages at the latest generation.
    pub latest_generation_on: Vec<String>,
    /// Storages with a replica row below the latest generation.
    pub outdated: Vec<String>,
    /// Assigned storages without a replica row.
    pub missing: Vec<String>,
    pub storages: Vec<StorageReport>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaStatus {
    UpToDate,
    Outdated,
    Missing,
}

impl ReplicaStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaStatus::UpToDate => "up_to_date",
            ReplicaStatus::Outdated => "outdated",
            ReplicaStatus::Missing => "missing",
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StorageReport {
    pub storage: String,
    pub status: ReplicaStatus,
    /// `None` when the storage has no replica row.
    pub generation: Option<i64>,
    /// Changes behind the latest generation, as Praefect counts them (a
    /// missing replica counts as generation −1).
    pub behind_by: i64,
    pub assigned: bool,
    pub configured: bool,
    /// Whether a job for this replica waits in the work stream; `None` when
    /// none was found before the scan limit.
    pub pending_job: Option<bool>,
    /// The change types of those jobs.
    pub pending_changes: Vec<String>,
    /// The change types of this replica's jobs in the dead letters: they
    /// ran out of attempts (or were invalid) and run again only when
    /// replayed (`dead list`, `dead replay`).
    pub dead_changes: Vec<String>,
}

/// Builds the report from the store and the work stream.
pub async fn report(
    config: &Config,
    store: &RepositoryStore,
    js: &Context,
    layout: &Layout,
    options: &DatalossOptions,
) -> Result<DatalossReport, DatalossError> {
    let mut names: Vec<String> = match &options.virtual_storage {
        Some(name) if config.virtual_storage(name).is_none() => {
            return Err(DatalossError::UnknownVirtualStorage(name.clone()));
        }
        Some(name) => vec![name.clone()],
        None => config
            .virtual_storages
            .iter()
            .map(|v| v.name.clone())
            .collect(),
    };
    names.sort();
    names.dedup();
    let configured: Vec<(String, String)> = config
        .targets()
        .map(|(vs, node)| (vs.name.clone(), node.storage.clone()))
        .collect();
    let lagging = store.lagging_repositories(&configured, &names).await?;

    // Each target's subject is read once, however many repositories it lags on.
    let mut scans: HashMap<(String, String), PendingJobs> = HashMap::new();
    let mut dead: HashMap<(String, String), PendingJobs> = HashMap::new();
    for repo in &lagging {
        for replica in &repo.replicas {
            let key = (repo.virtual_storage.clone(), replica.storage.clone());
            if let Entry::Vacant(slot) = scans.entry(key) {
                let (vs, storage) = slot.key();
                let found = scan_target(js, layout, vs, storage, options.scan_limit).await?;
                let dead_found = scan_dead(js, layout, vs, storage, options.scan_limit).await?;
                dead.insert(slot.key().clone(), dead_found);
                slot.insert(found);
            }
        }
    }
    let mut incomplete_scans: Vec<ScannedTarget> = scans
        .iter()
        .filter(|(_, s)| !s.complete)
        .map(|((vs, storage), s)| ScannedTarget {
            virtual_storage: vs.clone(),
            storage: storage.clone(),
            scanned: s.scanned,
        })
        .collect();
    incomplete_scans
        .sort_by(|a, b| (&a.virtual_storage, &a.storage).cmp(&(&b.virtual_storage, &b.storage)));

    let mut by_vs: HashMap<String, Vec<RepositoryReport>> = HashMap::new();
    for repo in lagging {
        let report = repository_report(&repo, &scans, &dead);
        if report.unavailable || options.partially_unavailable {
            by_vs
                .entry(repo.virtual_storage.clone())
                .or_default()
                .push(report);
        }
    }
    Ok(DatalossReport {
        virtual_storages: names
            .into_iter()
            .map(|name| VirtualStorageReport {
                repositories: by_vs.remove(&name).unwrap_or_default(),
                name,
            })
            .collect(),
        incomplete_scans,
    })
}

fn repository_report(
    repo: &LaggingRepository,
    scans: &HashMap<(String, String), PendingJobs>,
    dead: &HashMap<(String, String), PendingJobs>,
) -> RepositoryReport {
    let mut storages = Vec::new();
    let mut unavailable = true;
    for replica in &repo.replicas {
        let status = match replica.generation {
            None => ReplicaStatus::Missing,
            Some(g) if g < repo.generation => ReplicaStatus::Outdated,
            Some(_) => ReplicaStatus::UpToDate,
        };
        let (pending_job, pending) =
            match scans.get(&(repo.virtual_storage.clone(), replica.storage.clone())) {
                Some(scan) => {
                    let found = scan.for_repository(&repo.relative_path, repo.repository_id);
                    let known = !found.is_empty() || scan.complete;
                    (known.then_some(!found.is_empty()), found)
                }
                None => (None, Default::default()),
            };
        let dead_changes = dead
            .get(&(repo.virtual_storage.clone(), replica.storage.clone()))
            .map(|d| d.for_repository(&repo.relative_path, repo.repository_id))
            .unwrap_or_default();
        let being_deleted = pending.contains(&ChangeType::DeleteReplica);
        if status == ReplicaStatus::UpToDate
            && replica.assigned
            && replica.configured
            && !being_deleted
        {
            unavailable = false;
        }
        storages.push(StorageReport {
            storage: replica.storage.clone(),
            status,
            generation: replica.generation,
            behind_by: repo.generation - replica.generation.unwrap_or(-1),
            assigned: replica.assigned,
            configured: replica.configured,
            pending_job,
            pending_changes: pending.iter().map(|c| c.as_str().to_owned()).collect(),
            dead_changes: dead_changes.iter().map(|c| c.as_str().to_owned()).collect(),
        });
    }
    let with = |status: ReplicaStatus| {
        storages
            .iter()
            .filter(|s| s.status == status)
            .map(|s| s.storage.clone())
            .collect()
    };
    RepositoryReport {
        repository_id: repo.repository_id,
        relative_path: repo.relative_path.clone(),
        primary: repo.primary.clone(),
        generation: repo.generation,
        unavailable,
        latest_generation_on: with(ReplicaStatus::UpToDate),
        outdated: with(ReplicaStatus::Outdated),
        missing: with(ReplicaStatus::Missing),
        storages,
    }
}
