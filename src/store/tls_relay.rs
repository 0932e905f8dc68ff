//! Where a Postgres connection goes ([`PgEndpoint`]), and the TLS relay for
//! the connections whose server certificate must be verified.
//!
//! The relay exists because sqlx 0.9 cannot verify as libpq does: it builds
//! its rustls root store from the platform's roots plus `sslrootcert`, takes
//! no verifier or root store of ours, and skips the host name for
//! `verify-ca`, so a certificate any public CA issued for any name passes.
//! When `config::database_tls` says the server must be verified, sqlx
//! connects in plain text to a Unix socket this process listens on, in a
//! directory only its user can enter (0700); for each connection the relay
//! dials the server, sends Postgres's SSLRequest, does the TLS handshake
//! with `tls_client`'s verifier (exactly the configured roots), then copies
//! bytes both ways. Connections that verify nothing go to sqlx unchanged.
//!
//! A relay's first connection is made when it starts, so a refused
//! certificate is the caller's error, shaped as sqlx's own; a later refusal
//! is logged and answered to sqlx as a Postgres error naming the cause.

use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::tls_client::{TlsSetupError, client_config};
use crate::config::{PgTarget, ServerTrust, Verification};
use crate::error_chain::display_error_chain;

/// Postgres's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// How long a refused client is given to read the answer and hang up.
const REFUSAL_LINGER: Duration = Duration::from_secs(5);

/// How to reach one configured connection: sqlx's options, pointed at a
/// relay when the server must be verified. Cheap to clone; the relay runs
/// while a clone is alive.
#[derive(Clone)]
pub(crate) struct PgEndpoint {
    options: PgConnectOptions,
    relay: Option<Arc<Relay>>,
}

/// Written out: the options hold the password.
impl std::fmt::Debug for PgEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEndpoint")
            .field("host", &self.options.get_host())
            .field("port", &self.options.get_port())
            .field("relayed", &self.relay.is_some())
            .finish()
    }
}

impl PgEndpoint {
    /// Reaches `target`: straight, or through a relay started here (see the
    /// module's doc), whose first connection is made now. `connect_timeout`
    /// bounds each connection the relay opens to the server.
    pub(crate) async fn start(
        target: PgTarget,
        connect_timeout: Duration,
    ) -> Result<PgEndpoint, sqlx::Error> {
        let PgTarget { options, trust } = target;
        let ServerTrust::Verified(v) = trust else {
            return Ok(PgEndpoint {
                options,
                relay: None,
            });
        };
        let upstream = Arc::new(Upstream::new(&v, connect_timeout).map_err(setup_error)?);
        let mut first = upstream.open().await?;
        // A clean close, so the server logs nothing for it.
        let _ = first.shutdown().await;
        drop(first);
        let dir = tempfile::Builder::new()
            .prefix("gitaly-replicator-pg-")
            .permissions(Permissions::from_mode(0o700))
            .tempdir()?;
        let listener = UnixListener::bind(dir.path().join(format!(".s.PGSQL.{}", v.port)))?;
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, upstream, stop.clone()));
        Ok(PgEndpoint {
            options: options.socket(dir.path()).ssl_mode(PgSslMode::Disable),
            relay: Some(Arc::new(Relay {
                _stop: stop.drop_guard(),
                _dir: dir,
            })),
        })
    }

    /// `target` reached straight, for callers that cannot start a relay;
    /// refused when the server must be verified.
    pub(crate) fn direct(target: PgTarget) -> Result<PgEndpoint, TlsSetupError> {
        match target.trust {
            ServerTrust::Unverified => Ok(PgEndpoint {
                options: target.options,
                relay: None,
            }),
            ServerTrust::Verified(v) => Err(TlsSetupError::NeedsRelay { keys: v.keys }),
        }
    }

    /// The options to hand sqlx.
    pub(crate) fn options(&self) -> &PgConnectOptions {
        &self.options
    }
}

fn setup_error(e: TlsSetupError) -> sqlx::Error {
    sqlx::Error::Configuration(Box::new(e))
}

