//! The one decision: what JetStream is told about a delivered job, from where
//! the job stands, how many of its calls failed, how often it was delivered,
//! whether shutdown came first, and its part in a collapsed group. A pure
//! function with a table of tests; the consumer only carries its answers out
//! (`acknowledger`).
//!
//! Attempts count failed calls (an error from Gitaly or the store), carried
//! with the job in a header; deliveries are the server's and only a backstop
//! (`max_deliver`): a call cut short by a killed process, a release at
//! shutdown or a lost lock uses no attempt.

use crate::event::ChangeType;
use crate::queue::dead_letter::DeadReason;
use crate::replicator::JobOutcome;
use crate::retry_delay::RetryPolicy;
use std::time::Duration;

/// How many failed calls a job may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempts {
    Limited(u64),
    /// Never dies (Praefect's `delete_replica`).
    Unlimited,
}

/// Attempts per change type: `default` for all but `delete_replica`.
pub fn attempts_for(change: ChangeType, default: u32) -> Attempts {
    match change {
        ChangeType::DeleteReplica => Attempts::Unlimited,
        _ => Attempts::Limited(u64::from(default.max(1))),
    }
}

/// Where a delivered job stands when something must be said about it.
#[derive(Debug, Clone, Copy)]
pub enum Stage<'a> {
    /// Waiting for its repository or a job slot, or running.
    InFlight,
    /// Handed back unstarted: shutdown came first, or it arrived after the
    /// stop.
    Released,
    /// Still in its Gitaly call when the grace period ended.
    Abandoned,
    /// Not a valid job.
    Undecodable,
    /// It ran to this outcome (a follower: its group's leader did).
    Finished(&'a JobOutcome),
    /// Its dead-letter publish failed.
    DeadLetterFailed,
    /// Its requeue publish failed.
    RequeueFailed,
    /// The publish of its retry (the copy recording its failure) failed; it
    /// is delivered again after the delay, the failure unrecorded.
    RetryFailed(Duration),
    /// Delivered before the time its last failure set for its retry: it
    /// waits that long more.
    Early(Duration),
    /// Waiting (for its source) beyond this process's share of the
    /// ack-pending window: back to the stream, keeping its place.
    SentBack,
}

/// A job's part in a collapsed group of identical updates: the leader runs,
/// its followers are answered with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    /// The leader had been delivered this often.
    Follower {
        leader_delivered: u64,
        /// The leader's failed calls before this run.
        leader_failures: u64,
    },
}

/// A job's failed calls and deliveries so far, and how many it may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deliveries {
    /// The server's count for this message: 1 on the first delivery.
    pub delivered: u64,
    /// Calls of the job that failed before this delivery: the attempts it
    /// used, carried from copy to copy.
    pub failures: u64,
    pub attempts: Attempts,
    /// The consumer's limit, after which the server stops delivering
    /// (`u64::MAX`: unlimited).
    pub max_deliver: u64,
}

impl Deliveries {
    /// A nak on the server's last delivery would strand the job.
    fn last(&self) -> bool {
        self.delivered >= self.max_deliver
    }

    /// The attempts a dead letter records: the failures before, and the
    /// one that made it dead.
    pub fn attempts_used(&self, reason: DeadReason) -> u64 {
        self.failures + u64::from(reason == DeadReason::Dead)
    }
}

/// What to tell JetStream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckAction {
    Ack,
    /// Still ours: reset the ack timer.
    Progress,
    /// Deliver again, at once or after the delay.
    Nak(Option<Duration>),
    /// Publish to the dead-letter stream, then terminate.
    DeadLetter(DeadReason),
    /// Publish a fresh copy that keeps the job's place, then terminate: out
    /// of server deliveries but not of attempts.
    Requeue,
    /// Its call failed with attempts left: publish a fresh copy that keeps
    /// its place, records one more failure and runs after the delay, then
    /// terminate. The failure is written now, as it is decided.
    Retry(Duration),
    /// Say nothing: its call may still run, so it must not be handed to
    /// another process before the ack wait ends.
    Leave,
}

