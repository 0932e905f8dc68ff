//! The one place that computes how long something that failed waits before
//! it is tried again, exponential in the failures, with jitter: a job before
//! its next attempt, and the service's own retries (pull requests, the lock
//! connection, waiting for a repository lock).
//!
//! Built on the `backoff` crate, which is unmaintained (RUSTSEC-2025-0012);
//! it is used only here so that moving to `backon` touches this file alone.

use backoff::ExponentialBackoffBuilder;
use backoff::backoff::Backoff;
use std::time::Duration;

/// Shape of the retry delays.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the first failure (before jitter).
    pub initial: Duration,
    /// No delay grows beyond this (before jitter).
    pub max: Duration,
    /// Growth per failure.
    pub multiplier: f64,
    /// Each delay is drawn uniformly from `d × (1 ± jitter)`.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(5),
            max: Duration::from_secs(300),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// For the service's own calls to its broker and database (a pull
    /// request, a reconnect): from 100 ms, doubling, up to 5 s.
    pub const fn reconnect() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }

    /// The delay before attempt `failed + 1`, after `failed` failed deliveries (≥ 1).
    pub fn delay_after(&self, failed: u64) -> Duration {
        let mut backoff = ExponentialBackoffBuilder::new()
            .with_initial_interval(self.initial)
            .with_multiplier(self.multiplier)
            .with_max_interval(self.max)
            .with_randomization_factor(self.jitter)
            .with_max_elapsed_time(None)
            .build();
        let mut delay = self.initial;
        // Delivery counts past ~64 have long since reached `max`.
        for _ in 0..failed.clamp(1, 64) {
            delay = backoff.next_backoff().unwrap_or(self.max);
        }
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_within_the_jitter_band_and_stop_at_max() {
        let p = RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.25,
        };
        for (failed, nominal) in [
            (1u64, 1.0f64),
            (2, 2.0),
            (3, 4.0),
            (4, 8.0),
            (5, 10.0),
            (40, 10.0),
        ] {
            for _ in 0..50 {
                let d = p.delay_after(failed).as_secs_f64();
                assert!(
                    d >= nominal * 0.75 - 1e-9 && d <= nominal * 1.25 + 1e-9,
                    "failed={failed}: {d} outside {nominal}±25%"
                );
            }
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let p = RetryPolicy::default();
        let a: Vec<_> = (0..20).map(|_| p.delay_after(2)).collect();
        assert!(
            a.iter().any(|d| *d != a[0]),
            "20 identical delays: no jitter"
        );
    }
}
