//! Generation reads and writes of many concurrent `update` jobs, sent to
//! Postgres in batches: one statement (and one commit) per burst of jobs
//! instead of per job. Each job still waits for its own answer, so a job is
//! acknowledged only after its generation is stored. A batch that fails is
//! tried again row by row, so one bad row fails only its own job.

use crate::store::coalescer::Coalescer;
use crate::store::{
    Gated, GenerationQuery, GenerationRecord, ReplicatedGeneration, RepositoryStore, StoreError,
    WriteOrder,
};
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

struct Read {
    virtual_storage: String,
    relative_path: String,
    source: String,
    target: String,
    order: Option<(String, i64)>,
    repository_id: Option<i64>,
    reply: oneshot::Sender<Result<ReplicatedGeneration, StoreError>>,
}

impl Read {
    fn query(&self) -> GenerationQuery<'_> {
        GenerationQuery {
            virtual_storage: &self.virtual_storage,
            relative_path: &self.relative_path,
            source: &self.source,
            target: &self.target,
            order: self.order.as_ref().map(|(s, q)| (s.as_str(), *q)),
            repository_id: self.repository_id,
        }
    }
}

struct Write {
    virtual_storage: String,
    relative_path: String,
    storage: String,
    generation: i64,
    order: Option<WriteOrder>,
    reply: oneshot::Sender<Result<Gated<bool>, StoreError>>,
}

impl Write {
    fn record(&self) -> GenerationRecord<'_> {
        GenerationRecord {
            virtual_storage: &self.virtual_storage,
            relative_path: &self.relative_path,
            storage: &self.storage,
            generation: self.generation,
            order: self.order.as_ref(),
        }
    }
}

/// Batched front of the store's generation operations.
#[derive(Clone)]
pub struct GenerationBatcher {
    reads: Coalescer<Read>,
    writes: Coalescer<Write>,
}

const MAX_BATCH: usize = 256;

/// One batch at a time, reads and writes alike: what queues meanwhile goes
/// out as one statement, and a statement's fixed cost is most of a small
/// one's (docs/performance.md, what an update costs Postgres).
const BATCHES_IN_FLIGHT: usize = 1;

fn stopped(operation: &'static str) -> StoreError {
    StoreError::Batch {
        operation,
        message: "the batching task stopped".into(),
        retryable: true,
        outage: false,
    }
}

/// Runs `$statement` (an expression of `$rows_var`, a slice of rows) over
/// all `$rows`; if it fails, runs it again for each row alone, so a row that
/// breaks the statement fails only its own job. A macro, because a closure
/// over borrowed rows cannot name the lifetimes of the spawned batch task.
macro_rules! each_answered {
    ($rows:expr, |$rows_var:ident| $statement:expr) => {{
        let rows = $rows;
        let whole = {
            let $rows_var = rows;
            $statement
        };
        match whole {
            Ok(answers) if answers.len() == rows.len() => answers.into_iter().map(Ok).collect(),
            Err(e) if rows.len() == 1 => vec![Err(e)],
            _ => {
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    let $rows_var = std::slice::from_ref(row);
                    let one = $statement;
                    out.push(one.and_then(|mut a| a.pop().ok_or_else(missing_answer)));
                }
                out
            }
        }
    }};
}

fn missing_answer() -> StoreError {
    StoreError::Batch {
        operation: "generation batch",
        message: "no answer for the row".into(),
        retryable: true,
        outage: false,
    }
}

impl GenerationBatcher {
    /// Starts the batching tasks in `tasks`.
    pub fn start(store: RepositoryStore, tasks: &TaskTracker) -> GenerationBatcher {
        let s = store.clone();
        let reads = Coalescer::start(
            tasks,
            MAX_BATCH,
            BATCHES_IN_FLIGHT,
            move |batch: Vec<Read>| {
                let store = s.clone();
                async move {
                    let queries: Vec<_> = batch.iter().map(Read::query).collect();
                    let answers: Vec<_> =
                        each_answered!(&queries[..], |q| store.replicated_generations(q).await);
                    for (read, answer) in batch.into_iter().zip(answers) {
                        let _ = read.reply.send(answer);
                    }
                }
            },
        );
        // Rows sorted by key lock repository rows in the same order as
        // another process's batch; a deadlock with one is retried.
        let writes = Coalescer::start(
            tasks,
            MAX_BATCH,
            BATCHES_IN_FLIGHT,
            move |mut batch: Vec<Write>| {
                let store = store.clone();
                batch.sort_unstable_by(|a, b| {
                    (&a.virtual_storage, &a.relative_path, &a.storage).cmp(&(
                        &b.virtual_storage,
                        &b.relative_path,
                        &b.storage,
                    ))
                });
                async move {
                    let records: Vec<_> = batch.iter().map(Write::record).collect();
                    let answers: Vec<_> = each_answered!(&records[..], |r| {
                        let mut result = store.set_generations(r).await;
                        // A deadlock with another batch is settled by one retry,
                        // without failing every job.
                        if result.as_ref().is_err_and(StoreError::is_deadlock) {
                            result = store.set_generations(r).await;
                        }
                        result
                    });
                    drop(records);
                    for (write, answer) in batch.into_iter().zip(answers) {
                        let _ = write.reply.send(answer);
                    }
                }
            },
        );
        GenerationBatcher { reads, writes }
    }

    /// [`RepositoryStore::replicated_generation`], batched; with `order`, a
    /// job superseded on the target answers `Superseded`.
    pub async fn replicated_generation(
        &self,
        query: GenerationQuery<'_>,
    ) -> Result<ReplicatedGeneration, StoreError> {
        let (reply, answer) = oneshot::channel();
        let read = Read {
            virtual_storage: query.virtual_storage.to_owned(),
            relative_path: query.relative_path.to_owned(),
            source: query.source.to_owned(),
            target: query.target.to_owned(),
            order: query.order.map(|(s, q)| (s.to_owned(), q)),
            repository_id: query.repository_id,
            reply,
        };
        if !self.reads.send(read) {
            return Err(stopped("replicated_generation"));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(stopped("replicated_generation")))
    }

    /// [`RepositoryStore::set_generations`] for one replica, batched. An
    /// ungated write of generation -1 has nothing to do.
    pub async fn set_generation(
        &self,
        record: GenerationRecord<'_>,
    ) -> Result<Gated<bool>, StoreError> {
        if record.generation == -1 && record.order.is_none() {
            return Ok(Gated::Written(false));
        }
        let (reply, answer) = oneshot::channel();
        let write = Write {
            virtual_storage: record.virtual_storage.to_owned(),
            relative_path: record.relative_path.to_owned(),
            storage: record.storage.to_owned(),
            generation: record.generation,
            order: record.order.cloned(),
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
