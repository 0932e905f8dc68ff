//! The certificate authorities a `tls://` node's certificate is verified
//! against: the system's, plus those that `SSL_CERT_FILE` and `SSL_CERT_DIR`
//! name, the variables Gitaly and Praefect (Go's `crypto/x509`) honour. The
//! node's host name is checked against the certificate by rustls.

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, TrustAnchor};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// A PEM file of CA certificates, added to the system's.
pub const SSL_CERT_FILE: &str = "SSL_CERT_FILE";
/// Directories (separated by `:`) of PEM files of CA certificates, added to
/// the system's.
pub const SSL_CERT_DIR: &str = "SSL_CERT_DIR";

/// Where Linux distributions keep their CA bundle, in Go's order; as in Go,
/// the first that exists is read.
const SYSTEM_CERT_FILES: [&str; 6] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];
/// Where they keep a directory of CA certificates, in Go's order.
const SYSTEM_CERT_DIRS: [&str; 2] = ["/etc/ssl/certs", "/etc/pki/tls/certs"];

/// Why the certificate authorities could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TrustRootsError {
    /// A file or directory an environment variable names cannot be read, or
    /// holds something that is not PEM.
    #[error("{var} {path}: {reason}")]
    Unreadable {
        var: &'static str,
        path: String,
        reason: String,
    },
    #[error("{var} {path}: no PEM certificate in it")]
    NoCertificate { var: &'static str, path: String },
    #[error(
        "no CA certificate found: the system has none, and neither {SSL_CERT_FILE} nor \
         {SSL_CERT_DIR} names one"
    )]
    Empty,
}

/// The certificate authorities trusted for `tls://` nodes.
#[derive(Clone)]
pub struct TrustRoots {
    anchors: Arc<Vec<TrustAnchor<'static>>>,
}

impl std::fmt::Debug for TrustRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustRoots")
            .field("certificates", &self.anchors.len())
            .finish()
    }
}

impl TrustRoots {
    /// The system's certificate authorities plus those in `ssl_cert_file`
    /// and the directories of `ssl_cert_dir` (values of [`SSL_CERT_FILE`]
    /// and [`SSL_CERT_DIR`]). A file or directory named there must be
    /// readable; an unset or empty value adds nothing.
    pub fn load(
        ssl_cert_file: Option<&OsStr>,
        ssl_cert_dir: Option<&OsStr>,
    ) -> Result<TrustRoots, TrustRootsError> {
        let mut certificates = system_certificates();
        if let Some(file) = ssl_cert_file.filter(|f| !f.is_empty()) {
            let path = Path::new(file);
            let found = from_paths(SSL_CERT_FILE, Some(path), None)?;
            if found.is_empty() {
                return Err(TrustRootsError::NoCertificate {
                    var: SSL_CERT_FILE,
                    path: path.display().to_string(),
                });
            }
            certificates.extend(found);
        }
        for dir in ssl_cert_dir
            .map(std::env::split_paths)
            .into_iter()
            .flatten()
            .filter(|d| !d.as_os_str().is_empty())
        {
            certificates.extend(from_paths(SSL_CERT_DIR, None, Some(&dir))?);
        }
        let mut store = RootCertStore::empty();
        store.add_parsable_certificates(certificates);
        if store.roots.is_empty() {
            return Err(TrustRootsError::Empty);
        }
        Ok(TrustRoots {
            anchors: Arc::new(store.roots),
        })
    }

    /// [`TrustRoots::load`] with this process's `SSL_CERT_FILE` and
    /// `SSL_CERT_DIR`, read once: every node, and every channel a storage
    /// node opens to a source, shares the result.
    pub fn from_env() -> Result<TrustRoots, TrustRootsError> {
        static FROM_ENV: OnceLock<Result<TrustRoots, TrustRootsError>> = OnceLock::new();
        FROM_ENV
            .get_or_init(|| {
                TrustRoots::load(
                    std::env::var_os(SSL_CERT_FILE).as_deref(),
                    std::env::var_os(SSL_CERT_DIR).as_deref(),
                )
            })
            .clone()
    }

    /// How many certificate authorities are trusted.
    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    /// Whether none is (never true of a loaded set).
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    pub(crate) fn anchors(&self) -> impl Iterator<Item = TrustAnchor<'static>> + '_ {
        self.anchors.iter().cloned()
    }
}

/// The system's CA certificates; none when the system has no store.
fn system_certificates() -> Vec<CertificateDer<'static>> {
    let file = SYSTEM_CERT_FILES
        .iter()
        .map(Path::new)
        .find(|p| p.is_file());
    let mut certificates = rustls_native_certs::load_certs_from_paths(file, None).certs;
    for dir in SYSTEM_CERT_DIRS
        .iter()
        .map(Path::new)
        .filter(|d| d.is_dir())
    {
        certificates.extend(rustls_native_certs::load_certs_from_paths(None, Some(dir)).certs);
    }
    certificates
}

/// The certificates of a file or directory that `var` names; an error when
/// it cannot be read.
fn from_paths(
    var: &'static str,
    file: Option<&Path>,
    dir: Option<&Path>,
) -> Result<Vec<CertificateDer<'static>>, TrustRootsError> {
    let path: PathBuf = file.or(dir).map(Path::to_path_buf).unwrap_or_default();
    let unreadable = |reason: String| TrustRootsError::Unreadable {
        var,
        path: path.display().to_string(),
        reason,
    };
    std::fs::metadata(&path).map_err(|e| unreadable(e.to_string()))?;
    let result = rustls_native_certs::load_certs_from_paths(file, dir);
    if let Some(e) = result.errors.first() {
        return Err(unreadable(e.to_string()));
    }
    Ok(result.certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem(name: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn the_environments_files_and_directories_are_added_to_the_systems() {
        let system = TrustRoots::load(None, None).map(|r| r.len()).unwrap_or(0);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, pem("file-ca")).unwrap();
        let certs = dir.path().join("certs");
        let more = dir.path().join("more");
        for (d, names) in [(&certs, ["a", "b"]), (&more, ["c", "d"])] {
            std::fs::create_dir(d).unwrap();
            for name in names {
                std::fs::write(d.join(format!("{name}.pem")), pem(name)).unwrap();
            }
        }
        let roots = TrustRoots::load(Some(file.as_os_str()), None).unwrap();
        assert_eq!(roots.len(), system + 1);
        let dirs = std::env::join_paths([&certs, &more]).unwrap();
        let roots = TrustRoots::load(Some(file.as_os_str()), Some(&dirs)).unwrap();
        assert_eq!(roots.len(), system + 5);
        // Empty values are unset, as in Go.
        match TrustRoots::load(Some(OsStr::new("")), Some(OsStr::new(""))) {
            Ok(roots) => assert_eq!(roots.len(), system),
            Err(e) => assert!(system == 0 && matches!(e, TrustRootsError::Empty), "{e}"),
        }
    }

    #[test]
    fn a_file_or_directory_that_is_named_must_be_readable_and_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = TrustRoots::load(Some(missing.as_os_str()), None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("SSL_CERT_FILE {}: ", missing.display())),
            "{e}"
        );
        let e = TrustRoots::load(None, Some(missing.as_os_str())).unwrap_err();
        assert!(e.to_string().starts_with("SSL_CERT_DIR "), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = TrustRoots::load(Some(empty.as_os_str()), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "SSL_CERT_FILE {}: no PEM certificate in it",
                empty.display()
            )
        );
    }
}
