//! The JetStream layout: the work stream, the dead-letter stream, the stream
//! that keeps max-deliveries advisories, and one durable pull consumer per
//! (virtual storage, target storage), named as [`crate::queue::names`] says.
//! Created idempotently; an existing object is compared first, changed only
//! where JetStream allows it (each change is reported), and refused with a
//! clear error where it does not. A consumer found under another name with
//! the same filter (an older naming scheme's) is moved to its name.

use crate::config::Config;
use crate::queue::names::{advisory_consumer_name, durable_name};
use crate::subject::{dead_letter_prefix, job_subject};
use async_nats::jetstream::Context;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use futures::TryStreamExt;
use std::time::Duration;

/// Why the layout could not be ensured.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "stream {stream} exists with {field} = {existing}, but the configuration needs {wanted}; \
         JetStream cannot change this in place: migrate or delete the stream, or change the configuration"
    )]
    Incompatible {
        stream: String,
        field: &'static str,
        existing: String,
        wanted: String,
    },
    #[error(
        "consumer {consumer} on stream {stream} exists with {field} = {existing}, but the configuration needs {wanted}; delete the consumer to recreate it"
    )]
    IncompatibleConsumer {
        stream: String,
        consumer: String,
        field: &'static str,
        existing: String,
        wanted: String,
    },
    #[error(
        "nats.max_bytes = {max_bytes} cannot be used with nats-server {version}: before 2.10.6 it \
         enforces a byte limit by silently deleting the oldest accepted jobs (nats-server#4771); \
         set nats.max_bytes = -1 and bound the queue with nats.max_messages"
    )]
    UnsafeByteLimit { max_bytes: i64, version: String },
    #[error("JetStream request for {what} failed: {message}")]
    Api { what: String, message: String },
}

fn api(what: impl Into<String>, e: impl std::fmt::Display) -> LayoutError {
    LayoutError::Api {
        what: what.into(),
        message: e.to_string(),
    }
}

/// One consumer of the layout: a target of a virtual storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    pub virtual_storage: String,
    pub target_storage: String,
    pub durable_name: String,
    pub filter_subject: String,
}

/// Everything `setup` creates, derived from the configuration alone.
#[derive(Debug, Clone)]
pub struct Layout {
    pub subject_prefix: String,
    pub stream: String,
    pub dead_letter_stream: String,
    pub advisory_stream: String,
    pub advisory_consumer: String,
    pub replicas: usize,
    pub max_bytes: i64,
    pub max_messages: i64,
    pub duplicate_window: Duration,
    pub dead_letter_max_age: Duration,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub max_ack_pending: i64,
    pub consumers: Vec<ConsumerSpec>,
}

/// What `ensure` did to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutChange {
    Created(String),
    /// A consumer deleted because the one named `to` takes its filter; its
    /// unacknowledged jobs stay in the stream for `to`.
    Moved {
        stream: String,
        from: String,
        to: String,
    },
    Updated {
        object: String,
        changes: Vec<String>,
    },
    Unchanged(String),
}

impl std::fmt::Display for LayoutChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayoutChange::Created(o) => write!(f, "created {o}"),
            LayoutChange::Moved { stream, from, to } => {
                write!(f, "moved consumer {from} to {to} on {stream}")
            }
            LayoutChange::Updated { object, changes } => {
                write!(f, "updated {object}: {}", changes.join(", "))
            }
            LayoutChange::Unchanged(o) => write!(f, "unchanged {o}"),
        }
    }
}

impl Layout {
    pub fn from_config(config: &Config) -> Layout {
        let nats = &config.nats;
        let consumers = config
            .targets()
            .map(|(vs, node)| ConsumerSpec {
                virtual_storage: vs.name.clone(),
                target_storage: node.storage.clone(),
                durable_name: durable_name(&nats.consumer_prefix, &vs.name, &node.storage),
                filter_subject: job_subject(&nats.subject_prefix, &vs.name, &node.storage),
            })
            .collect();
        Layout {
            subject_prefix: nats.subject_prefix.clone(),
            stream: nats.stream.clone(),
            dead_letter_stream: nats.dead_letter_stream.clone(),
            advisory_stream: format!("{}_ADVISORIES", nats.stream),
            advisory_consumer: advisory_consumer_name(&nats.consumer_prefix),
            replicas: nats.replicas,
            max_bytes: nats.max_bytes,
            max_messages: nats.max_messages,
            duplicate_window: nats.duplicate_window,
            dead_letter_max_age: nats.dead_letter_max_age,
            ack_wait: nats.ack_wait,
            max_deliver: i64::from(config.replication.attempts.max(1)),
            max_ack_pending: nats.max_ack_pending,
            consumers,
        }
    }

