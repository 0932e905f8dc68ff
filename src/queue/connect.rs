//! Connecting to NATS from `[nats]`: servers, credentials, TLS.

use crate::config::{NatsConfig, UrlCredentials};
use std::time::Duration;

/// Why the NATS connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("nats.credentials_file {path}: {source}")]
    Credentials {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot connect to NATS at {url}: {}", nats_cause(source))]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
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

/// Connects with the configured auth and TLS; logs disconnects and reconnects.
pub async fn connect(config: &NatsConfig, name: &str) -> Result<async_nats::Client, ConnectError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                other => tracing::info!(event = %other, "NATS event"),
            }
        });
    if let Some(path) = &config.credentials_file {
        options =
            options
                .credentials_file(path)
                .await
                .map_err(|source| ConnectError::Credentials {
                    path: path.display().to_string(),
                    source,
                })?;
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
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if config.tls_required {
        options = options.require_tls(true);
    }
    options
        .connect(servers)
        .await
        .map_err(|source| ConnectError::Connect {
            url: config.masked_url(),
            source,
        })
}
