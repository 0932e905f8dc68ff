//! A private Postgres, for tests that stop or restart the database; never
//! the machine's shared one. `initdb` in a temporary directory, trust auth,
//! listening on 127.0.0.1 at a free port. Postgres refuses to run as root, so
//! under root its binaries run as the `postgres` user on a directory it owns.

use crate::ports::{self, unused_port};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Where Debian keeps the server binaries; `PG_BIN_DIR` overrides it.
fn bin_dir() -> PathBuf {
    std::env::var_os("PG_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// Whether this process runs as root (the servers then run as `postgres`).
pub(crate) fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub struct PrivatePostgres {
    pub port: u16,
    /// Whether the port was handed out (by [`PrivatePostgres::init`] or a
    /// start): from then on the server keeps it across restarts.
    port_fixed: bool,
    /// Holds the data directory and the socket; removed on drop.
    dir: tempfile::TempDir,
    as_postgres: bool,
    running: bool,
}

impl PrivatePostgres {
    /// A new cluster, initialised but not started; [`Self::start_again`]
    /// starts it on [`Self::port`] (the test may have its URL already).
    pub fn init() -> PrivatePostgres {
        let port = unused_port();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let as_postgres = running_as_root();
        // The postgres user must reach and own it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod the temporary directory");
        let pg = PrivatePostgres {
            port,
            port_fixed: true,
            dir,
            as_postgres,
            running: false,
        };
        let data = pg.data_dir();
        let out = pg.pg(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        assert!(out.status.success(), "initdb failed: {}", text(&out));
        pg
    }

    /// A new cluster, started.
    pub fn start() -> PrivatePostgres {
        let mut pg = Self::init();
        // Nobody has its URL yet: a taken port means another one.
        pg.port_fixed = false;
        pg.start_again();
        pg
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Writes `contents` to `name` in the data directory, readable by the
    /// server only (as it demands of a key file), for TLS keys and
    /// certificates; call before starting.
    pub fn install_file(&self, name: &str, contents: &[u8]) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.data_dir().join(name);
        std::fs::write(&path, contents).expect("write into the data directory");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod the file");
        if self.as_postgres {
            let out = Command::new("chown")
                .arg("postgres")
                .arg(&path)
                .output()
                .expect("run chown");
            assert!(out.status.success(), "chown failed: {}", text(&out));
        }
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Appends settings to `postgresql.conf`; call before starting.
    pub fn append_config(&self, settings: &str) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data_dir().join("postgresql.conf"))
            .expect("open postgresql.conf");
        writeln!(file, "{settings}").expect("append to postgresql.conf");
    }

    /// Replaces `pg_hba.conf`; call before starting.
    pub fn set_hba(&self, rules: &str) {
        std::fs::write(self.data_dir().join("pg_hba.conf"), rules).expect("write pg_hba.conf");
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg(&self, program: &str, args: &[&str]) -> Output {
        let binary = bin_dir().join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(binary);
            c
        } else {
            Command::new(binary)
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    }

    /// Starts the server and waits until it accepts connections. A port
    /// another process took meanwhile means waiting for it to come free, or
    /// a new one when nobody has the URL yet.
    pub fn start_again(&mut self) {
        if self.running {
            return;
        }
        let log = self.dir.path().join("postgres.log");
        let mut failure = String::new();
        for _ in 0..ports::ATTEMPTS {
            let logged_before = std::fs::read_to_string(&log).map_or(0, |l| l.len());
            let out = self.pg_ctl_start(&log);
            if out.status.success() {
                self.running = true;
                self.port_fixed = true;
                return;
            }
            let logged = std::fs::read_to_string(&log).unwrap_or_default();
            let new = logged.get(logged_before..).unwrap_or_default();
            failure = format!("{}; log: {new}", text(&out));
            if !ports::in_use(new) {
                break;
            }
            if self.port_fixed {
                std::thread::sleep(Duration::from_millis(500));
            } else {
                self.port = unused_port();
            }
        }
        panic!("pg_ctl start failed: {failure}");
    }

    /// `pg_ctl start`, waiting (`-w`) until this server accepts connections:
    /// pg_ctl asks the server it started, not whatever has the port.
    fn pg_ctl_start(&self, log: &Path) -> Output {
        let data = self.data_dir();
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off -c max_connections=200",
            self.port,
            path_str(self.dir.path())
        );
        self.pg(
            "pg_ctl",
            &[
                "-D",
                path_str(&data),
                "-o",
                &options,
                "-l",
                path_str(log),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    /// Stops the server at once (`-m immediate`: like a crash, no checkpoint).
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let data = self.data_dir();
        let out = self.pg(
            "pg_ctl",
            &["-D", path_str(&data), "-m", "immediate", "-w", "stop"],
        );
        assert!(out.status.success(), "pg_ctl stop failed: {}", text(&out));
        self.running = false;
    }

    /// Waits until a connection to it succeeds (or `timeout`).
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let url = self.url();
        crate::eventually(timeout, || {
            let url = url.clone();
            async move {
                use sqlx::Connection;
                sqlx::PgConnection::connect(&url).await.is_ok()
            }
        })
        .await
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let data = self.data_dir();
            let _ = self.pg(
                "pg_ctl",
                &["-D", path_str(&data), "-m", "immediate", "-w", "stop"],
            );
        }
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
