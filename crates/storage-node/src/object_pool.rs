//! Object pools as the node sees them: a repository borrows a pool's objects
//! through `objects/info/alternates`; the pool is reported when that file
//! points at a repository of the same storage.

use crate::snapshot::alternates;
use crate::storage::{RepoPath, io_status, is_git_dir};
use std::path::{Component, PathBuf};
use tonic::Status;

/// The relative path of the pool the repository borrows from, if it borrows
/// from a repository of its own storage.
pub fn pool_of(repo: &RepoPath) -> Option<String> {
    let root = &repo.storage.root;
    alternates(&repo.path.join("objects"))
        .into_iter()
        .filter_map(|objects| objects.canonicalize().ok())
        .filter(|objects| objects.file_name().is_some_and(|n| n == "objects"))
        .filter_map(|objects| objects.parent().map(PathBuf::from))
        .filter(|pool| is_git_dir(pool))
        .find_map(|pool| {
            let rel = pool.strip_prefix(root).ok()?;
            let normal = rel.components().all(|c| matches!(c, Component::Normal(_)));
            (normal && !rel.as_os_str().is_empty()).then(|| rel.to_string_lossy().into_owned())
        })
}

/// Points the repository's alternates at the pool's objects, by a path
/// relative to the repository's `objects` (it survives moving the storage).
/// Replaces the file atomically; linking again to the same pool changes nothing.
pub fn link(repo: &RepoPath, pool: &RepoPath) -> Result<(), Status> {
    if repo.path == pool.path {
        return Err(Status::invalid_argument(
            "a repository cannot be its own object pool",
        ));
    }
    let depth = repo
        .path
        .strip_prefix(&repo.storage.root)
        .map(|rel| rel.components().count())
        .unwrap_or_default();
    let mut target = PathBuf::new();
    // From <repo>/objects up to the storage root, then down into the pool.
    for _ in 0..=depth {
        target.push("..");
    }
    let pool_rel = pool
        .path
        .strip_prefix(&pool.storage.root)
        .map_err(|_| Status::internal("pool path outside its storage"))?;
    target.push(pool_rel);
    target.push("objects");
    let line = format!("{}\n", target.to_string_lossy());

    let info = repo.path.join("objects").join("info");
    let file = info.join("alternates");
    if std::fs::read_to_string(&file).is_ok_and(|current| current == line) {
        return Ok(());
    }
    std::fs::create_dir_all(&info).map_err(|e| io_status("creating objects/info", e))?;
    let tmp = info.join(format!("alternates.{}.tmp", uuid::Uuid::new_v4()));
    std::fs::write(&tmp, &line).map_err(|e| io_status("writing alternates", e))?;
    std::fs::rename(&tmp, &file).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_status("replacing alternates", e)
    })
}
