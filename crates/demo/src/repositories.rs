//! The demo's repositories: bare repositories on the source storage with
//! real commits, branches and tags, built by one `git fast-import` each (a
//! few milliseconds), sized a little differently from one another, and
//! recorded in Postgres as Praefect would after creating them: the source
//! replica at generation 1, the targets without a record.

use crate::error::DemoError;
use crate::git;
use crate::nodes::{SOURCE, VIRTUAL_STORAGE};
use futures::stream::{self, StreamExt, TryStreamExt};
use gitaly_replicator::RepositoryStore;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::path::Path;

/// The generation the source replica is recorded at.
pub const SOURCE_GENERATION: i64 = 1;

/// What one repository holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositorySpec {
    /// Gitaly's hashed layout: `@hashed/ab/cd/abcd….git`.
    pub relative_path: String,
    /// Commits on `main`.
    pub main_commits: usize,
    /// Branches besides `main`, each a few commits off it.
    pub branches: usize,
    /// Annotated tags; one lightweight tag comes on top.
    pub annotated_tags: usize,
    /// Bytes of the file each commit writes.
    pub file_size: usize,
}

impl RepositorySpec {
    /// The `i`-th repository: sizes vary with `i` but are the same every run.
    pub fn nth(i: usize) -> RepositorySpec {
        let hash = hex::encode(Sha256::digest(format!("demo-project-{i}").as_bytes()));
        RepositorySpec {
            relative_path: format!("@hashed/{}/{}/{hash}.git", &hash[..2], &hash[2..4]),
            // At least 30 commits (120 objects): more than git's
            // `transfer.unpackLimit` (100), so a replica keeps the pack it
            // receives, as a real one would, instead of loose objects.
            main_commits: 30 + (i * 7) % 20,
            branches: 1 + i % 3,
            annotated_tags: 1 + i % 2,
            file_size: 256 << (i % 5),
        }
    }

    pub fn commits(&self) -> usize {
        self.main_commits + (0..self.branches).map(|b| 1 + b % 2).sum::<usize>()
    }

    /// Refs the repository ends with: branches (main included) and tags.
    pub fn refs(&self) -> usize {
        1 + self.branches + self.annotated_tags + 1
    }

    /// The `git fast-import` input that builds the repository.
    pub fn fast_import_stream(&self, seed: usize) -> Vec<u8> {
        let mut out = String::new();
        let mut mark = 0usize;
        let mut main_marks = Vec::new();
        let mut rng = Lcg(seed as u64 * 7919 + 17);
        let mut commit = |out: &mut String, branch: &str, from: Option<usize>, n: usize| {
            mark += 1;
            let when = 1_700_000_000 + seed as u64 * 86_400 + n as u64 * 600;
            let message = format!("{branch}: change {n}\n");
            let mut content = String::with_capacity(self.file_size + 64);
            while content.len() < self.file_size {
                let _ = writeln!(content, "{:016x} line of change {n}", rng.next());
            }
            let _ = write!(
                out,
                "commit refs/heads/{branch}\nmark :{mark}\n\
                 author Demo Author <demo@example.com> {when} +0000\n\
                 committer Demo Author <demo@example.com> {when} +0000\n\
                 data {}\n{message}",
                message.len()
            );
            if let Some(from) = from {
                let _ = writeln!(out, "from :{from}");
            }
            let _ = write!(
                out,
                "M 100644 inline data/{branch}-{n}.txt\ndata {}\n{content}\n\n",
                content.len()
            );
            mark
        };
        for n in 0..self.main_commits {
            main_marks.push(commit(&mut out, "main", None, n));
        }
        for b in 0..self.branches {
            let base = main_marks[b.min(main_marks.len() - 1)];
            let branch = format!("feature/{b}");
            for n in 0..1 + b % 2 {
                commit(&mut out, &branch, (n == 0).then_some(base), n);
            }
        }
        for t in 0..self.annotated_tags {
            let at = main_marks[(t * 2).min(main_marks.len() - 1)];
            let message = format!("release 1.{t}\n");
            let _ = write!(
                out,
                "tag v1.{t}\nfrom :{at}\n\
                 tagger Demo Author <demo@example.com> 1700000000 +0000\n\
                 data {}\n{message}\n",
                message.len()
            );
        }
        let last = main_marks[main_marks.len() - 1];
        let _ = write!(out, "reset refs/tags/latest\nfrom :{last}\n\n");
        out.into_bytes()
    }
}

/// A small deterministic generator for file contents (no dependency on `rand`'s
/// algorithm, so every run builds the same repositories).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 11
    }
}

/// The repositories of a run with `count` of them.
pub fn plan(count: usize) -> Vec<RepositorySpec> {
    (0..count).map(RepositorySpec::nth).collect()
}

/// Builds every repository under `storage_dir` (a few at a time) and
/// records it in Postgres.
pub async fn create_all(
    specs: &[RepositorySpec],
    storage_dir: &Path,
    git_home: &Path,
    store: &RepositoryStore,
) -> Result<(), DemoError> {
    stream::iter(specs.iter().enumerate())
        .map(|(i, spec)| create(spec, i, storage_dir, git_home, store))
        .buffer_unordered(4)
        .try_collect::<Vec<()>>()
        .await
        .map(|_| ())
}

async fn create(
    spec: &RepositorySpec,
    seed: usize,
    storage_dir: &Path,
    git_home: &Path,
    store: &RepositoryStore,
) -> Result<(), DemoError> {
    let path = storage_dir.join(&spec.relative_path);
    std::fs::create_dir_all(&path)
        .map_err(DemoError::io(format!("creating {}", path.display())))?;
    git::run(
        git_home,
        Some(&path),
        &["init", "--bare", "--quiet", "--initial-branch=main"],
        None,
    )
    .await?;
    git::run(
        git_home,
        Some(&path),
        &["fast-import", "--quiet"],
        Some(&spec.fast_import_stream(seed)),
    )
    .await?;
    store
        .create_repository(
            VIRTUAL_STORAGE,
            &spec.relative_path,
            SOURCE,
            SOURCE_GENERATION,
            &[SOURCE],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_vary_and_paths_follow_the_hashed_layout() {
        let specs = plan(6);
        assert!(specs.iter().all(|s| {
            s.relative_path.starts_with("@hashed/") && s.relative_path.len() == 8 + 6 + 64 + 4
        }));
        let sizes: std::collections::HashSet<_> = specs
            .iter()
            .map(|s| (s.main_commits, s.file_size))
            .collect();
        assert_eq!(sizes.len(), 6);
        assert_eq!(specs[0], RepositorySpec::nth(0));
    }
}
