//! What loads but deserves a word: settings Praefect accepts and that work
//! differently from what their writer may expect. `check-config` prints
//! them, `run` logs them at start.

use std::fmt;

use super::{Config, node_token_env_var};

/// One warning, about one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// The key's full path, as in errors (`virtual_storage[0].node[1].token`).
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl Config {
    /// The warnings this configuration deserves, in file order.
    pub fn warnings(&self) -> Vec<ConfigWarning> {
        let mut out = Vec::new();
        for (i, vs) in self.virtual_storages.iter().enumerate() {
            for (j, node) in vs.nodes.iter().enumerate() {
                let key = format!("virtual_storage[{i}].node[{j}]");
                if node.address.lacks_port() {
                    out.push(ConfigWarning {
                        key: format!("{key}.address"),
                        message: format!(
                            "{} has no port: dialing it fails, as it does for Praefect, so \
                             the node stays unhealthy and its jobs wait; write {}:PORT \
                             (the port of the node's Gitaly listen_addr)",
                            node.address, node.address
                        ),
                    });
                }
                if node.token.is_empty() {
                    out.push(ConfigWarning {
                        key: format!("{key}.token"),
                        message: format!(
                            "not set: calls to {:?} carry no authorization, as Praefect's \
                             do, and fail if its Gitaly requires a token; set it here or \
                             in {}",
                            node.storage,
                            node_token_env_var(&vs.name, &node.storage)
                        ),
                    });
                }
            }
        }
        out.extend(self.database.warnings());
        out
    }
}
