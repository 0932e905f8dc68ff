//! The JetStream layout: the work stream, the dead-letter stream, the stream
//! that keeps max-deliveries advisories, and one durable pull consumer per
//! (virtual storage, target storage), named as [`crate::queue::names`] says.
//! Created idempotently; every setting of an existing object that the
//! configuration gives is compared, those JetStream can change are updated
//! and each is reported, and those it cannot are reported as such (the
//! object keeps them, and `setup` and `run` fail naming them). A consumer
//! found under another name with the same filter (an older naming scheme's)
//! is moved to its name.

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
    /// Objects that keep settings the configuration changes, because
    /// JetStream cannot change them in place; each entry is a
    /// [`LayoutChange::NotUpdatable`] as displayed.
    #[error("{}", .0.join("; "))]
    NotUpdatable(Vec<String>),
    #[error(
        "nats.max_bytes = {max_bytes} cannot be used with nats-server {version}: before 2.10.6 it \
         enforces a byte limit by silently deleting the oldest accepted jobs (nats-server#4771); \
         set nats.max_bytes = -1 and bound the queue with nats.max_messages"
    )]
    UnsafeByteLimit { max_bytes: i64, version: String },
    #[error("JetStream request for {what} failed: {message}")]
    Api { what: String, message: String },
    #[error(
        "nats.replicas = {replicas}, but nats-server {server} is not in a cluster: the cluster \
         size is 1, so a stream keeps one copy of each job whatever it says; set nats.replicas \
         = 1, or point nats.url at a JetStream cluster of at least {replicas} servers"
    )]
    ReplicasWithoutCluster { replicas: usize, server: String },
    #[error(
        "stream {stream} does not exist: run `gitaly-replicator setup` with this config to \
         create the streams and consumers"
    )]
    NotSetUp { stream: String },
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

/// What `ensure` did to one object. An object whose settings differ from
/// the configuration in some that JetStream can change and some that it
/// cannot gets two entries: `Updated` and `NotUpdatable`.
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
    /// Settings that differ from the configuration and that JetStream cannot
    /// change in place: the object keeps them.
    NotUpdatable {
        object: String,
        differences: Vec<String>,
        /// What the operator can do instead.
        remedy: &'static str,
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
            LayoutChange::NotUpdatable {
                object,
                differences,
                remedy,
            } => write!(
                f,
                "cannot update {object}: {} (JetStream cannot change this in place; {remedy})",
                differences.join(", ")
            ),
            LayoutChange::Unchanged(o) => write!(f, "unchanged {o}"),
        }
    }
}

impl LayoutChange {
    /// An error naming every object of `report` that kept settings the
    /// configuration changes; `Ok` when there is none.
    pub fn all_applied(report: &[LayoutChange]) -> Result<(), LayoutError> {
        let refused: Vec<String> = report
            .iter()
            .filter(|c| matches!(c, LayoutChange::NotUpdatable { .. }))
            .map(ToString::to_string)
            .collect();
        if refused.is_empty() {
            Ok(())
        } else {
            Err(LayoutError::NotUpdatable(refused))
        }
    }
}

/// The settings of one object that differ from the configuration, as
/// `name existing -> wanted`, split by whether JetStream can change them.
#[derive(Default)]
struct Differences {
    updatable: Vec<String>,
    fixed: Vec<String>,
}

impl Differences {
    /// Notes `field` if `have` differs from `wanted`; answers whether it does.
    fn note<T: PartialEq + std::fmt::Debug>(
        &mut self,
        field: &str,
        have: &T,
        wanted: &T,
        updatable: bool,
    ) -> bool {
        if have == wanted {
            return false;
        }
        let line = format!("{field} {have:?} -> {wanted:?}");
        if updatable {
            self.updatable.push(line);
        } else {
            self.fixed.push(line);
        }
        true
    }

    /// The report's entries: `updated` when something was changed, then the
    /// settings that were not; `Unchanged` when nothing differs.
    fn into_report(self, object: String, remedy: &'static str) -> Vec<LayoutChange> {
        let mut report = Vec::new();
        if !self.updatable.is_empty() {
            report.push(LayoutChange::Updated {
                object: object.clone(),
                changes: self.updatable,
            });
        }
        if !self.fixed.is_empty() {
            report.push(LayoutChange::NotUpdatable {
                object: object.clone(),
                differences: self.fixed,
                remedy,
            });
        }
        if report.is_empty() {
            report.push(LayoutChange::Unchanged(object));
        }
        report
    }
}

