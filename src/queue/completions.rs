//! Completion dedup keys: what makes two jobs twins (Praefect's rule). The
//! checks and records travel with the repository lock requests and are done
//! in the lock session's statements (see `exclusion`).

use crate::event::Job;
use crate::store::CompletionKey;

/// A completion key that owns its strings, to travel to the batching task.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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
