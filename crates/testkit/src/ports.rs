//! Ports for child processes that must bind a port of their own: nats-server,
//! Postgres and PgBouncer take a port number, not a listening socket. Where a
//! listener can be handed over, bind port 0 and pass it on instead.
//!
//! A port is drawn at random below the kernel's ephemeral range
//! (`ip_local_port_range`, 32768 and up by default), so the source port of an
//! outgoing connection never takes it. Another test may still draw the same
//! port, or bind it first: the fixtures start their child again on a new port
//! when it reports the address in use (see [`in_use`]), and check that what
//! answers on the port is their own child, never just that something does.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// The draw: above the well-known and registered services a test machine
/// may run, below the ephemeral range.
const RANGE: std::ops::Range<u16> = 20_000..32_000;

/// How many times a fixture starts its child on a new port before it gives up.
pub const ATTEMPTS: usize = 20;

/// A port of 127.0.0.1 that nothing listens on now, for a child process to
/// bind. Not reserved: start the child with a retry on [`in_use`].
pub fn unused_port() -> u16 {
    static DRAWS: AtomicU64 = AtomicU64::new(0);
    loop {
        // RandomState is seeded per process; the counter varies it per draw.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(DRAWS.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        let span = u64::from(RANGE.end - RANGE.start);
        let port = RANGE.start + (h.finish() % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Whether a server's log says it could not bind its address because
/// another process had it (nats-server, Postgres and PgBouncer all say so
/// in these words, in one case or the other).
pub fn in_use(log: &str) -> bool {
    log.to_ascii_lowercase().contains("address already in use")
}
