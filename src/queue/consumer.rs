//! The consumer: for every target, make sure its durable consumer exists,
//! then pull its jobs and hand each to a task of its own (`job`). Nothing
//! here decides an acknowledgement.
//!
//! It owns no shutdown of its own: the service hands it the tokens and task
//! trackers it runs under. `stop` ends fetching (jobs that have not started
//! are released), `abort` ends the grace period (running dispatches are left
//! for redelivery). If a target cannot be set up, it returns the error and
//! the service stops what was already started.

use crate::dependencies::Dependency;
use crate::error_chain::display_error_chain;
use crate::event::Job;
use crate::gitaly::NodeSet;
use crate::gitaly::health::{Health, watch_health};
use crate::metrics::{self, TargetMetrics};
use crate::ops_server::Readiness;
use crate::queue::ack::{Deliveries, Role, Stage, attempts_for};
use crate::queue::acknowledger::{Acknowledger, Delivery, JobFields};
use crate::queue::incarnation::{Belonging, Incarnation, StreamIdentity};
use crate::queue::job;
use crate::queue::layout::{ConsumerSpec, Layout, LayoutChange, LayoutError};
use crate::queue::open_groups::OpenGroups;
use crate::queue::puller::{PullError, Pulled, Puller};
use crate::queue::requeue::{Carried, Placement};
use crate::queue::waiting::Waiting;
use crate::replicator::Replicator;
use crate::retry_delay::RetryPolicy;
use crate::store::RepositoryStore;
use crate::store::locks::RepositoryLocks;
use async_nats::jetstream;
use std::collections::HashSet;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
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
    /// How often queue depth is read for the metrics.
    pub queue_depth_interval: Duration,
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
    Layout(#[from] LayoutError),
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
    /// Ends fetching; unstarted jobs are released.
    pub stop: CancellationToken,
    /// Ends the grace period; running dispatches are abandoned.
    pub abort: CancellationToken,
    /// Ends the tasks that serve the jobs (health checks, queue depth).
    pub background: CancellationToken,
    /// Where the pull loops and background tasks run.
    pub tasks: TaskTracker,
    /// Where each job's task runs, so the service can wait for jobs alone.
    pub jobs: TaskTracker,
    /// Set once every target is set up and pulling.
    pub readiness: Readiness,
    /// Where the jobs of Praefect's captured events are settled.
    pub store: RepositoryStore,
}

