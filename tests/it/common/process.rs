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

    /// The port of the operations endpoint, from the service's log line
    /// naming the address it bound: the config asks for port 0, so no other
    /// process can take the port between a choice and the bind.
    pub async fn ops_port(&self) -> u16 {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(port) = bound_ops_port(&self.stderr.lock().unwrap()) {
                return port;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the process never said where it serves /metrics:\n{}",
                self.stderr.lock().unwrap()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
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

/// The port in the log line `serving /metrics, …` with the bound address.
fn bound_ops_port(log: &str) -> Option<u16> {
    let line = log.lines().find(|l| l.contains("serving /metrics"))?;
    let (_, after) = line.split_once("127.0.0.1:")?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// `toml` with the operations endpoint on a port the process binds itself
/// (port 0); [`ReplicatorProcess::ops_port`] finds it.
pub fn with_ops_on_any_port(toml: &str) -> String {
    assert!(toml.contains("prometheus_listen_addr = \"\""), "{toml}");
    toml.replace(
        "prometheus_listen_addr = \"\"",
        "prometheus_listen_addr = \"127.0.0.1:0\"",
    )
}
