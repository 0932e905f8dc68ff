//! The git commands the demo runs itself: building repositories on the
//! source storage and reading refs to compare replicas. They run in the
//! storage node's clean environment (no system or user config, no hooks, no
//! prompts), so the result does not depend on who runs the demo.

use crate::error::DemoError;
use std::path::Path;
use std::process::Stdio;
use storage_node::git::clean_command;
use tokio::io::AsyncWriteExt;

/// Runs `git [--git-dir DIR] ARGS` with `input` on stdin; returns stdout.
pub async fn run(
    home: &Path,
    git_dir: Option<&Path>,
    args: &[&str],
    input: Option<&[u8]>,
) -> Result<String, DemoError> {
    let cwd = git_dir.unwrap_or(home);
    let failed = |message: String| DemoError::Git {
        args: args.join(" "),
        dir: cwd.display().to_string(),
        message,
    };
    let mut cmd = clean_command(home, cwd, git_dir);
    if input.is_some() {
        cmd.stdin(Stdio::piped());
    }
    cmd.args(args);
    let mut child = cmd
        .spawn()
        .map_err(|e| failed(format!("cannot start git (is it installed?): {e}")))?;
    if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(bytes)
            .await
            .map_err(|e| failed(format!("writing to git's stdin: {e}")))?;
        // Closing stdin tells git the input is complete.
        drop(stdin);
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| failed(format!("waiting for git: {e}")))?;
    if !out.status.success() {
        return Err(failed(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a replica is compared on: every ref with its object id, and where
/// HEAD points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refs {
    /// `<object id> <ref name>` lines, sorted by ref name.
    pub lines: Vec<String>,
    pub head: String,
}

impl Refs {
    pub fn count(&self) -> usize {
        self.lines.len()
    }
}

/// Reads a bare repository's refs and HEAD (`git for-each-ref`, `git symbolic-ref`).
pub async fn refs(home: &Path, repo: &Path) -> Result<Refs, DemoError> {
    let listed = run(
        home,
        Some(repo),
        &["for-each-ref", "--format=%(objectname) %(refname)"],
        None,
    )
    .await?;
    let head = run(home, Some(repo), &["symbolic-ref", "HEAD"], None).await?;
    Ok(Refs {
        lines: listed.lines().map(str::to_owned).collect(),
        head: head.trim().to_owned(),
    })
}

/// Runs `git fsck --full --no-dangling`; `Err` carries git's complaint.
pub async fn fsck(home: &Path, repo: &Path) -> Result<(), String> {
    run(home, Some(repo), &["fsck", "--full", "--no-dangling"], None)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
