//! The summary a run prints: jobs, faults of each kind, replicas converged,
//! jobs executed twice, left-over jobs settled, and the time to converge
//! after the last fault.

use super::faults::{Fault, Injected};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Summary {
    pub seed: u64,
    pub mode: &'static str,
    pub broker: &'static str,
    pub chaos: Duration,
    pub jobs: BTreeMap<String, usize>,
    pub poison: usize,
    pub consumer_kills: usize,
    pub longest_kill_gap: Duration,
    pub injected: Vec<Injected>,
    /// Target kills with a call in flight, by the consumers' logs.
    pub killed_mid_call: usize,
    pub started_while_broker_down: usize,
    /// Of those, the ones kept alive until they connected, and how many did.
    pub shielded: usize,
    pub shielded_connected: usize,
    pub live_paths: usize,
    pub gone_paths: usize,
    pub replicas_converged: usize,
    pub executed_twice: usize,
    pub completed_twice: usize,
    pub outcomes: Vec<(String, usize)>,
    pub dead_letters: usize,
    /// Poison jobs dead-lettered more than once, with their reasons.
    pub dead_repeated: Vec<String>,
    /// Left-over jobs settled: (requeued, removed).
    pub leftovers: (usize, usize),
    pub converged_after: Option<Duration>,
    pub wall: Duration,
}

impl Summary {
    pub fn count(&self, fault: Fault) -> usize {
        self.injected.iter().filter(|i| i.fault == fault).count()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: usize = self.jobs.values().sum();
        let by: Vec<String> = self.jobs.iter().map(|(c, n)| format!("{c} {n}")).collect();
        writeln!(
            f,
            "chaos summary (seed {}, {} mode: {} s of faults on {})",
            self.seed,
            self.mode,
            self.chaos.as_secs(),
            self.broker
        )?;
        writeln!(
            f,
            "  jobs published       {total} ({}), plus {} poison",
            by.join(", "),
            self.poison
        )?;
        writeln!(f, "  faults")?;
        writeln!(
            f,
            "    consumer SIGKILL   {} (at most {:.1} s apart)",
            self.consumer_kills,
            self.longest_kill_gap.as_secs_f64()
        )?;
        if self.count(Fault::BrokerRestart) > 0 || self.count(Fault::BrokerNodeRestart) == 0 {
            writeln!(
                f,
                "    broker restart     {} (consumers started while it was down: {}; kept until connected: {}, connected: {})",
                self.count(Fault::BrokerRestart),
                self.started_while_broker_down,
                self.shielded,
                self.shielded_connected
            )?;
        }
        if self.count(Fault::BrokerNodeRestart) > 0 {
            writeln!(
                f,
                "    cluster node kill  {}",
                self.count(Fault::BrokerNodeRestart)
            )?;
        }
        writeln!(
            f,
            "    Postgres restart   {}",
            self.count(Fault::PostgresRestart)
        )?;
        writeln!(
            f,
            "    target killed      {} (in the middle of a call: {})",
            self.count(Fault::TargetKill),
            self.killed_mid_call
        )?;
        writeln!(
            f,
            "    target UNAVAILABLE {}",
            self.count(Fault::TargetUnavailable)
        )?;
        writeln!(
            f,
            "  replicas converged   {} ({} repositories live, {} paths gone, on 3 storages)",
            self.replicas_converged, self.live_paths, self.gone_paths
        )?;
        writeln!(
            f,
            "  jobs executed twice  {} (their Gitaly call reached by two deliveries or more; completed twice: {})",
            self.executed_twice, self.completed_twice
        )?;
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect();
        writeln!(f, "  outcomes logged      {}", outcomes.join(", "))?;
        writeln!(
            f,
            "  dead letters         {} (of {} poison jobs)",
            self.dead_letters, self.poison
        )?;
        for r in &self.dead_repeated {
            writeln!(f, "    more than once:    {r}")?;
        }
        writeln!(
            f,
            "  leftovers settled    requeued {}, removed {} (jobs a broker kept below a consumer's acknowledgement floor)",
            self.leftovers.0, self.leftovers.1
        )?;
        match self.converged_after {
            Some(d) => writeln!(
                f,
                "  converged            {:.1} s after the last fault",
                d.as_secs_f64()
            )?,
            None => writeln!(f, "  converged            never")?,
        }
        write!(f, "  wall time            {:.0} s", self.wall.as_secs_f64())
    }
}
