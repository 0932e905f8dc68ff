//! Storages and repository paths: maps a `gitaly.Repository` to a directory
//! inside its storage root, refusing anything that would leave the root, and
//! hands out scratch directories under the storage's `+gitaly/tmp`.

use crate::git::Git;
use gitaly_wire::proto::gitaly as pb;
use std::collections::HashMap;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use tonic::Status;

/// The directory inside each storage that belongs to the node, never to a
/// repository (Gitaly reserves the same name).
pub const RESERVED_DIR: &str = "+gitaly";

/// One named storage: a directory of bare repositories.
#[derive(Debug)]
pub struct Storage {
    pub name: String,
    /// Canonical (symlink-free, absolute) root.
    pub root: PathBuf,
    /// Where the node keeps scratch directories; on the storage's file system
    /// so that a finished directory can be renamed into place atomically.
    pub tmp: PathBuf,
    /// An empty directory git sees as `$HOME`, so no user configuration leaks in.
    pub home: PathBuf,
}

/// A repository's place on disk (it may not exist yet).
#[derive(Debug, Clone)]
pub struct RepoPath {
    pub storage: Arc<Storage>,
    /// The relative path as the client sent it.
    pub relative: String,
    /// `root/relative`.
    pub path: PathBuf,
}

/// Every storage of the node, by name.
#[derive(Debug, Default)]
pub struct Storages {
    by_name: HashMap<String, Arc<Storage>>,
}

impl Storages {
    /// Creates missing storage directories and the node's own directories in
    /// each, and canonicalises the roots.
    pub fn open(storages: &[(String, PathBuf)]) -> io::Result<Storages> {
        let mut by_name = HashMap::new();
        for (name, dir) in storages {
            std::fs::create_dir_all(dir)?;
            let root = dir.canonicalize()?;
            let storage = Storage {
                name: name.clone(),
                tmp: root.join(RESERVED_DIR).join("tmp"),
                home: root.join(RESERVED_DIR).join("home"),
                root,
            };
            std::fs::create_dir_all(&storage.tmp)?;
            std::fs::create_dir_all(&storage.home)?;
            by_name.insert(name.clone(), Arc::new(storage));
        }
        Ok(Storages { by_name })
    }

    /// The storage of that name, or `InvalidArgument` as Gitaly answers.
    pub fn get(&self, name: &str) -> Result<&Arc<Storage>, Status> {
        self.by_name
            .get(name)
            .ok_or_else(|| Status::invalid_argument(format!("storage not found: {name:?}")))
    }

    /// Resolves the repository of a request (which must be set).
    pub fn resolve(&self, repository: Option<&pb::Repository>) -> Result<RepoPath, Status> {
        let repository = repository.ok_or_else(|| Status::invalid_argument("empty Repository"))?;
        self.get(&repository.storage_name)?
            .repo(&repository.relative_path)
    }
}

impl Storage {
    /// The repository at `relative` in this storage, if `relative` stays inside it.
    pub fn repo(self: &Arc<Self>, relative: &str) -> Result<RepoPath, Status> {
        let path = self.join(relative)?;
        Ok(RepoPath {
            storage: self.clone(),
            relative: relative.to_owned(),
            path,
        })
    }

    fn join(&self, relative: &str) -> Result<PathBuf, Status> {
        let escapes = || {
            Status::invalid_argument(format!(
                "relative path escapes root directory: {relative:?}"
            ))
        };
        if relative.is_empty() {
            return Err(Status::invalid_argument("empty RelativePath"));
        }
        if relative.contains('\0') {
            return Err(Status::invalid_argument(
                "relative path contains a NUL byte",
            ));
        }
        let mut path = self.root.clone();
        let mut depth = 0;
        for component in Path::new(relative).components() {
            match component {
                Component::Normal(name) => {
                    if depth == 0 && name == RESERVED_DIR {
                        return Err(Status::invalid_argument(format!(
                            "relative path {relative:?} is inside the reserved {RESERVED_DIR} directory"
                        )));
                    }
                    path.push(name);
                    depth += 1;
                }
                Component::CurDir => {}
                Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                    return Err(escapes());
                }
            }
        }
        if depth == 0 {
            return Err(Status::invalid_argument("empty RelativePath"));
        }
        // A symlink on the way may point outside: what exists of the path must
        // still be inside the root once every link is resolved.
        // The root exists, so the walk up ends there at the latest.
        let mut existing = path.as_path();
        let real = loop {
            match existing.canonicalize() {
                Ok(real) => break real,
                Err(_) => existing = existing.parent().ok_or_else(escapes)?,
            }
        };
        let inside = real.starts_with(&self.root) && (real != self.root || existing != path);
        if inside { Ok(path) } else { Err(escapes()) }
    }

    /// A new scratch directory, removed when the guard drops.
    pub fn temp_dir(&self, purpose: &str) -> io::Result<TempDir> {
        let path = self.tmp.join(format!("{purpose}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }
}

impl RepoPath {
    /// Whether a git repository is there: Gitaly's test (HEAD, objects/, refs/).
    pub fn exists(&self) -> bool {
        is_git_dir(&self.path)
    }

    /// Git for this repository.
    pub fn git(&self) -> Git<'_> {
        Git::in_repo(&self.storage.home, &self.path)
    }

    /// `NotFound` unless the repository exists.
    pub fn require(&self) -> Result<(), Status> {
        if self.exists() {
            Ok(())
        } else {
            Err(Status::not_found(format!(
                "repository does not exist: {:?} in storage {:?}",
                self.relative, self.storage.name
            )))
        }
    }
}

/// Gitaly's test for a repository directory.
pub fn is_git_dir(path: &Path) -> bool {
    path.join("HEAD").is_file() && path.join("objects").is_dir() && path.join("refs").is_dir()
}

/// A directory under the storage's `+gitaly/tmp`, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove a scratch directory");
        }
    }
}

/// Maps an I/O failure to `Internal` with what was being done.
pub fn io_status(what: &str, e: io::Error) -> Status {
    Status::internal(format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(dir: &Path) -> Arc<Storage> {
        let storages = Storages::open(&[("s".into(), dir.to_path_buf())]).unwrap();
        storages.get("s").unwrap().clone()
    }

    #[test]
    fn paths_inside_the_root_resolve_and_escapes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = storage(dir.path());
        assert_eq!(s.repo("a/b.git").unwrap().path, s.root.join("a/b.git"));
        assert_eq!(s.repo("./a.git").unwrap().path, s.root.join("a.git"));
        for bad in [
            "",
            ".",
            "../x.git",
            "a/../../x",
            "/etc",
            "+gitaly/tmp",
            "a\0b",
        ] {
            let e = s.repo(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
        std::os::unix::fs::symlink("/tmp", s.root.join("out")).unwrap();
        let e = s.repo("out/x.git").unwrap_err();
        assert!(e.message().contains("escapes root"), "{e:?}");
    }
}
