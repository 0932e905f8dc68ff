//! The end of a run: every replica against its source, on disk (`git
//! for-each-ref` and HEAD in both directories, `git fsck` where maintenance
//! ran) and in Postgres (the generation recorded for the replica equals the
//! source's); a renamed repository only at its new path, a deleted one
//! nowhere.

use crate::error::DemoError;
use crate::git::{self, Refs};
use crate::jobs::FollowUp;
use crate::nodes::{DemoNodes, SOURCE, STORAGES, VIRTUAL_STORAGE};
use crate::repositories::{RepositorySpec, SOURCE_GENERATION};
use futures::stream::{self, StreamExt, TryStreamExt};
use gitaly_replicator::ChangeType;
use gitaly_replicator::RepositoryStore;
use std::fmt;
use std::path::Path;

/// What was found for one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The source replica: on disk and recorded at the source generation.
    Source,
    /// Same refs and HEAD as the source, same generation recorded.
    Match,
    /// Removed from disk and from Postgres, as the delete asked.
    Gone,
    /// Not on disk.
    Missing,
    RefsDiffer {
        differing: usize,
    },
    HeadDiffers {
        source: String,
        replica: String,
    },
    Generation {
        expected: Option<i64>,
        recorded: Option<i64>,
    },
    /// `git fsck` complained after maintenance.
    Corrupt(String),
    /// Still on disk or in Postgres where it should be gone.
    Leftover(String),
    /// git could not read it.
    Unreadable(String),
}

impl Verdict {
    pub fn is_ok(&self) -> bool {
        matches!(self, Verdict::Source | Verdict::Match | Verdict::Gone)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Source => f.write_str("source"),
            Verdict::Match => f.write_str("match"),
            Verdict::Gone => f.write_str("gone"),
            Verdict::Missing => f.write_str("MISSING"),
            Verdict::RefsDiffer { differing } => write!(f, "REFS DIFFER ({differing})"),
            Verdict::HeadDiffers { source, replica } => {
                write!(f, "HEAD DIFFERS ({replica} vs {source})")
            }
            Verdict::Generation { expected, recorded } => write!(
                f,
                "GENERATION {} (want {})",
                show(*recorded),
                show(*expected)
            ),
            Verdict::Corrupt(e) => write!(f, "FSCK FAILED: {e}"),
            Verdict::Leftover(what) => write!(f, "LEFTOVER: {what}"),
            Verdict::Unreadable(e) => write!(f, "UNREADABLE: {e}"),
        }
    }
}

fn show(generation: Option<i64>) -> String {
    generation.map_or_else(|| "none".to_owned(), |g| g.to_string())
}

/// What the run did to a repository besides replicating it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Replicated,
    Maintained(Vec<ChangeType>),
    Renamed { from: String },
    Deleted,
}

/// One repository's verdicts, one per storage in [`STORAGES`] order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryCheck {
    /// Where it ends (the new path of a renamed one).
    pub relative_path: String,
    pub role: Role,
    /// Refs on the source (0 for a deleted repository).
    pub refs: usize,
    pub replicas: Vec<(String, Verdict)>,
}

impl RepositoryCheck {
    pub fn is_ok(&self) -> bool {
        self.replicas.iter().all(|(_, v)| v.is_ok())
    }
}

/// Checks every repository of the run, a few at a time.
pub async fn verify(
    nodes: &DemoNodes,
    store: &RepositoryStore,
    git_home: &Path,
    specs: &[RepositorySpec],
    what: &FollowUp,
) -> Result<Vec<RepositoryCheck>, DemoError> {
    let checker = Checker {
        nodes,
        store,
        git_home,
    };
    let checker = &checker;
    stream::iter(specs)
        .map(|spec| async move {
            let path = &spec.relative_path;
            if *path == what.deleted {
                checker.deleted(path).await
            } else if *path == what.renamed.0 {
                checker.renamed(path, &what.renamed.1).await
            } else {
                let maintained: Vec<(String, ChangeType)> = what
                    .maintenance
                    .iter()
                    .filter(|(p, _, _)| p == path)
                    .map(|(_, target, change)| (target.clone(), change.change_type()))
                    .collect();
                checker.kept(path, &maintained).await
            }
        })
        .buffered(8)
        .try_collect()
        .await
}

struct Checker<'a> {
    nodes: &'a DemoNodes,
    store: &'a RepositoryStore,
    git_home: &'a Path,
}

