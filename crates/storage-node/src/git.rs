//! Runs the system `git` binary: explicit arguments, never a shell, and a
//! clean environment (no system, global or user configuration, no hooks, no
//! prompts), so a repository behaves the same whoever starts the node.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use tokio::process::Command;
use tonic::Status;

/// What a finished git command left behind.
#[derive(Debug)]
pub struct GitOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl GitOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// A git invocation: `git [--git-dir=DIR] -c core.hooksPath=/dev/null ARGS`,
/// run from `cwd` with `home` as `$HOME`.
pub struct Git<'a> {
    home: &'a Path,
    cwd: &'a Path,
    git_dir: Option<&'a Path>,
}

/// `git [--git-dir DIR] -c core.hooksPath=/dev/null`, run from `cwd` with
/// `home` as `$HOME` and nothing else of the caller's environment but `PATH`;
/// stdin closed and output captured unless the caller changes them. The
/// demo's own git commands use it too, so both see repositories alike.
pub fn clean_command(home: &Path, cwd: &Path, git_dir: Option<&Path>) -> Command {
    let mut cmd = Command::new("git");
    cmd.env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ATTR_NOSYSTEM", "1")
        .env("LC_ALL", "C")
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A cancelled call must not leave git running.
        .kill_on_drop(true);
    if let Some(dir) = git_dir {
        cmd.arg("--git-dir").arg(dir);
    }
    // Replicated repositories bring no hooks, and none are wanted.
    cmd.args(["-c", "core.hooksPath=/dev/null"]);
    cmd
}

impl<'a> Git<'a> {
    /// Git for the repository at `git_dir`.
    pub fn in_repo(home: &'a Path, git_dir: &'a Path) -> Self {
        Git {
            home,
            cwd: git_dir,
            git_dir: Some(git_dir),
        }
    }

    /// Git outside any repository (`init`), run from `cwd`.
    pub fn outside(home: &'a Path, cwd: &'a Path) -> Self {
        Git {
            home,
            cwd,
            git_dir: None,
        }
    }

    fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = clean_command(self.home, self.cwd, self.git_dir);
        cmd.args(args);
        cmd
    }

    /// Runs git and returns its output whatever the exit code.
    pub async fn output<I, S>(&self, args: I) -> Result<GitOutput, Status>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self
            .command(args)
            .output()
            .await
            .map_err(|e| Status::internal(format!("cannot start git: {e}")))?;
        Ok(GitOutput {
            status: out.status,
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    /// Runs git; a non-zero exit is `Internal` carrying git's stderr.
    pub async fn run<I, S>(&self, args: I) -> Result<GitOutput, Status>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.output(&args).await?;
        if out.status.success() {
            Ok(out)
        } else {
            let shown: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
            Err(Status::internal(format!(
                "git {} failed ({}): {}",
                shown.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}
