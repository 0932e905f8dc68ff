//! The consumer: for every target, pull jobs from its durable consumer, run
//! each under the repository's exclusion, and acknowledge by outcome.
//!
//! Every delivered message is owned by one task from arrival to its final
//! acknowledgement; while it waits (for the repository lock or a job slot) or
//! runs, the task sends in-progress acks so JetStream does not redeliver it.
//! Shutdown cancels waiting, never a dispatch: jobs that have not started are
//! released at once, running ones get the grace period.

use crate::event::Job;
use crate::gitaly::NodeSet;
use crate::gitaly::health::watch_health;
use crate::metrics::TargetMetrics;
use crate::queue::ack::{AckAction, attempts_for, decide};
use crate::queue::dead_letter::{DeadJob, DeadReason, publish_dead};
use crate::queue::layout::{ConsumerSpec, Layout};
use crate::queue::puller::{PullError, Pulled, Puller};
use crate::queue::requeue::{Placement, requeue as publish_requeue};
use crate::replicator::{JobOutcome, Replicator, SkipReason};
use crate::retry_delay::RetryPolicy;
use crate::store::JobKey;
use crate::store::locks::RepositoryLocks;
use crate::store::{WriteOrder, repository_lock_key};
use crate::subject::parse_job_subject;
use async_nats::jetstream::{self, AckKind};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How the consumer runs.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Jobs asked for per pull request.
    pub batch_size: usize,
    /// Pull requests kept open per target.
    pub pull_loops_per_target: usize,
    /// Jobs dispatching at once in this process.
    pub max_concurrent_jobs: usize,
    /// How long one pull request waits on the server.
    pub fetch_expires: Duration,
    /// The consumers' ack wait; in-progress acks go every third of it.
    pub ack_wait: Duration,
    /// Attempts per job (delete_replica: unlimited).
    pub attempts: u32,
    pub retry: RetryPolicy,
    pub health_check_interval: Duration,
    /// How long running jobs may finish after shutdown starts.
    pub grace_period: Duration,
    /// How often queue depth is read for the metrics.
    pub queue_depth_interval: Duration,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            batch_size: 10,
            pull_loops_per_target: 1,
            max_concurrent_jobs: 64,
            fetch_expires: Duration::from_secs(5),
            ack_wait: Duration::from_secs(30),
            attempts: 3,
            retry: RetryPolicy::default(),
            health_check_interval: Duration::from_secs(5),
            grace_period: Duration::from_secs(60),
            queue_depth_interval: Duration::from_secs(10),
        }
    }
}

/// Why the consumer could not run.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("target {virtual_storage}/{storage} is in the layout but not in the node set")]
    UnknownTarget {
        virtual_storage: String,
        storage: String,
    },
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error("cannot read work stream {stream}: {message}")]
    Stream { stream: String, message: String },
}

/// What the consumer needs from the rest of the service.
pub struct ConsumerDeps<R> {
    pub client: async_nats::Client,
    pub layout: Layout,
    pub replicator: R,
    pub locks: Arc<RepositoryLocks>,
    pub nodes: NodeSet,
    pub settings: ConsumerSettings,
}

