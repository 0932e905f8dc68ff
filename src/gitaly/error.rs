//! Classification of Gitaly call failures where they enter: the dispatcher
//! only asks whether to retry, give up, or treat the RPC as gone.

use std::time::Duration;
use tonic::Code;

/// What a failed call means for the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallErrorKind {
    /// Transient (unavailable, timeout, auth, internal…): retry later.
    Retryable,
    /// The same request will fail again (bad argument): do not retry.
    Permanent,
    /// The target no longer implements a maintenance RPC (newer Gitaly
    /// removed it): the job can never have an effect there.
    Unsupported,
    /// The repository named in the request does not exist there.
    NotFound,
    /// `ReplicateRepository` says the source replica is not a valid repository.
    InvalidSource,
}

/// A failed call to one node.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{method} on storage {storage:?}: {code:?}: {message}")]
pub struct CallError {
    pub method: &'static str,
    pub storage: String,
    pub code: Code,
    pub message: String,
    pub kind: CallErrorKind,
}

/// The maintenance RPCs: their only effect is housekeeping on the target's
/// disk, so a node that no longer implements one loses nothing by skipping it.
pub const MAINTENANCE_METHODS: [&str; 8] = [
    "GarbageCollect",
    "RepackFull",
    "RepackIncremental",
    "Cleanup",
    "PackRefs",
    "WriteCommitGraph",
    "MidxRepack",
    "OptimizeRepository",
];

fn is_maintenance(method: &str) -> bool {
    MAINTENANCE_METHODS.contains(&method)
}

impl CallError {
    pub fn from_status(method: &'static str, storage: &str, status: &tonic::Status) -> Self {
        let message = status.message().to_owned();
        let kind = match status.code() {
            Code::Unimplemented if is_maintenance(method) => CallErrorKind::Unsupported,
            // A state-changing call that is not implemented did not happen:
            // the job failed, and retrying (perhaps on an upgraded node, or
            // until attempts run out and it is dead-lettered) is right.
            Code::Unimplemented => CallErrorKind::Retryable,
            Code::NotFound if message.contains("invalid source repository") => {
                CallErrorKind::InvalidSource
            }
            Code::NotFound => CallErrorKind::NotFound,
            Code::InvalidArgument | Code::OutOfRange => CallErrorKind::Permanent,
            _ => CallErrorKind::Retryable,
        };
        CallError {
            method,
            storage: storage.to_owned(),
            code: status.code(),
            message,
            kind,
        }
    }

    pub fn timed_out(method: &'static str, storage: &str, after: Duration) -> Self {
        CallError {
            method,
            storage: storage.to_owned(),
            code: Code::DeadlineExceeded,
            message: format!(
                "job timeout of {} reached",
                humantime::format_duration(after)
            ),
            kind: CallErrorKind::Retryable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let on = |method, code, msg: &str| {
            CallError::from_status(method, "s", &tonic::Status::new(code, msg)).kind
        };
        let c = |code, msg: &str| on("M", code, msg);
        for method in MAINTENANCE_METHODS {
            assert_eq!(
                on(method, Code::Unimplemented, ""),
                CallErrorKind::Unsupported,
                "{method}"
            );
        }
        for method in [
            "ReplicateRepository",
            "RemoveRepository",
            "RenameRepository",
            "GetObjectPool",
            "LinkRepositoryToObjectPool",
        ] {
            assert_eq!(
                on(method, Code::Unimplemented, ""),
                CallErrorKind::Retryable,
                "{method}"
            );
        }
        assert_eq!(
            c(Code::NotFound, "invalid source repository"),
            CallErrorKind::InvalidSource
        );
        assert_eq!(
            c(Code::NotFound, "repository does not exist"),
            CallErrorKind::NotFound
        );
        assert_eq!(
            c(Code::InvalidArgument, "empty path"),
            CallErrorKind::Permanent
        );
        assert_eq!(
            c(Code::Unavailable, "conn refused"),
            CallErrorKind::Retryable
        );
        assert_eq!(
            c(Code::Unauthenticated, "bad token"),
            CallErrorKind::Retryable
        );
    }
}
