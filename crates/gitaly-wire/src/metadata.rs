//! gRPC metadata Gitaly reads besides auth: `gitaly-servers`, which tells a
//! target node how to reach the source of a `ReplicateRepository`, and the
//! correlation id.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;

/// Metadata key of the source node list on `ReplicateRepository`.
pub const GITALY_SERVERS: &str = "gitaly-servers";
/// Metadata key GitLab's labkit uses for the correlation id.
pub const CORRELATION_ID: &str = "x-gitlab-correlation-id";

/// How to reach one storage: its address and the token to sign calls with.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub address: String,
    pub token: String,
}

impl fmt::Debug for ServerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerInfo")
            .field("address", &self.address)
            .field("token", &"[masked]")
            .finish()
    }
}

/// Why a `gitaly-servers` value could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("gitaly-servers metadata is not standard base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("gitaly-servers metadata is not a JSON object of storages: {0}")]
    Json(#[from] serde_json::Error),
}

/// Encodes `{"<storage>": {"address": …, "token": …}}` as standard base64.
pub fn encode_gitaly_servers(storage: &str, address: &str, token: &str) -> String {
    let mut map = HashMap::with_capacity(1);
    map.insert(
        storage,
        ServerInfo {
            address: address.to_owned(),
            token: token.to_owned(),
        },
    );
    // A map of strings always serialises.
    STANDARD.encode(serde_json::to_vec(&map).unwrap_or_default())
}

/// Decodes a `gitaly-servers` value into storage → server.
pub fn decode_gitaly_servers(value: &str) -> Result<HashMap<String, ServerInfo>, MetadataError> {
    let raw = STANDARD.decode(value.trim())?;
    Ok(serde_json::from_slice(&raw)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitaly_servers_round_trips_and_is_padded_base64_of_json() {
        let v = encode_gitaly_servers("gitaly-1", "tcp://127.0.0.1:8075", "tok");
        let json = String::from_utf8(STANDARD.decode(&v).unwrap()).unwrap();
        assert_eq!(
            json,
            r#"{"gitaly-1":{"address":"tcp://127.0.0.1:8075","token":"tok"}}"#
        );
        let m = decode_gitaly_servers(&v).unwrap();
        assert_eq!(m["gitaly-1"].address, "tcp://127.0.0.1:8075");
        assert!(!format!("{:?}", m["gitaly-1"]).contains("tok\""));
        assert!(decode_gitaly_servers("not base64!").is_err());
    }
}