const STREAM_REMEDY: &str = "migrate or delete the stream, or change the configuration";
const CONSUMER_REMEDY: &str = "delete the consumer and run setup to create it again; its unacknowledged jobs stay in the stream";

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
            max_deliver: nats.max_deliver,
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

    /// Checks that the work and dead-letter streams exist, for the commands
    /// that read them: a missing one is [`LayoutError::NotSetUp`].
    pub async fn require_streams(&self, js: &Context) -> Result<(), LayoutError> {
        use async_nats::jetstream::ErrorCode;
        use async_nats::jetstream::context::GetStreamErrorKind;
        for stream in [&self.stream, &self.dead_letter_stream] {
            match js.get_stream(stream.as_str()).await {
                Ok(_) => {}
                Err(e) => {
                    if let GetStreamErrorKind::JetStream(inner) = e.kind()
                        && inner.error_code() == ErrorCode::STREAM_NOT_FOUND
                    {
                        return Err(LayoutError::NotSetUp {
                            stream: stream.clone(),
                        });
                    }
                    return Err(api(format!("stream {stream}"), e));
                }
            }
        }
        Ok(())
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
        let info = js.client().server_info();
        // A server outside a cluster accepts any replica count and keeps one
        // copy: asking for more would only overstate durability.
        if self.replicas > 1 && info.cluster.as_deref().is_none_or(str::is_empty) {
            return Err(LayoutError::ReplicasWithoutCluster {
                replicas: self.replicas,
                server: format!("{} ({}:{})", info.server_name, info.host, info.port),
            });
        }
        let version = info.version;
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
            report.extend(ensure_stream(js, config).await?);
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
        report.extend(ensure_consumer(js, &advisories, &self.advisory_stream, wanted).await?);
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
        report.extend(ensure_consumer(js, &work, &self.stream, wanted).await?);
        Ok(report)
    }
}

/// Whether the server enforces `max_bytes` with discard-new by refusing
/// publishes (2.10.6 and later) rather than deleting old messages.
pub fn byte_limit_is_safe(version: &str) -> bool {
    version_at_least(version, (2, 10, 6))
}

/// Whether the nats-server `version` is `least` or later; an unreadable
/// version is taken for an old one.
fn version_at_least(version: &str, least: (u32, u32, u32)) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let v = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    v >= least
}

/// Creates the stream, or compares every setting the configuration gives
/// it, updates those JetStream can change and reports those it cannot
/// (storage and retention), which the stream keeps.
async fn ensure_stream(
    js: &Context,
    wanted: stream::Config,
) -> Result<Vec<LayoutChange>, LayoutError> {
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
            return Ok(vec![LayoutChange::Created(object)]);
        }
        Err(e) => return Err(api(&object, e)),
    };
    let have = existing
        .info()
        .await
        .map_err(|e| api(&object, e))?
        .config
        .clone();
    let mut d = Differences::default();
    let mut updated = have.clone();
    d.note("retention", &have.retention, &wanted.retention, false);
    d.note("storage", &have.storage, &wanted.storage, false);
    if d.note("description", &have.description, &wanted.description, true) {
        updated.description = wanted.description.clone();
    }
    if d.note("subjects", &have.subjects, &wanted.subjects, true) {
        updated.subjects = wanted.subjects.clone();
    }
    if d.note("replicas", &have.num_replicas, &wanted.num_replicas, true) {
        updated.num_replicas = wanted.num_replicas;
    }
    if d.note(
        "max_messages",
        &have.max_messages,
        &wanted.max_messages,
        true,
    ) {
        updated.max_messages = wanted.max_messages;
    }
    if d.note("max_bytes", &have.max_bytes, &wanted.max_bytes, true) {
        updated.max_bytes = wanted.max_bytes;
    }
    if d.note("discard", &have.discard, &wanted.discard, true) {
        updated.discard = wanted.discard;
    }
    if d.note("max_age", &have.max_age, &wanted.max_age, true) {
        updated.max_age = wanted.max_age;
    }
    // The server fills in a default duplicate window (2m) when none is asked for.
    if !wanted.duplicate_window.is_zero()
        && d.note(
            "duplicate_window",
            &have.duplicate_window,
            &wanted.duplicate_window,
            true,
        )
    {
        updated.duplicate_window = wanted.duplicate_window;
    }
    if !d.updatable.is_empty() {
        js.update_stream(updated)
            .await
            .map_err(|e| api(&object, e))?;
    }
    Ok(d.into_report(object, STREAM_REMEDY))
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

