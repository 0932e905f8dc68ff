//! The dead-letter stream: jobs that ran out of attempts or were never valid.
//! A dead message keeps the original payload and gains headers saying why,
//! after how many attempts, from which subject, and when. Operators list,
//! replay and purge it.

use crate::queue::incarnation::Incarnation;
use crate::queue::layout::Layout;
use crate::queue::requeue::{ORDER_SEQUENCE, ORDER_TIME, Placement, REPLAYED_AT, lineage, nanos};
use crate::subject::{dead_letter_prefix, parse_job_subject};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, Context};
use bytes::Bytes;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Headers a dead message carries.
pub mod headers {
    /// Why it died: `dead` (attempts used up), `invalid` (never valid),
    /// `stranded` (the server stopped delivering it at max_deliver).
    pub const REASON: &str = "Gitaly-Replicator-Reason";
    /// The last error, or why the payload is invalid.
    pub const ERROR: &str = "Gitaly-Replicator-Error";
    /// Attempts it used: its calls that failed (an interrupted call, a
    /// release at shutdown or a wait is none).
    pub const ATTEMPTS: &str = "Gitaly-Replicator-Attempts";
    /// Every server delivery it had, its requeued copies' included.
    pub const DELIVERIES: &str = "Gitaly-Replicator-Deliveries";
    /// The work subject it was published on.
    pub const ORIGINAL_SUBJECT: &str = "Gitaly-Replicator-Original-Subject";
    /// Its sequence in the work stream.
    pub const ORIGINAL_SEQUENCE: &str = "Gitaly-Replicator-Original-Sequence";
    /// When it died (RFC 3339).
    pub const DEAD_AT: &str = "Gitaly-Replicator-Dead-At";
    /// When it was last replayed from the dead letters (Unix nanoseconds),
    /// if it was.
    pub use crate::queue::requeue::REPLAYED_AT;
}

/// Why a job went to the dead-letter stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    Dead,
    Invalid,
    Stranded,
}

impl DeadReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Dead => "dead",
            DeadReason::Invalid => "invalid",
            DeadReason::Stranded => "stranded",
        }
    }
}

/// Why a dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("publishing to the dead-letter stream failed: {0}")]
    Publish(String),
    #[error("dead-letter stream {stream}: {message}")]
    Stream { stream: String, message: String },
    /// Replay would publish outside this deployment's work subjects; the
    /// dead job stays where it is.
    #[error(
        "dead job {sequence} not replayed: its subject {subject:?} is not a work subject of this deployment ({reason}); it stays in the dead-letter stream"
    )]
    ForeignSubject {
        sequence: u64,
        subject: String,
        reason: String,
    },
}

/// The message id of the dead letter of a job: named by the job (its
/// [`lineage`]), not by the copy that died, so that a repeat, from any
/// process or from a second copy of the job, is a duplicate JetStream drops;
/// another from a job of the same sequence in a re-created stream, or from
/// the job after a replay.
pub fn dead_message_id(
    incarnation: &Incarnation,
    placement: Placement,
    replayed_at: Option<OffsetDateTime>,
) -> String {
    format!("dead-{}", lineage(incarnation, placement, replayed_at))
}

/// The dead subject for a work subject: the prefix gains `-dead`, the
/// storage tokens stay as they were (escaped).
pub fn dead_subject_for(layout: &Layout, work_subject: &str) -> String {
    let rest = work_subject
        .strip_prefix(&layout.subject_prefix)
        .and_then(|r| r.strip_prefix('.'))
        .filter(|r| !r.is_empty())
        .unwrap_or("unroutable");
    format!("{}.{rest}", dead_letter_prefix(&layout.subject_prefix))
}

/// What to write for one dead job.
pub struct DeadJob<'a> {
    pub work_subject: &'a str,
    /// The incarnation of the work stream the job is of.
    pub incarnation: &'a Incarnation,
    pub work_sequence: u64,
    /// Its place in its replica's order, which a replay keeps.
    pub placement: Placement,
    /// When it was last replayed from the dead letters.
    pub replayed_at: Option<OffsetDateTime>,
    pub payload: Bytes,
    pub reason: DeadReason,
    pub error: &'a str,
    pub attempts: u64,
    pub deliveries: u64,
}