impl Checker<'_> {
    fn on_disk(&self, storage: &str, relative_path: &str) -> bool {
        self.nodes
            .get(storage)
            .is_some_and(|n| n.repository(relative_path).exists())
    }

    async fn generation(&self, path: &str, storage: &str) -> Result<Option<i64>, DemoError> {
        Ok(self
            .store
            .generation(VIRTUAL_STORAGE, path, storage)
            .await?)
    }

    async fn refs(&self, storage: &str, path: &str) -> Result<Refs, String> {
        let dir = match self.nodes.get(storage) {
            Some(n) => n.repository(path),
            None => return Err(format!("no storage {storage}")),
        };
        git::refs(self.git_home, &dir)
            .await
            .map_err(|e| e.to_string())
    }

    /// A repository that stayed where it was (maintenance on `maintained`
    /// (target, change) pairs).
    async fn kept(
        &self,
        path: &str,
        maintained: &[(String, ChangeType)],
    ) -> Result<RepositoryCheck, DemoError> {
        let role = if maintained.is_empty() {
            Role::Replicated
        } else {
            Role::Maintained(maintained.iter().map(|(_, c)| *c).collect())
        };
        self.compare(path, role, |storage| {
            maintained.iter().any(|(t, _)| t == storage)
        })
        .await
    }

    /// A renamed repository: everything at the new path, nothing at the old.
    async fn renamed(&self, old: &str, new: &str) -> Result<RepositoryCheck, DemoError> {
        let mut check = self
            .compare(
                new,
                Role::Renamed {
                    from: old.to_owned(),
                },
                |_| false,
            )
            .await?;
        for (storage, verdict) in &mut check.replicas {
            if !verdict.is_ok() {
                continue;
            }
            if self.on_disk(storage, old) {
                *verdict = Verdict::Leftover("old path still on disk".into());
            } else if self.generation(old, storage).await?.is_some() {
                *verdict = Verdict::Leftover("old path still recorded".into());
            }
        }
        Ok(check)
    }

    /// A deleted repository: on no storage's disk, in no replica record.
    async fn deleted(&self, path: &str) -> Result<RepositoryCheck, DemoError> {
        let mut replicas = Vec::new();
        for storage in STORAGES {
            let verdict = if self.on_disk(storage, path) {
                Verdict::Leftover("still on disk".into())
            } else if self.generation(path, storage).await?.is_some() {
                Verdict::Leftover("still recorded".into())
            } else {
                Verdict::Gone
            };
            replicas.push((storage.to_owned(), verdict));
        }
        Ok(RepositoryCheck {
            relative_path: path.to_owned(),
            role: Role::Deleted,
            refs: 0,
            replicas,
        })
    }

    /// The source and every target at `path`; `fsck(storage)` says where
    /// to run `git fsck` too.
    async fn compare(
        &self,
        path: &str,
        role: Role,
        fsck: impl Fn(&str) -> bool,
    ) -> Result<RepositoryCheck, DemoError> {
        let source_generation = self.generation(path, SOURCE).await?;
        let source = self.refs(SOURCE, path).await;
        let mut replicas = Vec::new();
        let source_verdict = match (&source, source_generation) {
            _ if !self.on_disk(SOURCE, path) => Verdict::Missing,
            (Err(e), _) => Verdict::Unreadable(e.clone()),
            (Ok(_), Some(SOURCE_GENERATION)) => Verdict::Source,
            (Ok(_), recorded) => Verdict::Generation {
                expected: Some(SOURCE_GENERATION),
                recorded,
            },
        };
        replicas.push((SOURCE.to_owned(), source_verdict));
        for storage in &STORAGES[1..] {
            let verdict = match &source {
                Err(e) => Verdict::Unreadable(format!("source: {e}")),
                Ok(source) => {
                    self.replica(path, storage, source, source_generation, &fsck)
                        .await?
                }
            };
            replicas.push(((*storage).to_owned(), verdict));
        }
        Ok(RepositoryCheck {
            relative_path: path.to_owned(),
            role,
            refs: source.as_ref().map(Refs::count).unwrap_or_default(),
            replicas,
        })
    }

    async fn replica(
        &self,
        path: &str,
        storage: &str,
        source: &Refs,
        source_generation: Option<i64>,
        fsck: &impl Fn(&str) -> bool,
    ) -> Result<Verdict, DemoError> {
        if !self.on_disk(storage, path) {
            return Ok(Verdict::Missing);
        }
        let replica = match self.refs(storage, path).await {
            Ok(r) => r,
            Err(e) => return Ok(Verdict::Unreadable(e)),
        };
        if replica.lines != source.lines {
            let differing = source
                .lines
                .iter()
                .filter(|l| !replica.lines.contains(l))
                .count()
                + replica
                    .lines
                    .iter()
                    .filter(|l| !source.lines.contains(l))
                    .count();
            return Ok(Verdict::RefsDiffer { differing });
        }
        if replica.head != source.head {
            return Ok(Verdict::HeadDiffers {
                source: source.head.clone(),
                replica: replica.head,
            });
        }
        let recorded = self.generation(path, storage).await?;
        if recorded.is_none() || recorded != source_generation {
            return Ok(Verdict::Generation {
                expected: source_generation,
                recorded,
            });
        }
        if fsck(storage)
            && let Some(dir) = self.nodes.get(storage).map(|n| n.repository(path))
            && let Err(e) = git::fsck(self.git_home, &dir).await
        {
            return Ok(Verdict::Corrupt(e));
        }
        Ok(Verdict::Match)
    }
}
