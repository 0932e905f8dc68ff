//! What one demo run owns: a run id, the names derived from it (streams,
//! subject prefix, consumers, database) so that runs never share anything
//! with each other or with real data, and a scratch directory for the
//! storages.

use crate::error::DemoError;
use std::path::{Path, PathBuf};

/// The run's names and scratch directory.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// 8 hex digits, unique per run.
    pub id: String,
    /// `$TMPDIR/gitaly-replicator-demo-<id>`: one directory per storage, the
    /// git home and the config file.
    pub root: PathBuf,
}

impl Workspace {
    /// Picks an id and creates the scratch directory.
    pub fn create() -> Result<Workspace, DemoError> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let ws = Workspace::of(&id)?;
        std::fs::create_dir_all(&ws.root)
            .map_err(DemoError::io(format!("creating {}", ws.root.display())))?;
        Ok(ws)
    }

    /// The workspace of an earlier run (`--clean ID`); nothing is created.
    pub fn of(id: &str) -> Result<Workspace, DemoError> {
        if id.len() != 8
            || !id
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        {
            return Err(DemoError::Usage(format!(
                "run id {id:?}: expected the 8 hex digits a run prints (gitaly-replicator-demo-<ID>)"
            )));
        }
        let root = std::env::temp_dir().join(format!("gitaly-replicator-demo-{id}"));
        Ok(Workspace {
            id: id.to_owned(),
            root,
        })
    }

    /// The config file, written readable by its owner alone: it holds the
    /// nodes' tokens.
    pub fn write_config(&self, toml: &str) -> Result<(), DemoError> {
        use std::io::Write;
        #[cfg(unix)]
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.config_file();
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        options.mode(0o600);
        options
            .open(&path)
            .and_then(|mut f| f.write_all(toml.as_bytes()))
            .map_err(DemoError::io(format!("writing {}", path.display())))
    }

    /// Where a kept `--tls` run keeps its CA.
    pub fn ca_file(&self) -> PathBuf {
        self.root.join("ca.pem")
    }

    /// The directory of repositories of `storage`.
    pub fn storage_dir(&self, storage: &str) -> PathBuf {
        self.root.join(storage)
    }

    /// `$HOME` for the git commands the demo runs (no user configuration).
    pub fn git_home(&self) -> &Path {
        &self.root
    }

    pub fn config_file(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    pub fn subject_prefix(&self) -> String {
        format!("demo-{}.replication", self.id)
    }

    pub fn stream(&self) -> String {
        format!("DEMO_{}", self.id.to_ascii_uppercase())
    }

    pub fn dead_letter_stream(&self) -> String {
        format!("{}_DEAD", self.stream())
    }

    pub fn consumer_prefix(&self) -> String {
        format!("demo-{}", self.id)
    }

    pub fn database_name(&self) -> String {
        format!("gitaly_replicator_demo_{}", self.id)
    }

    /// Deletes the scratch directory and everything in it.
    pub fn remove(&self) -> Result<(), DemoError> {
        match std::fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DemoError::Io {
                context: format!("removing {}", self.root.display()),
                source: e,
            }),
            _ => Ok(()),
        }
    }
}