/// A running relay: its accept loop stops and its directory (and socket)
/// goes when the last endpoint holding it is dropped. Connections already
/// relayed run on until either side closes.
struct Relay {
    _stop: DropGuard,
    _dir: tempfile::TempDir,
}

/// The server a relay dials, and how it verifies it.
struct Upstream {
    host: String,
    port: u16,
    hostaddr: Option<std::net::IpAddr>,
    name: ServerName<'static>,
    connector: TlsConnector,
    timeout: Duration,
    keys: String,
}

impl Upstream {
    fn new(v: &Verification, timeout: Duration) -> Result<Upstream, TlsSetupError> {
        let (config, name) = client_config(v)?;
        Ok(Upstream {
            host: v
                .host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: v.port,
            hostaddr: v.hostaddr,
            name,
            connector: TlsConnector::from(config),
            timeout,
            keys: v.keys.clone(),
        })
    }

    /// A verified TLS connection to the server, before Postgres's startup.
    /// Errors are sqlx's for the same failures, so callers classify both alike.
    async fn open(&self) -> Result<TlsStream<TcpStream>, sqlx::Error> {
        tokio::time::timeout(self.timeout, self.open_unbounded())
            .await
            .unwrap_or_else(|_| {
                Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no TLS connection to {}:{} within {:?}",
                        self.host, self.port, self.timeout
                    ),
                )))
            })
    }

    async fn open_unbounded(&self) -> Result<TlsStream<TcpStream>, sqlx::Error> {
        let mut tcp = match self.hostaddr {
            Some(ip) => TcpStream::connect((ip, self.port)).await?,
            None => TcpStream::connect((self.host.as_str(), self.port)).await?,
        };
        tcp.set_nodelay(true)?;
        tcp.write_all(&SSL_REQUEST).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {}
            b'N' => return Err(sqlx::Error::Tls("server does not support TLS".into())),
            other => {
                return Err(sqlx::Error::Protocol(format!(
                    "unexpected response from SSLRequest: 0x{other:02x}"
                )));
            }
        }
        Ok(self.connector.connect(self.name.clone(), tcp).await?)
    }
}

/// Accepts sqlx's connections until `stop`, each relayed in a task of its own.
async fn accept(listener: UnixListener, upstream: Arc<Upstream>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, _)) => {
                tokio::spawn(relay(client, upstream.clone()));
            }
            Err(e) => {
                // Out of file descriptors, most likely: try again shortly.
                tracing::warn!(error = %e, "the Postgres TLS relay cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn relay(mut client: UnixStream, upstream: Arc<Upstream>) {
    match upstream.open().await {
        Ok(mut server) => {
            // Ends when either side closes; sqlx sees any error as its own.
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
                tracing::debug!(error = %e, "a relayed Postgres connection ended");
            }
        }
        Err(e) => {
            let cause = display_error_chain(&e);
            let message = format!(
                "TLS to Postgres at {}:{} failed: {cause} (check {}sslrootcert, {}sslmode \
                 and {}host)",
                upstream.host, upstream.port, upstream.keys, upstream.keys, upstream.keys
            );
            tracing::warn!("{message}");
            refuse(client, &message).await;
        }
    }
}

/// Answers sqlx's startup with a FATAL error, as a server would, so the
/// cause reaches whoever asked for the connection.
async fn refuse(mut client: UnixStream, message: &str) {
    let _ = client.write_all(&error_response(message)).await;
    let _ = client.shutdown().await;
    // Closing with sqlx's startup message unread could discard the answer.
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// A Postgres ErrorResponse: FATAL, SQLSTATE 08006 (connection failure).
fn error_response(message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "08006"),
        (b'M', message),
    ] {
        body.push(field);
        body.extend(value.bytes().filter(|&b| b != 0));
        body.push(0);
    }
    body.push(0);
    let mut out = vec![b'E'];
    let len = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_response_is_framed_as_postgres_frames_it() {
        let r = error_response("bad\0cert");
        assert_eq!(r[0], b'E');
        let len = u32::from_be_bytes([r[1], r[2], r[3], r[4]]) as usize;
        assert_eq!(len, r.len() - 1);
        assert_eq!(&r[5..], b"SFATAL\0VFATAL\0C08006\0Mbadcert\0\0".as_slice());
    }
}
