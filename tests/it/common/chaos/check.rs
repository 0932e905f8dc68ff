//! The end state, read from the parts themselves: the refs on each node's
//! disk (`git for-each-ref` and HEAD in the bare repositories), the rows in
//! Postgres, the stream and its consumers, and the dead letters.

use super::model::{DIR, Expected, Model, Poison, SOURCE, STORAGES};
use crate::common::git::git_cmd;
use async_nats::jetstream;
use gitaly_replicator::Layout;
use gitaly_replicator::dead_letters::{self, headers};
use sqlx::PgPool;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub struct Checker {
    pub js: jetstream::Context,
    pub layout: Layout,
    pub pool: PgPool,
    pub virtual_storage: String,
    /// Each storage's directory, by name.
    pub dirs: BTreeMap<String, PathBuf>,
}

/// A replica's refs, or why there are none to read.
fn refs(repo: &Path) -> Result<Option<String>, String> {
    if !repo.exists() {
        return Ok(None);
    }
    let head = std::fs::read_to_string(repo.join("HEAD"))
        .map_err(|e| format!("{}: no HEAD: {e}", repo.display()))?;
    let out = git_cmd(repo)
        .args(["for-each-ref", "--format=%(objectname) %(refname)"])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{}: git for-each-ref: {}",
            repo.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(Some(format!(
        "{}HEAD: {}",
        String::from_utf8_lossy(&out.stdout),
        head.trim()
    )))
}

