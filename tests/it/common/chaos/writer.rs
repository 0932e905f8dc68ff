//! The writer: Praefect's side of the run. It makes real commits on the
//! source, raises the generation in Postgres as Praefect does after a write,
//! and publishes jobs through a plain NATS client, as any publisher would:
//! updates, `delete_replica` followed by `update`, renames, deletes,
//! maintenance, and a few jobs meant for the dead letters. Outages of NATS
//! or Postgres only hold it up: it retries, with the same `Nats-Msg-Id`.

use super::model::{DIR, Kind, Model, Phase, Poison, Published, Repo, SOURCE, STORAGES, TARGETS};
use crate::common::git;
use async_nats::jetstream;
use gitaly_replicator::{RepositoryStore, job_subject};
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::time::Instant;

/// Repositories kept in use; deleted ones are replaced.
const IN_USE: usize = 12;
/// Longer than any outage the faults cause: past it the run is broken.
const GIVE_UP: Duration = Duration::from_secs(120);
/// Jobs of each poison kind.
const POISON_EACH: usize = 2;
const BRANCHES: [&str; 4] = ["main", "feature", "topic/a", "topic/b"];
const MAINTENANCE: [&str; 8] = [
    "gc",
    "repack_full",
    "repack_incremental",
    "cleanup",
    "pack_refs",
    "write_commit_graph",
    "midx_repack",
    "optimize_repository",
];

/// What the writer knows of a repository's refs on the source.
#[derive(Debug, Clone)]
struct Refs {
    branches: BTreeSet<String>,
    head: String,
}

pub struct Writer {
    pub model: Model,
    refs: Vec<Refs>,
    rng: StdRng,
    store: RepositoryStore,
    js: jetstream::Context,
    subject_prefix: String,
    virtual_storage: String,
    /// The source's storage directory.
    source_dir: PathBuf,
    made: u64,
    commits: u64,
    /// Poison jobs go out only until then, so the ones that must use up
    /// their attempts are dead before the run ends.
    poison_until: Instant,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

impl Writer {
    pub fn new(
        rng: StdRng,
        store: RepositoryStore,
        mut js: jetstream::Context,
        subject_prefix: &str,
        virtual_storage: &str,
        source_dir: PathBuf,
        poison_until: Instant,
    ) -> Writer {
        // A publish lost in a broker restart is retried soon.
        js.set_timeout(Duration::from_secs(2));
        Writer {
            model: Model::default(),
            refs: Vec::new(),
            rng,
            store,
            js,
            subject_prefix: subject_prefix.to_owned(),
            virtual_storage: virtual_storage.to_owned(),
            source_dir,
            made: 0,
            commits: 0,
            poison_until,
        }
    }

    /// The repositories in use at the start, replicated before the faults.
    pub async fn seed(&mut self) {
        for i in 0..IN_USE {
            let kind = if i % 2 == 0 {
                Kind::Maintained
            } else {
                Kind::Churned
            };
            self.create(kind).await;
        }
    }

