//! Cleanup: removes what crashed or killed git processes leave behind.
//!
//! - [`remove_abandoned_locks`]: every lock file of git, whatever its age,
//!   for a caller that holds the repository's lock (every git of the node
//!   that writes to a repository runs under it, so none can own them).
//! - [`clean_stale_files`]: as Gitaly's housekeeping does, stale lock files,
//!   temporary object files and empty directories under `refs/`, only when
//!   old enough that no running git can still own them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A ref lock this old belongs to a git that is gone.
pub const STALE_LOCK: Duration = Duration::from_secs(60 * 60);
/// A config lock this old belongs to a git that is gone.
pub const STALE_CONFIG_LOCK: Duration = Duration::from_secs(15 * 60);
/// An object being written this long ago was abandoned.
pub const STALE_TEMPORARY_OBJECT: Duration = Duration::from_secs(24 * 60 * 60);
/// Directories under refs/ that git itself keeps.
const KEPT_REF_DIRS: [&str; 3] = ["refs", "refs/heads", "refs/tags"];

/// Where git keeps lock files below a repository's top level: ref, reflog
/// and reftable locks, commit-graph and multi-pack-index locks.
const LOCK_DIRS: [&str; 5] = ["refs", "logs", "reftable", "objects/info", "objects/pack"];
/// Files at the top level that act as locks without the `.lock` suffix:
/// `git gc`'s pid file, and the temporary file git writes `packed-refs`
/// through, which it creates exclusively.
const TOP_LEVEL_LOCKS: [&str; 2] = ["gc.pid", "packed-refs.new"];

/// Removes every lock file of git in the bare repository at `repo`, whatever
/// its age, and returns their paths relative to `repo`. Only for a caller
/// that holds the repository's lock, so that no git of the node holds them.
pub fn remove_abandoned_locks(repo: &Path) -> io::Result<Vec<PathBuf>> {
    let is_lock = |name: &str| name.ends_with(".lock");
    let mut removed = Vec::new();
    remove_files(repo, Path::new(""), false, &mut removed, &|name| {
        is_lock(name) || TOP_LEVEL_LOCKS.contains(&name)
    })?;
    for dir in LOCK_DIRS {
        remove_files(repo, Path::new(dir), true, &mut removed, &is_lock)?;
    }
    Ok(removed)
}