/// What every job task of this process shares.
pub(super) struct Shared<R> {
    pub layout: Layout,
    pub replicator: R,
    pub locks: Arc<RepositoryLocks>,
    pub permits: Arc<Semaphore>,
    /// Bounds the jobs this process holds (fetched, not yet acknowledged):
    /// a pull request reserves its batch here first. Without it, jobs
    /// waiting for their repository lock took no job slot, so the pull loops
    /// kept fetching and, with an unlimited `max_ack_pending`, memory grew
    /// with the backlog.
    pub intake: Arc<Semaphore>,
    /// Bounds the twins that joined a group waiting for its lock and gave
    /// their intake back (see `open_groups`): they hold only memory, so
    /// more of them than the intake may wait, and the pull loops keep
    /// fetching the other repositories' jobs behind a busy replica's twins.
    pub riders: Arc<Semaphore>,
    pub settings: ConsumerSettings,
    pub stop: CancellationToken,
    pub abort: CancellationToken,
    pub jobs: TaskTracker,
    pub warned_unsupported: Mutex<HashSet<(String, &'static str)>>,
    /// The work stream's identity: which incarnation each job is of.
    pub identity: Arc<StreamIdentity>,
    /// The latest stream time (Unix nanoseconds) of any job this process has
    /// received: the broker's clock was at least there when a job starts
    /// after it, so completions are recorded on the same clock as the
    /// publication times they are compared with.
    pub latest_published: AtomicI64,
}

/// One target's consumer.
pub(super) struct Target {
    pub spec: ConsumerSpec,
    pub metrics: TargetMetrics,
    pub acknowledger: Acknowledger,
    /// Its jobs waiting in this process.
    pub waiting: Arc<Waiting>,
    /// Its groups of identical updates still waiting for their lock.
    pub(super) groups: OpenGroups,
}

/// Sets up every target and pulls until `stop`; returns once the pull loops
/// have ended (jobs may still be running in `jobs`).
pub async fn run<R: Replicator>(deps: ConsumerDeps<R>) -> Result<(), ConsumerError> {
    let ConsumerDeps {
        client,
        layout,
        replicator,
        locks,
        nodes,
        settings,
        stop,
        abort,
        background,
        tasks,
        jobs,
        readiness,
        store,
    } = deps;
    let js = jetstream::new(client.clone());
    let identity = StreamIdentity::new(js.clone(), &layout.stream)
        .await
        .map_err(|message| ConsumerError::Stream {
            stream: layout.stream.clone(),
            message,
        })?;
    let intake = intake_capacity(&settings, layout.consumers.len());
    let shared = Arc::new(Shared {
        layout: layout.clone(),
        replicator,
        locks,
        permits: Arc::new(Semaphore::new(settings.max_concurrent_jobs.max(1))),
        intake: Arc::new(Semaphore::new(intake)),
        riders: Arc::new(Semaphore::new(intake.saturating_mul(RIDERS_PER_INTAKE))),
        settings,
        stop: stop.clone(),
        abort,
        jobs,
        warned_unsupported: Mutex::new(HashSet::new()),
        identity: identity.clone(),
        latest_published: AtomicI64::new(0),
    });
    let mut loops = Vec::new();
    let advisories = Puller::new(
        client.clone(),
        js.clone(),
        &layout.advisory_stream,
        &layout.advisory_consumer,
        shared.settings.fetch_expires,
    )
    .await?;
    loops.push(tasks.spawn(crate::queue::advisories::run(
        js.clone(),
        layout.clone(),
        store.clone(),
        advisories,
        stop.clone(),
    )));
    tasks.spawn(crate::queue::leftovers::run(
        js.clone(),
        layout.clone(),
        crate::queue::leftovers::sweep_interval(shared.settings.ack_wait),
        background.clone(),
    ));
    tasks.spawn(crate::queue::incarnation::follow(
        identity.clone(),
        js.clone(),
        layout.clone(),
        crate::queue::incarnation::LOOK_INTERVAL,
        background.clone(),
    ));
    tasks.spawn(crate::queue::depth::poll(
        js.clone(),
        layout.clone(),
        shared.settings.queue_depth_interval,
        background.clone(),
    ));
    // One health watcher per node: targets gate their pulls on it, and
    // updates read their source's from it.
    for node in nodes.iter() {
        watch_health(
            node.clone(),
            shared.settings.health_check_interval,
            metrics::node_healthy(&node.virtual_storage, &node.storage),
            &tasks,
            background.clone(),
        );
    }
    for spec in &layout.consumers {
        let node = nodes
            .get(&spec.virtual_storage, &spec.target_storage)
            .ok_or_else(|| ConsumerError::UnknownTarget {
                virtual_storage: spec.virtual_storage.clone(),
                storage: spec.target_storage.clone(),
            })?
            .clone();
        let changes = layout.ensure_target(&js, spec).await?;
        crate::service::log_changes(&changes);
        LayoutChange::all_applied(&changes)?;
        let metrics = TargetMetrics::new(&spec.virtual_storage, &spec.target_storage);
        let waiting = Waiting::new(
            &spec.virtual_storage,
            &spec.target_storage,
            layout.max_ack_pending,
        );
        let target = Arc::new(Target {
            spec: spec.clone(),
            acknowledger: Acknowledger::new(
                js.clone(),
                layout.clone(),
                identity.clone(),
                store.clone(),
                shared.settings.retry,
                metrics.clone(),
            ),
            metrics,
            waiting: waiting.clone(),
            groups: OpenGroups::new(waiting),
        });
        let database = readiness.dependencies().watch(Dependency::Postgres);
        let healthy = node.subscribe_health();
        for _ in 0..shared.settings.pull_loops_per_target.max(1) {
            let puller = Puller::new(
                client.clone(),
                js.clone(),
                &layout.stream,
                &spec.durable_name,
                shared.settings.fetch_expires,
            )
            .await?;
            loops.push(tasks.spawn(pull_loop(
                shared.clone(),
                target.clone(),
                puller,
                healthy.clone(),
                database.clone(),
            )));
        }
    }
    readiness.set(true);
    stop.cancelled().await;
    tracing::info!("shutting down: no new jobs are fetched; running jobs may finish");
    for l in loops {
        let _ = l.await;
    }
    Ok(())
}

/// Twins that may wait in open groups without intake, per job of intake
/// (a joined twin holds its message and decoded job, a few kB at most).
const RIDERS_PER_INTAKE: usize = 8;

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
    mut healthy: watch::Receiver<Health>,
    mut database: watch::Receiver<bool>,
) {
    let stop = shared.stop.clone();
    let retry = RetryPolicy::reconnect();
    let mut failures = 0;
    let batch_size = shared.settings.batch_size.max(1);
    // The intake reserved for the open request; each arriving job takes one.
    let mut reserved: Option<OwnedSemaphorePermit> = None;
    loop {
        // Only ask for jobs that can start: a target that is down, a
        // repository store that does not answer or a process that is full
        // leaves them in the stream.
        if !puller.is_active() {
            // What the last request did not fill goes back.
            drop(reserved.take());
            tokio::select! {
                r = healthy.wait_for(|h| *h == Health::Healthy) => if r.is_err() { break },
                _ = stop.cancelled() => break,
            }
            tokio::select! {
                r = database.wait_for(|up| *up) => if r.is_err() { break },
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
                failures += 1;
                tracing::warn!(error = display_error_chain(&e), consumer = %target.spec.durable_name, "pull request failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(retry.delay_after(failures)) => {}
                    _ = stop.cancelled() => break,
                }
                continue;
            }
            failures = 0;
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
                let batch = of_current_stream(&shared, &target, batch).await;
                job::dispatch_batch(&shared, &target, batch)
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
                tracing::error!(error = display_error_chain(&e), consumer = %target.spec.durable_name, "pulling stopped");
                break;
            }
        }
    }
    // Jobs that arrived after the stop are handed back at once.
    let incarnation = shared.identity.current();
    for m in puller.close().await {
        let (deliveries, sequence, placement, carried) = delivery_facts(&shared, &m, &incarnation);
        let subject = crate::subject::parse_job_subject(
            &shared.layout.subject_prefix,
            m.message.subject.as_str(),
        )
        .unwrap_or_default();
        let d = Delivery {
            message: &m,
            incarnation: &incarnation,
            sequence,
            deliveries,
            placement,
            carried,
            fields: JobFields::undecoded(&subject.0, &subject.1, sequence, &deliveries),
        };
        target
            .acknowledger
            .settle(&d, Stage::Released, Role::Leader, "")
            .await;
    }
}