/// The acknowledgement for a job at `stage`.
pub fn decide(
    stage: Stage<'_>,
    role: Role,
    deliveries: &Deliveries,
    retry: &RetryPolicy,
) -> AckAction {
    // Another delivery, soon or later; on the server's last delivery a nak
    // would strand the job, so it goes back as a fresh copy instead.
    let again = |delay: Option<Duration>| {
        if deliveries.last() {
            AckAction::Requeue
        } else {
            AckAction::Nak(delay)
        }
    };
    let soon = Some(retry.delay_after(1));
    match stage {
        Stage::InFlight => AckAction::Progress,
        Stage::Released => again(None),
        Stage::Abandoned => AckAction::Leave,
        Stage::Undecodable => AckAction::DeadLetter(DeadReason::Invalid),
        // A dead job whose dead letter could not be written waits for its
        // next delivery; a fresh copy would reset its attempts.
        Stage::DeadLetterFailed => AckAction::Nak(soon),
        Stage::RequeueFailed => AckAction::Nak(None),
        Stage::RetryFailed(delay) => AckAction::Nak(Some(delay)),
        Stage::Early(delay) => again(Some(delay)),
        // A nak, even with a delay, would keep it in the ack-pending window
        // that the target's other jobs need; a fresh copy leaves it.
        Stage::SentBack => AckAction::Requeue,
        Stage::Finished(outcome) => match role {
            Role::Leader => finished(outcome, deliveries, retry, again),
            Role::Follower {
                leader_delivered,
                leader_failures,
            } => {
                let leader = Deliveries {
                    delivered: leader_delivered,
                    failures: leader_failures,
                    ..*deliveries
                };
                match finished(outcome, &leader, retry, AckAction::Nak) {
                    AckAction::Ack => AckAction::Ack,
                    // It comes back when its leader does, and collapses
                    // again; it never ran, so its own attempts stay.
                    AckAction::Nak(delay) => again(delay),
                    AckAction::Retry(delay) => again(Some(delay)),
                    // Its leader died or was requeued; it never ran, so it
                    // keeps its own attempts.
                    _ => again(soon),
                }
            }
        },
    }
}

