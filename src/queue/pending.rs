//! The jobs waiting in the work stream for one target, read without
//! consuming them: a WorkQueue stream removes a job when it is acked, so
//! every message left on a target's subject is pending or in flight.
//!
//! The read is a walk over the target's subject with the stream's
//! message-get API (`next_by_subj`), one message per request. It creates no
//! consumer (a WorkQueue stream refuses a second consumer whose filter
//! overlaps the target's durable) and acks nothing. It stops after `limit`
//! messages, so a huge backlog costs a bounded number of requests.

use crate::event::{ChangeType, Job};
use crate::queue::layout::Layout;
use crate::subject::job_subject;
use async_nats::jetstream::{self, Context};
use std::collections::{BTreeSet, HashMap};

/// Why the work stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PendingScanError {
    #[error("stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error("stream {stream}: reading {subject} after sequence {sequence}: {message}")]
    Read {
        stream: String,
        subject: String,
        sequence: u64,
        message: String,
    },
}

/// The jobs found on one target's subject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingJobs {
    /// Change types of the jobs per relative path.
    pub by_path: HashMap<String, BTreeSet<ChangeType>>,
    /// Change types of the jobs per repository id, for jobs that name one.
    pub by_repository_id: HashMap<i64, BTreeSet<ChangeType>>,
    /// Messages read.
    pub scanned: u64,
    /// Whether every message on the subject was read (the limit was not hit).
    pub complete: bool,
}

impl PendingJobs {
    /// The change types of the jobs waiting for this repository.
    pub fn for_repository(&self, relative_path: &str, repository_id: i64) -> BTreeSet<ChangeType> {
        let mut found = self.by_path.get(relative_path).cloned().unwrap_or_default();
        if let Some(by_id) = self.by_repository_id.get(&repository_id) {
            found.extend(by_id);
        }
        found
    }
}

/// Reads up to `limit` jobs waiting for (`virtual_storage`, `target`).
/// Messages that do not decode, or name another target, are skipped (the
/// consumer dead-letters them).
pub async fn scan_target(
    js: &Context,
    layout: &Layout,
    virtual_storage: &str,
    target: &str,
    limit: u64,
) -> Result<PendingJobs, PendingScanError> {
    let subject = job_subject(&layout.subject_prefix, virtual_storage, target);
    scan(js, &layout.stream, subject, virtual_storage, target, limit).await
}

/// Reads up to `limit` dead jobs of (`virtual_storage`, `target`): those
/// that ran out of attempts or were invalid, kept until replayed or purged.
pub async fn scan_dead(
    js: &Context,
    layout: &Layout,
    virtual_storage: &str,
    target: &str,
    limit: u64,
) -> Result<PendingJobs, PendingScanError> {
    let prefix = crate::subject::dead_letter_prefix(&layout.subject_prefix);
    let subject = job_subject(&prefix, virtual_storage, target);
    scan(
        js,
        &layout.dead_letter_stream,
        subject,
        virtual_storage,
        target,
        limit,
    )
    .await
}

async fn scan(
    js: &Context,
    stream_name: &str,
    subject: String,
    virtual_storage: &str,
    target: &str,
    limit: u64,
) -> Result<PendingJobs, PendingScanError> {
    let stream_err = |message: String| PendingScanError::Stream {
        stream: stream_name.to_owned(),
        message,
    };
    let stream = js
        .get_stream_no_info(stream_name)
        .await
        .map_err(|e| stream_err(e.to_string()))?;
    let mut found = PendingJobs::default();
    let mut sequence = 1;
    loop {
        if found.scanned >= limit {
            return Ok(found);
        }
        let message = match stream
            .get_first_raw_message_by_subject(&subject, sequence)
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                found.complete = true;
                return Ok(found);
            }
            Err(e) => {
                return Err(PendingScanError::Read {
                    stream: stream_name.to_owned(),
                    subject,
                    sequence,
                    message: e.to_string(),
                });
            }
        };
        found.scanned += 1;
        sequence = message.sequence + 1;
        let Ok(job) = Job::from_json(&message.payload) else {
            continue;
        };
        if job.virtual_storage != virtual_storage || job.target_node_storage != target {
            continue;
        }
        let change = job.change_type();
        if let Some(id) = job.repository_id {
            found.by_repository_id.entry(id).or_default().insert(change);
        }
        found
            .by_path
            .entry(job.relative_path)
            .or_default()
            .insert(change);
    }
}
