//! `[[virtual_storage]]` and its `[[virtual_storage.node]]` entries: the
//! clusters whose replicas are kept in step.

use serde::Serialize;

use super::{NodeAddress, Secret};

/// One `[[virtual_storage]]`: a named cluster of storage nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VirtualStorage {
    /// The virtual storage's name, as repositories and jobs refer to it.
    pub name: String,
    /// `[[virtual_storage.node]]`.
    #[serde(rename = "node", skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<Node>,
}

impl VirtualStorage {
    /// The node with this storage name.
    pub fn node(&self, storage: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.storage == storage)
    }
}

/// One `[[virtual_storage.node]]`: a Gitaly server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    /// The storage name, unique within its virtual storage.
    pub storage: String,
    /// Its gRPC address.
    pub address: NodeAddress,
    /// Gitaly's auth token for this node; may come from
    /// [`node_token_env_var`](super::node_token_env_var) instead of the file.
    pub token: Secret,
}
