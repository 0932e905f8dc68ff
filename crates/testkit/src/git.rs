//! Git commands on the bare repositories the storage-node tests work on.
//! Every command runs without the system's or the user's git config, with a
//! fixed identity, so results do not depend on the machine.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

pub fn git_cmd(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com");
    cmd
}

/// Runs git in `dir` with `input` on stdin; panics unless it succeeds.
pub fn git_with_input(dir: &Path, args: &[&str], input: &str) -> String {
    let mut child = git_cmd(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    git_with_input(dir, args, "")
}

pub fn init_bare(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    git(
        path,
        &["init", "--bare", "--quiet", "--initial-branch=main"],
    );
}

/// A new commit on `branch` holding `content` in `file.txt`; returns its id.
pub fn commit(repo: &Path, branch: &str, content: &str) -> String {
    let blob = git_with_input(repo, &["hash-object", "-w", "--stdin"], content);
    let tree = git_with_input(
        repo,
        &["mktree"],
        &format!("100644 blob {blob}\tfile.txt\n"),
    );
    let reference = format!("refs/heads/{branch}");
    let parent = git_cmd(repo)
        .args(["rev-parse", "--verify", "--quiet", &reference])
        .output()
        .unwrap();
    let parent = String::from_utf8(parent.stdout).unwrap().trim().to_owned();
    let mut args = vec!["commit-tree", &tree, "-m", content];
    if !parent.is_empty() {
        args.extend(["-p", &parent]);
    }
    let commit = git(repo, &args);
    git(repo, &["update-ref", &reference, &commit]);
    commit
}

/// Two commits on main, a feature and a stale branch, an annotated and a
/// lightweight tag.
pub fn populate(repo: &Path) {
    init_bare(repo);
    commit(repo, "main", "one");
    let two = commit(repo, "main", "two");
    commit(repo, "feature", "feature work");
    commit(repo, "stale", "to be deleted");
    git(repo, &["tag", "-a", "v1", "-m", "release 1", &two]);
    git(repo, &["update-ref", "refs/tags/light", &two]);
}

/// `<oid> <ref>` lines plus where HEAD points.
pub fn refs(repo: &Path) -> String {
    let refs = git(repo, &["for-each-ref", "--format=%(objectname) %(refname)"]);
    let head = git(repo, &["symbolic-ref", "HEAD"]);
    format!("{refs}\nHEAD -> {head}")
}

pub fn assert_fsck_clean(repo: &Path) {
    let out = git_cmd(repo)
        .args(["fsck", "--full", "--strict", "--no-dangling"])
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "git fsck in {}: {}{}",
        repo.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
