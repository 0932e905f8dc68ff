//! How a Postgres connection checks the server's certificate, decided as
//! libpq decides it: the root certificate file is the only trust anchor.
//!
//! sqlx verifies against the platform's roots *plus* `sslrootcert`, and
//! `verify-ca` skips the host name, so with sqlx alone any certificate a
//! public CA issued for any name would pass `verify-ca`. The rule is
//! therefore decided here, once, and carried out by the store's TLS relay
//! (`store::tls_relay`) whenever a certificate must be verified; the other
//! modes go to sqlx unchanged.
//!
//! The rule, per connection (`[database]`, and `[database.session_pooled]`
//! over it), with the root file taken from `sslrootcert`, else the url's
//! `sslrootcert`, else `PGSSLROOTCERT`, else `~/.postgresql/root.crt` if it
//! exists:
//! - `sslrootcert = "system"`: the platform's roots, and only with
//!   `verify-full` (as libpq 16: the platform's roots vouch for names, so
//!   without the name check they vouch for nothing);
//! - `verify-ca` / `verify-full`: chained to the root file (and, for
//!   `verify-full`, the host name in the certificate); no root file is an
//!   error;
//! - `require`: as `verify-ca` when the root file exists, unverified
//!   otherwise (libpq's rule, kept for old configurations);
//! - `prefer`, `allow`, `disable`: never verified. (libpq verifies `prefer`
//!   against an existing root file but falls back to plain text when that
//!   fails, which protects nothing.)
//!
//! Over a Unix socket libpq uses no TLS; such connections go to sqlx as
//! configured.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use sqlx::postgres::{PgConnectOptions, PgSslMode};

use super::ConfigError;

/// A Postgres connection's options and how its server is verified.
#[derive(Clone)]
pub(crate) struct PgTarget {
    /// sqlx's options as the configuration gives them.
    pub options: PgConnectOptions,
    pub trust: ServerTrust,
}

/// Who checks the server's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ServerTrust {
    /// sqlx, as configured: no TLS, or TLS without verification.
    Unverified,
    /// The relay, against exactly these roots.
    Verified(Verification),
}

/// What the relay checks, and with which client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Verification {
    pub roots: Roots,
    /// `verify-full`: the host name must be in the certificate.
    pub check_host: bool,
    /// The server's host name, checked with `check_host` and sent as SNI.
    pub host: String,
    /// Where to dial: `hostaddr` when given, else `host`.
    pub hostaddr: Option<IpAddr>,
    pub port: u16,
    pub client_cert: Option<Pem>,
    pub client_key: Option<Pem>,
    /// The prefix of the connection's keys in errors: `database.` or
    /// `database.session_pooled.`.
    pub keys: String,
}

/// The trust anchors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Roots {
    /// The CA certificates of a PEM file (or of PEM text from `PGSSLROOTCERT`).
    Pem(Pem),
    /// `sslrootcert = "system"`: the platform's roots (honouring
    /// `SSL_CERT_FILE` and `SSL_CERT_DIR`, as OpenSSL does for libpq).
    System,
}

/// A PEM file, or PEM text given in an environment variable as sqlx accepts it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Pem {
    File(PathBuf),
    Inline(String),
}

/// Written out: inline PEM may be a private key.
impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pem::File(path) => write!(f, "{}", path.display()),
            Pem::Inline(_) => f.write_str("[inline PEM]"),
        }
    }
}

impl fmt::Display for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The TLS settings of one connection, each already taken from the first
/// place that sets it (the keys, the url, the environment). Not `Debug`:
/// `key` may be PEM text.
#[derive(Default)]
pub(super) struct TlsSettings {
    pub rootcert: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub hostaddr: Option<IpAddr>,
}

