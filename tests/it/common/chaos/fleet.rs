//! The consumers: `gitaly-replicator run` processes on one config, killed
//! with SIGKILL and replaced at once. Each one's log becomes evidence when it
//! exits.

use super::evidence::{Evidence, Incarnation, in_flight};
use crate::common::process::ReplicatorProcess;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;

struct Slot {
    process: ReplicatorProcess,
    incarnation: Incarnation,
}

pub struct Fleet {
    toml: String,
    /// Every consumer's extra environment (`SSL_CERT_FILE`).
    env: Vec<(String, String)>,
    /// Every exited consumer's whole log, for a failure's report.
    pub log_path: std::path::PathBuf,
    slots: Vec<Slot>,
    pub evidence: Evidence,
    /// The single nats-server is down: consumers started now count.
    broker_down: bool,
    /// An outage's shield is given once.
    shield_available: bool,
    /// When each SIGKILL was sent.
    pub kills: Vec<tokio::time::Instant>,
}

impl Fleet {
    pub fn start(
        toml: &str,
        env: Vec<(String, String)>,
        consumers: usize,
        log_path: std::path::PathBuf,
    ) -> Fleet {
        let mut fleet = Fleet {
            toml: toml.to_owned(),
            env,
            log_path,
            slots: Vec::new(),
            evidence: Evidence::default(),
            broker_down: false,
            shield_available: false,
            kills: Vec::new(),
        };
        for _ in 0..consumers {
            let slot = fleet.spawn();
            fleet.slots.push(slot);
        }
        fleet
    }

    fn spawn(&mut self) -> Slot {
        let shielded = self.broker_down && self.shield_available;
        if shielded {
            self.shield_available = false;
        }
        Slot {
            process: {
                let env: Vec<(&str, &str)> = self
                    .env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                ReplicatorProcess::spawn_with_env(&self.toml, &["run"], &env)
            },
            incarnation: Incarnation {
                began_in_outage: self.broker_down,
                shielded,
                ..Incarnation::default()
            },
        }
    }

    /// While the broker is down, the first consumer started is kept alive
    /// until it has connected: the evidence that a consumer started without
    /// a broker starts working once there is one.
    pub fn set_broker_down(&mut self, down: bool) {
        self.broker_down = down;
        self.shield_available = down;
    }

    fn log(slot: &Slot) -> String {
        slot.process
            .stderr
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// SIGKILLs a consumer that may be killed now and starts another in its
    /// place; false when every one is shielded.
    pub async fn kill_one(&mut self, rng: &mut StdRng) -> bool {
        let killable: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                let slot = &self.slots[i];
                !slot.incarnation.shielded || Self::log(slot).contains("NATS answers")
            })
            .collect();
        let Some(&i) = killable.choose(rng) else {
            return false;
        };
        let old = self.slots.swap_remove(i);
        self.kills.push(tokio::time::Instant::now());
        old.process.signal("KILL");
        let (_, log) = old.process.wait().await;
        self.keep(&log, old.incarnation);
        let fresh = self.spawn();
        self.slots.push(fresh);
        true
    }

    /// The longest time between two kills.
    pub fn longest_gap(&self) -> std::time::Duration {
        self.kills
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }

    /// Takes in an exited consumer's log, and appends it to the log file.
    fn keep(&mut self, log: &str, incarnation: Incarnation) {
        use std::io::Write;
        let n = self.evidence.incarnations.len();
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
        {
            let _ = writeln!(file, "=== consumer process {n}\n{log}");
        }
        self.evidence.absorb(log, incarnation);
    }

    /// Jobs of `target` that the running consumers' logs show in flight.
    pub fn in_flight(&self, target: &str) -> usize {
        self.slots
            .iter()
            .map(|s| in_flight(&Self::log(s), target))
            .sum()
    }

    /// Stops every consumer with SIGTERM (they finish or hand back their
    /// jobs) and takes in their logs.
    pub async fn stop(&mut self) {
        for slot in std::mem::take(&mut self.slots) {
            slot.process.signal("TERM");
            let (_, log) = slot.process.wait().await;
            self.keep(&log, slot.incarnation);
        }
    }

    /// The last lines of every running consumer's log, for a failure report.
    pub fn tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for (i, slot) in self.slots.iter().enumerate() {
            let log = Self::log(slot);
            let all: Vec<&str> = log.lines().collect();
            out += &format!("--- consumer {i} (last {lines} lines)\n");
            for l in &all[all.len().saturating_sub(lines)..] {
                out += l;
                out.push('\n');
            }
        }
        out
    }
}
