//! What a storage node is told at start: its storages, its token and the
//! faults to inject.

use crate::faults::Faults;
use gitaly_replicator::Secret;
use std::path::PathBuf;

/// A storage node's configuration.
#[derive(Debug, Clone, Default)]
pub struct NodeConfig {
    /// (storage name, directory of its repositories); missing directories are created.
    pub storages: Vec<(String, PathBuf)>,
    /// Gitaly's auth token; calls must carry a v2 token made from it. Empty
    /// turns authentication off, as in Gitaly.
    pub token: Secret,
    pub faults: Faults,
}

/// Why a configuration cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum NodeConfigError {
    #[error("no storage given: pass at least one NAME=DIR")]
    NoStorage,
    #[error("storage {0:?} is given twice")]
    DuplicateStorage(String),
}

impl NodeConfig {
    /// Checks what can be checked without touching the disk.
    pub fn validate(&self) -> Result<(), NodeConfigError> {
        if self.storages.is_empty() {
            return Err(NodeConfigError::NoStorage);
        }
        for (i, (name, _)) in self.storages.iter().enumerate() {
            if self.storages[..i].iter().any(|(n, _)| n == name) {
                return Err(NodeConfigError::DuplicateStorage(name.clone()));
            }
        }
        Ok(())
    }
}

/// Parses `NAME=DIR`.
pub fn parse_storage(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_owned(), PathBuf::from(dir)))
        }
        _ => Err(format!(
            "{s:?}: expected NAME=DIR, e.g. gitaly-1=/var/opt/gitaly-1"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storages_parse_and_duplicates_are_refused() {
        assert_eq!(
            parse_storage("gitaly-1=/tmp/a=b").unwrap(),
            ("gitaly-1".to_owned(), PathBuf::from("/tmp/a=b"))
        );
        assert!(parse_storage("=x").is_err() && parse_storage("x").is_err());
        let mut config = NodeConfig::default();
        assert!(config.validate().is_err());
        config.storages = vec![("a".into(), "/x".into()), ("a".into(), "/y".into())];
        assert!(matches!(
            config.validate(),
            Err(NodeConfigError::DuplicateStorage(_))
        ));
    }
}
