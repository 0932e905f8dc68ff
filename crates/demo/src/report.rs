//! The demo's result and the summary printed from it: a per-repository
//! verdict table, then repositories, jobs by outcome, time, metrics, and
//! one PASS/FAIL line.

use crate::measurements::Measurements;
use crate::nodes::STORAGES;
use crate::verify::{RepositoryCheck, Role};
use gitaly_replicator::ChangeType;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// What was built on the source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepositoryStats {
    pub created: usize,
    pub commits: usize,
    pub refs: usize,
}

/// Where things stay after `--keep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// The run id, which `--clean` takes.
    pub run_id: String,
    /// With `--tls`: the run's CA, which the nodes' certificates need.
    pub ca_file: Option<PathBuf>,
    pub workspace: PathBuf,
    pub storages: Vec<(String, PathBuf)>,
    pub config_file: PathBuf,
    pub database_url: String,
    pub streams: Vec<String>,
}

/// Everything a run found.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub run_id: String,
    pub repositories: RepositoryStats,
    /// Jobs published, by change type.
    pub published: BTreeMap<ChangeType, u64>,
    pub measurements: Measurements,
    /// Messages in the dead-letter stream at the end.
    pub dead_letters: u64,
    /// Jobs still in the work stream when the run stopped waiting.
    pub unfinished: u64,
    pub setup_time: Duration,
    /// From the consumer's start to the last job acknowledged.
    pub jobs_time: Duration,
    pub total_time: Duration,
    pub checks: Vec<RepositoryCheck>,
    pub metrics_url: String,
    pub kept: Option<Kept>,
}

impl DemoReport {
    /// Every replica matches, every job finished, none died.
    pub fn passed(&self) -> bool {
        self.unfinished == 0 && self.dead_letters == 0 && self.checks.iter().all(|c| c.is_ok())
    }

    pub fn jobs_published(&self) -> u64 {
        self.published.values().sum()
    }

    /// (matching, checked) over the target replicas.
    pub fn replica_tally(&self) -> (usize, usize) {
        let targets = self
            .checks
            .iter()
            .flat_map(|c| c.replicas.iter().skip(1))
            .collect::<Vec<_>>();
        (
            targets.iter().filter(|(_, v)| v.is_ok()).count(),
            targets.len(),
        )
    }
}

/// `@hashed/6b/86/6b86b273ff34…-renamed.git`: the hash cut to 12 digits.
fn short_path(path: &str) -> String {
    let (dir, file) = path.rsplit_once('/').unwrap_or(("", path));
    let (stem, ext) = file.split_once(['.', '-']).unwrap_or((file, ""));
    let sep = &file[stem.len()..(stem.len() + 1).min(file.len())];
    let stem = if stem.chars().count() > 12 {
        format!("{}…", stem.chars().take(12).collect::<String>())
    } else {
        stem.to_owned()
    };
    let file = if ext.is_empty() {
        stem
    } else {
        format!("{stem}{sep}{ext}")
    };
    if dir.is_empty() {
        file
    } else {
        format!("{dir}/{file}")
    }
}