struct Shared<R> {
    js: jetstream::Context,
    layout: Layout,
    replicator: R,
    locks: Arc<RepositoryLocks>,
    permits: Arc<Semaphore>,
    /// Bounds the jobs this process holds (fetched, not yet acknowledged):
    /// a pull request reserves its batch here first. Without it, jobs
    /// waiting for their repository lock took no job slot, so the pull loops
    /// kept fetching and, with an unlimited `max_ack_pending`, memory grew
    /// with the backlog.
    intake: Arc<Semaphore>,
    settings: ConsumerSettings,
    /// Stop fetching; release jobs that have not started.
    stop: CancellationToken,
    /// Grace period over: abandon running dispatches (they are redelivered).
    abort: CancellationToken,
    tracker: TaskTracker,
    warned_unsupported: Mutex<HashSet<(String, &'static str)>>,
    /// The work stream's incarnation, which order records are kept for.
    stream_incarnation: String,
    /// The latest stream time (Unix nanoseconds) of any job this process has
    /// received: the broker's clock was at least there when a job starts
    /// after it, so completions are recorded on the same clock as the
    /// publication times they are compared with.
    latest_published: AtomicI64,
}

struct Target {
    spec: ConsumerSpec,
    metrics: TargetMetrics,
}

/// Runs until `shutdown` resolves, then drains: stops fetching, releases
/// jobs not yet started, waits up to the grace period for running ones.
pub async fn run<R: Replicator>(
    deps: ConsumerDeps<R>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ConsumerError> {
    let ConsumerDeps {
        client,
        layout,
        replicator,
        locks,
        nodes,
        settings,
    } = deps;
    let js = jetstream::new(client.clone());
    let stream_incarnation = stream_incarnation(&js, &layout.stream).await?;
    let shared = Arc::new(Shared {
        js,
        layout: layout.clone(),
        replicator,
        locks,
        permits: Arc::new(Semaphore::new(settings.max_concurrent_jobs.max(1))),
        intake: Arc::new(Semaphore::new(intake_capacity(
            &settings,
            layout.consumers.len(),
        ))),
        settings,
        stop: CancellationToken::new(),
        abort: CancellationToken::new(),
        tracker: TaskTracker::new(),
        warned_unsupported: Mutex::new(HashSet::new()),
        stream_incarnation,
        latest_published: AtomicI64::new(0),
    });
    let background = CancellationToken::new();
    let mut loops = Vec::new();
    for spec in &layout.consumers {
        let node = nodes
            .get(&spec.virtual_storage, &spec.target_storage)
            .ok_or_else(|| ConsumerError::UnknownTarget {
                virtual_storage: spec.virtual_storage.clone(),
                storage: spec.target_storage.clone(),
            })?
            .clone();
        let target = Arc::new(Target {
            spec: spec.clone(),
            metrics: TargetMetrics::new(&spec.virtual_storage, &spec.target_storage),
        });
        let healthy = watch_health(
            node,
            shared.settings.health_check_interval,
            target.metrics.clone(),
            background.clone(),
        );
        for _ in 0..shared.settings.pull_loops_per_target.max(1) {
            let puller = Puller::new(
                client.clone(),
                shared.js.clone(),
                &layout.stream,
                &spec.durable_name,
                shared.settings.fetch_expires,
            )
            .await?;
            loops.push(tokio::spawn(pull_loop(
                shared.clone(),
                target.clone(),
                puller,
                healthy.clone(),
            )));
        }
    }
    let advisories = Puller::new(
        client.clone(),
        shared.js.clone(),
        &layout.advisory_stream,
        &layout.advisory_consumer,
        shared.settings.fetch_expires,
    )
    .await?;
    loops.push(tokio::spawn(crate::queue::advisories::run(
        shared.js.clone(),
        layout.clone(),
        advisories,
        shared.stop.clone(),
    )));
    let depth = tokio::spawn(crate::queue::depth::poll(
        shared.js.clone(),
        layout.clone(),
        shared.settings.queue_depth_interval,
        background.clone(),
    ));

    shutdown.await;
    tracing::info!("shutting down: no new jobs are fetched; running jobs may finish");
    shared.stop.cancel();
    for l in loops {
        let _ = l.await;
    }
    shared.tracker.close();
    if tokio::time::timeout(shared.settings.grace_period, shared.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_period = ?shared.settings.grace_period,
            "grace period over: abandoning running jobs; JetStream redelivers them"
        );
        shared.abort.cancel();
        shared.tracker.wait().await;
    }
    background.cancel();
    let _ = depth.await;
    Ok(())
}

/// Names the work stream's incarnation: a recreated stream numbers its jobs
/// from 1 again, and its jobs must not look older than the old stream's.
async fn stream_incarnation(
    js: &jetstream::Context,
    stream: &str,
) -> Result<String, ConsumerError> {
    let failed = |e: &dyn std::fmt::Display| ConsumerError::Stream {
        stream: stream.to_owned(),
        message: e.to_string(),
    };
    let mut s = js.get_stream(stream).await.map_err(|e| failed(&e))?;
    let created = s.info().await.map_err(|e| failed(&e))?.created;
    Ok(format!("{stream}@{}", created.unix_timestamp_nanos()))
}

/// Jobs one process may hold: every job slot busy, plus one open request
/// per pull loop, so a full process still has its next batches at hand.
pub fn intake_capacity(settings: &ConsumerSettings, consumers: usize) -> usize {
    let loops = consumers.max(1) * settings.pull_loops_per_target.max(1);
    settings.max_concurrent_jobs.max(1) + settings.batch_size.max(1) * loops
}

async fn pull_loop<R: Replicator>(
    shared: Arc<Shared<R>>,
    target: Arc<Target>,
    mut puller: Puller,
    mut healthy: watch::Receiver<bool>,
) {
    let stop = shared.stop.clone();
    let mut error_wait = Duration::from_millis(100);
    let batch_size = shared.settings.batch_size.max(1);
    // The intake reserved for the open request; each arriving job takes one.
    let mut reserved: Option<OwnedSemaphorePermit> = None;
    loop {
        // Only ask for jobs that can start: a target that is down or a
        // process that is full leaves them in the stream.
        if !puller.is_active() {
            // What the last request did not fill goes back.
            drop(reserved.take());
            tokio::select! {
                r = healthy.wait_for(|h| *h) => if r.is_err() { break },
                _ = stop.cancelled() => break,
            }
            let permit = tokio::select! {
                p = shared.permits.acquire() => p,
                _ = stop.cancelled() => break,
            };
            drop(permit);
            reserved = tokio::select! {
                p = shared.intake.clone().acquire_many_owned(batch_size as u32) => p.ok(),
                _ = stop.cancelled() => break,
            };
            if let Err(e) = puller.request(batch_size).await {
                reserved = None;
                tracing::warn!(error = %e, consumer = %target.spec.durable_name, "pull request failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(error_wait) => {}
                    _ = stop.cancelled() => break,
                }
                error_wait = (error_wait * 2).min(Duration::from_secs(5));
                continue;
            }
            error_wait = Duration::from_millis(100);
        }
        let step = tokio::select! {
            s = puller.next() => s,
            _ = stop.cancelled() => break,
        };
        match step {
            Ok(Pulled::Messages(batch)) => {
                // A late job of an expired request finds nothing reserved
                // and runs uncounted; that is rare and bounded by one batch.
                let batch = batch
                    .into_iter()
                    .map(|m| (m, reserved.as_mut().and_then(|r| r.split(1))))
                    .collect();
                dispatch_batch(&shared, &target, batch)
            }
            Ok(Pulled::RequestDone(None)) => {}
            Ok(Pulled::RequestDone(Some(reason))) => {
                tracing::debug!(consumer = %target.spec.durable_name, %reason, "pull request ended by the server");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = stop.cancelled() => break,
                }
            }
            Ok(Pulled::Stalled) => {
                tracing::warn!(consumer = %target.spec.durable_name, "pull request went silent; renewing it");
                target.metrics.pull_renewed();
            }
            Err(e) => {
                tracing::error!(error = %e, consumer = %target.spec.durable_name, "pulling stopped");
                break;
            }
        }
    }
    // Jobs that arrived after the stop are handed back at once.
    for m in puller.close().await {
        let _ = m.ack_with(AckKind::Nak(None)).await;
    }
}

