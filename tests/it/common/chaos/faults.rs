//! The faults, at random from the run's seed: consumers SIGKILLed at least
//! every 2 s, and one at a time, the broker restarted (a consumer started
//! while it is down), Postgres restarted, a target killed (in the middle of
//! a call when one is in flight) and restarted, a target answering
//! UNAVAILABLE to every call for a while.

use super::broker::Broker;
use super::fleet::Fleet;
use crate::common::storage_nodes::NodeProcess;
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use std::sync::Arc;
use std::time::Duration;
use testkit::postgres_server::PrivatePostgres;
use time::OffsetDateTime;
use tokio::sync::Mutex;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    BrokerRestart,
    BrokerNodeRestart,
    PostgresRestart,
    TargetKill,
    TargetUnavailable,
}

/// One fault as it happened.
#[derive(Debug, Clone)]
pub struct Injected {
    pub fault: Fault,
    /// When it struck (the log's clock, for the evidence).
    pub at: OffsetDateTime,
    pub target: Option<String>,
}

/// Longest wait for a call in flight before a target is killed anyway.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(3);

fn millis(rng: &mut StdRng, from: u64, to: u64) -> Duration {
    Duration::from_millis(rng.random_range(from..to))
}

/// Kills a consumer every 0.4 to 1.9 s until `until`; returns when the last
/// replacement started.
pub async fn kill_consumers(fleet: Arc<Mutex<Fleet>>, mut rng: StdRng, until: Instant) -> Instant {
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(millis(&mut rng, 400, 1900)).await;
        if Instant::now() >= until {
            return last;
        }
        if fleet.lock().await.kill_one(&mut rng).await {
            last = Instant::now();
        }
    }
}

/// The parts the other faults act on.
pub struct Injector {
    pub broker: Broker,
    pub postgres: PrivatePostgres,
    /// gitaly-2 and gitaly-3.
    pub targets: Vec<NodeProcess>,
    /// Each target's normal flags (its latency).
    pub flags: Vec<Vec<String>>,
    pub fleet: Arc<Mutex<Fleet>>,
    pub rng: StdRng,
    pub injected: Vec<Injected>,
    /// When the last fault was over.
    pub healed: Instant,
}

impl Injector {
    /// One fault after another, with pauses, until `until`: the kinds in a
    /// shuffled round each, so every kind comes early and often.
    pub async fn run(mut self, until: Instant) -> Injector {
        let kinds = [
            match self.broker {
                Broker::Single(_) => Fault::BrokerRestart,
                Broker::Cluster(_) => Fault::BrokerNodeRestart,
            },
            Fault::PostgresRestart,
            Fault::TargetKill,
            Fault::TargetUnavailable,
        ];
        let mut round = Vec::new();
        loop {
            tokio::time::sleep(millis(&mut self.rng, 1000, 3000)).await;
            if Instant::now() >= until {
                return self;
            }
            if round.is_empty() {
                round = kinds.to_vec();
                round.shuffle(&mut self.rng);
            }
            let Some(fault) = round.pop() else { continue };
            self.inject(fault).await;
            self.healed = Instant::now();
        }
    }

    fn record(&mut self, fault: Fault, target: Option<&str>) {
        self.injected.push(Injected {
            fault,
            at: OffsetDateTime::now_utc(),
            target: target.map(str::to_owned),
        });
    }

    async fn inject(&mut self, fault: Fault) {
        match fault {
            Fault::BrokerRestart => self.restart_broker().await,
            Fault::BrokerNodeRestart => self.restart_broker_node().await,
            Fault::PostgresRestart => {
                self.record(fault, None);
                let down = millis(&mut self.rng, 1000, 3000);
                let pg = &mut self.postgres;
                tokio::task::block_in_place(|| pg.stop());
                tokio::time::sleep(down).await;
                let pg = &mut self.postgres;
                tokio::task::block_in_place(|| pg.start_again());
            }
            Fault::TargetKill => self.kill_target().await,
            Fault::TargetUnavailable => {
                let i = self.rng.random_range(0..self.targets.len());
                let storage = self.targets[i].storage.clone();
                self.record(fault, Some(&storage));
                let mut failing = self.flags[i].clone();
                failing.extend(["--failure-rate".to_owned(), "1".to_owned()]);
                self.targets[i].restart_with(&failing).await;
                tokio::time::sleep(millis(&mut self.rng, 1500, 3000)).await;
                let normal = self.flags[i].clone();
                self.targets[i].restart_with(&normal).await;
            }
        }
    }

    /// The single server down for 1.5 to 3 s, and a consumer started while
    /// it is.
    async fn restart_broker(&mut self) {
        let Broker::Single(nats) = &mut self.broker else {
            return;
        };
        let down = millis(&mut self.rng, 1500, 3000);
        self.fleet.lock().await.set_broker_down(true);
        nats.kill();
        let stopped = Instant::now();
        self.record(Fault::BrokerRestart, None);
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.fleet.lock().await.kill_one(&mut self.rng).await;
        tokio::time::sleep(down.saturating_sub(stopped.elapsed())).await;
        let Broker::Single(nats) = &mut self.broker else {
            return;
        };
        nats.start_again().await;
        self.fleet.lock().await.set_broker_down(false);
    }

    /// One node of the cluster down for 2 to 5 s.
    async fn restart_broker_node(&mut self) {
        let down = millis(&mut self.rng, 2000, 5000);
        let i = self.rng.random_range(0..testkit::nats_cluster::NODES);
        let Broker::Cluster(cluster) = &mut self.broker else {
            return;
        };
        cluster.kill(i);
        self.record(Fault::BrokerNodeRestart, None);
        tokio::time::sleep(down).await;
        let Broker::Cluster(cluster) = &mut self.broker else {
            return;
        };
        cluster.start_again(i).await;
    }

    /// Kills a target as soon as a call to it is in flight (or after a
    /// while without one), down for 0.5 to 2 s.
    async fn kill_target(&mut self) {
        let i = self.rng.random_range(0..self.targets.len());
        let storage = self.targets[i].storage.clone();
        let deadline = Instant::now() + IN_FLIGHT_WAIT;
        while Instant::now() < deadline && self.fleet.lock().await.in_flight(&storage) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.record(Fault::TargetKill, Some(&storage));
        self.targets[i].kill().await;
        tokio::time::sleep(millis(&mut self.rng, 500, 2000)).await;
        self.targets[i].restart().await;
    }
}
