//! Generation reads and writes of many concurrent `update` jobs, sent to
//! Postgres in batches: one statement (and one commit) per burst of jobs
//! instead of per job. Each job still waits for its own answer, so a job is
//! acknowledged only after its generation is stored.

use crate::coalescer::Coalescer;
use crate::store::{
    GenerationQuery, GenerationRecord, ReplicatedGeneration, RepositoryStore, StoreError,
};
use tokio::sync::oneshot;

struct Read {
    virtual_storage: String,
    relative_path: String,
    source: String,
    target: String,
    reply: oneshot::Sender<Result<ReplicatedGeneration, StoreError>>,
}

struct Write {
    virtual_storage: String,
    relative_path: String,
    storage: String,
    generation: i64,
    reply: oneshot::Sender<Result<bool, StoreError>>,
}

/// Batched front of the store's generation operations.
#[derive(Clone)]
pub struct GenerationBatcher {
    reads: Coalescer<Read>,
    writes: Coalescer<Write>,
}

const MAX_BATCH: usize = 256;

fn stopped(operation: &'static str) -> StoreError {
    StoreError::Batch {
        operation,
        message: "the batching task stopped".into(),
        retryable: true,
    }
}

/// Sends each job of a batch its own answer, or every job the batch's error.
fn answer_each<T>(
    replies: impl Iterator<Item = oneshot::Sender<Result<T, StoreError>>>,
    answers: Result<Vec<T>, StoreError>,
) {
    match answers {
        Ok(answers) => {
            for (reply, answer) in replies.zip(answers) {
                let _ = reply.send(Ok(answer));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.for_batch()));
            }
        }
    }
}

impl GenerationBatcher {
    /// Starts the batching tasks; they need a Tokio runtime.
    pub fn start(store: RepositoryStore) -> GenerationBatcher {
        let s = store.clone();
        let reads = Coalescer::start(MAX_BATCH, 2, move |batch: Vec<Read>| {
            let store = s.clone();
            async move {
                let queries: Vec<_> = batch
                    .iter()
                    .map(|r| GenerationQuery {
                        virtual_storage: &r.virtual_storage,
                        relative_path: &r.relative_path,
                        source: &r.source,
                        target: &r.target,
                    })
                    .collect();
                let answers = store.replicated_generations(&queries).await;
                answer_each(batch.into_iter().map(|r| r.reply), answers);
            }
        });
        // One write batch at a time: concurrent multi-row upserts could
        // deadlock each other on the repository rows.
        let writes = Coalescer::start(MAX_BATCH, 1, move |batch: Vec<Write>| {
            let store = store.clone();
            async move {
                let records: Vec<_> = batch
                    .iter()
                    .map(|w| GenerationRecord {
                        virtual_storage: &w.virtual_storage,
                        relative_path: &w.relative_path,
                        storage: &w.storage,
                        generation: w.generation,
                    })
                    .collect();
                let mut result = store.set_generations(&records).await;
                // Another process's batch may still deadlock with ours; one
                // retry settles it without failing every job of the batch.
                if result.as_ref().is_err_and(StoreError::is_deadlock) {
                    result = store.set_generations(&records).await;
                }
                answer_each(batch.into_iter().map(|w| w.reply), result);
            }
        });
        GenerationBatcher { reads, writes }
    }

    /// [`RepositoryStore::replicated_generation`], batched.
    pub async fn replicated_generation(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        source: &str,
        target: &str,
    ) -> Result<ReplicatedGeneration, StoreError> {
        let (reply, answer) = oneshot::channel();
        let read = Read {
            virtual_storage: virtual_storage.to_owned(),
            relative_path: relative_path.to_owned(),
            source: source.to_owned(),
            target: target.to_owned(),
            reply,
        };
        if !self.reads.send(read) {
            return Err(stopped("replicated_generation"));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(stopped("replicated_generation")))
    }

    /// [`RepositoryStore::set_generation`], batched.
    pub async fn set_generation(
        &self,
        virtual_storage: &str,
        relative_path: &str,
        storage: &str,
        generation: i64,
    ) -> Result<bool, StoreError> {
        if generation == -1 {
            return Ok(false);
        }
        let (reply, answer) = oneshot::channel();
        let write = Write {
            virtual_storage: virtual_storage.to_owned(),
            relative_path: relative_path.to_owned(),
            storage: storage.to_owned(),
            generation,
            reply,
        };
        if !self.writes.send(write) {
            return Err(stopped("set_generation"));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(stopped("set_generation")))
    }
}
