//! A TCP proxy on 127.0.0.1 that can hold traffic back: for tests of a slow
//! network or database (a connection whose round trips take seconds) without
//! breaking the connection.
//!
//! Each chunk read from either side is stamped with when it arrived and
//! written on once it is `delay` old, where `delay` is the proxy's delay at
//! the moment of arrival; order within a direction is kept. So a delay of 2 s
//! adds 2 s each way to every round trip made while it is on.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A running proxy; stops (and drops its connections) on drop.
pub struct DelayProxy {
    addr: SocketAddr,
    delay: Arc<Mutex<Duration>>,
    accept: JoinHandle<()>,
}

impl DelayProxy {
    /// Forwards connections made to the proxy's port to `upstream`. Binds
    /// port 0 and keeps the listener: the port is never free in between.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<DelayProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let shared = delay.clone();
        let accept = tokio::spawn(async move {
            let mut links = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let delay = shared.clone();
                links.spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        link(client, server, delay).await;
                    }
                });
            }
        });
        Ok(DelayProxy {
            addr,
            delay,
            accept,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Holds back what arrives from now on by `delay` (zero: none).
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap_or_else(|e| e.into_inner()) = delay;
    }

    /// Delays traffic by `delay` for `span`, then lets it through again; the
    /// returned task ends when the span is over.
    pub fn delay_for(&self, delay: Duration, span: Duration) -> JoinHandle<()> {
        self.set_delay(delay);
        let shared = self.delay.clone();
        tokio::spawn(async move {
            tokio::time::sleep(span).await;
            *shared.lock().unwrap_or_else(|e| e.into_inner()) = Duration::ZERO;
        })
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        // The accept task owns the links: aborting it drops them all.
        self.accept.abort();
    }
}

/// Pumps both directions until either side closes.
async fn link(client: TcpStream, server: TcpStream, delay: Arc<Mutex<Duration>>) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        _ = pump(cr, sw, delay.clone()) => {}
        _ = pump(sr, cw, delay) => {}
    }
}

/// One direction: a reader stamps chunks, a writer sends each when due.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<Mutex<Duration>>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let d = *delay.lock().unwrap_or_else(|e| e.into_inner());
                    if tx.send((Instant::now() + d, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    // The writer drains what the reader stamped before the reader ended.
    let (_, ()) = tokio::join!(reader, writer);
}
