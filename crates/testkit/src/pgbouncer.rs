//! A private PgBouncer in front of a Postgres on 127.0.0.1, on a free port,
//! in the pool mode a test asks for: what Praefect deployments put before
//! `[database]`. PgBouncer refuses to run as root; under root it switches
//! to the `postgres` user itself (`-u`). Killed on drop.

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ports::{self, unused_port};
use crate::postgres_server::running_as_root;

/// Debian's binary; `PGBOUNCER_BIN` overrides it.
fn binary() -> String {
    std::env::var("PGBOUNCER_BIN").unwrap_or_else(|_| "/usr/sbin/pgbouncer".to_owned())
}

pub struct PgBouncer {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl PgBouncer {
    /// Pools connections to every database of the Postgres at
    /// 127.0.0.1:`upstream_port` for the users `postgres` and `root` (trust),
    /// with at most `pool_size` server connections per database and user, so
    /// that clients share them.
    pub fn start(upstream_port: u16, pool_mode: &str, pool_size: u32) -> PgBouncer {
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod the temporary directory");
        let path = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(path("users.txt"), "\"postgres\" \"\"\n\"root\" \"\"\n")
            .expect("write the user list");
        let log = dir.path().join("pgbouncer.log");
        let mut failure = String::new();
        for _ in 0..ports::ATTEMPTS {
            let port = unused_port();
            let ini = format!(
                "[databases]\n* = host=127.0.0.1 port={upstream_port}\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {users}\npool_mode = {pool_mode}\n\
                 default_pool_size = {pool_size}\nmax_client_conn = 500\n\
                 logfile = {log}\npidfile = {pid}\nserver_reset_query = DISCARD ALL\n",
                users = path("users.txt"),
                log = log.display(),
                pid = path("pgbouncer.pid"),
            );
            std::fs::write(path("pgbouncer.ini"), ini).expect("write pgbouncer.ini");
            let logged_before = read(&log).len();
            let mut command = Command::new(binary());
            if running_as_root() {
                command.args(["-u", "postgres"]);
            }
            let mut child = command
                .arg(path("pgbouncer.ini"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start pgbouncer (Debian package pgbouncer)");
            // Up once it logs that it listens: whatever else answers on the
            // port is not this PgBouncer.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let logged = read(&log)
                    .get(logged_before..)
                    .unwrap_or_default()
                    .to_owned();
                if logged.contains("listening on 127.0.0.1") {
                    return PgBouncer { port, child, dir };
                }
                let exited = !matches!(child.try_wait(), Ok(None));
                if exited || Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    failure = logged;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !ports::in_use(&failure) {
                break;
            }
        }
        panic!("pgbouncer did not start: {failure}");
    }

    /// What PgBouncer logged so far.
    pub fn log(&self) -> String {
        read(&self.dir.path().join("pgbouncer.log"))
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