/// A delivered message's counts, its own sequence, its place in its
/// replica's order and what it carries from earlier copies (the attempts it
/// may have are its job's, known once it is decoded; until then, the
/// configured number).
pub(super) fn delivery_facts<R>(
    shared: &Shared<R>,
    m: &jetstream::Message,
    incarnation: &Incarnation,
) -> (Deliveries, u64, Placement, Carried) {
    let (delivered, sequence, published) = match m.info() {
        Ok(i) => (i.delivered.max(1) as u64, i.stream_sequence, i.published),
        Err(_) => (1, 0, OffsetDateTime::now_utc()),
    };
    let headers = m.message.headers.as_ref();
    let placement = Placement::of(headers, sequence, published, incarnation);
    let carried = Carried::of(headers);
    let deliveries = Deliveries {
        delivered,
        failures: carried.failures,
        attempts: crate::queue::ack::Attempts::Limited(u64::from(shared.settings.attempts.max(1))),
        max_deliver: u64::try_from(shared.layout.max_deliver)
            .ok()
            .filter(|n| *n >= 1)
            .unwrap_or(u64::MAX),
    };
    (deliveries, sequence, placement, carried)
}

/// The jobs of a batch that are of the work stream's current incarnation,
/// each with it. A job of a stream that is gone (fetched before it was
/// deleted) is dropped unacknowledged: its ack subject could name the job
/// of the same sequence in the new stream.
async fn of_current_stream<R>(
    shared: &Shared<R>,
    target: &Target,
    batch: Vec<(jetstream::Message, Option<OwnedSemaphorePermit>)>,
) -> Vec<(
    jetstream::Message,
    Option<OwnedSemaphorePermit>,
    Arc<Incarnation>,
)> {
    let mut current = Vec::with_capacity(batch.len());
    let mut dropped = 0;
    for (m, held) in batch {
        let Ok(info) = m.info() else {
            // Not a JetStream delivery: decoding reports it.
            current.push((m, held, shared.identity.current()));
            continue;
        };
        let (sequence, stored) = (info.stream_sequence, info.published);
        match shared.identity.belonging(sequence, stored).await {
            Belonging::Current(incarnation) => current.push((m, held, incarnation)),
            Belonging::Earlier => dropped += 1,
        }
    }
    if dropped > 0 {
        tracing::warn!(
            consumer = %target.spec.durable_name,
            jobs = dropped,
            "jobs of a work stream that was deleted since they were fetched were dropped unacknowledged; they went with the old stream"
        );
    }
    current
}

/// The attempts a decoded job may have.
pub(super) fn with_attempts<R>(shared: &Shared<R>, job: &Job, d: Deliveries) -> Deliveries {
    Deliveries {
        attempts: attempts_for(job.change_type(), shared.settings.attempts),
        ..d
    }
}