impl TlsSettings {
    /// `keys` (the connection's own), then the url's query, then libpq's
    /// variables, in sqlx's order of precedence.
    pub(super) fn resolve(
        keys: [Option<&Path>; 3],
        url: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> TlsSettings {
        let query: Vec<(String, String)> = url
            .and_then(|u| url::Url::parse(u).ok())
            .map(|u| u.query_pairs().into_owned().collect())
            .unwrap_or_default();
        let from_url = |names: &[&str]| {
            query
                .iter()
                .rev()
                .find(|(k, _)| names.contains(&k.as_str()))
                .map(|(_, v)| v.clone())
        };
        let pick = |key: Option<&Path>, names: &[&str], var: &str| {
            key.map(|p| p.to_string_lossy().into_owned())
                .or_else(|| from_url(names))
                .or_else(|| env(var))
        };
        let [rootcert, cert, key] = keys;
        TlsSettings {
            rootcert: pick(
                rootcert,
                &["sslrootcert", "ssl-root-cert", "ssl-ca"],
                "PGSSLROOTCERT",
            ),
            cert: pick(cert, &["sslcert", "ssl-cert"], "PGSSLCERT"),
            key: pick(key, &["sslkey", "ssl-key"], "PGSSLKEY"),
            hostaddr: from_url(&["hostaddr"])
                .or_else(|| env("PGHOSTADDR"))
                .and_then(|a| a.parse().ok()),
        }
    }
}

/// libpq's default root certificate file, `~/.postgresql/root.crt`.
pub(super) fn default_root_file() -> Option<PathBuf> {
    std::env::home_dir().map(|home| home.join(".postgresql").join("root.crt"))
}

/// The rule of the module's doc. `default_root` is libpq's default file,
/// `exists` tells whether a file exists; `keys` prefixes the keys in errors.
pub(super) fn decide(
    options: &PgConnectOptions,
    settings: TlsSettings,
    keys: &str,
    default_root: Option<PathBuf>,
    exists: impl Fn(&Path) -> bool,
) -> Result<ServerTrust, ConfigError> {
    let mode = options.get_ssl_mode();
    let explicit = settings.rootcert.filter(|r| !r.is_empty());
    if explicit.as_deref() == Some("system") && !matches!(mode, PgSslMode::VerifyFull) {
        return Err(ConfigError::new(
            format!("{keys}sslrootcert"),
            format!(
                "\"system\" (the platform's roots) needs {keys}sslmode = \"verify-full\", \
                 not \"{}\": without the host name check any certificate a public CA \
                 issued, for any name, would pass",
                mode_name(mode)
            ),
        ));
    }
    let verifying = match mode {
        PgSslMode::Disable | PgSslMode::Allow | PgSslMode::Prefer => false,
        PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull => true,
    };
    let unix_socket = options.get_socket().is_some() || options.get_host().starts_with('/');
    if !verifying || unix_socket {
        return Ok(ServerTrust::Unverified);
    }
    let roots = match explicit {
        Some(r) if r == "system" => Some(Roots::System),
        Some(r) => Some(Roots::Pem(pem(r))),
        None => default_root
            .as_deref()
            .filter(|p| exists(p))
            .map(|p| Roots::Pem(Pem::File(p.to_path_buf()))),
    };
    let roots = match (mode, roots) {
        // libpq verifies `require` only against a root file that exists.
        (PgSslMode::Require, Some(Roots::Pem(Pem::File(path)))) if !exists(&path) => {
            return Ok(ServerTrust::Unverified);
        }
        (PgSslMode::Require, None) => return Ok(ServerTrust::Unverified),
        (_, Some(roots)) => roots,
        (_, None) => {
            let file = default_root.map_or_else(
                || "~/.postgresql/root.crt (no home directory)".to_owned(),
                |p| p.display().to_string(),
            );
            return Err(ConfigError::new(
                format!("{keys}sslrootcert"),
                format!(
                    "root certificate file {file} does not exist, and {keys}sslmode \"{}\" \
                     verifies the server against it; set {keys}sslrootcert to a file, or to \
                     \"system\" with {keys}sslmode = \"verify-full\"",
                    mode_name(mode)
                ),
            ));
        }
    };
    Ok(ServerTrust::Verified(Verification {
        roots,
        check_host: matches!(mode, PgSslMode::VerifyFull),
        host: options.get_host().to_owned(),
        hostaddr: settings.hostaddr,
        port: options.get_port(),
        client_cert: settings.cert.filter(|c| !c.is_empty()).map(pem),
        client_key: settings.key.filter(|k| !k.is_empty()).map(pem),
        keys: keys.to_owned(),
    }))
}

/// As sqlx reads a value: PEM text when it looks like PEM, a path otherwise.
fn pem(value: String) -> Pem {
    let trimmed = value.trim();
    if trimmed.starts_with("-----BEGIN") && trimmed.ends_with("-----") {
        Pem::Inline(value)
    } else {
        Pem::File(PathBuf::from(value))
    }
}

fn mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

#[cfg(test)]
mod tests;
