//! One job's life in the consumer, from arrival to its final
//! acknowledgement: decode it, collapse identical updates (of a batch, and
//! into a group of an earlier batch still waiting for its replica's lock),
//! wait for the repository and a job slot, dispatch, and settle.
//!
//! Every delivered message is owned by one task until it is settled; while
//! it waits or runs, the task keeps it ours with in-progress acks. Each
//! acknowledgement, follower acks included, is what `ack::decide` answers
//! for the stage the job reached (`acknowledger` carries it out). Shutdown
//! cancels waiting, never a dispatch: jobs that have not started are
//! released at once, running ones get the grace period.

use crate::error_chain::display_error_chain;
use crate::event::Job;
use crate::queue::ack::{Deliveries, Role, Stage};
use crate::queue::acknowledger::{Delivery, JobFields, job_log};
use crate::queue::consumer::{Shared, Target, delivery_facts, with_attempts};
use crate::queue::dispatch::{Ran, lock_job, run_locked};
use crate::queue::incarnation::Incarnation;
use crate::queue::layout::Layout;
use crate::queue::open_groups::{GroupKey, GroupTicket};
use crate::queue::requeue::{Carried, Placement};
use crate::queue::waiting::WaitReason;
use crate::replicator::{JobOutcome, Replicator, SkipReason};
use crate::subject::parse_job_subject;
use async_nats::jetstream;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

/// One delivered job before it runs.
pub(super) struct Delivered {
    pub(super) message: jetstream::Message,
    /// The incarnation of the work stream it came from.
    pub(super) incarnation: Arc<Incarnation>,
    pub(super) job: Job,
    pub(super) deliveries: Deliveries,
    /// The message's own stream sequence.
    pub(super) sequence: u64,
    /// Its first publication: its place in its replica's order, and the
    /// time completion dedup judges it by (the broker's clock; a publisher's
    /// `created_at` may come from a clock that is off).
    pub(super) placement: Placement,
    /// What it carries from the job's earlier copies.
    pub(super) carried: Carried,
    /// Its share of the intake (or, joined to an open group, a rider's
    /// place), given back when the task ends.
    pub(super) held: Option<OwnedSemaphorePermit>,
}

impl Delivered {
    pub(super) fn fields(&self) -> JobFields<'_> {
        let job = &self.job;
        JobFields {
            virtual_storage: &job.virtual_storage,
            target: &job.target_node_storage,
            source: job.source_node_storage.as_deref().unwrap_or(""),
            correlation_id: job.correlation_id.as_deref().unwrap_or(""),
            change_type: job.change_type().as_str(),
            relative_path: &job.relative_path,
            stream_sequence: self.sequence,
            attempt: self.deliveries.failures + 1,
            delivery: self.deliveries.delivered,
        }
    }

    fn delivery(&self) -> Delivery<'_> {
        Delivery {
            message: &self.message,
            incarnation: &self.incarnation,
            sequence: self.sequence,
            deliveries: self.deliveries,
            placement: self.placement,
            carried: self.carried,
            fields: self.fields(),
        }
    }
}

/// Nanoseconds since 1970, saturating (an i64 lasts until 2262).
fn unix_nanos(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos()).unwrap_or(i64::MAX)
}

