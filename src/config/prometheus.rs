//! `[prometheus]`: Praefect's histogram buckets.

use serde::Serialize;

/// Praefect's (and Gitaly's) default `grpc_latency_buckets`, in seconds.
pub const DEFAULT_LATENCY_BUCKETS: [f64; 11] = [
    0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 10.0, 30.0, 60.0, 300.0, 1500.0,
];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrometheusConfig {
    /// Buckets of the replication latency and delay histograms, as Praefect
    /// uses them; ascending. Empty in the file means the default.
    pub grpc_latency_buckets: Vec<f64>,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        PrometheusConfig {
            grpc_latency_buckets: DEFAULT_LATENCY_BUCKETS.to_vec(),
        }
    }
}
