//! Creating, removing and renaming repositories. Each change appears at once
//! or not at all: a new repository is built in a scratch directory and
//! renamed into place; a removed one is first renamed out of the way.

use crate::git::Git;
use crate::storage::{RepoPath, io_status};
use gitaly_wire::proto::gitaly::ObjectFormat;
use std::path::Path;
use tonic::Status;

/// `git init --bare` in scratch space, then into place. The caller holds the
/// repository's lock.
pub async fn create(
    repo: &RepoPath,
    default_branch: &[u8],
    object_format: i32,
) -> Result<(), Status> {
    if repo.path.exists() {
        return Err(Status::already_exists(format!(
            "repository already exists: {:?}",
            repo.relative
        )));
    }
    let mut args = vec!["init".to_owned(), "--bare".to_owned(), "--quiet".to_owned()];
    if !default_branch.is_empty() {
        let branch = std::str::from_utf8(default_branch)
            .map_err(|_| Status::invalid_argument("default branch is not UTF-8"))?;
        let branch = branch.strip_prefix("refs/heads/").unwrap_or(branch);
        args.push(format!("--initial-branch={branch}"));
    }
    match ObjectFormat::try_from(object_format) {
        Ok(ObjectFormat::Unspecified) | Ok(ObjectFormat::Sha1) => {}
        Ok(ObjectFormat::Sha256) => args.push("--object-format=sha256".into()),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown object format {object_format}"
            )));
        }
    }
    let scratch = repo
        .storage
        .temp_dir("create")
        .map_err(|e| io_status("creating scratch directory", e))?;
    let fresh = scratch.path().join("repo");
    args.push("--".into());
    args.push(fresh.to_string_lossy().into_owned());
    Git::outside(&repo.storage.home, scratch.path())
        .run(&args)
        .await?;
    move_into_place(&fresh, &repo.path)
}

/// Renames a finished repository directory to its place, creating parents.
pub fn move_into_place(from: &Path, to: &Path) -> Result<(), Status> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_status("creating parent directories", e))?;
    }
    if to.exists() {
        return Err(Status::already_exists(format!(
            "{} appeared meanwhile",
            to.display()
        )));
    }
    std::fs::rename(from, to).map_err(|e| io_status("moving the repository into place", e))
}

/// Removes an existing repository: renamed into scratch space first, so it
/// vanishes at once, then deleted. The caller holds the lock and checked it exists.
pub async fn remove(repo: &RepoPath) -> Result<(), Status> {
    let scratch = repo
        .storage
        .temp_dir("remove")
        .map_err(|e| io_status("creating scratch directory", e))?;
    std::fs::rename(&repo.path, scratch.path().join("repo"))
        .map_err(|e| io_status("moving the repository away", e))?;
    // The scratch guard deletes it, off the async threads.
    tokio::task::spawn_blocking(move || drop(scratch))
        .await
        .map_err(|e| Status::internal(format!("removing the repository: {e}")))
}

/// Renames an existing repository to `to`, which must be free. The caller
/// holds both locks.
pub fn rename(from: &RepoPath, to: &RepoPath) -> Result<(), Status> {
    if to.path.exists() {
        return Err(Status::already_exists(format!(
            "target repository already exists: {:?}",
            to.relative
        )));
    }
    move_into_place(&from.path, &to.path)
}