/// Decodes a batch, sends invalid messages to the dead letters, collapses
/// identical updates, and starts one task per remaining job.
pub(super) fn dispatch_batch<R: Replicator>(
    shared: &Arc<Shared<R>>,
    target: &Arc<Target>,
    batch: Vec<(
        jetstream::Message,
        Option<OwnedSemaphorePermit>,
        Arc<Incarnation>,
    )>,
) {
    let mut groups: Vec<(Delivered, Vec<Delivered>, Option<GroupKey>)> = Vec::new();
    let mut update_leader: HashMap<(String, String), usize> = HashMap::new();
    for (message, held, incarnation) in batch {
        let (deliveries, sequence, placement, carried) =
            delivery_facts(shared, &message, &incarnation);
        shared
            .latest_published
            .fetch_max(unix_nanos(placement.published), Ordering::Relaxed);
        // A retry delivered before its time: nak'd for the rest of its
        // delay (the failure that set it is already counted).
        let cap = shared.settings.retry.max;
        if let Some(left) = carried.wait_left(OffsetDateTime::now_utc(), cap) {
            let target = target.clone();
            shared.jobs.spawn(async move {
                let _held = held;
                let d = Delivery {
                    message: &message,
                    incarnation: &incarnation,
                    sequence,
                    deliveries,
                    placement,
                    carried,
                    fields: JobFields::undecoded(
                        &target.spec.virtual_storage,
                        &target.spec.target_storage,
                        sequence,
                        &deliveries,
                    ),
                };
                let acks = &target.acknowledger;
                acks.settle(&d, Stage::Early(left), Role::Leader, "").await;
            });
            continue;
        }
        let job = match decode(&shared.layout, &message) {
            Ok(job) => job,
            Err(reason) => {
                let target = target.clone();
                shared.jobs.spawn(async move {
                    let _held = held;
                    target.metrics.outcome(None, "invalid");
                    let fields = JobFields::undecoded(
                        &target.spec.virtual_storage,
                        &target.spec.target_storage,
                        sequence,
                        &deliveries,
                    );
                    job_log!(warn, fields, error = %reason, "invalid replication job");
                    let d = Delivery {
                        message: &message,
                        incarnation: &incarnation,
                        sequence,
                        deliveries,
                        placement,
                        carried,
                        fields,
                    };
                    let acks = &target.acknowledger;
                    acks.settle(&d, Stage::Undecodable, Role::Leader, &reason)
                        .await;
                });
                continue;
            }
        };
        let deliveries = with_attempts(shared, &job, deliveries);
        let mut d = Delivered {
            message,
            incarnation,
            job,
            deliveries,
            sequence,
            placement,
            carried,
            held,
        };
        let mut key = None;
        if d.job.change_type().needs_source() {
            let k = (
                d.job.relative_path.clone(),
                d.job.source_node_storage.clone().unwrap_or_default(),
            );
            if let Some(&i) = update_leader.get(&k) {
                // The group runs as its newest job, so it takes that job's
                // place in the replica's order: a state-changing job
                // published between the twins cannot undo the newest one.
                let (leader, followers, _) = &mut groups[i];
                let (newer, mut older) = if d.placement.sequence > leader.placement.sequence {
                    let old = std::mem::replace(leader, d);
                    (leader, old)
                } else {
                    (leader, d)
                };
                match (&mut newer.held, older.held.take()) {
                    (Some(l), Some(f)) => l.merge(f),
                    (l, f) => *l = l.take().or(f),
                }
                followers.push(older);
                continue;
            }
            // A group of an earlier batch still waiting for the lock runs
            // for this one too.
            d = match target.groups.join(&k, d, &shared.riders) {
                None => continue,
                Some(d) => d,
            };
            update_leader.insert(k.clone(), groups.len());
            key = Some(k);
        }
        groups.push((d, Vec::new(), key));
    }
    for (d, followers, key) in groups {
        // Opened here, before the next batch is read, so its twins find it.
        let ticket = key.and_then(|k| target.groups.open(k, &d.incarnation));
        let shared2 = shared.clone();
        let target = target.clone();
        shared
            .jobs
            .spawn(Box::pin(process(shared2, target, d, followers, ticket)));
    }
}

/// Folds the members that joined a group while it waited for its lock into
/// it: the newest leads, so the group takes its place in the replica's order
/// (see `dispatch_batch`).
fn fold_joiners(d: &mut Delivered, followers: &mut Vec<Delivered>, joiners: Vec<Delivered>) {
    for mut j in joiners {
        if j.placement.sequence > d.placement.sequence {
            std::mem::swap(d, &mut j);
        }
        followers.push(j);
    }
}

/// The job in a message, checked against the subject it came on.
fn decode(layout: &Layout, m: &jetstream::Message) -> Result<Job, String> {
    let job = Job::from_json(&m.message.payload).map_err(|e| e.to_string())?;
    let (vs, target) = parse_job_subject(&layout.subject_prefix, m.message.subject.as_str())
        .map_err(|e| e.to_string())?;
    if vs != job.virtual_storage || target != job.target_node_storage {
        return Err(format!(
            "subject {} is for {vs}/{target} but the payload is for {}/{}",
            m.message.subject, job.virtual_storage, job.target_node_storage
        ));
    }
    Ok(job)
}

