//! Addresses in the forms Praefect accepts: a Gitaly node's [`NodeAddress`],
//! and the socket address the metrics listener binds.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// Appended to every address error, and to the error for a missing address.
pub(super) const ADDRESS_FORMS: &str = "expected tcp://HOST:PORT, tls://HOST:PORT or unix:/PATH";

/// A Gitaly node's gRPC address, in the forms Praefect accepts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NodeAddress {
    /// `tcp://HOST:PORT`, plaintext. `port` is `None` for Praefect's
    /// `tcp://HOST`, which loads (with a warning) but cannot be dialed.
    Tcp { host: String, port: Option<u16> },
    /// `tls://HOST:PORT`; `port` as for `Tcp`.
    Tls { host: String, port: Option<u16> },
    /// `unix:/PATH` (also written `unix:///PATH`).
    Unix { path: PathBuf },
}

impl NodeAddress {
    /// The canonical address string (what `Display` prints), as Gitaly expects it,
    /// e.g. in the `gitaly-servers` metadata of `ReplicateRepository`.
    pub fn uri(&self) -> String {
        self.to_string()
    }

    /// Whether the connection uses TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, NodeAddress::Tls { .. })
    }

    /// Whether this is a TCP address without a port: Praefect's configs and
    /// examples have them, and Praefect's own dial of one fails ("missing
    /// port in address"); so does ours, rather than guessing a port.
    pub fn lacks_port(&self) -> bool {
        matches!(
            self,
            NodeAddress::Tcp { port: None, .. } | NodeAddress::Tls { port: None, .. }
        )
    }
}

impl FromStr for NodeAddress {
    type Err = String;

    /// Parses an address; the error says what is wrong and which forms are accepted.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid address {s:?}: {why}; {ADDRESS_FORMS}");
        if let Some(rest) = s.strip_prefix("tcp://") {
            let (host, port) = host_port(rest).map_err(|why| bad(&why))?;
            Ok(NodeAddress::Tcp { host, port })
        } else if let Some(rest) = s.strip_prefix("tls://") {
            let (host, port) = host_port(rest).map_err(|why| bad(&why))?;
            Ok(NodeAddress::Tls { host, port })
        } else if let Some(rest) = s.strip_prefix("unix:") {
            let path = match rest.strip_prefix("//") {
                Some(p) if p.starts_with('/') => p,
                Some(_) => return Err(bad("unix:// must be followed by an absolute path")),
                None => rest,
            };
            if path.is_empty() {
                return Err(bad("the socket path is empty"));
            }
            Ok(NodeAddress::Unix {
                path: PathBuf::from(path),
            })
        } else if s.contains("://") {
            Err(bad("unsupported scheme"))
        } else {
            Err(bad("the scheme is missing"))
        }
    }
}

/// `HOST:PORT`, `[IPV6]:PORT`, or either without the port.
fn host_port(s: &str) -> Result<(String, Option<u16>), String> {
    if s.contains(['/', '?', '#', '@']) || s.contains(char::is_whitespace) {
        return Err("only HOST:PORT may follow the scheme".into());
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed '['")?;
        match after {
            "" => (host, None),
            _ => (
                host,
                Some(after.strip_prefix(':').ok_or("only :PORT may follow ']'")?),
            ),
        }
    } else {
        match s.rsplit_once(':') {
            None => (s, None),
            Some((host, _)) if host.contains(':') => {
                return Err("write IPv6 addresses in brackets, as [::1]:8075".into());
            }
            Some((host, port)) => (host, Some(port)),
        }
    };
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    let port = match port.map(|p| (p, p.parse::<u16>())) {
        None => None,
        Some((_, Ok(port))) if port != 0 => Some(port),
        Some((p, _)) => return Err(format!("{p:?} is not a port number")),
    };
    Ok((host.to_string(), port))
}

impl fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, host, port) = match self {
            NodeAddress::Unix { path } => return write!(f, "unix:{}", path.display()),
            NodeAddress::Tcp { host, port } => ("tcp", host, port),
            NodeAddress::Tls { host, port } => ("tls", host, port),
        };
        match (host.contains(':'), port) {
            (true, Some(port)) => write!(f, "{scheme}://[{host}]:{port}"),
            (true, None) => write!(f, "{scheme}://[{host}]"),
            (false, Some(port)) => write!(f, "{scheme}://{host}:{port}"),
            (false, None) => write!(f, "{scheme}://{host}"),
        }
    }
}

/// Serialized in canonical form, so the printed configuration reads back.
impl Serialize for NodeAddress {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// An IP socket address, or Praefect's `localhost:PORT` and `:PORT`. Other host
/// names are refused rather than resolved while reading the configuration.
pub(super) fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let parsed = s.rsplit_once(':').and_then(|(host, port)| {
        let port = port.parse().ok()?;
        match host {
            "" => Some(SocketAddr::new(unspecified, port)),
            "localhost" => Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
            _ => None,
        }
    });
    parsed.ok_or_else(|| {
        format!(
            "{s:?} is not IP:PORT (e.g. \"127.0.0.1:9652\"; \"localhost:PORT\" and \":PORT\" \
             also work, other host names do not); \"\" disables the listener"
        )
    })
}