    pub fn consumer(&self, virtual_storage: &str, target: &str) -> Option<&ConsumerSpec> {
        self.consumers
            .iter()
            .find(|c| c.virtual_storage == virtual_storage && c.target_storage == target)
    }

    /// Work stream: WorkQueue retention, so an acked job is gone; a full
    /// stream refuses publishers (discard new) instead of dropping jobs.
    pub fn work_stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            description: Some("gitaly-replicator replication jobs".into()),
            subjects: vec![format!("{}.>", self.subject_prefix)],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            max_bytes: self.max_bytes,
            max_messages: self.max_messages,
            discard: DiscardPolicy::New,
            ..Default::default()
        }
    }

    /// Dead letters: kept for `dead_letter_max_age`, then dropped.
    pub fn dead_letter_stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.dead_letter_stream.clone(),
            description: Some("gitaly-replicator dead replication jobs".into()),
            subjects: vec![format!("{}.>", dead_letter_prefix(&self.subject_prefix))],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.replicas,
            max_age: self.dead_letter_max_age,
            duplicate_window: self.duplicate_window,
            max_bytes: -1,
            max_messages: -1,
            ..Default::default()
        }
    }

    /// The server's max-deliveries advisories for the work stream, kept in a
    /// stream so that one fired while no process was running is not lost.
    pub fn advisory_stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.advisory_stream.clone(),
            description: Some("max-deliveries advisories of the replication work stream".into()),
            subjects: vec![format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*",
                self.stream
            )],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            num_replicas: self.replicas,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: -1,
            max_messages: -1,
            ..Default::default()
        }
    }

    pub fn consumer_config(&self, spec: &ConsumerSpec) -> pull::Config {
        pull::Config {
            durable_name: Some(spec.durable_name.clone()),
            name: Some(spec.durable_name.clone()),
            description: Some(format!(
                "replication jobs for storage {:?} of virtual storage {:?}",
                spec.target_storage, spec.virtual_storage
            )),
            filter_subject: spec.filter_subject.clone(),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            max_ack_pending: self.max_ack_pending,
            ..Default::default()
        }
    }

    pub fn advisory_consumer_config(&self) -> pull::Config {
        pull::Config {
            durable_name: Some(self.advisory_consumer.clone()),
            name: Some(self.advisory_consumer.clone()),
            description: Some("moves stranded jobs to the dead-letter stream".into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            max_ack_pending: 1000,
            ..Default::default()
        }
    }

    /// Creates what is missing, updates what JetStream can change, and refuses
    /// what it cannot. Returns one entry per object.
    pub async fn ensure(&self, js: &Context) -> Result<Vec<LayoutChange>, LayoutError> {
        let mut report = self.ensure_streams(js).await?;
        for spec in &self.consumers {
            report.extend(self.ensure_target(js, spec).await?);
        }
        Ok(report)
    }

    /// The streams and the advisory consumer: what must exist before any
    /// target's consumer.
    pub async fn ensure_streams(&self, js: &Context) -> Result<Vec<LayoutChange>, LayoutError> {
        let version = js.client().server_info().version;
        if self.max_bytes != -1 && !byte_limit_is_safe(&version) {
            return Err(LayoutError::UnsafeByteLimit {
                max_bytes: self.max_bytes,
                version,
            });
        }
        let mut report = Vec::new();
        for config in [
            self.work_stream_config(),
            self.dead_letter_stream_config(),
            self.advisory_stream_config(),
        ] {
            report.push(ensure_stream(js, config).await?);
        }
        let advisories = js
            .get_stream(&self.advisory_stream)
            .await
            .map_err(|e| api(format!("stream {}", self.advisory_stream), e))?;
        let existing = durable_consumers(&advisories, &self.advisory_stream).await?;
        let wanted = self.advisory_consumer_config();
        move_consumers(
            &advisories,
            &self.advisory_stream,
            &existing,
            &wanted,
            &mut report,
        )
        .await?;
        report.push(ensure_consumer(&advisories, &self.advisory_stream, wanted).await?);
        Ok(report)
    }

    /// One target's durable consumer (taking over one of an older name).
    pub async fn ensure_target(
        &self,
        js: &Context,
        spec: &ConsumerSpec,
    ) -> Result<Vec<LayoutChange>, LayoutError> {
        let work = js
            .get_stream(&self.stream)
            .await
            .map_err(|e| api(format!("stream {}", self.stream), e))?;
        let existing = durable_consumers(&work, &self.stream).await?;
        let wanted = self.consumer_config(spec);
        let mut report = Vec::new();
        move_consumers(&work, &self.stream, &existing, &wanted, &mut report).await?;
        report.push(ensure_consumer(&work, &self.stream, wanted).await?);
        Ok(report)
    }
}