/// Removes the regular files in `repo/rel` (and below it when `deep`) whose
/// names `wanted` picks, adding their paths relative to `repo` to `removed`.
fn remove_files(
    repo: &Path,
    rel: &Path,
    deep: bool,
    removed: &mut Vec<PathBuf>,
    wanted: &dyn Fn(&str) -> bool,
) -> io::Result<()> {
    let entries = match fs::read_dir(repo.join(rel)) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let child = rel.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() && deep {
            remove_files(repo, &child, deep, removed, wanted)?;
        } else if kind.is_file() && wanted(&entry.file_name().to_string_lossy()) {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed.push(child),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Removes stale files in the bare repository at `repo` and says how many.
pub fn clean_stale_files(repo: &Path, now: SystemTime) -> io::Result<usize> {
    let mut removed = 0;
    for (name, age) in [
        ("config.lock", STALE_CONFIG_LOCK),
        ("packed-refs.lock", STALE_LOCK),
        ("packed-refs.new", STALE_LOCK),
        ("HEAD.lock", STALE_LOCK),
        ("index.lock", STALE_LOCK),
        ("shallow.lock", STALE_LOCK),
    ] {
        removed += remove_if_older(&repo.join(name), now, age)?;
    }
    removed += clean_tree(repo, Path::new("refs"), now, &|p: &Path| {
        p.extension()
            .is_some_and(|e| e == "lock")
            .then_some(STALE_LOCK)
    })?;
    removed += clean_tree(repo, Path::new("objects"), now, &|p: &Path| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        (name.starts_with("tmp_") || name.ends_with(".lock")).then_some(STALE_TEMPORARY_OBJECT)
    })?;
    Ok(removed)
}

fn age(meta: &fs::Metadata, now: SystemTime) -> Duration {
    meta.modified()
        .ok()
        .and_then(|m| now.duration_since(m).ok())
        .unwrap_or_default()
}

fn remove_if_older(path: &Path, now: SystemTime, max: Duration) -> io::Result<usize> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() && age(&meta, now) > max => match fs::remove_file(path) {
            Ok(()) => Ok(1),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        },
        Ok(_) => Ok(0),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Walks `repo/rel` depth first: removes files `stale` gives an age limit for
/// once they pass it, and, under refs/, empty directories older than
/// [`STALE_LOCK`]. Returns how many entries went.
fn clean_tree(
    repo: &Path,
    rel: &Path,
    now: SystemTime,
    stale: &dyn Fn(&Path) -> Option<Duration>,
) -> io::Result<usize> {
    let dir = repo.join(rel);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let child = rel.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            removed += clean_tree(repo, &child, now, stale)?;
        } else if kind.is_file()
            && let Some(max) = stale(&child)
        {
            removed += remove_if_older(&entry.path(), now, max)?;
        }
    }
    let is_ref_dir = rel.starts_with("refs");
    let kept = KEPT_REF_DIRS.iter().any(|k| rel == Path::new(k));
    if is_ref_dir && !kept {
        let meta = fs::symlink_metadata(&dir)?;
        let empty = fs::read_dir(&dir)?.next().is_none();
        if empty && age(&meta, now) > STALE_LOCK {
            // Another git may have filled it since: then it is not removed.
            match fs::remove_dir(&dir) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age_file(path: &Path, by: Duration) {
        let f = fs::File::options().read(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - by).unwrap();
    }

    #[test]
    fn old_locks_and_empty_ref_dirs_go_and_fresh_ones_stay() {
        let repo = tempfile::tempdir().unwrap();
        let r = repo.path();
        fs::create_dir_all(r.join("refs/heads/old")).unwrap();
        fs::create_dir_all(r.join("refs/tags")).unwrap();
        fs::create_dir_all(r.join("objects/pack")).unwrap();
        for f in [
            "refs/heads/main.lock",
            "packed-refs.lock",
            "objects/pack/tmp_pack_x",
        ] {
            fs::write(r.join(f), "").unwrap();
            age_file(&r.join(f), Duration::from_secs(2 * 24 * 3600));
        }
        fs::write(r.join("refs/heads/fresh.lock"), "").unwrap();
        fs::write(r.join("config.lock"), "").unwrap();
        age_file(&r.join("refs/heads/old"), Duration::from_secs(2 * 3600));
        let n = clean_stale_files(r, SystemTime::now()).unwrap();
        assert_eq!(n, 4);
        assert!(r.join("refs/heads/fresh.lock").exists());
        assert!(r.join("config.lock").exists());
        assert!(!r.join("refs/heads/old").exists());
        assert!(r.join("refs/heads").exists() && r.join("refs/tags").exists());
    }

    #[test]
    fn every_lock_file_goes_whatever_its_age_and_nothing_else() {
        let repo = tempfile::tempdir().unwrap();
        let r = repo.path();
        for d in [
            "refs/heads/topic",
            "objects/info/commit-graphs",
            "objects/pack",
        ] {
            fs::create_dir_all(r.join(d)).unwrap();
        }
        let locks = [
            "HEAD.lock",
            "config.lock",
            "gc.pid",
            "packed-refs.lock",
            "packed-refs.new",
            "objects/info/commit-graphs/commit-graph-chain.lock",
            "objects/pack/multi-pack-index.lock",
            "refs/heads/topic/x.lock",
        ];
        let kept = [
            "HEAD",
            "config",
            "packed-refs",
            "refs/heads/main",
            "objects/pack/pack-1.pack",
            "objects/pack/tmp_pack_1",
        ];
        for f in locks.iter().chain(&kept) {
            fs::write(r.join(f), "").unwrap();
        }
        let mut removed = remove_abandoned_locks(r).unwrap();
        removed.sort();
        let mut expected: Vec<PathBuf> = locks.iter().map(PathBuf::from).collect();
        expected.sort();
        assert_eq!(removed, expected);
        for f in kept {
            assert!(r.join(f).exists(), "{f}");
        }
        assert_eq!(remove_abandoned_locks(r).unwrap(), Vec::<PathBuf>::new());
    }
}