/// The leader's answer to an outcome; `again` redelivers it.
fn finished(
    outcome: &JobOutcome,
    deliveries: &Deliveries,
    retry: &RetryPolicy,
    again: impl Fn(Option<Duration>) -> AckAction,
) -> AckAction {
    match outcome {
        JobOutcome::Completed | JobOutcome::Skipped(_) | JobOutcome::Unsupported { .. } => {
            AckAction::Ack
        }
        JobOutcome::Invalid(_) => AckAction::DeadLetter(DeadReason::Invalid),
        // Its lock was lost, not its attempt; or its source is down (the
        // consumer waits for it in process, so this answers only a job
        // handed back meanwhile).
        JobOutcome::Interrupted | JobOutcome::SourceUnavailable { .. } => {
            again(Some(retry.delay_after(1)))
        }
        // The database was down: the job runs again once it is back, however
        // long that takes (pulling pauses meanwhile), and is never dead.
        JobOutcome::Failed(e) if e.is_database_outage() => {
            again(Some(retry.delay_after(deliveries.delivered)))
        }
        JobOutcome::Failed(_) => {
            let used = deliveries.failures.saturating_add(1);
            match deliveries.attempts {
                Attempts::Limited(n) if used >= n => AckAction::DeadLetter(DeadReason::Dead),
                _ => AckAction::Retry(retry.delay_after(used)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gitaly::{CallError, CallErrorKind};
    use crate::replicator::{ReplicationError, SkipReason};
    use crate::store::StoreError;
    use AckAction::*;

    fn failed() -> JobOutcome {
        JobOutcome::Failed(ReplicationError::Call(CallError {
            method: "X",
            storage: "s".into(),
            code: tonic::Code::Unavailable,
            message: "down".into(),
            kind: CallErrorKind::Retryable,
        }))
    }

    const RETRY: RetryPolicy = RetryPolicy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
        multiplier: 2.0,
        jitter: 0.0,
    };

    fn nak_after(failures: u64) -> AckAction {
        Nak(Some(RETRY.delay_after(failures)))
    }

    fn retry_after(failures: u64) -> AckAction {
        Retry(RETRY.delay_after(failures))
    }

    /// Three attempts, none used; three server deliveries.
    fn delivery(delivered: u64) -> Deliveries {
        Deliveries {
            delivered,
            failures: 0,
            attempts: Attempts::Limited(3),
            max_deliver: 3,
        }
    }

    /// Three attempts, `failures` of them used, the first delivery.
    fn failed_before(failures: u64) -> Deliveries {
        Deliveries {
            failures,
            ..delivery(1)
        }
    }

    fn unlimited(delivered: u64) -> Deliveries {
        Deliveries {
            attempts: Attempts::Unlimited,
            ..delivery(delivered)
        }
    }

    #[test]
    fn every_stage_role_and_delivery_count_maps_to_the_design_table() {
        let completed = JobOutcome::Completed;
        let skipped = JobOutcome::Skipped(SkipReason::Superseded);
        let unsupported = JobOutcome::Unsupported {
            method: "Cleanup",
            message: String::new(),
        };
        let invalid = JobOutcome::Invalid("bad".into());
        let failed = failed();
        let interrupted = JobOutcome::Interrupted;
        let database_down = JobOutcome::Failed(ReplicationError::Store(StoreError::Query {
            operation: "set_generation",
            source: sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into()),
        }));
        let leader = Role::Leader;
        let follower = |leader_delivered| Role::Follower {
            leader_delivered,
            leader_failures: 0,
        };
        let follower_of_failed = |leader_failures| Role::Follower {
            leader_delivered: 1,
            leader_failures,
        };
        let rows: Vec<(&str, Stage, Role, Deliveries, AckAction)> = vec![
            // While it waits or runs, it stays ours.
            ("in flight", Stage::InFlight, leader, delivery(1), Progress),
            (
                "follower in flight",
                Stage::InFlight,
                follower(1),
                delivery(3),
                Progress,
            ),
            // Done, nothing to do, or an RPC a newer Gitaly removed: ack.
            (
                "completed",
                Stage::Finished(&completed),
                leader,
                delivery(1),
                Ack,
            ),
            (
                "skipped",
                Stage::Finished(&skipped),
                leader,
                delivery(2),
                Ack,
            ),
            (
                "unsupported",
                Stage::Finished(&unsupported),
                leader,
                delivery(1),
                Ack,
            ),
            (
                "completed on the last delivery",
                Stage::Finished(&completed),
                leader,
                delivery(3),
                Ack,
            ),
            // Never valid: a dead letter, no retry.
            (
                "invalid",
                Stage::Finished(&invalid),
                leader,
                delivery(1),
                DeadLetter(DeadReason::Invalid),
            ),
            (
                "undecodable",
                Stage::Undecodable,
                leader,
                delivery(1),
                DeadLetter(DeadReason::Invalid),
            ),
            // Failed: the failure is recorded in a fresh copy that runs after
            // a growing delay; dead when its failures use up the attempts.
            (
                "failed, first",
                Stage::Finished(&failed),
                leader,
                delivery(1),
                retry_after(1),
            ),
            (
                "failed, second",
                Stage::Finished(&failed),
                leader,
                failed_before(1),
                retry_after(2),
            ),
            (
                "failed, last",
                Stage::Finished(&failed),
                leader,
                failed_before(2),
                DeadLetter(DeadReason::Dead),
            ),
            // Deliveries cut short (a killed process) are no failures.
            (
                "first failure on the last delivery",
                Stage::Finished(&failed),
                leader,
                delivery(3),
                retry_after(1),
            ),
            // The database was down: retried like a failure, never dead.
            (
                "database down, second",
                Stage::Finished(&database_down),
                leader,
                delivery(2),
                nak_after(2),
            ),
            (
                "database down, last",
                Stage::Finished(&database_down),
                leader,
                delivery(3),
                Requeue,
            ),
            // More attempts than server deliveries: a fresh copy at the limit.
            (
                "failed at max_deliver with attempts left",
                Stage::Finished(&failed),
                leader,
                Deliveries {
                    attempts: Attempts::Limited(5),
                    failures: 3,
                    ..delivery(3)
                },
                retry_after(4),
            ),
            // delete_replica never dies.
            (
                "unlimited, failed",
                Stage::Finished(&failed),
                leader,
                unlimited(2),
                retry_after(1),
            ),
            (
                "unlimited, failed many times",
                Stage::Finished(&failed),
                leader,
                Deliveries {
                    failures: 40,
                    ..unlimited(3)
                },
                retry_after(41),
            ),
            // Delivered before its retry time: back for the rest of it.
            (
                "early",
                Stage::Early(Duration::from_secs(4)),
                leader,
                delivery(1),
                Nak(Some(Duration::from_secs(4))),
            ),
            (
                "early on the last delivery",
                Stage::Early(Duration::from_secs(4)),
                leader,
                delivery(3),
                Requeue,
            ),
            // A lost lock costs no attempt.
            (
                "interrupted",
                Stage::Finished(&interrupted),
                leader,
                delivery(2),
                nak_after(1),
            ),
            (
                "interrupted on the last delivery",
                Stage::Finished(&interrupted),
                leader,
                delivery(3),
                Requeue,
            ),
            // Shutdown before it started: back at once, never stranded.
            ("released", Stage::Released, leader, delivery(1), Nak(None)),
            (
                "released on the last delivery",
                Stage::Released,
                leader,
                delivery(3),
                Requeue,
            ),
            (
                "released follower on the last delivery",
                Stage::Released,
                follower(1),
                delivery(3),
                Requeue,
            ),
            // Waiting beyond the share: a fresh copy, leader or follower.
            ("sent back", Stage::SentBack, leader, delivery(1), Requeue),
            (
                "follower sent back",
                Stage::SentBack,
                follower(1),
                delivery(1),
                Requeue,
            ),
            // The grace period ended mid-call: say nothing.
            ("abandoned", Stage::Abandoned, leader, delivery(1), Leave),
            // A failed dead-letter publish keeps the job; a failed requeue too.
            (
                "dead letter failed",
                Stage::DeadLetterFailed,
                leader,
                delivery(3),
                nak_after(1),
            ),
            (
                "requeue failed",
                Stage::RequeueFailed,
                leader,
                delivery(3),
                Nak(None),
            ),
            (
                "retry failed",
                Stage::RetryFailed(Duration::from_secs(2)),
                leader,
                delivery(1),
                Nak(Some(Duration::from_secs(2))),
            ),
            // Followers are answered with their leader...
            (
                "follower of a completed leader",
                Stage::Finished(&completed),
                follower(1),
                delivery(1),
                Ack,
            ),
            (
                "follower of a failed leader",
                Stage::Finished(&failed),
                follower_of_failed(1),
                delivery(1),
                nak_after(2),
            ),
            // ...but each by its own delivery count,
            (
                "follower on its last delivery, leader failed",
                Stage::Finished(&failed),
                follower(1),
                delivery(3),
                Requeue,
            ),
            // and a follower never ran, so a dead or invalid leader does not
            // use up its attempts.
            (
                "follower of a dead leader",
                Stage::Finished(&failed),
                follower_of_failed(2),
                delivery(1),
                nak_after(1),
            ),
            (
                "follower of an invalid leader",
                Stage::Finished(&invalid),
                follower(1),
                delivery(2),
                nak_after(1),
            ),
            (
                "follower of an interrupted leader",
                Stage::Finished(&interrupted),
                follower(1),
                delivery(1),
                nak_after(1),
            ),
        ];
        for (name, stage, role, deliveries, expected) in rows {
            assert_eq!(decide(stage, role, &deliveries, &RETRY), expected, "{name}");
        }
    }

    #[test]
    fn delete_replica_has_unlimited_attempts_and_the_rest_the_configured_number() {
        assert_eq!(
            attempts_for(ChangeType::DeleteReplica, 3),
            Attempts::Unlimited
        );
        assert_eq!(attempts_for(ChangeType::Update, 5), Attempts::Limited(5));
        assert_eq!(attempts_for(ChangeType::Update, 0), Attempts::Limited(1));
    }
}
