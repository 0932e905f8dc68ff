//! Connecting to NATS from `[nats]`: servers, credentials, TLS. A refused
//! login or certificate names the configuration keys involved, never a
//! secret.

use crate::config::{NatsConfig, UrlCredentials};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Why the NATS connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A file `[nats]` names cannot be used; only its path is shown.
    #[error("{key} {path}: {reason}")]
    File {
        key: &'static str,
        path: String,
        reason: String,
    },
    #[error(
        "cannot connect to NATS at {url}: {}{}",
        nats_cause(source),
        refusal_text(refused)
    )]
    Connect {
        url: String,
        source: async_nats::ConnectError,
        /// What the server refused, by configuration key, when it was the
        /// credentials or a certificate.
        refused: Option<String>,
    },
}

impl ConnectError {
    /// Whether the server could not be reached, or its TLS handshake
    /// failed; not a refusal of the credentials.
    pub fn is_unreachable(&self) -> bool {
        match self {
            ConnectError::Connect { source, .. } => {
                self.is_transient() || source.kind() == async_nats::ConnectErrorKind::Tls
            }
            ConnectError::File { .. } => false,
        }
    }

    /// Whether waiting may help: the server is down or unreachable, rather
    /// than refusing the credentials or a certificate.
    pub fn is_transient(&self) -> bool {
        match self {
            ConnectError::Connect {
                source,
                refused: None,
                ..
            } => matches!(
                source.kind(),
                async_nats::ConnectErrorKind::Io
                    | async_nats::ConnectErrorKind::TimedOut
                    | async_nats::ConnectErrorKind::Dns
                    | async_nats::ConnectErrorKind::MaxReconnects
            ),
            _ => false,
        }
    }
}

fn refusal_text(refused: &Option<String>) -> String {
    refused
        .as_ref()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default()
}

/// async-nats's error as `kind: cause`, or the cause alone when it already
/// says what the kind does ("authorization violation: nats: authorization
/// violation" otherwise).
fn nats_cause(e: &async_nats::ConnectError) -> String {
    let kind = e.kind().to_string();
    match std::error::Error::source(e).map(ToString::to_string) {
        Some(cause) if cause.contains(&kind) => cause,
        Some(cause) => format!("{kind}: {cause}"),
        None => kind,
    }
}

/// The keys of the way `config` authenticates.
fn credential_keys(config: &NatsConfig) -> &'static str {
    if config.credentials_file.is_some() {
        "nats.credentials_file"
    } else if config.nkey_seed_file.is_some() {
        "nats.nkey_seed_file"
    } else if config.token.is_some() {
        "nats.token"
    } else if config.user.is_some() {
        "nats.user and nats.password"
    } else if config.servers_and_credentials().1.is_some() {
        "the credentials in nats.url"
    } else {
        ""
    }
}

/// The TLS error under a connection error: async-nats passes the TLS
/// stream's `io::Error`, which carries rustls's.
fn tls_error(e: &async_nats::ConnectError) -> Option<&rustls::Error> {
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        source = cause.source();
    }
    None
}

/// What the server refused, when it refused something the configuration
/// chose: the credentials, its own certificate (not signed by a trusted
/// CA, or not for the host name), or the client certificate.
fn refusal(config: &NatsConfig, e: &async_nats::ConnectError) -> Option<String> {
    use async_nats::ConnectErrorKind as Kind;
    let path = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    match (e.kind(), tls_error(e)) {
        (Kind::AuthorizationViolation | Kind::Authentication, _) => {
            Some(match credential_keys(config) {
                "" => "the server wants credentials: set nats.user and nats.password, \
                       nats.token, nats.nkey_seed_file or nats.credentials_file"
                    .to_owned(),
                keys => format!("the server refused {keys}"),
            })
        }
        (_, Some(rustls::Error::InvalidCertificate(_))) => Some(match &config.tls_ca_file {
            Some(_) => format!(
                "the server's certificate is not for this host or not signed by a CA of \
                 nats.tls_ca_file {}",
                path(&config.tls_ca_file)
            ),
            None => "the server's certificate is not for this host or not signed by a CA the \
                     system trusts: set nats.tls_ca_file"
                .to_owned(),
        }),
        // The server's alert during or right after the handshake: it
        // refused the client's certificate, or wanted one.
        (_, Some(rustls::Error::AlertReceived(alert))) => match &config.tls_cert_file {
            Some(_) => Some(format!(
                "the server refused the client certificate of nats.tls_cert_file {}",
                path(&config.tls_cert_file)
            )),
            // A server without the client's certificate says "certificate
            // required", or "bad certificate" as nats-server does.
            None if matches!(
                alert,
                rustls::AlertDescription::CertificateRequired
                    | rustls::AlertDescription::BadCertificate
            ) =>
            {
                Some(
                    "the server wants a client certificate: set nats.tls_cert_file and \
                     nats.tls_key_file"
                        .to_owned(),
                )
            }
            None => None,
        },
        // The client's own TLS settings could not be loaded.
        (Kind::Tls, _) => {
            Some("check nats.tls_ca_file, nats.tls_cert_file and nats.tls_key_file".to_owned())
        }
        _ => None,
    }
}