async fn process<R: Replicator>(
    shared: Arc<Shared<R>>,
    target: Arc<Target>,
    mut d: Delivered,
    mut followers: Vec<Delivered>,
    mut group: Option<GroupTicket>,
) {
    let change_type = d.job.change_type();
    let acks = &target.acknowledger;
    // When it started waiting: an earlier copy's, if one went back to the
    // stream waiting, so a wait is logged once however many copies it takes.
    let mut waiting_since = d.carried.waiting_since;
    let mut slot = None;
    let ran = loop {
        let locked = {
            let fields = d.fields();
            // The leader counts itself; its followers wait with it.
            let _counted: Vec<_> = followers
                .iter()
                .map(|_| target.waiting.counting(WaitReason::RepositoryLocked))
                .collect();
            let work = lock_job(&shared, &target, &d, &fields);
            keeping_ours(&shared, &target, &d, &followers, group.as_ref(), work).await
        };
        // Closed once the lock is taken (or never will be): whoever joined
        // was published before the generations are read.
        if let Some(ticket) = group.take() {
            fold_joiners(&mut d, &mut followers, target.groups.close(ticket));
        }
        let ran = match locked {
            Err(ran) => ran,
            Ok(locked) => {
                let fields = d.fields();
                let waiting = waiting_since.is_some();
                let work = run_locked(&shared, &target, &d, locked, &fields, waiting);
                keeping_ours(&shared, &target, &d, &followers, None, work).await
            }
        };
        let Ran::Finished(JobOutcome::SourceUnavailable { storage }, _, _) = &ran else {
            break ran;
        };
        // Nothing ran and nothing was written: it waits, using no attempt.
        target.metrics.job_finished(change_type, "deferred", None);
        if waiting_since.is_none() {
            waiting_since = Some(OffsetDateTime::now_utc());
            job_log!(
                warn,
                d.fields(),
                source_state = "unhealthy",
                wait_reason = WaitReason::SourceUnavailable.as_str(),
                "started waiting: source storage {storage} is unhealthy and no other healthy replica holds the repository's generation; the job waits for one without using an attempt"
            );
        }
        if slot.is_none() {
            slot = target.waiting.hold();
            if slot.is_some() {
                // In memory for as long as it takes: it gives back its
                // intake so other jobs keep coming.
                drop(d.held.take());
                for f in &mut followers {
                    drop(f.held.take());
                }
            }
        }
        // Beyond the share it waits one interval (at least a second, which
        // paces the copies' round trips), keeping its intake, then goes back.
        let interval = shared
            .settings
            .health_check_interval
            .max(Duration::from_millis(100));
        let wait = if slot.is_some() {
            interval
        } else {
            interval.max(Duration::from_secs(1))
        };
        let stop = shared.stop.clone();
        let waited = keeping_ours(&shared, &target, &d, &followers, None, async move {
            tokio::select! {
                _ = tokio::time::sleep(wait) => true,
                _ = stop.cancelled() => false,
            }
        })
        .await;
        if !waited {
            break Ran::Released;
        }
        if slot.is_none() {
            break Ran::SentBack;
        }
    };
    drop(slot);
    // A failed or interrupted try goes back still waiting (its copy carries
    // when it started); any other outcome ends the wait.
    let ended = matches!(
        &ran,
        Ran::Finished(o, _, _) if !matches!(o, JobOutcome::Failed(_) | JobOutcome::Interrupted)
    );
    if let (Some(since), true) = (waiting_since, ended) {
        let waited = (OffsetDateTime::now_utc() - since).whole_seconds();
        job_log!(
            info,
            d.fields(),
            waited_seconds = waited,
            wait_reason = WaitReason::SourceUnavailable.as_str(),
            "stopped waiting: a healthy replica holds the repository's generation again"
        );
    }
    let follower = Role::Follower {
        leader_delivered: d.deliveries.delivered,
        leader_failures: d.deliveries.failures,
    };
    let fields = d.fields();
    let (outcome, latency, dispatched) = match ran {
        Ran::Finished(o, l, dispatched) => (o, l, dispatched),
        Ran::Released => {
            job_log!(
                info,
                fields,
                "shutting down: job released before it started"
            );
            acks.settle(&d.delivery(), Stage::Released, Role::Leader, "")
                .await;
            for f in &followers {
                acks.settle(&f.delivery(), Stage::Released, follower, "")
                    .await;
            }
            return;
        }
        Ran::Abandoned => {
            acks.settle(&d.delivery(), Stage::Abandoned, Role::Leader, "")
                .await;
            return;
        }
        Ran::SentBack => {
            // The copy carries when it started waiting.
            let mut sent = d.delivery();
            sent.carried.waiting_since = waiting_since;
            acks.settle(&sent, Stage::SentBack, Role::Leader, "").await;
            for f in &followers {
                let mut sent = f.delivery();
                sent.carried.waiting_since = waiting_since;
                acks.settle(&sent, Stage::SentBack, follower, "").await;
            }
            return;
        }
    };
    let label = outcome.label();
    if dispatched {
        target.metrics.job_finished(change_type, label, latency);
    } else {
        target.metrics.outcome(Some(change_type), label);
    }
    log_outcome(&shared, &target, &fields, &outcome, latency);
    let error = match &outcome {
        JobOutcome::Failed(e) => display_error_chain(e),
        JobOutcome::Invalid(e) => e.clone(),
        _ => String::new(),
    };
    let stage = Stage::Finished(&outcome);
    let mut settled = d.delivery();
    settled.carried.waiting_since = waiting_since;
    acks.settle(&settled, stage, Role::Leader, &error).await;
    let collapsed = matches!(
        outcome,
        JobOutcome::Completed | JobOutcome::Skipped(_) | JobOutcome::Unsupported { .. }
    );
    for f in &followers {
        if collapsed {
            target.metrics.outcome(Some(change_type), "skipped");
            job_log!(debug, f.fields(), skipped = %SkipReason::Collapsed, "collapsed update acknowledged");
        }
        acks.settle(&f.delivery(), stage, follower, "").await;
    }
}