/// Logs an event of one job with Praefect's field names at the top level of
/// the line, where log queries written for Praefect look for them.
macro_rules! job_log {
    ($level:ident, $d:expr, $($rest:tt)*) => {
        tracing::$level!(
            virtual_storage = %$d.job.virtual_storage,
            replication_job_target = %$d.job.target_node_storage,
            replication_job_source = %$d.job.source_node_storage.as_deref().unwrap_or(""),
            correlation_id = %$d.job.correlation_id.as_deref().unwrap_or(""),
            change_type = %$d.job.change_type(),
            relative_path = %$d.job.relative_path,
            stream_sequence = $d.sequence,
            attempt = $d.delivered,
            $($rest)*
        )
    };
}

/// One delivered job before it runs.
struct Delivered {
    message: jetstream::Message,
    job: Job,
    delivered: u64,
    /// The message's own stream sequence.
    sequence: u64,
    /// Its first publication: its place in its replica's order, and the
    /// time completion dedup judges it by (the broker's clock; a publisher's
    /// `created_at` may come from a clock that is off).
    placement: Placement,
    /// Its share of the intake, given back when the task ends.
    held: Option<OwnedSemaphorePermit>,
}

/// A collapsed twin acknowledged with its group's leader.
struct Follower {
    message: jetstream::Message,
    delivered: u64,
    sequence: u64,
    placement: Placement,
}

/// Nanoseconds since 1970, saturating (an i64 lasts until 2262).
fn unix_nanos(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos()).unwrap_or(i64::MAX)
}

fn delivery_facts(m: &jetstream::Message) -> (u64, u64, Placement) {
    let (delivered, sequence, published) = match m.info() {
        Ok(i) => (i.delivered.max(1) as u64, i.stream_sequence, i.published),
        Err(_) => (1, 0, OffsetDateTime::now_utc()),
    };
    let placement = Placement::of(m.message.headers.as_ref(), sequence, published);
    (delivered, sequence, placement)
}