/// Whether every object the refs need is there.
fn connected(repo: &Path) -> Result<(), String> {
    let out = git_cmd(repo)
        .args(["fsck", "--connectivity-only", "--no-dangling"])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: git fsck: {}",
            repo.display(),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Checker {
    /// What is still in the queue: messages in the work stream, jobs pending
    /// or unacknowledged on a consumer, advisories not yet handled.
    pub async fn queue_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut stream = match self.js.get_stream(&self.layout.stream).await {
            Ok(s) => s,
            Err(e) => return vec![format!("work stream: {e}")],
        };
        let info = stream.info().await.cloned();
        match info {
            Ok(info) if info.state.messages == 0 => {}
            Ok(info) => {
                // Which ones, for the report: sequence, subject, delivery
                // headers and the start of the payload.
                let mut left = Vec::new();
                let (first, last) = (info.state.first_sequence, info.state.last_sequence);
                for seq in first..=last.min(first.saturating_add(2000)) {
                    if let Ok(m) = stream.get_raw_message(seq).await {
                        let payload = String::from_utf8_lossy(&m.payload);
                        left.push(format!(
                            "    #{seq} {} {:?} {}",
                            m.subject,
                            m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned()),
                            payload.chars().take(200).collect::<String>()
                        ));
                        if left.len() == 20 {
                            break;
                        }
                    }
                }
                // And where each consumer stands: a job at or below its ack
                // floor is one it will never deliver again.
                for c in &self.layout.consumers {
                    if let Ok(ci) = stream.consumer_info(&c.durable_name).await {
                        left.push(format!(
                            "    consumer {}: ack floor {}, delivered {}, {} pending, {} unacknowledged, {} redelivered",
                            c.durable_name,
                            ci.ack_floor.stream_sequence,
                            ci.delivered.stream_sequence,
                            ci.num_pending,
                            ci.num_ack_pending,
                            ci.num_redelivered
                        ));
                    }
                }
                problems.push(format!(
                    "{} jobs still in the work stream:\n{}",
                    info.state.messages,
                    left.join("\n")
                ))
            }
            Err(e) => problems.push(format!("work stream: {e}")),
        }
        let mut consumers: Vec<(String, String)> = self
            .layout
            .consumers
            .iter()
            .map(|c| (self.layout.stream.clone(), c.durable_name.clone()))
            .collect();
        consumers.push((
            self.layout.advisory_stream.clone(),
            self.layout.advisory_consumer.clone(),
        ));
        for (stream, consumer) in consumers {
            let info = match self.js.get_stream(&stream).await {
                Ok(s) => s.consumer_info(&consumer).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match info {
                Ok(i) if i.num_pending == 0 && i.num_ack_pending == 0 => {}
                Ok(i) => problems.push(format!(
                    "consumer {consumer}: {} pending, {} unacknowledged",
                    i.num_pending, i.num_ack_pending
                )),
                Err(e) => problems.push(format!("consumer {consumer}: {e}")),
            }
        }
        problems
    }

    /// Every path against what its last jobs asked, on disk and in
    /// Postgres; with `thorough`, also whether each live replica has all its
    /// objects. Returns the problems and how many replicas are as expected.
    pub async fn replica_problems(&self, model: &Model, thorough: bool) -> (Vec<String>, usize) {
        let expected = model.expected();
        let mut problems = Vec::new();
        let rows: Vec<(String, String, i64)> = match sqlx::query_as(
            "SELECT relative_path, storage, generation FROM storage_repositories
             WHERE virtual_storage = $1",
        )
        .bind(&self.virtual_storage)
        .fetch_all(&self.pool)
        .await
        {
            Ok(rows) => rows,
            Err(e) => return (vec![format!("reading storage_repositories: {e}")], 0),
        };
        let repositories: BTreeSet<String> = match sqlx::query_scalar(
            "SELECT relative_path FROM repositories WHERE virtual_storage = $1",
        )
        .bind(&self.virtual_storage)
        .fetch_all(&self.pool)
        .await
        {
            Ok(rows) => rows.into_iter().collect(),
            Err(e) => return (vec![format!("reading repositories: {e}")], 0),
        };
        let generations: BTreeMap<(String, String), i64> = rows
            .into_iter()
            .map(|(path, storage, g)| ((path, storage), g))
            .collect();
        for ((path, storage), g) in &generations {
            if !expected.contains_key(path) {
                problems.push(format!(
                    "{path} on {storage}: unexpected row at generation {g}"
                ));
            }
        }
        for path in &repositories {
            if !expected.contains_key(path) {
                problems.push(format!("{path}: unexpected repositories row"));
            }
        }
        problems.extend(self.unexpected_directories(&expected));

        let dirs = self.dirs.clone();
        let expected_paths = expected.clone();
        let (disk_problems, mut bad) =
            tokio::task::spawn_blocking(move || disk_state(&dirs, &expected_paths, thorough))
                .await
                .unwrap();
        problems.extend(disk_problems);
        for (path, want) in &expected {
            let has_row = repositories.contains(path);
            for storage in STORAGES {
                let row = generations
                    .get(&(path.clone(), storage.to_owned()))
                    .copied();
                let ok = match want {
                    Expected::Live { generation } => {
                        if row != Some(*generation) {
                            problems.push(format!(
                                "{path} on {storage}: generation {row:?} in Postgres, want {generation}"
                            ));
                        }
                        row == Some(*generation) && has_row
                    }
                    Expected::Gone => {
                        if let Some(g) = row {
                            problems.push(format!(
                                "{path} on {storage}: row at generation {g} left in Postgres"
                            ));
                        }
                        row.is_none() && !has_row
                    }
                };
                if !ok {
                    bad.insert((path.clone(), storage));
                }
            }
            match (want, has_row) {
                (Expected::Live { .. }, false) => {
                    problems.push(format!("{path}: no repositories row"))
                }
                (Expected::Gone, true) => problems.push(format!("{path}: repositories row left")),
                _ => {}
            }
        }
        (problems, expected.len() * STORAGES.len() - bad.len())
    }

    /// Repositories on disk that no job of the run asked for.
    fn unexpected_directories(&self, expected: &BTreeMap<String, Expected>) -> Vec<String> {
        let mut problems = Vec::new();
        for (storage, dir) in &self.dirs {
            let Ok(entries) = std::fs::read_dir(dir.join(DIR)) else {
                continue;
            };
            for e in entries.flatten() {
                let path = format!("{DIR}/{}", e.file_name().to_string_lossy());
                if !expected.contains_key(&path) {
                    problems.push(format!(
                        "{path} on {storage}: on disk, but no job asked for it"
                    ));
                }
            }
        }
        problems
    }

    /// The dead letters against the poison jobs: each one there, nothing
    /// else. Returns the problems, how many dead letters there are, and the
    /// poison jobs dead-lettered more than once with their reasons (two
    /// lineages of one job: a retry copy published, then the original's
    /// acknowledgement lost to a kill).
    pub async fn dead_letter_problems(
        &self,
        poison: &[Poison],
    ) -> (Vec<String>, usize, Vec<String>) {
        let dead = match dead_letters::list(&self.js, &self.layout, 1, 100_000).await {
            Ok(d) => d,
            Err(e) => return (vec![format!("dead letters: {e}")], 0, Vec::new()),
        };
        let mut problems = Vec::new();
        for d in &dead {
            let reason = d.header(headers::REASON).unwrap_or_default();
            match poison.iter().find(|p| p.payload == d.payload.as_ref()) {
                Some(p) if p.reasons.contains(&reason) => {}
                Some(p) => problems.push(format!(
                    "dead letter of a poison job ({}) with reason {reason:?}, want one of {:?}",
                    p.what, p.reasons
                )),
                None => problems.push(format!(
                    "unexpected dead letter ({reason}: {}) of {}",
                    d.header(headers::ERROR).unwrap_or_default(),
                    String::from_utf8_lossy(&d.payload)
                )),
            }
        }
        let mut repeated = Vec::new();
        for p in poison {
            let reasons: Vec<_> = dead
                .iter()
                .filter(|d| d.payload.as_ref() == p.payload.as_slice())
                .map(|d| d.header(headers::REASON).unwrap_or_default())
                .collect();
            if reasons.is_empty() {
                problems.push(format!(
                    "poison job ({}) not in the dead letters: {}",
                    p.what,
                    String::from_utf8_lossy(&p.payload)
                ));
            } else if reasons.len() > 1 {
                repeated.push(format!("{} ({}): {reasons:?}", p.what, reasons.len()));
            }
        }
        (problems, dead.len(), repeated)
    }
}

