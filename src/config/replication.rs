//! `[replication]`: how many jobs are fetched and run at once, and how they are
//! timed out and retried.

use std::time::Duration;

use serde::Serialize;

use super::mask;

/// `[replication]`: Praefect's keys plus the knobs of the consumer loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicationConfig {
    /// Jobs per fetch (default 10, 1..=1000).
    pub batch_size: usize,
    /// Praefect's name; here: targets fetched in parallel per process (default 1).
    pub parallel_storage_processing_workers: usize,
    /// Jobs in flight per process (default 64).
    pub max_concurrent_jobs: usize,
    /// Deliveries per job before it is dead-lettered (default 3; `delete_replica`
    /// is unlimited).
    pub attempts: u32,
    /// Per-job timeout; zero means none (default), as in Praefect.
    #[serde(serialize_with = "mask::serialize_duration")]
    pub job_timeout: Duration,
    /// How often each node's gRPC health is checked (default 5s).
    #[serde(serialize_with = "mask::serialize_duration")]
    pub health_check_interval: Duration,
    /// Delay before the second attempt of a failed job (default 5s); it doubles
    /// with each failure, with jitter.
    #[serde(serialize_with = "mask::serialize_duration")]
    pub retry_delay: Duration,
    /// The longest delay between attempts (default 5m).
    #[serde(serialize_with = "mask::serialize_duration")]
    pub max_retry_delay: Duration,
    /// How long a maintenance job's completion is remembered for dedup
    /// (default 24h: the work stream keeps jobs without an age limit, so a
    /// day stands in for the age of the oldest twin still queued).
    #[serde(serialize_with = "mask::serialize_duration")]
    pub completion_retention: Duration,
    /// An update completes only when the target's `CalculateChecksum`
    /// equals the source's afterwards (default false); otherwise it fails
    /// and is retried.
    pub verify_after_update: bool,
    /// The lease of a process's repository lock session (default 30s, at
    /// least 2s): a process that stops renewing it (hung, cut off) holds its
    /// repositories at most this long before others take them over; a
    /// process that cannot renew it for half of it stops its jobs.
    #[serde(serialize_with = "mask::serialize_duration")]
    pub lock_lease: Duration,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            batch_size: 10,
            parallel_storage_processing_workers: 1,
            max_concurrent_jobs: 64,
            attempts: 3,
            job_timeout: Duration::ZERO,
            health_check_interval: Duration::from_secs(5),
            retry_delay: Duration::from_secs(5),
            max_retry_delay: Duration::from_secs(300),
            completion_retention: Duration::from_secs(24 * 3600),
            verify_after_update: false,
            lock_lease: crate::store::locks::DEFAULT_LOCK_LEASE,
        }
    }
}
