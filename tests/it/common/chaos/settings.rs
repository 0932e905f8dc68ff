//! How long the fault suite runs and with which seed: a short run by default,
//! the long mode when `CHAOS_SECONDS` is set, a replay when `CHAOS_SEED` is,
//! over TLS to the storage nodes when `CHAOS_TLS=1`.

use rand::SeedableRng;
use rand::rngs::StdRng;
use std::time::Duration;

/// Seconds of faults in the short mode: with start-up, convergence and the
/// checks the whole test takes about a minute.
const SHORT_SECONDS: u64 = 40;

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub seed: u64,
    /// How long the writer writes and the faults come.
    pub chaos: Duration,
    /// `CHAOS_SECONDS` was set: the long mode, with the 3-node NATS cluster.
    pub long: bool,
    /// `CHAOS_TLS=1`: the storage nodes serve TLS (`tls://` addresses,
    /// certificates of a CA made for the run, trusted by `SSL_CERT_FILE`).
    pub tls: bool,
}

impl Settings {
    pub fn from_env() -> Settings {
        let seconds = std::env::var("CHAOS_SECONDS").ok().map(|s| {
            s.trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("CHAOS_SECONDS={s:?} is not a number of seconds"))
        });
        let seed = match std::env::var("CHAOS_SEED") {
            Ok(s) => s
                .trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("CHAOS_SEED={s:?} is not a number")),
            Err(_) => rand::random(),
        };
        Settings {
            seed,
            chaos: Duration::from_secs(seconds.unwrap_or(SHORT_SECONDS)),
            long: seconds.is_some(),
            tls: match std::env::var("CHAOS_TLS").as_deref() {
                Ok("1") => true,
                Ok("0") | Err(_) => false,
                Ok(other) => panic!("CHAOS_TLS={other:?}: 1 or 0"),
            },
        }
    }

    /// A generator of its own for each part (writer, faults, kills), so one
    /// part's draws do not shift another's.
    pub fn rng(&self, part: u64) -> StdRng {
        StdRng::seed_from_u64(self.seed ^ part.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    pub fn mode(&self) -> &'static str {
        if self.long { "long" } else { "short" }
    }

    /// How the consumers reach the storage nodes.
    pub fn transport(&self) -> &'static str {
        if self.tls { "TLS" } else { "plain TCP" }
    }
}