/// Runs `work` while keeping the job, its followers and the members that
/// joined its open `group` ours with in-progress acks.
async fn keeping_ours<R, T>(
    shared: &Shared<R>,
    target: &Target,
    d: &Delivered,
    followers: &[Delivered],
    group: Option<&GroupTicket>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let acks = &target.acknowledger;
    let follower = Role::Follower {
        leader_delivered: d.deliveries.delivered,
        leader_failures: d.deliveries.failures,
    };
    let every = (shared.settings.ack_wait / 3).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tokio::pin!(work);
    loop {
        tokio::select! {
            r = &mut work => return r,
            _ = tick.tick() => {
                acks.settle(&d.delivery(), Stage::InFlight, Role::Leader, "").await;
                for f in followers {
                    acks.settle(&f.delivery(), Stage::InFlight, follower, "").await;
                }
                if let Some(ticket) = group {
                    let joiners = target.groups.take_joiners(ticket);
                    for f in &joiners {
                        acks.settle(&f.delivery(), Stage::InFlight, follower, "").await;
                    }
                    target.groups.put_back(ticket, joiners);
                }
            }
        }
    }
}

/// The log line of a finished job, as Praefect writes it.
fn log_outcome<R>(
    shared: &Shared<R>,
    target: &Target,
    fields: &JobFields<'_>,
    outcome: &JobOutcome,
    latency: Option<Duration>,
) {
    match outcome {
        JobOutcome::Completed => {
            job_log!(info, fields, new_state = "completed", latency = ?latency, "replication job processing finished")
        }
        JobOutcome::Skipped(reason) => {
            job_log!(info, fields, new_state = "completed", skipped = %reason, "replication job processing finished")
        }
        JobOutcome::Failed(e) => {
            job_log!(
                warn,
                fields,
                new_state = "failed",
                error = display_error_chain(e),
                "replication job processing finished"
            )
        }
        JobOutcome::Invalid(e) => {
            job_log!(warn, fields, new_state = "dead", error = %e, "replication job is invalid")
        }
        // `process` keeps such a job waiting and logs it there; it never
        // ends as this outcome.
        JobOutcome::SourceUnavailable { .. } => {}
        JobOutcome::Interrupted => {
            job_log!(
                warn,
                fields,
                new_state = "interrupted",
                "repository lock lost: the job stopped before its write and runs again"
            )
        }
        JobOutcome::Unsupported { method, message } => {
            let first = shared
                .warned_unsupported
                .lock()
                .map(|mut w| w.insert((target.spec.durable_name.clone(), *method)))
                .unwrap_or(false);
            if first {
                job_log!(warn, fields, method, %message, "target does not implement this RPC any more; such jobs are acknowledged without effect");
            }
        }
    }
}
