//! `[nats]`: the JetStream connection (servers, authentication, TLS) and the
//! layout of streams and consumers.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::{Secret, mask};

/// `[nats]`: the JetStream connection and layout.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct NatsConfig {
    /// Server URL, or several separated by commas (see [`NatsConfig::servers`]).
    #[serde(serialize_with = "mask::serialize_nats_url")]
    pub url: String,
    /// A `.creds` file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// A file holding a user's NKey seed (`SU…`), for NKey authentication.
    pub nkey_seed_file: Option<PathBuf>,
    pub token: Option<Secret>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// CA bundle to verify the server with.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key, for mutual TLS (both or neither).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to connect without TLS.
    pub tls_required: bool,
    /// Subjects are `<subject_prefix>.<virtual_storage>.<target_storage>`.
    pub subject_prefix: String,
    /// The work stream.
    pub stream: String,
    /// The dead-letter stream.
    pub dead_letter_stream: String,
    /// Durable consumer names are derived from it.
    pub consumer_prefix: String,
    /// Stream replicas (1..=5; 3 in a cluster).
    pub replicas: usize,
    /// How long a delivered job may go unacknowledged (at least 1s).
    #[serde(serialize_with = "mask::serialize_duration")]
    pub ack_wait: Duration,
    /// Unacknowledged jobs per consumer (-1 for unlimited).
    pub max_ack_pending: i64,
    /// Server deliveries of one message before the server gives up on it
    /// (-1 for unlimited). Attempts are counted apart (failed calls, in a
    /// header), so this is only the backstop for a job whose process dies
    /// in its call every time.
    pub max_deliver: i64,
    /// Work stream size limit in bytes, discard new (-1 for unlimited).
    pub max_bytes: i64,
    /// Work stream limit in messages (discard new); -1 for unlimited.
    pub max_messages: i64,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    #[serde(serialize_with = "mask::serialize_duration")]
    pub duplicate_window: Duration,
    /// How long dead letters are kept.
    #[serde(serialize_with = "mask::serialize_duration")]
    pub dead_letter_max_age: Duration,
    /// Long-poll expiry of one fetch.
    #[serde(serialize_with = "mask::serialize_duration")]
    pub fetch_expires: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            credentials_file: None,
            nkey_seed_file: None,
            token: None,
            user: None,
            password: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
            subject_prefix: "gitaly.replication".into(),
            stream: "GITALY_REPLICATION".into(),
            dead_letter_stream: "GITALY_REPLICATION_DEAD".into(),
            consumer_prefix: "gitaly-replicator".into(),
            replicas: 1,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1000,
            max_deliver: 50,
            max_bytes: -1,
            max_messages: 10_000_000,
            duplicate_window: Duration::from_secs(120),
            dead_letter_max_age: Duration::from_secs(30 * 24 * 3600),
            fetch_expires: Duration::from_secs(5),
        }
    }
}

/// Written out because `url` may carry credentials and is shown masked; the
/// destructuring makes a new field a compile error here until it is shown.
impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let NatsConfig {
            url: _,
            credentials_file,
            nkey_seed_file,
            token,
            user,
            password,
            tls_ca_file,
            tls_cert_file,
            tls_key_file,
            tls_required,
            subject_prefix,
            stream,
            dead_letter_stream,
            consumer_prefix,
            replicas,
            ack_wait,
            max_ack_pending,
            max_deliver,
            max_bytes,
            max_messages,
            duplicate_window,
            dead_letter_max_age,
            fetch_expires,
        } = self;
        f.debug_struct("NatsConfig")
            .field("url", &self.masked_url())
            .field("credentials_file", credentials_file)
            .field("nkey_seed_file", nkey_seed_file)
            .field("token", token)
            .field("user", user)
            .field("password", password)
            .field("tls_ca_file", tls_ca_file)
            .field("tls_cert_file", tls_cert_file)
            .field("tls_key_file", tls_key_file)
            .field("tls_required", tls_required)
            .field("subject_prefix", subject_prefix)
            .field("stream", stream)
            .field("dead_letter_stream", dead_letter_stream)
            .field("consumer_prefix", consumer_prefix)
            .field("replicas", replicas)
            .field("ack_wait", ack_wait)
            .field("max_ack_pending", max_ack_pending)
            .field("max_deliver", max_deliver)
            .field("max_bytes", max_bytes)
            .field("max_messages", max_messages)
            .field("duplicate_window", duplicate_window)
            .field("dead_letter_max_age", dead_letter_max_age)
            .field("fetch_expires", fetch_expires)
            .finish()
    }
}

impl NatsConfig {
    /// The server URLs in `url`, trimmed.
    pub fn servers(&self) -> impl Iterator<Item = &str> {
        self.url.split(',').map(str::trim).filter(|s| !s.is_empty())
    }

    /// `url` with any credentials in it (`user:password@`, `token@`) masked.
    pub fn masked_url(&self) -> String {
        mask::nats_url(&self.url)
    }

    /// The server URLs without the credentials they carry, and those
    /// credentials (percent-decoded); `None` when no URL carries any. The
    /// client is given them as options: async-nats does not send a URL's
    /// credentials, and logs server URLs at debug level.
    pub fn servers_and_credentials(&self) -> (Vec<String>, Option<UrlCredentials>) {
        let mut credentials = None;
        let servers = self
            .servers()
            .map(|server| {
                let (bare, found) = split_credentials(server);
                if credentials.is_none() {
                    credentials = found;
                }
                bare
            })
            .collect();
        (servers, credentials)
    }

    /// The credentials of each server URL that carries some, in order.
    pub(super) fn url_credentials(&self) -> Vec<UrlCredentials> {
        self.servers()
            .filter_map(|server| split_credentials(server).1)
            .collect()
    }
}

/// Credentials written into a server URL.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum UrlCredentials {
    /// `nats://user:password@host`.
    UserPassword { user: String, password: Secret },
    /// `nats://token@host`.
    Token(Secret),
}

/// `server` without its user info, and the credentials that were in it.
fn split_credentials(server: &str) -> (String, Option<UrlCredentials>) {
    let (scheme, rest) = match server.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), server),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (server.to_owned(), None);
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let user_info = &rest[..at];
    let credentials = match user_info.split_once(':') {
        Some((user, password)) => UrlCredentials::UserPassword {
            user: decode(user),
            password: Secret::new(decode(password)),
        },
        None => UrlCredentials::Token(Secret::new(decode(user_info))),
    };
    (format!("{scheme}{}", &rest[at + 1..]), Some(credentials))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> NatsConfig {
        NatsConfig {
            url: url.into(),
            ..NatsConfig::default()
        }
    }

    #[test]
    fn credentials_are_taken_out_of_the_server_urls() {
        let (servers, credentials) =
            config("nats://u:p%40ss@a:4222, tls://u:p%40ss@b:4222/x@y").servers_and_credentials();
        assert_eq!(servers, ["nats://a:4222", "tls://b:4222/x@y"]);
        assert_eq!(
            credentials,
            Some(UrlCredentials::UserPassword {
                user: "u".into(),
                password: Secret::new("p@ss"),
            })
        );
        let (servers, credentials) = config("tok@c:4222,d:4222").servers_and_credentials();
        assert_eq!(servers, ["c:4222", "d:4222"]);
        assert_eq!(credentials, Some(UrlCredentials::Token(Secret::new("tok"))));
        let (servers, credentials) = config("nats://e:4222").servers_and_credentials();
        assert_eq!(
            (servers, credentials),
            (vec!["nats://e:4222".to_owned()], None)
        );
    }
}
