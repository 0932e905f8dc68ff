//! Runs the system `git` binary: explicit arguments, never a shell, and a
//! clean environment (no system, global or user configuration, no hooks, no
//! prompts), so a repository behaves the same whoever starts the node.
//!
//! A git that was started runs to its end, even when the call that started
//! it is dropped: killed in the middle of a ref transaction, git leaves its
//! lock files behind and every later write to the repository fails. Callers
//! that change a repository run git in a task of their own
//! ([`StorageNode::change`](crate::node::StorageNode::change)). On Linux,
//! git is stopped with SIGTERM, which lets it remove its lock files, when the
//! node dies first.

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
///
/// Dropping the command's future does not stop git. On Linux git gets
/// SIGTERM when the thread that started it ends, so start it from a thread
/// that lives as long as the node (an async runtime's worker, not a
/// `spawn_blocking` thread).
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
        .stderr(Stdio::piped());
    #[cfg(target_os = "linux")]
    stop_with_the_node(&mut cmd);
    if let Some(dir) = git_dir {
        cmd.arg("--git-dir").arg(dir);
    }
    // Replicated repositories bring no hooks, and none are wanted.
    cmd.args(["-c", "core.hooksPath=/dev/null"]);
    cmd
}

/// Has the kernel send git SIGTERM when the thread that starts it ends,
/// which for the runtime's threads means when the node dies, even by
/// SIGKILL. Git's signal handlers then remove its lock files; an orphan
/// would go on writing to a repository that a restarted node takes to be
/// free of its own git processes. Git's own children are not covered.
#[cfg(target_os = "linux")]
fn stop_with_the_node(cmd: &mut Command) {
    let node = std::process::id();
    let set_death_signal = move || {
        // SAFETY: prctl with PR_SET_PDEATHSIG only changes this process's
        // death signal; it is async-signal-safe, as fork requires here.
        let set = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) };
        if set != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The node may have died before the signal was asked for.
        if std::os::unix::process::parent_id() != node {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the closure runs between fork and exec; it allocates nothing
    // and makes only async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(set_death_signal);
    }
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Whether the process `pid` has ended (a zombie or reaped).
    fn ended(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
            Err(_) => true,
        }
    }

    #[test]
    fn git_gets_sigterm_when_the_thread_that_started_it_ends() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().to_path_buf();
        // Git reads stdin until its end, which the test keeps open.
        let (reader, _writer) = std::io::pipe().unwrap();
        let pid = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut cmd = clean_command(&dir, &dir, None);
                cmd.stdin(reader).args(["hash-object", "--stdin"]);
                let child = cmd.spawn().unwrap();
                let pid = child.id().unwrap();
                // Forgotten, not dropped: only the end of the thread may stop git.
                std::mem::forget(child);
                pid
            })
        })
        .join()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ended(pid) {
            assert!(Instant::now() < deadline, "git {pid} outlived its thread");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
