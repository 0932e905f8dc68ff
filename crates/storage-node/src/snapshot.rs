//! The snapshot format of `GetSnapshot`, as Gitaly makes it: a tar of the bare
//! repository's `HEAD`, `packed-refs`, `refs/` and `objects/`, with the
//! objects of its alternates (an object pool) copied in so that the snapshot
//! stands alone. Configuration and hooks never travel: a snapshot comes from
//! another machine, and git runs commands named in a repository's config.
//!
//! Both directions are blocking code (std I/O); callers run them with
//! `spawn_blocking`.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use tar::{EntryType, HeaderMode};

/// Top-level names a snapshot may hold; anything else in an archive is skipped.
const TOP_LEVEL: [&str; 4] = ["HEAD", "packed-refs", "refs", "objects"];
/// Files under `objects/info` that point elsewhere on the sender's disk.
const FOREIGN: [&str; 2] = ["alternates", "http-alternates"];
/// The configuration a received snapshot gets: a plain bare repository.
const SNAPSHOT_CONFIG: &str = "[core]\n\trepositoryformatversion = 0\n\tbare = true\n";

/// Writes the snapshot of the repository at `repo` to `out`. Refs come
/// before objects: git writes objects before the refs that name them, so a
/// ref seen in the archive has its objects there too.
pub fn write_snapshot<W: Write>(repo: &Path, out: W) -> io::Result<W> {
    let mut tar = tar::Builder::new(out);
    tar.mode(HeaderMode::Deterministic);
    tar.follow_symlinks(false);
    let mut seen = HashSet::new();
    add_file(&mut tar, &mut seen, &repo.join("HEAD"), Path::new("HEAD"))?;
    add_file(
        &mut tar,
        &mut seen,
        &repo.join("packed-refs"),
        Path::new("packed-refs"),
    )?;
    add_tree(
        &mut tar,
        &mut seen,
        &repo.join("refs"),
        Path::new("refs"),
        &|_| true,
    )?;
    let objects = repo.join("objects");
    add_tree(
        &mut tar,
        &mut seen,
        &objects,
        Path::new("objects"),
        &|rel| !is_foreign(rel) && !is_temporary(rel),
    )?;
    for alternate in alternates(&objects) {
        // Only what makes the objects whole: packs with their index, loose objects.
        add_tree(
            &mut tar,
            &mut seen,
            &alternate,
            Path::new("objects"),
            &|rel| {
                let name = rel.to_string_lossy();
                let in_pack_dir = rel.starts_with("pack");
                let is_loose = rel.components().count() == 2 && name.len() == 41;
                (in_pack_dir && (name.ends_with(".pack") || name.ends_with(".idx"))) || is_loose
            },
        )?;
    }
    tar.into_inner()
}

fn is_foreign(rel: &Path) -> bool {
    rel.parent() == Some(Path::new("info"))
        && FOREIGN.iter().any(|f| rel.file_name() == Some(f.as_ref()))
}

fn is_temporary(rel: &Path) -> bool {
    let name = rel.to_string_lossy();
    let file = rel
        .file_name()
        .map(|f| f.to_string_lossy())
        .unwrap_or_default();
    file.starts_with("tmp_") || file.ends_with(".lock") || name.starts_with("incoming-")
}

/// The object directories named in `objects/info/alternates` (absolute, or
/// relative to `objects`), those that exist.
pub fn alternates(objects: &Path) -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string(objects.join("info").join("alternates")) else {
        return Vec::new();
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| objects.join(l))
        .filter(|p| p.is_dir())
        .collect()
}

fn add_file<W: Write>(
    tar: &mut tar::Builder<W>,
    seen: &mut HashSet<PathBuf>,
    path: &Path,
    name: &Path,
) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_file() || !seen.insert(name.to_path_buf()) {
        return Ok(());
    }
    match File::open(path) {
        Ok(mut file) => tar.append_file(name, &mut file),
        // Gone since it was listed (a loose object packed meanwhile).
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Adds the regular files under `dir` (no symlinks), named `prefix/<rel>`,
/// that `keep(rel)` accepts.
fn add_tree<W: Write>(
    tar: &mut tar::Builder<W>,
    seen: &mut HashSet<PathBuf>,
    dir: &Path,
    prefix: &Path,
    keep: &dyn Fn(&Path) -> bool,
) -> io::Result<()> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let entries = match fs::read_dir(dir.join(&rel)) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut names: Vec<_> = entries.collect::<io::Result<_>>()?;
        names.sort_by_key(|e| e.file_name());
        for entry in names {
            let child = rel.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(child);
            } else if kind.is_file() && keep(&child) && !child.to_string_lossy().ends_with(".lock")
            {
                add_file(tar, seen, &entry.path(), &prefix.join(&child))?;
            }
        }
    }
    Ok(())
}

/// Unpacks a snapshot into the empty directory `dest`, keeping only regular
/// files and directories under the snapshot's top-level names, and makes it a
/// bare repository git can fetch from. An entry that climbs out of `dest` is
/// an error; links are never created.
pub fn unpack_snapshot<R: Read>(input: R, dest: &Path) -> io::Result<()> {
    let mut archive = tar::Archive::new(input);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw = entry.path()?.into_owned();
        let Some(rel) = accepted_path(&raw)? else {
            continue;
        };
        let target = dest.join(&rel);
        match entry.header().entry_type() {
            EntryType::Regular | EntryType::Continuous => {
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent)?;
                }
                let mut file = File::create(&target)?;
                io::copy(&mut entry, &mut file)?;
            }
            EntryType::Directory => fs::create_dir_all(&target)?,
            _ => {}
        }
    }
    if !dest.join("HEAD").is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the snapshot has no HEAD",
        ));
    }
    fs::create_dir_all(dest.join("refs"))?;
    fs::create_dir_all(dest.join("objects"))?;
    fs::write(dest.join("config"), SNAPSHOT_CONFIG)?;
    Ok(())
}

/// The archive path made relative and checked: `None` to skip it.
fn accepted_path(raw: &Path) -> io::Result<Option<PathBuf>> {
    let mut rel = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(name) => rel.push(name),
            Component::CurDir => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("snapshot entry {raw:?} leaves the repository"),
                ));
            }
        }
    }
    let top = rel.components().next().map(|c| c.as_os_str().to_owned());
    let allowed = top.is_some_and(|t| TOP_LEVEL.iter().any(|name| t == *name));
    let foreign = rel.strip_prefix("objects").is_ok_and(is_foreign);
    Ok((allowed && !foreign).then_some(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_paths_are_filtered_and_escapes_refused() {
        let ok = |p: &str| accepted_path(Path::new(p)).unwrap();
        assert_eq!(
            ok("./refs/heads/main"),
            Some(PathBuf::from("refs/heads/main"))
        );
        assert_eq!(ok("HEAD"), Some(PathBuf::from("HEAD")));
        assert_eq!(ok("config"), None);
        assert_eq!(ok("hooks/post-receive"), None);
        assert_eq!(ok("objects/info/alternates"), None);
        assert!(accepted_path(Path::new("../x")).is_err());
        assert!(accepted_path(Path::new("/etc/passwd")).is_err());
    }
}
