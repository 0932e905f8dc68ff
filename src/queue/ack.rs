//! The one mapping from a job's outcome to its acknowledgement.

use crate::event::ChangeType;
use crate::replicator::JobOutcome;
use crate::retry_delay::RetryPolicy;
use std::time::Duration;

/// How many deliveries a job gets.
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

/// What to tell JetStream about a delivered job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckAction {
    Ack,
    /// Redeliver after the delay.
    Nak(Duration),
    /// Publish to the dead-letter stream, then terminate.
    DeadLetter {
        invalid: bool,
    },
    /// Out of server deliveries but not of attempts: publish a fresh copy to
    /// the work subject, then terminate this one.
    Requeue,
}

/// Decides the acknowledgement. `delivered` is the server's delivery count
/// (1 on the first delivery); `max_deliver` the consumer's limit.
pub fn decide(
    outcome: &JobOutcome,
    delivered: u64,
    attempts: Attempts,
    max_deliver: u64,
    retry: &RetryPolicy,
) -> AckAction {
    match outcome {
        JobOutcome::Completed | JobOutcome::Skipped(_) | JobOutcome::Unsupported { .. } => {
            AckAction::Ack
        }
        JobOutcome::Invalid(_) => AckAction::DeadLetter { invalid: true },
        // Its lock was lost, not its attempt: run it again soon, and on the
        // server's last delivery as a fresh copy rather than a dead letter.
        JobOutcome::Interrupted if delivered >= max_deliver => AckAction::Requeue,
        JobOutcome::Interrupted => AckAction::Nak(retry.delay_after(1)),
        JobOutcome::Failed(_) => match attempts {
            Attempts::Limited(n) if delivered >= n => AckAction::DeadLetter { invalid: false },
            Attempts::Unlimited if delivered >= max_deliver => AckAction::Requeue,
            _ => AckAction::Nak(retry.delay_after(delivered)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gitaly::{CallError, CallErrorKind};
    use crate::replicator::{ReplicationError, SkipReason};

    fn failed() -> JobOutcome {
        JobOutcome::Failed(ReplicationError::Call(CallError {
            method: "X",
            storage: "s".into(),
            code: tonic::Code::Unavailable,
            message: "down".into(),
            kind: CallErrorKind::Retryable,
        }))
    }

    #[test]
    fn outcomes_map_to_the_design_table() {
        let p = RetryPolicy::default();
        let three = Attempts::Limited(3);
        assert_eq!(
            decide(&JobOutcome::Completed, 1, three, 3, &p),
            AckAction::Ack
        );
        assert_eq!(
            decide(
                &JobOutcome::Skipped(SkipReason::Superseded),
                1,
                three,
                3,
                &p
            ),
            AckAction::Ack
        );
        assert_eq!(
            decide(
                &JobOutcome::Unsupported {
                    method: "Cleanup",
                    message: String::new()
                },
                1,
                three,
                3,
                &p
            ),
            AckAction::Ack
        );
        assert_eq!(
            decide(&JobOutcome::Invalid("x".into()), 1, three, 3, &p),
            AckAction::DeadLetter { invalid: true }
        );
        assert!(matches!(
            decide(&failed(), 1, three, 3, &p),
            AckAction::Nak(_)
        ));
        assert!(matches!(
            decide(&failed(), 2, three, 3, &p),
            AckAction::Nak(_)
        ));
        assert_eq!(
            decide(&failed(), 3, three, 3, &p),
            AckAction::DeadLetter { invalid: false }
        );
        assert!(matches!(
            decide(&failed(), 2, Attempts::Unlimited, 3, &p),
            AckAction::Nak(_)
        ));
        assert_eq!(
            decide(&failed(), 3, Attempts::Unlimited, 3, &p),
            AckAction::Requeue
        );
        assert!(matches!(
            decide(&JobOutcome::Interrupted, 1, three, 3, &p),
            AckAction::Nak(_)
        ));
        assert_eq!(
            decide(&JobOutcome::Interrupted, 3, three, 3, &p),
            AckAction::Requeue
        );
        assert_eq!(
            attempts_for(ChangeType::DeleteReplica, 3),
            Attempts::Unlimited
        );
        assert_eq!(attempts_for(ChangeType::Update, 5), Attempts::Limited(5));
    }
}
