//! Real storage nodes as processes: the `storage-node` binary, each with its
//! own storage directory and token, killed when the fixture is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Overrides where the `storage-node` binary is.
pub const BINARY_ENV: &str = "STORAGE_NODE_BIN";

/// The `storage-node` binary: `$STORAGE_NODE_BIN`, else the one cargo built
/// beside the running test (`target/<profile>/storage-node`; `cargo test
/// --workspace` builds it).
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os(BINARY_ENV) {
        return path.into();
    }
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lies in target/<profile>/deps");
    let path = profile_dir.join("storage-node");
    assert!(
        path.exists(),
        "no storage-node binary at {}: run the tests with `cargo test --workspace` \
         (or `cargo build -p storage-node` with the same profile first), or set {BINARY_ENV}",
        path.display()
    );
    path
}

/// One `storage-node` process serving one storage.
pub struct NodeProcess {
    pub storage: String,
    /// The storage's directory of repositories.
    pub dir: PathBuf,
    /// The token the node checks.
    pub token: String,
    pub addr: SocketAddr,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl NodeProcess {
    /// Starts the binary on `listen` (port 0 for a free one) and waits for
    /// its `listening on ADDR` line.
    pub async fn spawn(
        storage: &str,
        dir: &Path,
        token: &str,
        listen: &str,
        extra: &[String],
    ) -> NodeProcess {
        Self::spawn_with_env(storage, dir, token, listen, extra, &[]).await
    }

    /// Like [`NodeProcess::spawn`], with `env` set for the process (say
    /// `SSL_CERT_FILE`, for the sources it dials over TLS).
    pub async fn spawn_with_env(
        storage: &str,
        dir: &Path,
        token: &str,
        listen: &str,
        extra: &[String],
        env: &[(String, String)],
    ) -> NodeProcess {
        let (child, addr) = Self::start(storage, dir, token, listen, extra, env).await;
        NodeProcess {
            storage: storage.to_owned(),
            dir: dir.to_owned(),
            token: token.to_owned(),
            addr,
            extra: extra.to_vec(),
            env: env.to_vec(),
            child: Some(child),
        }
    }

    async fn start(
        storage: &str,
        dir: &Path,
        token: &str,
        listen: &str,
        extra: &[String],
        env: &[(String, String)],
    ) -> (Child, SocketAddr) {
        match Self::try_start(storage, dir, token, listen, extra, env).await {
            Ok(started) => started,
            Err(line) => panic!("unexpected first line of storage-node: {line:?}"),
        }
    }

    /// Starts the binary; answers the process and the address it printed,
    /// or what it printed instead (nothing when it exited, as it does when
    /// its address is taken).
    async fn try_start(
        storage: &str,
        dir: &Path,
        token: &str,
        listen: &str,
        extra: &[String],
        env: &[(String, String)],
    ) -> Result<(Child, SocketAddr), String> {
        let mut child = Command::new(binary())
            .args(["--listen", listen, "--token", token, "--log", "error"])
            .arg("--storage")
            .arg(format!("{storage}={}", dir.display()))
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the storage-node binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut line = String::new();
        let mut stdout = BufReader::new(stdout);
        let read = stdout.read_line(&mut line);
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("storage-node printed its address within 10 s")
            .expect("reading storage-node's stdout");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok());
        match addr {
            Some(addr) => Ok((child, addr)),
            None => Err(line),
        }
    }

    /// `tcp://ADDR`, or `tls://ADDR` when the node serves TLS, as the
    /// config writes it.
    pub fn address(&self) -> String {
        let scheme = if self.extra.iter().any(|f| f == "--tls-cert") {
            "tls"
        } else {
            "tcp"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Where a repository of this storage lives.
    pub fn repo(&self, relative_path: &str) -> PathBuf {
        self.dir.join(relative_path)
    }

    /// SIGKILL, then reap.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("killing storage-node");
        }
    }

    /// Starts the node again on the same address, directory and token, with
    /// `extra` flags from now on.
    pub async fn restart_with(&mut self, extra: &[String]) {
        self.extra = extra.to_vec();
        self.restart().await;
    }

    /// Starts the node again on the same address, directory, token and flags.
    /// Another process may hold the port for a moment (an outgoing
    /// connection's source port, say): the start is tried again until it is
    /// free.
    pub async fn restart(&mut self) {
        self.kill().await;
        let listen = self.addr.to_string();
        for _ in 0..crate::ports::ATTEMPTS {
            let started = Self::try_start(
                &self.storage,
                &self.dir,
                &self.token,
                &listen,
                &self.extra,
                &self.env,
            )
            .await;
            match started {
                Ok((child, addr)) => {
                    assert_eq!(addr, self.addr);
                    self.child = Some(child);
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
        panic!("{} did not start again on {}", self.storage, self.addr);
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}