fn role(r: &Role) -> String {
    match r {
        Role::Replicated => "replicated".into(),
        Role::Maintained(changes) => {
            let names: Vec<&str> = changes.iter().map(|c| c.as_str()).collect();
            format!("replicated + {}", names.join(", "))
        }
        Role::Renamed { from } => format!("renamed from {}", short_path(from)),
        Role::Deleted => "deleted".into(),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Replicas (refs and HEAD compared with git; generations read from Postgres)"
        )?;
        let paths: Vec<String> = self
            .checks
            .iter()
            .map(|c| short_path(&c.relative_path))
            .collect();
        let width = paths
            .iter()
            .map(|p| p.chars().count())
            .max()
            .unwrap_or(0)
            .max("repository".len());
        write!(f, "  {:<width$} {:>4}", "repository", "refs")?;
        for s in STORAGES {
            write!(f, "  {s:<9}")?;
        }
        writeln!(f, "  what happened")?;
        for (c, path) in self.checks.iter().zip(&paths) {
            write!(f, "  {path:<width$} {:>4}", c.refs)?;
            for (_, v) in &c.replicas {
                write!(f, "  {:<9}", v.to_string())?;
            }
            writeln!(f, "  {}", role(&c.role))?;
        }
        writeln!(f)?;

        let r = &self.repositories;
        writeln!(f, "Summary of demo run {}", self.run_id)?;
        writeln!(
            f,
            "  repositories  {} created on gitaly-1 ({} commits, {} refs), replicated to gitaly-2 and gitaly-3; 1 renamed, 1 deleted",
            r.created, r.commits, r.refs
        )?;
        let published: Vec<String> = self
            .published
            .iter()
            .map(|(c, n)| format!("{n} {c}"))
            .collect();
        writeln!(
            f,
            "  jobs          {} published: {}",
            self.jobs_published(),
            published.join(", ")
        )?;
        let m = &self.measurements;
        writeln!(
            f,
            "  outcomes      {} completed, {} skipped, {} unsupported, {} invalid, {} failed attempts, {} dead letters, {} unfinished",
            m.total("completed"),
            m.total("skipped"),
            m.total("unsupported"),
            m.total("invalid"),
            m.failed,
            self.dead_letters,
            self.unfinished
        )?;
        let mut by_change: BTreeMap<ChangeType, Vec<String>> = BTreeMap::new();
        for (change, outcome, n) in &m.outcomes {
            by_change
                .entry(*change)
                .or_default()
                .push(format!("{n} {outcome}"));
        }
        for (change, counts) in by_change {
            writeln!(f, "      {:<20} {}", change.as_str(), counts.join(", "))?;
        }
        let rate = if self.jobs_time.is_zero() {
            0.0
        } else {
            self.jobs_published() as f64 / self.jobs_time.as_secs_f64()
        };
        writeln!(
            f,
            "  time          {} in all: setup {}, jobs {} ({rate:.1} jobs/s), then verification",
            secs(self.total_time),
            secs(self.setup_time),
            secs(self.jobs_time),
        )?;
        let (matching, checked) = self.replica_tally();
        writeln!(
            f,
            "  replicas      {matching} of {checked} target replicas as expected (match, or gone where deleted)"
        )?;
        writeln!(
            f,
            "  metrics       served at {} while the demo ran; scraped at the end:",
            self.metrics_url
        )?;
        let mean = |(count, sum): (u64, f64)| {
            if count == 0 {
                "no observations".to_owned()
            } else {
                format!(
                    "{count} observations, mean {:.1} ms",
                    sum * 1000.0 / count as f64
                )
            }
        };
        writeln!(
            f,
            "      gitaly_replicator_jobs_total{{virtual_storage=\"default\"}}   {}",
            m.outcomes.iter().map(|(_, _, n)| n).sum::<u64>()
        )?;
        writeln!(
            f,
            "      gitaly_praefect_replication_latency             {}",
            mean(m.latency)
        )?;
        writeln!(
            f,
            "      gitaly_praefect_replication_delay               {}",
            mean(m.delay)
        )?;
        let healthy: Vec<String> = m.healthy.iter().map(|(s, v)| format!("{s}={v}")).collect();
        writeln!(
            f,
            "      gitaly_replicator_target_healthy                {}",
            healthy.join(" ")
        )?;
        writeln!(
            f,
            "      gitaly_replicator_dead_letters_total            {}",
            m.dead_letters
        )?;
        if let Some(k) = &self.kept {
            writeln!(
                f,
                "  kept (--keep); the storage nodes stopped with the demo:"
            )?;
            writeln!(f, "      workspace     {}", k.workspace.display())?;
            for (storage, dir) in &k.storages {
                writeln!(f, "      {storage:<13} {}", dir.display())?;
            }
            writeln!(f, "      database      {}", k.database_url)?;
            writeln!(f, "      streams       {}", k.streams.join(", "))?;
            let trust = k
                .ca_file
                .as_ref()
                .map(|ca| format!("SSL_CERT_FILE={} ", ca.display()))
                .unwrap_or_default();
            writeln!(
                f,
                "      inspect with  {trust}gitaly-replicator --config {} status",
                k.config_file.display()
            )?;
            writeln!(
                f,
                "      remove with   gitaly-replicator-demo --clean {} (with the same --nats-url and --database-url, if given)",
                k.run_id
            )?;
        }
        writeln!(f)?;
        if self.passed() {
            write!(
                f,
                "PASS: every replica matches its source ({matching} of {checked})"
            )
        } else {
            write!(
                f,
                "FAIL: {} of {checked} target replicas differ, {} jobs unfinished, {} dead letters",
                checked - matching,
                self.unfinished,
                self.dead_letters
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_hashed_paths_are_shortened_for_the_table() {
        let h = "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b";
        assert_eq!(
            short_path(&format!("@hashed/6b/86/{h}.git")),
            "@hashed/6b/86/6b86b273ff34….git"
        );
        assert_eq!(
            short_path(&format!("@hashed/6b/86/{h}-renamed.git")),
            "@hashed/6b/86/6b86b273ff34…-renamed.git"
        );
        assert_eq!(short_path("a.git"), "a.git");
    }
}
