//! Jobs that wait without failing: an update whose source is down (and no
//! other healthy replica holds its generation), a job waiting for its
//! repository lock. Waiting uses no attempt and is never a reason for a dead
//! letter.
//!
//! A job waiting in memory stays in its consumer's ack-pending window
//! (`max_ack_pending`), and a full window stops the server delivering the
//! target's other jobs. So a process keeps at most a quarter of the window
//! per target waiting in memory; a job over that share waits one interval
//! and then goes back to the stream as a fresh copy that keeps its place in
//! its replica's order, its counts and when it started waiting. JetStream
//! has no delayed delivery outside the window, so the delay is spent before
//! the copy is published, holding the job's intake share: that paces the
//! cycle, and the target's other jobs are fetched meanwhile.

use ::metrics::Gauge;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Why a job waits: the `reason` label of the waiting gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitReason {
    /// Its source is unhealthy, and no other healthy replica holds the
    /// repository's generation.
    SourceUnavailable,
    /// Another job of its replica holds the repository lock.
    RepositoryLocked,
}

impl WaitReason {
    pub const ALL: [WaitReason; 2] = [WaitReason::SourceUnavailable, WaitReason::RepositoryLocked];

    pub fn as_str(self) -> &'static str {
        match self {
            WaitReason::SourceUnavailable => "source_unavailable",
            WaitReason::RepositoryLocked => "repository_locked",
        }
    }
}

/// The share of a consumer's ack-pending window one process may hold
/// waiting in memory: a quarter, so the target's other jobs keep flowing
/// even while a few processes hold theirs.
pub fn memory_share(max_ack_pending: i64) -> usize {
    match usize::try_from(max_ack_pending) {
        Ok(n) if n >= 1 => (n / 4).max(1),
        // Unlimited: the process's intake bounds what it holds.
        _ => usize::MAX,
    }
}

/// One target's waiting jobs in this process.
pub struct Waiting {
    share: usize,
    held: AtomicUsize,
    gauges: [Gauge; 2],
}

impl Waiting {
    pub fn new(virtual_storage: &str, storage: &str, max_ack_pending: i64) -> Arc<Self> {
        let gauges = WaitReason::ALL.map(|r| {
            let g = crate::metrics::jobs_waiting(virtual_storage, storage, r.as_str());
            g.set(0.0);
            g
        });
        Arc::new(Waiting {
            share: memory_share(max_ack_pending),
            held: AtomicUsize::new(0),
            gauges,
        })
    }

    fn gauge(&self, reason: WaitReason) -> &Gauge {
        &self.gauges[reason as usize]
    }

    /// A place to wait in memory for its source, or `None` when this
    /// process's share is taken (the job goes back to the stream).
    pub fn hold(self: &Arc<Self>) -> Option<WaitSlot> {
        let taken = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.share).then_some(n + 1)
            })
            .is_ok();
        taken.then(|| WaitSlot::new(self.clone(), WaitReason::SourceUnavailable, true))
    }

    /// Counts a job in the gauge while it waits for `reason`, outside the
    /// share (a lock wait is short, and the job holds a job's intake).
    pub fn counting(self: &Arc<Self>, reason: WaitReason) -> WaitSlot {
        WaitSlot::new(self.clone(), reason, false)
    }
}

/// A job waiting; dropped when it stops.
pub struct WaitSlot {
    waiting: Arc<Waiting>,
    reason: WaitReason,
    in_share: bool,
}

impl WaitSlot {
    fn new(waiting: Arc<Waiting>, reason: WaitReason, in_share: bool) -> Self {
        waiting.gauge(reason).increment(1.0);
        WaitSlot {
            waiting,
            reason,
            in_share,
        }
    }
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        self.waiting.gauge(self.reason).decrement(1.0);
        if self.in_share {
            self.waiting.held.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_holds_a_quarter_of_the_ack_pending_window_waiting() {
        assert_eq!(memory_share(100), 25);
        assert_eq!(memory_share(2), 1);
        assert_eq!(memory_share(-1), usize::MAX);
        let w = Waiting::new("vs", "s", 8);
        let a = w.hold().unwrap();
        let b = w.hold().unwrap();
        assert!(w.hold().is_none(), "the share is two");
        let _lock = w.counting(WaitReason::RepositoryLocked);
        drop(a);
        assert!(w.hold().is_some());
        drop(b);
    }
}
