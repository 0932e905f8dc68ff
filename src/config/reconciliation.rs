//! `[reconciliation]`: Praefect's keys for the reconciler, which schedules
//! the jobs no publisher sent (outdated, missing and unassigned replicas),
//! plus the bounds of its scan; and `[background_verification]`, which
//! compares replicas' checksums with their source's.

use std::time::Duration;

use serde::Serialize;

use super::mask;

/// Prometheus' default buckets, which Praefect uses for
/// `gitaly_praefect_reconciliation_scheduling_seconds`.
pub const DEFAULT_RECONCILIATION_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReconciliationConfig {
    /// How often the reconciler runs (Praefect's key and default, 5m); zero
    /// disables it.
    #[serde(serialize_with = "mask::serialize_duration")]
    pub scheduling_interval: Duration,
    /// Buckets of `gitaly_praefect_reconciliation_scheduling_seconds`.
    pub histogram_buckets: Vec<f64>,
    /// Repositories read per scan statement (default 10000): the scan walks
    /// the store by repository id in batches this big.
    pub scan_batch_size: usize,
    /// Jobs read per target from the work stream to find the replicas that
    /// already have one (default 10000). Past it, repeats are still dropped
    /// by the stream's duplicate window.
    pub pending_scan_limit: u64,
}

impl Default for ReconciliationConfig {
    fn default() -> Self {
        ReconciliationConfig {
            scheduling_interval: Duration::from_secs(300),
            histogram_buckets: DEFAULT_RECONCILIATION_BUCKETS.to_vec(),
            scan_batch_size: 10_000,
            pending_scan_limit: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerificationConfig {
    /// How long a replica's verification holds (Praefect 15's key); replicas
    /// not verified within it are checked again. Zero (the default here:
    /// verification is opt-in) disables it.
    #[serde(serialize_with = "mask::serialize_duration")]
    pub verification_interval: Duration,
    /// Replicas checked per round (default 100).
    pub batch_size: usize,
}

impl Default for VerificationConfig {
    fn default() -> Self {
        VerificationConfig {
            verification_interval: Duration::ZERO,
            batch_size: 100,
        }
    }
}