/// Whether the server enforces `max_bytes` with discard-new by refusing
/// publishes (2.10.6 and later) rather than deleting old messages.
pub fn byte_limit_is_safe(version: &str) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let v = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    v >= (2, 10, 6)
}

async fn ensure_stream(js: &Context, wanted: stream::Config) -> Result<LayoutChange, LayoutError> {
    let object = format!("stream {}", wanted.name);
    let mut existing = match js.get_stream(&wanted.name).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                async_nats::jetstream::context::GetStreamErrorKind::JetStream(ref je)
                    if je.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            js.create_stream(wanted.clone())
                .await
                .map_err(|e| api(&object, e))?;
            return Ok(LayoutChange::Created(object));
        }
        Err(e) => return Err(api(&object, e)),
    };
    let have = existing
        .info()
        .await
        .map_err(|e| api(&object, e))?
        .config
        .clone();
    let incompatible =
        |field: &'static str, existing: String, wanted: String| LayoutError::Incompatible {
            stream: have.name.clone(),
            field,
            existing,
            wanted,
        };
    if have.retention != wanted.retention {
        return Err(incompatible(
            "retention",
            format!("{:?}", have.retention),
            format!("{:?}", wanted.retention),
        ));
    }
    if have.storage != wanted.storage {
        return Err(incompatible(
            "storage",
            format!("{:?}", have.storage),
            format!("{:?}", wanted.storage),
        ));
    }
    let mut changes = Vec::new();
    let mut updated = have.clone();
    if have.subjects != wanted.subjects {
        changes.push(format!(
            "subjects {:?} -> {:?}",
            have.subjects, wanted.subjects
        ));
        updated.subjects = wanted.subjects.clone();
    }
    if have.num_replicas != wanted.num_replicas {
        changes.push(format!(
            "replicas {} -> {}",
            have.num_replicas, wanted.num_replicas
        ));
        updated.num_replicas = wanted.num_replicas;
    }
    if have.max_bytes != wanted.max_bytes {
        changes.push(format!(
            "max_bytes {} -> {}",
            have.max_bytes, wanted.max_bytes
        ));
        updated.max_bytes = wanted.max_bytes;
    }
    if have.discard != wanted.discard {
        changes.push(format!(
            "discard {:?} -> {:?}",
            have.discard, wanted.discard
        ));
        updated.discard = wanted.discard;
    }
    if have.max_age != wanted.max_age {
        changes.push(format!(
            "max_age {:?} -> {:?}",
            have.max_age, wanted.max_age
        ));
        updated.max_age = wanted.max_age;
    }
    // The server fills in a default duplicate window (2m) when none is asked for.
    if !wanted.duplicate_window.is_zero() && have.duplicate_window != wanted.duplicate_window {
        changes.push(format!(
            "duplicate_window {:?} -> {:?}",
            have.duplicate_window, wanted.duplicate_window
        ));
        updated.duplicate_window = wanted.duplicate_window;
    }
    if changes.is_empty() {
        return Ok(LayoutChange::Unchanged(object));
    }
    js.update_stream(updated)
        .await
        .map_err(|e| api(&object, e))?;
    Ok(LayoutChange::Updated { object, changes })
}

/// (name, filter subject) of every durable consumer on `stream`.
async fn durable_consumers(
    stream: &stream::Stream,
    stream_name: &str,
) -> Result<Vec<(String, String)>, LayoutError> {
    let what = || format!("consumers of stream {stream_name}");
    let mut list = stream.consumers();
    let mut found = Vec::new();
    while let Some(info) = list.try_next().await.map_err(|e| api(what(), e))? {
        if info.config.durable_name.is_some() {
            found.push((info.name, info.config.filter_subject));
        }
    }
    Ok(found)
}