/// Checks that a file `[nats]` names can be read, so that the error names
/// its key rather than the client's step that failed.
fn readable(key: &'static str, path: &Path) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|e| ConnectError::File {
        key,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Checks that `path` holds PEM certificates, so that a wrong file is
/// named before, and whether or not, the server asks for TLS.
fn certificates(key: &'static str, path: &Path) -> Result<(), ConnectError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let bytes = readable(key, path)?;
    let mut found = CertificateDer::pem_slice_iter(&bytes);
    match found.next() {
        Some(Ok(_)) if found.all(|c| c.is_ok()) => Ok(()),
        _ => Err(ConnectError::File {
            key,
            path: path.display().to_string(),
            reason: "no PEM certificate in it".into(),
        }),
    }
}

/// Checks that `path` holds a PEM private key; the parser's message is not
/// shown, as it may quote the key.
fn private_key(key: &'static str, path: &Path) -> Result<(), ConnectError> {
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
    let bytes = readable(key, path)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map(drop)
        .map_err(|_| ConnectError::File {
            key,
            path: path.display().to_string(),
            reason: "no PEM private key in it".into(),
        })
}

/// The NKey seed in `path`: the one line of a file `nk -gen user` writes.
fn nkey_seed(path: &Path) -> Result<String, ConnectError> {
    let bad = |reason: &str| ConnectError::File {
        key: "nats.nkey_seed_file",
        path: path.display().to_string(),
        reason: reason.to_owned(),
    };
    let text =
        String::from_utf8(readable("nats.nkey_seed_file", path)?).map_err(|_| bad("not text"))?;
    let seed = text.trim();
    // The parser's own message is not shown: it may quote the seed.
    match nkeys::KeyPair::from_seed(seed) {
        Ok(_) => Ok(seed.to_owned()),
        Err(_) => Err(bad("not an NKey seed (expected one line starting with SU)")),
    }
}

/// Connects with the configured auth and TLS; logs disconnects and reconnects.
pub async fn connect(config: &NatsConfig, name: &str) -> Result<async_nats::Client, ConnectError> {
    // The first connection is logged when `connect` returns: the callback
    // runs on a task a short-lived command may exit before.
    let first = Arc::new(AtomicBool::new(true));
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let first = Arc::clone(&first);
            async move {
                match event {
                    async_nats::Event::Connected => {
                        if !first.swap(false, Ordering::SeqCst) {
                            tracing::info!("reconnected to NATS")
                        }
                    }
                    async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                    // The server drops a refused request: the caller only sees
                    // its timeout, so the reason is said here, where it arrives.
                    async_nats::Event::ServerError(async_nats::ServerError::Other(message))
                        if message.contains("Permissions Violation") =>
                    {
                        tracing::error!(
                            error = %message,
                            "NATS refused this user a request; the request times out. The \
                             service's user needs the consumer role (docs/security.md), and \
                             streams and consumers are changed only by `setup`, run as the operator"
                        )
                    }
                    other => tracing::info!(event = %other, "NATS event"),
                }
            }
        });
    if let Some(path) = &config.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| ConnectError::File {
                key: "nats.credentials_file",
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
    }
    if let Some(path) = &config.nkey_seed_file {
        options = options.nkey(nkey_seed(path)?);
    }
    let (servers, in_urls) = config.servers_and_credentials();
    // Validation allows them only as the one way to authenticate.
    match in_urls {
        Some(UrlCredentials::UserPassword { user, password }) => {
            options = options.user_and_password(user, password.expose().to_owned());
        }
        Some(UrlCredentials::Token(token)) => {
            options = options.token(token.expose().to_owned());
        }
        None => {}
    }
    if let Some(token) = &config.token {
        options = options.token(token.expose().to_owned());
    }
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(ca) = &config.tls_ca_file {
        certificates("nats.tls_ca_file", ca)?;
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        certificates("nats.tls_cert_file", cert)?;
        private_key("nats.tls_key_file", key)?;
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if config.tls_required {
        options = options.require_tls(true);
    }
    let client = options
        .connect(servers)
        .await
        .map_err(|source| ConnectError::Connect {
            url: config.masked_url(),
            refused: refusal(config, &source),
            source,
        })?;
    tracing::info!("connected to NATS");
    Ok(client)
}