/// Decodes a batch, sends invalid messages to the dead letters, collapses
/// identical updates, and starts one task per remaining job.
fn dispatch_batch<R: Replicator>(
    shared: &Arc<Shared<R>>,
    target: &Arc<Target>,
    batch: Vec<(jetstream::Message, Option<OwnedSemaphorePermit>)>,
) {
    let mut leaders: Vec<(Delivered, Vec<Follower>)> = Vec::new();
    let mut update_leader: HashMap<(String, String), usize> = HashMap::new();
    for (message, held) in batch {
        let (delivered, sequence, placement) = delivery_facts(&message);
        shared
            .latest_published
            .fetch_max(unix_nanos(placement.published), Ordering::Relaxed);
        let job = match decode(&shared.layout, &message) {
            Ok(job) => job,
            Err(reason) => {
                let shared = shared.clone();
                let target = target.clone();
                shared.tracker.clone().spawn(async move {
                    let _held = held;
                    target.metrics.outcome(None, "invalid");
                    tracing::warn!(consumer = %target.spec.durable_name, stream_sequence = sequence, error = %reason, "invalid replication job");
                    dead_letter(&shared, &target, &message, sequence, DeadReason::Invalid, &reason, delivered).await;
                });
                continue;
            }
        };
        let d = Delivered {
            message,
            job,
            delivered,
            sequence,
            placement,
            held,
        };
        if d.job.change_type().needs_source() {
            let key = (
                d.job.relative_path.clone(),
                d.job.source_node_storage.clone().unwrap_or_default(),
            );
            if let Some(&i) = update_leader.get(&key) {
                // The group runs as its newest job, so it takes that job's
                // place in the replica's order: a state-changing job
                // published between the twins cannot undo the newest one.
                let (leader, followers) = &mut leaders[i];
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
                followers.push(Follower {
                    message: older.message,
                    delivered: older.delivered,
                    sequence: older.sequence,
                    placement: older.placement,
                });
                continue;
            }
            update_leader.insert(key, leaders.len());
        }
        leaders.push((d, Vec::new()));
    }
    for (d, followers) in leaders {
        let shared2 = shared.clone();
        let target = target.clone();
        shared
            .tracker
            .spawn(Box::pin(process(shared2, target, d, followers)));
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

/// How far a job got before it was stopped.
enum Ran {
    /// The outcome; the latency when it completed; whether it was dispatched
    /// (a superseded job never is).
    Finished(JobOutcome, Option<Duration>, bool),
    /// Shutdown came before it started: release it now.
    Released,
    /// The grace period ended mid-dispatch: leave it for redelivery.
    Abandoned,
}

async fn process<R: Replicator>(
    shared: Arc<Shared<R>>,
    target: Arc<Target>,
    d: Delivered,
    followers: Vec<Follower>,
) {
    let change_type = d.job.change_type();
    let work = run_job(&shared, &target, &d);
    tokio::pin!(work);
    // In-progress acks keep the messages ours while we wait and run.
    let every = (shared.settings.ack_wait / 3).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    let ran = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = tick.tick() => {
                let _ = d.message.ack_with(AckKind::Progress).await;
                for f in &followers {
                    let _ = f.message.ack_with(AckKind::Progress).await;
                }
            }
        }
    };
    let (outcome, latency, dispatched) = match ran {
        Ran::Finished(o, l, d) => (o, l, d),
        Ran::Released => {
            release(&shared, &d, &followers).await;
            return;
        }
        Ran::Abandoned => return,
    };
    let label = outcome.label();
    if dispatched {
        target.metrics.job_finished(change_type, label, latency);
    } else {
        target.metrics.outcome(Some(change_type), label);
    }
    match &outcome {
        JobOutcome::Completed => {
            job_log!(info, d, new_state = "completed", latency = ?latency, "replication job processing finished")
        }
        JobOutcome::Skipped(reason) => {
            job_log!(info, d, new_state = "completed", skipped = %reason, "replication job processing finished")
        }
        JobOutcome::Failed(e) => {
            job_log!(warn, d, new_state = "failed", error = %e, "replication job processing finished")
        }
        JobOutcome::Invalid(e) => {
            job_log!(warn, d, new_state = "dead", error = %e, "replication job is invalid")
        }
        JobOutcome::Interrupted => {
            job_log!(
                warn,
                d,
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
                job_log!(warn, d, method, %message, "target does not implement this RPC any more; such jobs are acknowledged without effect");
            }
        }
    }
    let attempts = attempts_for(change_type, shared.settings.attempts);
    let action = decide(
        &outcome,
        d.delivered,
        attempts,
        shared.layout.max_deliver.max(1) as u64,
        &shared.settings.retry,
    );
    let follower_ack = match &action {
        AckAction::Ack => AckKind::Ack,
        AckAction::Nak(delay) => AckKind::Nak(Some(*delay)),
        // A collapsed twin of a dead job keeps its own attempts.
        _ => AckKind::Nak(Some(shared.settings.retry.delay_after(1))),
    };
    match action {
        AckAction::Ack => {
            let _ = d.message.ack().await;
        }
        AckAction::Nak(delay) => {
            let _ = d.message.ack_with(AckKind::Nak(Some(delay))).await;
        }
        AckAction::DeadLetter { invalid } => {
            let error = match &outcome {
                JobOutcome::Failed(e) => e.to_string(),
                JobOutcome::Invalid(e) => e.clone(),
                _ => String::new(),
            };
            let reason = if invalid {
                DeadReason::Invalid
            } else {
                DeadReason::Dead
            };
            dead_letter(
                &shared,
                &target,
                &d.message,
                d.sequence,
                reason,
                &error,
                d.delivered,
            )
            .await;
        }
        AckAction::Requeue => {
            requeue(&shared, &d.message, d.placement, d.sequence, d.delivered).await
        }
    }
    for f in &followers {
        if matches!(follower_ack, AckKind::Ack) {
            target.metrics.outcome(Some(change_type), "skipped");
            job_log!(debug, d, skipped = %SkipReason::Collapsed, "collapsed update acknowledged");
        }
        let _ = f.message.ack_with(follower_ack).await;
    }
}