/// Deletes every durable consumer in `existing` that has `wanted`'s filter
/// subject under another name: a WorkQueue stream refuses a second consumer
/// with an overlapping filter, so the one under the old name (`<prefix>~…`
/// before names were hashed, or another prefix's) must go before `wanted` can
/// be created. Nothing is lost: the stream keeps every unacknowledged job
/// until a consumer acks it, and `wanted` delivers from the first one.
async fn move_consumers(
    stream: &stream::Stream,
    stream_name: &str,
    existing: &[(String, String)],
    wanted: &pull::Config,
    report: &mut Vec<LayoutChange>,
) -> Result<(), LayoutError> {
    let to = wanted.durable_name.clone().unwrap_or_default();
    let old = existing
        .iter()
        .filter(|(name, filter)| *filter == wanted.filter_subject && *name != to);
    for (from, _) in old {
        stream
            .delete_consumer(from)
            .await
            .map_err(|e| api(format!("consumer {from} on {stream_name}"), e))?;
        report.push(LayoutChange::Moved {
            stream: stream_name.to_owned(),
            from: from.clone(),
            to: to.clone(),
        });
    }
    Ok(())
}

async fn ensure_consumer(
    stream: &stream::Stream,
    stream_name: &str,
    wanted: pull::Config,
) -> Result<LayoutChange, LayoutError> {
    let name = wanted.durable_name.clone().unwrap_or_default();
    let object = format!("consumer {name} on {stream_name}");
    let have = match stream.consumer_info(&name).await {
        Ok(info) => info.config,
        Err(_) => {
            stream
                .create_consumer(wanted)
                .await
                .map_err(|e| api(&object, e))?;
            return Ok(LayoutChange::Created(object));
        }
    };
    let incompatible =
        |field: &'static str, existing: String, wanted: String| LayoutError::IncompatibleConsumer {
            stream: stream_name.to_owned(),
            consumer: name.clone(),
            field,
            existing,
            wanted,
        };
    if have.ack_policy != wanted.ack_policy {
        return Err(incompatible(
            "ack_policy",
            format!("{:?}", have.ack_policy),
            format!("{:?}", wanted.ack_policy),
        ));
    }
    if have.deliver_subject.is_some() {
        return Err(incompatible(
            "deliver_subject",
            format!("{:?}", have.deliver_subject),
            "none (a pull consumer)".into(),
        ));
    }
    let mut changes = Vec::new();
    if have.filter_subject != wanted.filter_subject {
        changes.push(format!(
            "filter_subject {:?} -> {:?}",
            have.filter_subject, wanted.filter_subject
        ));
    }
    if have.ack_wait != wanted.ack_wait {
        changes.push(format!(
            "ack_wait {:?} -> {:?}",
            have.ack_wait, wanted.ack_wait
        ));
    }
    if have.max_deliver != wanted.max_deliver {
        changes.push(format!(
            "max_deliver {} -> {}",
            have.max_deliver, wanted.max_deliver
        ));
    }
    if have.max_ack_pending != wanted.max_ack_pending {
        changes.push(format!(
            "max_ack_pending {} -> {}",
            have.max_ack_pending, wanted.max_ack_pending
        ));
    }
    if changes.is_empty() {
        return Ok(LayoutChange::Unchanged(object));
    }
    // On nats-server 2.9 creating an existing durable updates it in place.
    stream
        .create_consumer(wanted)
        .await
        .map_err(|e| api(&object, e))?;
    Ok(LayoutChange::Updated { object, changes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_limits_are_trusted_from_nats_server_2_10_6_on() {
        assert!(!byte_limit_is_safe("2.9.10"));
        assert!(!byte_limit_is_safe("2.10.5"));
        assert!(byte_limit_is_safe("2.10.6"));
        assert!(byte_limit_is_safe("2.11.0-beta.1"));
        assert!(!byte_limit_is_safe("garbage"));
    }

    #[test]
    fn a_move_is_reported_with_both_names() {
        let moved = LayoutChange::Moved {
            stream: "S".into(),
            from: "p~vs~gitaly%2E3".into(),
            to: "p_vs_gitaly_3_fd49e0ab7ffb2f67".into(),
        };
        assert_eq!(
            moved.to_string(),
            "moved consumer p~vs~gitaly%2E3 to p_vs_gitaly_3_fd49e0ab7ffb2f67 on S"
        );
    }
}