/// The replicas that are not as expected, (path, storage).
type Bad = BTreeSet<(String, &'static str)>;

/// The disk half of the check: the problems, and the replicas they concern.
fn disk_state(
    dirs: &BTreeMap<String, PathBuf>,
    expected: &BTreeMap<String, Expected>,
    thorough: bool,
) -> (Vec<String>, Bad) {
    let mut problems = Vec::new();
    let mut bad = Bad::new();
    for (path, want) in expected {
        let source = refs(&dirs[SOURCE].join(path));
        for storage in STORAGES {
            let repo = dirs[storage].join(path);
            let ok = match (want, refs(&repo)) {
                (_, Err(e)) => {
                    problems.push(e);
                    false
                }
                (Expected::Gone, Ok(None)) => true,
                (Expected::Gone, Ok(Some(_))) => {
                    problems.push(format!("{path} on {storage}: still on disk"));
                    false
                }
                (Expected::Live { .. }, Ok(None)) => {
                    problems.push(format!("{path} on {storage}: missing on disk"));
                    false
                }
                (Expected::Live { .. }, Ok(Some(r))) => match &source {
                    Ok(Some(s)) if *s == r => match thorough.then(|| connected(&repo)) {
                        Some(Err(e)) => {
                            problems.push(e);
                            false
                        }
                        _ => true,
                    },
                    Ok(Some(s)) => {
                        problems.push(format!(
                            "{path} on {storage}: refs differ from the source's\n  source: {}\n  here:   {}",
                            s.replace('\n', "; "),
                            r.replace('\n', "; ")
                        ));
                        false
                    }
                    _ => false,
                },
            };
            if !ok {
                bad.insert((path.clone(), storage));
            }
        }
    }
    (problems, bad)
}