/// Header values must be one line of visible text.
fn header_safe(s: &str) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    one_line.chars().take(2048).collect()
}

/// Publishes a dead job and waits for the stream's ack. The message id names
/// the job, so a repeat (after a lost ack, or from a second copy of the job)
/// is dropped by the stream's duplicate window. Returns false when it was.
pub async fn publish_dead(
    js: &Context,
    layout: &Layout,
    job: DeadJob<'_>,
) -> Result<bool, DeadLetterError> {
    let mut h = HeaderMap::new();
    h.insert(headers::REASON, job.reason.as_str());
    h.insert(headers::ERROR, header_safe(job.error).as_str());
    h.insert(headers::ATTEMPTS, job.attempts.to_string().as_str());
    h.insert(headers::DELIVERIES, job.deliveries.to_string().as_str());
    h.insert(headers::ORIGINAL_SUBJECT, job.work_subject);
    h.insert(
        headers::ORIGINAL_SEQUENCE,
        job.work_sequence.to_string().as_str(),
    );
    let now = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    h.insert(headers::DEAD_AT, now.as_str());
    job.placement.write(&mut h);
    if let Some(at) = job.replayed_at {
        h.insert(REPLAYED_AT, nanos(at).as_str());
    }
    h.insert(
        "Nats-Msg-Id",
        dead_message_id(job.incarnation, job.placement, job.replayed_at).as_str(),
    );
    let subject = dead_subject_for(layout, job.work_subject);
    let acked = js
        .publish_with_headers(subject, h, job.payload.clone())
        .await
        .map_err(|e| DeadLetterError::Publish(e.to_string()))?
        .await
        .map_err(|e| DeadLetterError::Publish(e.to_string()))?;
    // Once per job: a repeat the stream dropped as a duplicate was logged
    // the first time.
    if !acked.duplicate {
        log_dead(&job);
    }
    Ok(!acked.duplicate)
}

/// The one line that says a job went to the dead letters, with Praefect's
/// fields when its payload is a job.
fn log_dead(job: &DeadJob<'_>) {
    let parsed = crate::event::Job::from_json(&job.payload).ok();
    let field = |f: fn(&crate::event::Job) -> &str| parsed.as_ref().map(f).unwrap_or_default();
    tracing::warn!(
        virtual_storage = field(|j| &j.virtual_storage),
        replication_job_target = field(|j| &j.target_node_storage),
        replication_job_source = field(|j| j.source_node_storage.as_deref().unwrap_or_default()),
        correlation_id = field(|j| j.correlation_id.as_deref().unwrap_or_default()),
        change_type = field(|j| j.change_type().as_str()),
        relative_path = field(|j| &j.relative_path),
        stream_sequence = job.work_sequence,
        reason = job.reason.as_str(),
        attempts = job.attempts,
        deliveries = job.deliveries,
        error = job.error,
        "job moved to the dead letters"
    );
}

/// One dead message as stored.
#[derive(Debug, Clone)]
pub struct DeadMessage {
    pub sequence: u64,
    pub subject: String,
    pub time: OffsetDateTime,
    pub payload: Bytes,
    pub headers: HeaderMap,
}

impl DeadMessage {
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers.get(key).map(|v| v.as_str())
    }

    /// The job's place in its replica's order, when its dead letter records
    /// it (sequence and time; dead letters from before have neither).
    pub fn placement(&self) -> Option<Placement> {
        let sequence = self.header(ORDER_SEQUENCE)?.parse::<u64>().ok()?;
        let nanos = self.header(ORDER_TIME)?.parse::<i128>().ok()?;
        let published = OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()?;
        Some(Placement {
            sequence,
            published,
        })
    }
}

fn stream_err(layout: &Layout, e: impl std::fmt::Display) -> DeadLetterError {
    DeadLetterError::Stream {
        stream: layout.dead_letter_stream.clone(),
        message: e.to_string(),
    }
}

