//! A private PgBouncer in front of a Postgres on 127.0.0.1, on a free port,
//! in the pool mode a test asks for: what Praefect deployments put before
//! `[database]`. PgBouncer refuses to run as root; under root it switches
//! to the `postgres` user itself (`-u`). Killed on drop.

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod the temporary directory");
        let path = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(path("users.txt"), "\"postgres\" \"\"\n\"root\" \"\"\n")
            .expect("write the user list");
        let ini = format!(
            "[databases]\n* = host=127.0.0.1 port={upstream_port}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {users}\npool_mode = {pool_mode}\n\
             default_pool_size = {pool_size}\nmax_client_conn = 500\n\
             logfile = {log}\npidfile = {pid}\nserver_reset_query = DISCARD ALL\n",
            users = path("users.txt"),
            log = path("pgbouncer.log"),
            pid = path("pgbouncer.pid"),
        );
        std::fs::write(path("pgbouncer.ini"), ini).expect("write pgbouncer.ini");
        let mut command = Command::new(binary());
        if running_as_root() {
            command.args(["-u", "postgres"]);
        }
        let child = command
            .arg(path("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer (Debian package pgbouncer)");
        let bouncer = PgBouncer { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not listen on {port}: {}",
                bouncer.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        bouncer
    }

    /// What PgBouncer logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
