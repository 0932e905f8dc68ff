//! The `gitaly-replicator` binary as a child process, for tests that must
//! signal or kill a process.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

pub struct ReplicatorProcess {
    pub child: Child,
    _dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// Everything the process wrote to stderr so far. Read continuously: a
    /// full pipe would block the process's logging and stall it.
    pub stderr: Arc<Mutex<String>>,
    reader: JoinHandle<()>,
}

impl ReplicatorProcess {
    /// Writes `toml` to a temp file and runs `gitaly-replicator run` on it.
    pub fn run(toml: &str) -> ReplicatorProcess {
        Self::spawn(toml, &["run"])
    }

    pub fn spawn(toml: &str, args: &[&str]) -> ReplicatorProcess {
        Self::spawn_with_env(toml, args, &[])
    }

    /// Like `spawn`, with `env` set too (after `RUST_LOG=info`, so it may
    /// change the level).
    pub fn spawn_with_env(toml: &str, args: &[&str], env: &[(&str, &str)]) -> ReplicatorProcess {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, toml).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_gitaly-replicator"))
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        ReplicatorProcess {
            child,
            _dir: dir,
            config_path,
            stderr,
            reader,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id().map(|p| p as i32).unwrap_or(0)
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for exit and returns (exit code, stderr).
    pub async fn wait(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().await.unwrap();
        let _ = (&mut self.reader).await;
        let stderr = self.stderr.lock().unwrap().clone();
        (status.code(), stderr)
    }
}
