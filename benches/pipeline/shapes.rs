//! Backlog shapes: which repository each job of a backlog is for. A backlog
//! left by an outage is rarely one job per repository: a few busy
//! repositories carry most of it, which is the shape Praefect's queue is
//! best at (one Acknowledge removes every ready twin of a completed job, and
//! Dequeue then locks about as many rows as there are repositories).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Shape {
    /// Every job for a repository of its own.
    OnePerRepository,
    /// Repositories drawn from a Zipf distribution with exponent `s` over
    /// `repositories` ranks.
    Zipf { s: f64, repositories: usize },
    /// Jobs spread evenly over this many repositories.
    Repositories(usize),
    /// One job per repository, with Praefect's lock table holding a row
    /// for each of this many repositories that once had jobs (v14.10 never
    /// deletes them).
    StaleLocks(usize),
}

impl Shape {
    pub fn label(self) -> String {
        match self {
            Shape::OnePerRepository => "one per repository".into(),
            Shape::Zipf { s, repositories } => {
                format!("Zipf s={s} over {repositories} repositories")
            }
            Shape::Repositories(r) => format!("over {r} repositories"),
            Shape::StaleLocks(n) => format!("one per repository, {} stale lock rows", label(n)),
        }
    }

    /// The repository index of each of `n` jobs, in publishing order.
    pub fn repositories(self, n: usize) -> Vec<usize> {
        match self {
            Shape::OnePerRepository | Shape::StaleLocks(_) => (0..n).collect(),
            Shape::Repositories(r) => (0..n).map(|i| i % r.max(1)).collect(),
            Shape::Zipf { s, repositories } => {
                // The cumulative weights of ranks 1..=repositories, then one
                // uniform draw per job, seeded so every run has one backlog.
                let mut cdf = Vec::with_capacity(repositories);
                let mut total = 0.0;
                for k in 1..=repositories.max(1) {
                    total += 1.0 / (k as f64).powf(s);
                    cdf.push(total);
                }
                let mut rng = StdRng::seed_from_u64(ZIPF_SEED);
                (0..n)
                    .map(|_| {
                        let u = rng.random::<f64>() * total;
                        cdf.partition_point(|&c| c < u).min(cdf.len() - 1)
                    })
                    .collect()
            }
        }
    }

    /// Lock rows Praefect's table holds before the backlog arrives.
    pub fn stale_locks(self) -> usize {
        match self {
            Shape::StaleLocks(n) => n,
            _ => 0,
        }
    }
}

/// The seed of the Zipf draw.
const ZIPF_SEED: u64 = 0x5eed_2b1f;

/// How many distinct repositories `repos` names.
pub fn distinct(repos: &[usize]) -> usize {
    let mut seen = repos.to_vec();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

/// Jobs of the busiest repository.
pub fn busiest(repos: &[usize]) -> usize {
    let mut counts = std::collections::HashMap::new();
    for &r in repos {
        *counts.entry(r).or_insert(0usize) += 1;
    }
    counts.values().copied().max().unwrap_or(0)
}

/// "2k", "10k", "100k".
pub fn label(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}
