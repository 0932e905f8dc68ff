//! What the demo reads from the service's metrics: job outcomes by change
//! type, failed attempts, dead letters, latency and delay, target health.
//! Counters are taken as the difference from a baseline read before the
//! service started, because the recorder is process-wide (a test process
//! may have run other consumers before).

use crate::metrics_text::Samples;
use crate::nodes::{STORAGES, VIRTUAL_STORAGE};
use gitaly_replicator::ChangeType;
use gitaly_replicator::metric_names::{
    DEAD_LETTERS_TOTAL, JOBS_TOTAL, OUTCOMES, REPLICATION_DELAY, REPLICATION_LATENCY,
    TARGET_HEALTHY,
};

/// Outcome counts and key values of one run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measurements {
    /// (change type, outcome, jobs) for every non-zero count, in
    /// [`ChangeType::ALL`] and [`OUTCOMES`] order.
    pub outcomes: Vec<(ChangeType, &'static str, u64)>,
    /// Attempts that ended `failed`.
    pub failed: u64,
    pub dead_letters: u64,
    /// (count, sum in seconds) of the latency histogram, all change types.
    pub latency: (u64, f64),
    /// (count, sum in seconds) of the delay histogram, all change types.
    pub delay: (u64, f64),
    /// (storage, 1 or 0) for each storage, as last reported.
    pub healthy: Vec<(String, f64)>,
}

fn delta(now: f64, before: f64) -> u64 {
    (now - before).max(0.0).round() as u64
}

impl Measurements {
    /// The run's share of `now`, given what `baseline` held before it.
    pub fn between(baseline: &Samples, now: &Samples) -> Measurements {
        let vs = [("virtual_storage", VIRTUAL_STORAGE)];
        let counted = |name: &str, filter: &[(&str, &str)]| {
            delta(now.sum(name, filter), baseline.sum(name, filter))
        };
        let mut outcomes = Vec::new();
        for change in ChangeType::ALL {
            for outcome in OUTCOMES {
                let filter = [
                    ("virtual_storage", VIRTUAL_STORAGE),
                    ("change_type", change.as_str()),
                    ("outcome", outcome),
                ];
                let n = counted(JOBS_TOTAL, &filter);
                if n > 0 {
                    outcomes.push((change, outcome, n));
                }
            }
        }
        let histogram = |name: &str| {
            let count = format!("{name}_count");
            let sum = format!("{name}_sum");
            (
                counted(&count, &[]),
                (now.sum(&sum, &[]) - baseline.sum(&sum, &[])).max(0.0),
            )
        };
        let healthy = STORAGES
            .iter()
            .map(|s| {
                let filter = [("virtual_storage", VIRTUAL_STORAGE), ("gitaly_storage", *s)];
                ((*s).to_owned(), now.sum(TARGET_HEALTHY, &filter))
            })
            .collect();
        Measurements {
            outcomes,
            failed: counted(
                JOBS_TOTAL,
                &[("virtual_storage", VIRTUAL_STORAGE), ("outcome", "failed")],
            ),
            dead_letters: counted(DEAD_LETTERS_TOTAL, &vs),
            latency: histogram(REPLICATION_LATENCY),
            delay: histogram(REPLICATION_DELAY),
            healthy,
        }
    }

    /// Jobs with `outcome`, all change types.
    pub fn total(&self, outcome: &str) -> u64 {
        self.outcomes
            .iter()
            .filter(|(_, o, _)| *o == outcome)
            .map(|(_, _, n)| n)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_counted_from_the_baseline_and_other_virtual_storages_are_ignored() {
        let before = Samples::parse(
            "gitaly_replicator_jobs_total{virtual_storage=\"default\",gitaly_storage=\"gitaly-2\",change_type=\"update\",outcome=\"completed\"} 4\n",
        );
        let now = Samples::parse(
            "gitaly_replicator_jobs_total{virtual_storage=\"default\",gitaly_storage=\"gitaly-2\",change_type=\"update\",outcome=\"completed\"} 10\n\
             gitaly_replicator_jobs_total{virtual_storage=\"default\",gitaly_storage=\"gitaly-3\",change_type=\"gc\",outcome=\"failed\"} 2\n\
             gitaly_replicator_jobs_total{virtual_storage=\"other\",gitaly_storage=\"gitaly-3\",change_type=\"gc\",outcome=\"failed\"} 9\n\
             gitaly_praefect_replication_latency_count{type=\"update\"} 6\n\
             gitaly_praefect_replication_latency_sum{type=\"update\"} 0.3\n\
             gitaly_replicator_target_healthy{virtual_storage=\"default\",gitaly_storage=\"gitaly-2\"} 1\n",
        );
        let m = Measurements::between(&before, &now);
        assert_eq!(
            m.outcomes,
            vec![
                (ChangeType::Update, "completed", 6),
                (ChangeType::GarbageCollect, "failed", 2)
            ]
        );
        assert_eq!(m.failed, 2);
        assert_eq!(m.total("completed"), 6);
        assert_eq!(m.latency.0, 6);
        assert_eq!(m.healthy[1], ("gitaly-2".to_owned(), 1.0));
    }
}
