//! Completion dedup for the consumer: checks and records go to Postgres in
//! batches (one statement per burst of jobs), since one round trip and one
//! commit per job would cap throughput at the disk's fsync rate.

use crate::coalescer::Coalescer;
use crate::event::Job;
use crate::store::{CompletionKey, RepositoryStore};
use time::OffsetDateTime;
use tokio::sync::oneshot;

/// A completion key that owns its strings, to travel to the batching task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobKey {
    pub virtual_storage: String,
    pub relative_path: String,
    pub target_storage: String,
    pub change_type: &'static str,
    pub source_storage: String,
}

impl JobKey {
    pub fn of(job: &Job) -> JobKey {
        JobKey {
            virtual_storage: job.virtual_storage.clone(),
            relative_path: job.relative_path.clone(),
            target_storage: job.target_node_storage.clone(),
            change_type: job.change_type().as_str(),
            source_storage: job.source_node_storage.clone().unwrap_or_default(),
        }
    }

    pub fn as_key(&self) -> CompletionKey<'_> {
        CompletionKey {
            virtual_storage: &self.virtual_storage,
            relative_path: &self.relative_path,
            target_storage: &self.target_storage,
            change_type: self.change_type,
            source_storage: &self.source_storage,
        }
    }
}

type Check = (JobKey, OffsetDateTime, oneshot::Sender<bool>);
type Record = (JobKey, OffsetDateTime, oneshot::Sender<()>);

/// Batched access to the completion records.
#[derive(Clone)]
pub struct CompletionLog {
    checks: Coalescer<Check>,
    records: Coalescer<Record>,
}

const MAX_BATCH: usize = 512;
const IN_FLIGHT: usize = 2;

impl CompletionLog {
    pub fn start(store: RepositoryStore) -> CompletionLog {
        let s = store.clone();
        let checks = Coalescer::start(MAX_BATCH, IN_FLIGHT, move |batch: Vec<Check>| {
            let store = s.clone();
            async move {
                let rows: Vec<_> = batch.iter().map(|(k, t, _)| (k.as_key(), *t)).collect();
                let answers = match store.superseded_many(&rows).await {
                    Ok(a) => a,
                    Err(e) => {
                        // Dedup only saves work: without an answer the jobs run.
                        tracing::warn!(error = %e, "completion dedup check failed; running the jobs");
                        Vec::new()
                    }
                };
                for (i, (_, _, reply)) in batch.into_iter().enumerate() {
                    let _ = reply.send(answers.get(i).copied().unwrap_or(false));
                }
            }
        });
        let records = Coalescer::start(MAX_BATCH, IN_FLIGHT, move |batch: Vec<Record>| {
            let store = store.clone();
            async move {
                let rows: Vec<_> = batch.iter().map(|(k, t, _)| (k.as_key(), *t)).collect();
                if let Err(e) = store.record_completions(&rows).await {
                    tracing::warn!(error = %e, jobs = rows.len(), "recording completions for dedup failed");
                }
                for (_, _, done) in batch {
                    let _ = done.send(());
                }
            }
        });
        CompletionLog { checks, records }
    }

    /// Whether a twin of this job completed after it was created.
    pub async fn superseded(&self, key: JobKey, created_at: OffsetDateTime) -> bool {
        let (tx, rx) = oneshot::channel();
        if !self.checks.send((key, created_at, tx)) {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Records a completion. The job awaits it before giving up its
    /// repository lock, so the next job of the repository sees it; a failed
    /// record is only logged (it saves later work, it is not the job's effect).
    pub async fn record(&self, key: JobKey, started_at: OffsetDateTime) {
        let (done, recorded) = oneshot::channel();
        if self.records.send((key, started_at, done)) {
            let _ = recorded.await;
        }
    }
}