/// The repository lock keys of a job: its replica, and for a rename the
/// replica at the new path too, in a fixed order so that two renames in
/// opposite directions cannot wait for each other.
fn lock_keys(job: &Job) -> Vec<i64> {
    let (vs, rel, target) = job.repository_key();
    let mut keys = vec![repository_lock_key(vs, rel, target)];
    if let crate::event::Change::Rename { new_relative_path } = &job.change {
        keys.push(repository_lock_key(vs, new_relative_path, target));
        keys.sort_unstable();
        keys.dedup();
    }
    keys
}

/// Waits for the repository and a job slot, checks completion dedup, and
/// dispatches.
async fn run_job<R: Replicator>(shared: &Shared<R>, target: &Target, d: &Delivered) -> Ran {
    let job = &d.job;
    let change = job.change_type();
    let ordered = change.changes_state();
    // Maintenance jobs are deduplicated Praefect's way; state-changing jobs
    // are ordered instead (a twin's completion says nothing about a delete
    // published between the two).
    let completion = (!ordered).then(|| JobKey::of(job));
    let mut guards = Vec::new();
    for (i, key) in lock_keys(job).into_iter().enumerate() {
        // The dedup check is answered with the lock, so it sees every twin
        // that completed before the lock was free.
        let check = completion
            .clone()
            .filter(|_| i == 0)
            .map(|c| (c, d.placement.published));
        match shared.locks.acquire_checked(key, check, &shared.stop).await {
            Some(g) => guards.push(g),
            None => {
                for g in guards {
                    shared.locks.release(g);
                }
                return Ran::Released;
            }
        }
    }
    let permit = tokio::select! {
        p = shared.permits.acquire() => p,
        _ = shared.stop.cancelled() => {
            for g in guards {
                shared.locks.release(g);
            }
            return Ran::Released;
        }
    };
    let mut record = None;
    if guards.iter().any(|g| g.waited()) {
        job_log!(
            debug,
            d,
            "waited for the repository lock: another job of this replica ran first"
        );
    }
    let ran = if guards.iter().any(|g| g.superseded()) {
        drop(permit);
        Ran::Finished(JobOutcome::Skipped(SkipReason::Superseded), None, false)
    } else {
        let started_wall = OffsetDateTime::now_utc();
        let delay = (started_wall - job.created_at.unwrap_or(d.placement.published))
            .try_into()
            .unwrap_or(Duration::ZERO);
        target.metrics.job_started(change, delay);
        job_log!(info, d, "replication job processing started");
        // On the broker's clock, a time this job surely started after.
        let started = OffsetDateTime::from_unix_timestamp_nanos(i128::from(
            shared.latest_published.load(Ordering::Relaxed),
        ))
        .unwrap_or(d.placement.published)
        .max(d.placement.published);
        let order = ordered.then(|| WriteOrder {
            stream: shared.stream_incarnation.clone(),
            sequence: i64::try_from(d.placement.sequence).unwrap_or(i64::MAX),
            lock_session: guards.first().map(|g| g.session()),
            repository_id: job.repository_id,
        });
        let lost = guards.first().map(|g| g.lost().clone()).unwrap_or_default();
        let timer = Instant::now();
        let outcome = tokio::select! {
            // Boxed: Gitaly call futures are large, and moving them inline
            // made every job's task copy kilobytes.
            o = Box::pin(shared.replicator.replicate_in_order(job, order.as_ref())) => Some(o),
            // The lock is gone and another process may run the repository
            // now: stop, write nothing, run again.
            _ = lost.cancelled() => Some(JobOutcome::Interrupted),
            _ = shared.abort.cancelled() => None,
        };
        // The slot bounds calls to Gitaly; what follows is bookkeeping.
        drop(permit);
        match outcome {
            None => {
                target.metrics.job_finished(change, "abandoned", None);
                // The lock connection's session keeps the lock until the
                // process exits, so no other process starts this repository
                // while its abandoned call may still run.
                for g in guards {
                    std::mem::forget(g);
                }
                return Ran::Abandoned;
            }
            Some(outcome) => {
                let completed = matches!(outcome, JobOutcome::Completed);
                let latency = completed.then(|| timer.elapsed());
                if completed {
                    record = completion.map(|c| (c, started));
                }
                Ran::Finished(outcome, latency, true)
            }
        }
    };
    // The record is written before the job is acknowledged, so a twin
    // delivered after the ack sees it.
    let mut guards = guards.into_iter();
    if let Some(first) = guards.next() {
        for g in guards {
            shared.locks.release(g);
        }
        shared.locks.release_recording(first, record).await;
    }
    ran
}

