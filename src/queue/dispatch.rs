//! Running one job once it arrived: its repository locks (waiting for them
//! is counted in the waiting gauge), a job slot, completion dedup, the
//! dispatch raced against a lost lock and the end of the grace period, and
//! the completion record written before the job is acknowledged.

use crate::event::Job;
use crate::queue::acknowledger::{JobFields, job_log};
use crate::queue::consumer::{Shared, Target};
use crate::queue::job::Delivered;
use crate::queue::waiting::WaitReason;
use crate::replicator::{JobOutcome, Replicator, SkipReason};
use crate::store::{JobKey, WriteOrder, repository_lock_key};
use std::sync::atomic::Ordering;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::time::Instant;

/// How far a job got before it was stopped.
pub(super) enum Ran {
    /// The outcome; its latency when observed (see
    /// [`JobOutcome::observes_latency`]); whether it was dispatched
    /// (a superseded job never is).
    Finished(JobOutcome, Option<Duration>, bool),
    /// Shutdown came before it started.
    Released,
    /// The grace period ended mid-dispatch.
    Abandoned,
    /// It waits, beyond this process's share: back to the stream.
    SentBack,
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

/// A job's repository locks, taken.
pub(super) struct Locked {
    guards: Vec<crate::store::locks::RepositoryGuard>,
    /// The relative path the repository was renamed to since the job was
    /// published, where it runs instead.
    followed: Option<String>,
    /// What completion dedup records once it completed (maintenance jobs).
    completion: Option<JobKey>,
}

/// The job as it runs: at the path its repository was renamed to, if it was.
fn as_run<'a>(job: &'a Job, followed: Option<&str>) -> std::borrow::Cow<'a, Job> {
    match followed {
        None => std::borrow::Cow::Borrowed(job),
        Some(path) => std::borrow::Cow::Owned(Job {
            relative_path: path.to_owned(),
            ..job.clone()
        }),
    }
}

/// Waits for the job's repository locks, asking with the first whether a
/// twin's completion supersedes it (maintenance jobs only).
pub(super) async fn lock_job<R: Replicator>(
    shared: &Shared<R>,
    target: &Target,
    d: &Delivered,
    fields: &JobFields<'_>,
) -> Result<Locked, Ran> {
    let followed = match shared.replicator.followed_path(&d.job).await {
        Ok(None) => None,
        Ok(Some(path)) => {
            job_log!(
                info,
                fields,
                followed_path = %path,
                "the repository was renamed in Praefect's store since the job was published; the job runs at its new relative path"
            );
            Some(path)
        }
        Err(outcome) => return Err(Ran::Finished(outcome, None, false)),
    };
    let job = as_run(&d.job, followed.as_deref());
    // Maintenance jobs are deduplicated Praefect's way; state-changing jobs
    // are ordered instead (a twin's completion says nothing about a delete
    // published between the two).
    let completion = (!job.change_type().changes_state()).then(|| JobKey::of(&job));
    let mut guards = Vec::new();
    let locking = target.waiting.counting(WaitReason::RepositoryLocked);
    for (i, key) in lock_keys(&job).into_iter().enumerate() {
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
                return Err(Ran::Released);
            }
        }
    }
    drop(locking);
    Ok(Locked {
        guards,
        followed,
        completion,
    })
}

/// With the job's locks taken: waits for a job slot, checks completion
/// dedup, and dispatches.
pub(super) async fn run_locked<R: Replicator>(
    shared: &Shared<R>,
    target: &Target,
    d: &Delivered,
    locked: Locked,
    fields: &JobFields<'_>,
    waiting: bool,
) -> Ran {
    let Locked {
        guards,
        followed,
        completion,
    } = locked;
    let job = as_run(&d.job, followed.as_deref());
    let job = &*job;
    let change = job.change_type();
    let ordered = change.changes_state();
    let permit = tokio::select! {
        p = shared.permits.acquire() => p,
        _ = shared.stop.cancelled() => {
            for g in guards {
                shared.locks.release(g);
            }
            return Ran::Released;
        }
    };
    if guards.iter().any(|g| g.waited()) {
        job_log!(
            debug,
            fields,
            "waited for the repository lock: another job of this replica ran first"
        );
    }
    let mut record = None;
    let ran = if guards.iter().any(|g| g.superseded()) {
        drop(permit);
        Ran::Finished(JobOutcome::Skipped(SkipReason::Superseded), None, false)
    } else {
        let started_wall = OffsetDateTime::now_utc();
        // A created time before the stream had the job (Go's zero time, a
        // clock far behind) says nothing about the delay.
        let created = job
            .created_at
            .filter(|t| *t >= d.placement.published - time::Duration::DAY)
            .unwrap_or(d.placement.published);
        let delay = (started_wall - created)
            .try_into()
            .unwrap_or(Duration::ZERO);
        target.metrics.job_started(change, delay);
        // A waiting job is tried every interval: its tries are not news.
        if waiting {
            job_log!(debug, fields, "replication job processing started");
        } else {
            job_log!(info, fields, "replication job processing started");
        }
        // On the broker's clock, a time this job surely started after.
        let started = OffsetDateTime::from_unix_timestamp_nanos(i128::from(
            shared.latest_published.load(Ordering::Relaxed),
        ))
        .unwrap_or(d.placement.published)
        .max(d.placement.published);
        let order = ordered.then(|| WriteOrder {
            stream: d.incarnation.label(),
            sequence: i64::try_from(d.placement.sequence).unwrap_or(i64::MAX),
            lock_session: guards.first().map(|g| g.session()),
            repository_id: job.repository_id,
        });
        let lost = guards.first().map(|g| g.lost().clone()).unwrap_or_default();
        let timer = Instant::now();
        let outcome = tokio::select! {
            // Inline: the replicator boxes each kind's own future, so this
            // one is small (see `GitalyReplicator::run`).
            o = shared.replicator.replicate_in_order(job, order.as_ref()) => Some(o),
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
                let latency = outcome.observes_latency().then(|| timer.elapsed());
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