    /// Writes and publishes until `until`.
    pub async fn run(mut self, until: Instant) -> Writer {
        while Instant::now() < until {
            self.settle_renames().await;
            self.step().await;
            let pause = self.rng.random_range(100..250);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        self
    }

    /// Waits for the source's renames still outstanding, publishing the
    /// updates that follow each; false when some never took effect.
    pub async fn finish_renames(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.settle_renames().await;
            let pending = self
                .model
                .repos
                .iter()
                .any(|r| matches!(r.phase, Phase::Renaming { .. }));
            if !pending {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn in_use(&self, kind: Option<Kind>) -> Vec<usize> {
        (0..self.model.repos.len())
            .filter(|&i| {
                let r = &self.model.repos[i];
                r.phase == Phase::Active && kind.is_none_or(|k| r.kind == k)
            })
            .collect()
    }

    async fn step(&mut self) {
        let active = self.in_use(None);
        if active.len() + self.renaming() < IN_USE {
            let maintained = self.in_use(Some(Kind::Maintained)).len();
            let kind = if maintained * 2 < IN_USE {
                Kind::Maintained
            } else {
                Kind::Churned
            };
            return self.create(kind).await;
        }
        let churned = self.in_use(Some(Kind::Churned));
        let maintained = self.in_use(Some(Kind::Maintained));
        let pick = |rng: &mut StdRng, from: &[usize]| from.choose(rng).copied();
        let roll = self.rng.random_range(0..100);
        let churn = pick(&mut self.rng, &churned);
        let maint = pick(&mut self.rng, &maintained);
        match (roll, churn, maint) {
            (50..62, Some(i), _) => self.delete_replica_then_update(i).await,
            (62..82, _, Some(i)) => self.maintenance(i).await,
            (82..88, Some(i), _) => self.rename(i).await,
            (88..91, Some(i), _) => self.delete(i).await,
            (91..94, _, _) if self.poison_due() => self.poison().await,
            _ => {
                if let Some(&i) = active.choose(&mut self.rng) {
                    self.write(i).await;
                }
            }
        }
    }

    fn renaming(&self) -> usize {
        self.model
            .repos
            .iter()
            .filter(|r| matches!(r.phase, Phase::Renaming { .. }))
            .count()
    }

    fn poison_due(&self) -> bool {
        Instant::now() < self.poison_until && self.model.poison.len() < 2 * POISON_EACH
    }

    /// A new repository on the source, recorded at generation 1 and
    /// published to both targets.
    async fn create(&mut self, kind: Kind) {
        let letter = match kind {
            Kind::Maintained => "m",
            Kind::Churned => "c",
        };
        let path = format!("{DIR}/{letter}{}.git", self.made);
        self.made += 1;
        let dir = self.source_dir.join(&path);
        let content = format!("{path}: first");
        blocking(move || {
            git::init_bare(&dir);
            git::commit(&dir, "main", &content);
        })
        .await;
        let id = self.raise(&path, 1).await;
        self.model.repos.push(Repo {
            id,
            path,
            kind,
            generation: 1,
            phase: Phase::Active,
        });
        self.refs.push(Refs {
            branches: BTreeSet::from(["main".to_owned()]),
            head: "main".to_owned(),
        });
        self.publish_updates(self.model.repos.len() - 1).await;
    }

    /// A write on the source: a commit, a branch deleted, a tag, or HEAD
    /// moved; then the generation raised and the targets' updates published.
    async fn write(&mut self, i: usize) {
        self.commits += 1;
        let n = self.commits;
        let dir = self.source_dir.join(&self.model.repos[i].path);
        let refs = &mut self.refs[i];
        let others: Vec<String> = refs
            .branches
            .iter()
            .filter(|b| **b != "main" && **b != refs.head)
            .cloned()
            .collect();
        let roll = self.rng.random_range(0..10);
        let args: Vec<String> = match roll {
            0 if !others.is_empty() => {
                let b = others.choose(&mut self.rng).cloned().unwrap_or_default();
                refs.branches.remove(&b);
                vec!["update-ref".into(), "-d".into(), format!("refs/heads/{b}")]
            }
            1 => vec![
                "update-ref".into(),
                format!("refs/tags/t{n}"),
                "refs/heads/main".into(),
            ],
            2 => vec![
                "tag".into(),
                "-a".into(),
                format!("a{n}"),
                "-m".into(),
                format!("tag {n}"),
                "main".into(),
            ],
            3 if refs.branches.len() > 1 => {
                let b = refs
                    .branches
                    .iter()
                    .filter(|b| **b != refs.head)
                    .cloned()
                    .collect::<Vec<_>>()
                    .choose(&mut self.rng)
                    .cloned()
                    .unwrap_or_default();
                refs.head = b.clone();
                vec![
                    "symbolic-ref".into(),
                    "HEAD".into(),
                    format!("refs/heads/{b}"),
                ]
            }
            _ => {
                let b = BRANCHES.choose(&mut self.rng).copied().unwrap_or("main");
                refs.branches.insert(b.to_owned());
                let content = format!("commit {n} on {b}");
                blocking(move || {
                    git::commit(&dir, b, &content);
                })
                .await;
                Vec::new()
            }
        };
        if !args.is_empty() {
            let dir = self.source_dir.join(&self.model.repos[i].path);
            blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                git::git(&dir, &args);
            })
            .await;
        }
        let repo = &mut self.model.repos[i];
        repo.generation += 1;
        let (path, generation) = (repo.path.clone(), repo.generation);
        self.raise(&path, generation).await;
        self.publish_updates(i).await;
    }

    /// Praefect's record of a write on the primary: the repository and the
    /// source's replica at `generation`. Returns the repository id.
    async fn raise(&self, path: &str, generation: i64) -> i64 {
        let deadline = Instant::now() + GIVE_UP;
        loop {
            match self
                .store
                .create_repository(&self.virtual_storage, path, SOURCE, generation, &[SOURCE])
                .await
            {
                Ok(id) => return id,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "raising {path} to generation {generation} failed for {GIVE_UP:?}: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn publish_updates(&mut self, i: usize) {
        let mut targets = TARGETS;
        targets.shuffle(&mut self.rng);
        for target in targets {
            self.job(i, "update", target, None).await;
        }
    }

    async fn delete_replica_then_update(&mut self, i: usize) {
        let target = TARGETS.choose(&mut self.rng).copied().unwrap_or(TARGETS[0]);
        self.job(i, "delete_replica", target, None).await;
        self.job(i, "update", target, None).await;
    }

    /// Maintenance of a replica the test has seen replicated: one that never
    /// existed would fail until dead (as the poison jobs do on purpose).
    async fn maintenance(&mut self, i: usize) {
        let target = TARGETS.choose(&mut self.rng).copied().unwrap_or(TARGETS[0]);
        let path = self.model.repos[i].path.clone();
        let replicated = self
            .store
            .generation(&self.virtual_storage, &path, target)
            .await;
        if !matches!(replicated, Ok(Some(g)) if g >= 1) {
            return;
        }
        let change = MAINTENANCE
            .choose(&mut self.rng)
            .copied()
            .unwrap_or("cleanup");
        let flag = self.rng.random_bool(0.5);
        let params = match change {
            "gc" => Some(json!({"create_bitmap": flag, "prune": !flag})),
            "repack_full" => Some(json!({"create_bitmap": flag})),
            "pack_refs" => Some(json!({"all_refs": flag})),
            "write_commit_graph" => Some(json!({"split_strategy": "size_multiple"})),
            _ => None,
        };
        self.job(i, change, target, params).await;
    }

    /// Renames on all three storages, the source among them; the repository
    /// is written to again once the source's rename took effect.
    async fn rename(&mut self, i: usize) {
        let old = self.model.repos[i].path.clone();
        self.made += 1;
        let new = format!("{}-r{}.git", old.trim_end_matches(".git"), self.made);
        let mut storages = STORAGES;
        storages.shuffle(&mut self.rng);
        for storage in storages {
            let params = json!({"new_relative_path": new});
            self.job(i, "rename", storage, Some(params)).await;
        }
        self.model.gone.insert(old);
        self.model.repos[i].phase = Phase::Renaming { to: new };
    }

    async fn delete(&mut self, i: usize) {
        let mut storages = STORAGES;
        storages.shuffle(&mut self.rng);
        for storage in storages {
            self.job(i, "delete", storage, None).await;
        }
        self.model.gone.insert(self.model.repos[i].path.clone());
        self.model.repos[i].phase = Phase::Deleted;
    }

    /// Once the source's replica row is at the new path, the source holds
    /// the repository there: it is in use again, and its replicas get an
    /// update, as Praefect's reconciler would send for any outdated one.
    async fn settle_renames(&mut self) {
        for i in 0..self.model.repos.len() {
            let Phase::Renaming { to } = &self.model.repos[i].phase else {
                continue;
            };
            let to = to.clone();
            let moved = self
                .store
                .generation(&self.virtual_storage, &to, SOURCE)
                .await;
            if matches!(moved, Ok(Some(_))) {
                let repo = &mut self.model.repos[i];
                repo.path = to;
                repo.phase = Phase::Active;
                self.publish_updates(i).await;
            }
        }
    }

    /// A job that must end in the dead letters: a payload that is not JSON
    /// (dead at once), or maintenance of a repository that never existed
    /// (failed until its attempts are used up).
    async fn poison(&mut self) {
        let target = TARGETS.choose(&mut self.rng).copied().unwrap_or(TARGETS[0]);
        let n = self.model.poison.len();
        let subject = job_subject(&self.subject_prefix, &self.virtual_storage, target);
        let poison = if n.is_multiple_of(2) {
            let payload = format!("{{\"change\": \"update\", \"poison\": {n}").into_bytes();
            self.publish(&subject, &payload).await;
            Poison {
                payload,
                reasons: &["invalid"],
                what: "not JSON",
            }
        } else {
            let path = format!("{DIR}/absent-{n}.git");
            self.model.never_created.insert(path.clone());
            let (payload, _) = self.send("cleanup", &path, None, target, None).await;
            Poison {
                payload,
                reasons: &["dead", "stranded"],
                what: "maintenance of a repository that never existed",
            }
        };
        self.model.poison.push(poison);
    }

    /// One job of repository `i`.
    async fn job(&mut self, i: usize, change: &str, target: &str, params: Option<Value>) {
        let (path, id) = {
            let r = &self.model.repos[i];
            (r.path.clone(), r.id)
        };
        self.send(change, &path, Some(id), target, params).await;
    }

    /// Publishes a job as Praefect's fields name it and journals it;
    /// returns its payload and stream sequence.
    async fn send(
        &mut self,
        change: &str,
        path: &str,
        repository_id: Option<i64>,
        target: &str,
        params: Option<Value>,
    ) -> (Vec<u8>, u64) {
        let correlation_id = format!("chaos-{:06}", self.model.journal.len() + 1);
        let created_at = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        let mut job = json!({
            "change": change,
            "virtual_storage": self.virtual_storage,
            "relative_path": path,
            "target_node_storage": target,
            "correlation_id": correlation_id,
            "created_at": created_at,
        });
        if change == "update" {
            job["source_node_storage"] = SOURCE.into();
        }
        if let Some(id) = repository_id {
            job["repository_id"] = id.into();
        }
        let new_path = params
            .as_ref()
            .and_then(|p| p.get("new_relative_path"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let Some(p) = params {
            job["params"] = p;
        }
        let payload = serde_json::to_vec(&job).unwrap();
        let subject = job_subject(&self.subject_prefix, &self.virtual_storage, target);
        let sequence = self.publish(&subject, &payload).await;
        self.model.journal.push(Published {
            sequence,
            correlation_id,
            change: change.to_owned(),
            path: path.to_owned(),
            new_path,
            target: target.to_owned(),
        });
        (payload, sequence)
    }

    /// Publishes until the stream acknowledges, with one message id for all
    /// tries so that a publish that did land is not stored twice.
    async fn publish(&self, subject: &str, payload: &[u8]) -> u64 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", uuid::Uuid::new_v4().to_string().as_str());
        let deadline = Instant::now() + GIVE_UP;
        loop {
            let sent = self
                .js
                .publish_with_headers(subject.to_owned(), headers.clone(), payload.to_vec().into())
                .await;
            let error = match sent {
                Ok(ack) => match ack.await {
                    Ok(ack) => return ack.sequence,
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "publishing to {subject} failed for {GIVE_UP:?}: {error}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
