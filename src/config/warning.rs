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
        if self.nats.url == super::NatsConfig::default().url {
            out.push(ConfigWarning {
                key: "nats.url".into(),
                message: format!(
                    "{} is the default: a Praefect config has no [nats], so this is the \
                     broker every job goes through; set [nats] url (or \
                     GITALY_REPLICATOR_NATS__URL) to your NATS server",
                    self.nats.url
                ),
            });
        }
        if self
            .prometheus_listen_addr
            .is_some_and(|a| a.port() == PRAEFECT_PROMETHEUS_PORT)
        {
            out.push(ConfigWarning {
                key: "prometheus_listen_addr".into(),
                message: format!(
                    "port {PRAEFECT_PROMETHEUS_PORT} is Praefect's own metrics port: the \
                     replicator and Praefect cannot both listen there on one host (`run` would \
                     fail with \"address in use\"); next to Praefect, give the replicator \
                     another port (for example :9655); on a host or pod of its own this is \
                     harmless"
                ),
            });
        }
        let interval = self.background_verification.verification_interval;
        if !interval.is_zero() {
            out.push(ConfigWarning {
                key: "background_verification.verification_interval".into(),
                message: format!(
                    "{}: checksum verification of replicas is on (Praefect's key, read from \
                     this file): replicas not verified within it are compared with the primary \
                     by CalculateChecksum, a read of the whole repository on both nodes; set \
                     it to 0s to turn it off",
                    humantime::format_duration(interval)
                ),
            });
        }
        out
    }
}

/// The port Praefect's `prometheus_listen_addr` uses in GitLab's packages.
const PRAEFECT_PROMETHEUS_PORT: u16 = 9652;
