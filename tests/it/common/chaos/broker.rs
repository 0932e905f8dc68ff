//! The suite's NATS: one private nats-server, or in the long mode a private
//! 3-node cluster with the streams replicated on all three.

use testkit::nats_cluster::{self, NatsCluster};
use testkit::nats_server::PrivateNats;

pub enum Broker {
    Single(PrivateNats),
    Cluster(NatsCluster),
}

impl Broker {
    pub async fn single() -> Broker {
        Broker::Single(PrivateNats::start().await)
    }

    pub async fn cluster() -> Broker {
        Broker::Cluster(NatsCluster::start().await)
    }

    pub fn url(&self) -> String {
        match self {
            Broker::Single(n) => n.url(),
            Broker::Cluster(c) => c.url(),
        }
    }

    /// A client of every server (it reconnects to whichever is up).
    pub async fn client(&self) -> async_nats::Client {
        let servers: Vec<String> = self.url().split(',').map(str::to_owned).collect();
        async_nats::connect(servers).await.unwrap()
    }

    /// `[nats] replicas`: a stream on every node of a cluster.
    pub fn replicas(&self) -> usize {
        match self {
            Broker::Single(_) => 1,
            Broker::Cluster(_) => nats_cluster::NODES,
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Broker::Single(_) => "one nats-server",
            Broker::Cluster(_) => "a 3-node NATS cluster",
        }
    }
}
