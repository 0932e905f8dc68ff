//! A private nats-server with JetStream, for tests that stop or restart the
//! broker; never the machine's shared one.

use crate::ports::{self, unused_port};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// What nats-server logs once its listeners are up.
const READY: &str = "Server is ready";

pub struct PrivateNats {
    pub port: u16,
    /// Whether the port was handed out (by [`PrivateNats::not_started`] or a
    /// start): from then on the server keeps it across restarts.
    port_fixed: bool,
    dir: tempfile::TempDir,
    /// A configuration file given with `-c`, for settings the command line
    /// has no flags for (several users, say).
    config: Option<std::path::PathBuf>,
    child: Option<Child>,
}

/// `$NATS_SERVER_BIN`, else Debian's, else the one on the `PATH`.
pub(crate) fn binary() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| {
        if std::path::Path::new("/usr/sbin/nats-server").exists() {
            "/usr/sbin/nats-server".into()
        } else {
            "nats-server".into()
        }
    })
}

impl PrivateNats {
    pub async fn start() -> PrivateNats {
        let mut n = Self::unstarted();
        n.spawn().await;
        n
    }

    /// A server that also reads `config` (nats-server's configuration
    /// format), e.g. `authorization { users = [...] }`, `tls { ... }` or an
    /// operator. The fixture waits for the server's greeting, not for a
    /// login, so it needs neither credentials nor certificates.
    pub async fn start_with_config(config: &str) -> PrivateNats {
        Self::start_with_files(config, &[]).await
    }

    /// Like [`PrivateNats::start_with_config`], with `files` (name,
    /// contents) beside the configuration, for its `include`s.
    pub async fn start_with_files(config: &str, files: &[(&str, &str)]) -> PrivateNats {
        let mut n = Self::unstarted();
        for (name, contents) in files {
            std::fs::write(n.dir.path().join(name), contents).unwrap();
        }
        let path = n.dir.path().join("nats.conf");
        std::fs::write(&path, config).unwrap();
        n.config = Some(path);
        n.spawn().await;
        n
    }

    /// A port and a store, with no server yet: [`PrivateNats::start_again`]
    /// starts it on that port (the test has its URL already).
    pub fn not_started() -> PrivateNats {
        let mut n = Self::unstarted();
        n.port_fixed = true;
        n
    }

    fn unstarted() -> PrivateNats {
        PrivateNats {
            port: unused_port(),
            port_fixed: false,
            dir: tempfile::tempdir().unwrap(),
            config: None,
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server. A port another process took meanwhile means a new
    /// port on a first start, and waiting for it to come free on a restart.
    async fn spawn(&mut self) {
        for _ in 0..ports::ATTEMPTS {
            let logged_before = self.log().len();
            let mut child = self.command().spawn().expect("nats-server is installed");
            if self.came_up(&mut child, logged_before).await {
                self.child = Some(child);
                self.port_fixed = true;
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            if !ports::in_use(self.log().get(logged_before..).unwrap_or_default()) {
                break;
            }
            if self.port_fixed {
                tokio::time::sleep(Duration::from_millis(500)).await;
            } else {
                self.port = unused_port();
            }
        }
        panic!("private nats-server did not start:\n{}", self.log());
    }

    fn command(&self) -> Command {
        let mut command = Command::new(binary());
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        command
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(self.log_file());
        command
    }

    /// Whether `child` is up: it logged that it is ready (so what answers
    /// on the port is this server, not another that had the port) and it
    /// answers. False once it exited.
    async fn came_up(&self, child: &mut Child, logged_before: usize) -> bool {
        for _ in 0..200 {
            if !matches!(child.try_wait(), Ok(None)) {
                return false;
            }
            if self
                .log()
                .get(logged_before..)
                .is_some_and(|new| new.contains(READY))
            {
                // A configured server may want TLS or credentials the fixture
                // does not have: its INFO line shows it is up.
                let up = if self.config.is_some() {
                    self.sends_info().await
                } else {
                    async_nats::connect(self.url()).await.is_ok()
                };
                if up {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Where the server's log goes, appended to across restarts.
    fn log_file(&self) -> Stdio {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats-server.log"));
        file.map(Stdio::from).unwrap_or_else(|_| Stdio::null())
    }

    /// What the server logged so far (errors and warnings, and its
    /// permission violations).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default()
    }

    /// Whether the server accepts a TCP connection and greets with `INFO`.
    async fn sends_info(&self) -> bool {
        use tokio::io::AsyncReadExt;
        let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        let mut greeting = [0u8; 5];
        let read = tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut greeting));
        matches!(read.await, Ok(Ok(_))) && &greeting == b"INFO "
    }

    /// The directory of the server's store and configuration, for files
    /// the configuration names.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server with SIGTERM, so it saves its streams' and
    /// consumers' state before it exits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Kills the server (losing its in-memory pull requests) and starts it
    /// again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// Starts a killed server again on the same port and store.
    pub async fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn().await;
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
    }
}