/// Hands back a job that never started, and its collapsed twins. On its
/// last server delivery a nak would strand it, so it is requeued instead.
async fn release<R: Replicator>(shared: &Shared<R>, d: &Delivered, followers: &[Follower]) {
    job_log!(info, d, "shutting down: job released before it started");
    let last = shared.layout.max_deliver.max(1) as u64;
    let jobs = std::iter::once((&d.message, d.delivered, d.sequence, d.placement)).chain(
        followers
            .iter()
            .map(|f| (&f.message, f.delivered, f.sequence, f.placement)),
    );
    for (message, delivered, sequence, placement) in jobs {
        if delivered >= last {
            requeue(shared, message, placement, sequence, delivered).await;
        } else {
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
    }
}

/// Publishes to the dead-letter stream, then terminates the job. If the
/// dead-letter publish fails, the job is naked instead: never lost.
async fn dead_letter<R: Replicator>(
    shared: &Shared<R>,
    target: &Target,
    m: &jetstream::Message,
    sequence: u64,
    reason: DeadReason,
    error: &str,
    attempts: u64,
) {
    let dead = DeadJob {
        work_subject: m.message.subject.as_str(),
        work_sequence: sequence,
        payload: m.message.payload.clone(),
        reason,
        error,
        attempts,
    };
    match publish_dead(&shared.js, &shared.layout, dead).await {
        Ok(()) => {
            target.metrics.dead_letter(reason.as_str());
            let _ = m.ack_with(AckKind::Term).await;
        }
        Err(e) => {
            tracing::error!(error = %e, "could not write the dead letter; the job stays queued");
            let _ = m
                .ack_with(AckKind::Nak(Some(shared.settings.retry.delay_after(1))))
                .await;
        }
    }
}

/// Publishes a fresh copy of the job (new delivery count, same place in its
/// replica's order), then terminates the old message.
async fn requeue<R: Replicator>(
    shared: &Shared<R>,
    m: &jetstream::Message,
    placement: Placement,
    sequence: u64,
    delivered: u64,
) {
    let published = publish_requeue(
        &shared.js,
        &shared.layout.stream,
        m.message.subject.to_string(),
        m.message.payload.clone(),
        placement,
        sequence,
        delivered,
    )
    .await;
    match published {
        Ok(()) => {
            let _ = m.ack_with(AckKind::Term).await;
        }
        Err(e) => {
            tracing::error!(error = %e, "could not requeue the job; it stays queued");
            let _ = m.ack_with(AckKind::Nak(None)).await;
        }
    }
}
