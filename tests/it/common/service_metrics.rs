//! The metrics of the service run in this test process, as a scraper reads
//! them, filtered by a test's own virtual storage.

use testkit::metrics::Samples;

/// The process's metrics (the recorder the service installed).
pub fn samples() -> Samples {
    Samples::parse(
        &gitaly_replicator::install_metrics(
            &gitaly_replicator::DEFAULT_LATENCY_BUCKETS,
            &gitaly_replicator::DEFAULT_RECONCILIATION_BUCKETS,
        )
        .unwrap()
        .render(),
    )
}

/// Jobs of this virtual storage that ended `outcome`.
pub fn jobs_with_outcome(vs: &str, outcome: &str) -> f64 {
    samples().sum(
        "gitaly_replicator_jobs_total",
        &[("virtual_storage", vs), ("outcome", outcome)],
    )
}

/// A per-node metric of this virtual storage.
pub fn metric(vs: &str, name: &str, storage: &str) -> f64 {
    samples().sum(
        name,
        &[("virtual_storage", vs), ("gitaly_storage", storage)],
    )
}