/// Reads dead messages in order, from `start` (sequence), at most `limit`.
pub async fn list(
    js: &Context,
    layout: &Layout,
    start: u64,
    limit: usize,
) -> Result<Vec<DeadMessage>, DeadLetterError> {
    let mut stream = js
        .get_stream(&layout.dead_letter_stream)
        .await
        .map_err(|e| stream_err(layout, e))?;
    let info = stream.info().await.map_err(|e| stream_err(layout, e))?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = Vec::new();
    let mut seq = start.max(first);
    while seq <= last && out.len() < limit {
        match stream.get_raw_message(seq).await {
            Ok(m) => out.push(DeadMessage {
                sequence: m.sequence,
                subject: m.subject.to_string(),
                time: m.time,
                payload: m.payload,
                headers: m.headers,
            }),
            // Deleted (replayed or purged) sequences leave gaps.
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(stream_err(layout, e)),
        }
        seq += 1;
    }
    Ok(out)
}

/// Sends a dead message back to its work subject as a new job (fresh
/// attempts, new message id) that keeps its place in its replica's order
/// (the consumer skips it as out of order when a later job of its replica
/// took effect), and removes it from the dead-letter stream.
pub async fn replay(
    js: &Context,
    layout: &Layout,
    message: &DeadMessage,
) -> Result<(), DeadLetterError> {
    let work_subject = replay_subject(layout, message)?;
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", uuid::Uuid::new_v4().to_string().as_str());
    // Both or neither: a sequence without its time cannot say which
    // incarnation of the work stream it is of.
    if let (Some(sequence), Some(time)) =
        (message.header(ORDER_SEQUENCE), message.header(ORDER_TIME))
    {
        h.insert(ORDER_SEQUENCE, sequence);
        h.insert(ORDER_TIME, time);
    }
    // The replayed job's retries and dead letter are its own, never taken
    // for duplicates of the ones before.
    h.insert(REPLAYED_AT, nanos(OffsetDateTime::now_utc()).as_str());
    js.publish_with_headers(work_subject, h, message.payload.clone())
        .await
        .map_err(|e| DeadLetterError::Publish(e.to_string()))?
        .await
        .map_err(|e| DeadLetterError::Publish(e.to_string()))?;
    delete(js, layout, message.sequence).await
}

/// Where a replay publishes: the work subject the dead job came from, only
/// if it is one of this deployment's (its prefix, a configured virtual
/// storage and target). Anyone who can write into the dead-letter subjects
/// could otherwise make an operator's `replay --all` publish anywhere (a
/// JetStream API subject, say).
pub fn replay_subject(layout: &Layout, message: &DeadMessage) -> Result<String, DeadLetterError> {
    let subject = message
        .header(headers::ORIGINAL_SUBJECT)
        .map(str::to_owned)
        .unwrap_or_else(|| {
            message.subject.replacen(
                &dead_letter_prefix(&layout.subject_prefix),
                &layout.subject_prefix,
                1,
            )
        });
    let refuse = |reason: String| DeadLetterError::ForeignSubject {
        sequence: message.sequence,
        subject: subject.clone(),
        reason,
    };
    let (virtual_storage, target) =
        parse_job_subject(&layout.subject_prefix, &subject).map_err(|e| refuse(e.to_string()))?;
    if !layout
        .consumers
        .iter()
        .any(|c| c.virtual_storage == virtual_storage && c.target_storage == target)
    {
        return Err(refuse(format!(
            "no configured target {virtual_storage}/{target}"
        )));
    }
    Ok(subject)
}

/// Deletes one dead message.
pub async fn delete(js: &Context, layout: &Layout, sequence: u64) -> Result<(), DeadLetterError> {
    let stream = js
        .get_stream(&layout.dead_letter_stream)
        .await
        .map_err(|e| stream_err(layout, e))?;
    stream
        .delete_message(sequence)
        .await
        .map_err(|e| stream_err(layout, e))?;
    Ok(())
}

/// Deletes every dead message; returns how many.
pub async fn purge_all(js: &Context, layout: &Layout) -> Result<u64, DeadLetterError> {
    let stream = js
        .get_stream(&layout.dead_letter_stream)
        .await
        .map_err(|e| stream_err(layout, e))?;
    let r = stream.purge().await.map_err(|e| stream_err(layout, e))?;
    Ok(r.purged)
}