/// Creates the consumer, or compares every setting the configuration gives
/// it, updates those JetStream can change and reports those it cannot, which
/// the consumer keeps.
async fn ensure_consumer(
    js: &Context,
    stream: &stream::Stream,
    stream_name: &str,
    wanted: pull::Config,
) -> Result<Vec<LayoutChange>, LayoutError> {
    let name = wanted.durable_name.clone().unwrap_or_default();
    let object = format!("consumer {name} on {stream_name}");
    let have = match stream.consumer_info(&name).await {
        Ok(info) => info.config,
        Err(_) => {
            stream
                .create_consumer(wanted)
                .await
                .map_err(|e| api(&object, e))?;
            return Ok(vec![LayoutChange::Created(object)]);
        }
    };
    // nats-server 2.10 and later change a consumer's filter in place.
    let filter_updatable = version_at_least(&js.client().server_info().version, (2, 10, 0));
    let mut d = Differences::default();
    let push = d.note("deliver_subject", &have.deliver_subject, &None, false);
    d.note("ack_policy", &have.ack_policy, &wanted.ack_policy, false);
    d.note(
        "deliver_policy",
        &have.deliver_policy,
        &wanted.deliver_policy,
        false,
    );
    d.note(
        "replay_policy",
        &have.replay_policy,
        &wanted.replay_policy,
        false,
    );
    d.note(
        "filter_subject",
        &have.filter_subject,
        &wanted.filter_subject,
        filter_updatable,
    );
    d.note("description", &have.description, &wanted.description, true);
    d.note("ack_wait", &have.ack_wait, &wanted.ack_wait, true);
    d.note("max_deliver", &have.max_deliver, &wanted.max_deliver, true);
    d.note(
        "max_ack_pending",
        &have.max_ack_pending,
        &wanted.max_ack_pending,
        true,
    );
    if push {
        // A pull consumer's config cannot describe a push consumer, so
        // nothing of it is changed.
        d.fixed.append(&mut d.updatable);
    }
    if !d.updatable.is_empty() {
        // What cannot change is sent as it is, or the server refuses it all.
        let mut update = wanted;
        update.ack_policy = have.ack_policy;
        update.deliver_policy = have.deliver_policy;
        update.replay_policy = have.replay_policy;
        if !filter_updatable {
            update.filter_subject = have.filter_subject.clone();
        }
        // Creating an existing durable updates it in place.
        stream
            .create_consumer(update)
            .await
            .map_err(|e| api(&object, e))?;
    }
    Ok(d.into_report(object, CONSUMER_REMEDY))
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
    fn settings_are_reported_by_whether_jetstream_can_change_them() {
        let mut d = Differences::default();
        assert!(!d.note("max_messages", &5_i64, &5, true));
        assert!(d.note("max_messages", &5_i64, &7, true));
        assert!(d.note("storage", &StorageType::Memory, &StorageType::File, false));
        let report = d.into_report("stream S".into(), STREAM_REMEDY);
        let lines: Vec<String> = report.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "updated stream S: max_messages 5 -> 7",
                "cannot update stream S: storage Memory -> File (JetStream cannot change this \
                 in place; migrate or delete the stream, or change the configuration)",
            ]
        );
        let err = LayoutChange::all_applied(&report).unwrap_err().to_string();
        assert_eq!(err, lines[1]);
        let unchanged = Differences::default().into_report("stream S".into(), STREAM_REMEDY);
        assert_eq!(unchanged, [LayoutChange::Unchanged("stream S".into())]);
        assert!(LayoutChange::all_applied(&unchanged).is_ok());
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
