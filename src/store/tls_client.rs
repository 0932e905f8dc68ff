//! The relay's TLS client: a rustls configuration that trusts exactly the
//! roots the configuration decided (`config::database_tls`), checks the host
//! name for `verify-full` only, and shows the client certificate if one is
//! configured. Loaded before anything is dialled, so a missing or unreadable
//! file stops the connection with the key and the path.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::config::{Pem, Roots, Verification};

/// Why the relay's TLS client could not be set up: a configuration problem,
/// not worth waiting for. Names the key and the path, never a file's content.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsSetupError {
    #[error(
        "root certificate file {path} does not exist; set {keys}sslrootcert to a file, or to \
         \"system\" with {keys}sslmode = \"verify-full\""
    )]
    RootFileMissing { path: String, keys: String },
    #[error("{key} {pem}: cannot read it: {reason}")]
    Unreadable {
        key: String,
        pem: String,
        reason: String,
    },
    #[error("{key} {pem}: no PEM certificate in it")]
    NoCertificate { key: String, pem: String },
    #[error("{key} {pem}: no PEM private key in it")]
    NoPrivateKey { key: String, pem: String },
    #[error("{keys}sslcert and {keys}sslkey go together: set both or neither")]
    HalfClientCertificate { keys: String },
    #[error("{keys}sslrootcert = \"system\": the platform has no root certificates ({reason})")]
    NoSystemRoots { keys: String, reason: String },
    #[error("{keys}host {host:?} is not a host name or an IP address")]
    BadHost { keys: String, host: String },
    /// A caller that cannot start a relay was given a connection that needs one.
    #[error(
        "{keys}sslmode and {keys}sslrootcert ask for verification, which only a store \
         opened with connect_store carries out"
    )]
    NeedsRelay { keys: String },
    #[error("{what}: {source}")]
    Rustls { what: String, source: rustls::Error },
}

/// The rustls configuration and the name to verify for `v`.
pub(crate) fn client_config(
    v: &Verification,
) -> Result<(Arc<ClientConfig>, ServerName<'static>), TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(root_store(v)?);
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsSetupError::Rustls {
            what: format!("{}sslrootcert", v.keys),
            source: rustls::Error::General(e.to_string()),
        })?;
    let verifier: Arc<dyn ServerCertVerifier> = if v.check_host {
        webpki
    } else {
        Arc::new(ChainOnly(webpki))
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsSetupError::Rustls {
            what: "TLS versions".into(),
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&v.client_cert, &v.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let cert_key = format!("{}sslcert", v.keys);
            let chain = certificates(&cert_key, cert)?;
            let key = private_key(&format!("{}sslkey", v.keys), key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|source| TlsSetupError::Rustls {
                    what: format!("{}sslcert and {}sslkey", v.keys, v.keys),
                    source,
                })?
        }
        _ => {
            return Err(TlsSetupError::HalfClientCertificate {
                keys: v.keys.clone(),
            });
        }
    };
    let host = v.host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned()).map_err(|_| TlsSetupError::BadHost {
        keys: v.keys.clone(),
        host: v.host.clone(),
    })?;
    Ok((Arc::new(config), name))
}

fn root_store(v: &Verification) -> Result<RootCertStore, TlsSetupError> {
    let mut store = RootCertStore::empty();
    match &v.roots {
        Roots::Pem(pem) => {
            let key = format!("{}sslrootcert", v.keys);
            if let Pem::File(path) = pem
                && !Path::new(path).exists()
            {
                return Err(TlsSetupError::RootFileMissing {
                    path: path.display().to_string(),
                    keys: v.keys.clone(),
                });
            }
            for cert in certificates(&key, pem)? {
                store.add(cert).map_err(|source| TlsSetupError::Rustls {
                    what: format!("{key} {pem}"),
                    source,
                })?;
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let reason = found
                    .errors
                    .first()
                    .map_or_else(|| "none found".to_owned(), ToString::to_string);
                return Err(TlsSetupError::NoSystemRoots {
                    keys: v.keys.clone(),
                    reason,
                });
            }
        }
    }
    Ok(store)
}

fn pem_bytes(key: &str, pem: &Pem) -> Result<Vec<u8>, TlsSetupError> {
    match pem {
        Pem::File(path) => std::fs::read(path).map_err(|e| TlsSetupError::Unreadable {
            key: key.to_owned(),
            pem: pem.to_string(),
            reason: e.to_string(),
        }),
        Pem::Inline(text) => Ok(text.as_bytes().to_vec()),
    }
}

fn certificates(key: &str, pem: &Pem) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let bytes = pem_bytes(key, pem)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsSetupError::Unreadable {
            key: key.to_owned(),
            pem: pem.to_string(),
            reason: format!("not PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            key: key.to_owned(),
            pem: pem.to_string(),
        });
    }
    Ok(certs)
}

fn private_key(key: &str, pem: &Pem) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    let bytes = pem_bytes(key, pem)?;
    // The parser's error is not shown: it might quote the key.
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsSetupError::NoPrivateKey {
            key: key.to_owned(),
            pem: pem.to_string(),
        },
        _ => TlsSetupError::Unreadable {
            key: key.to_owned(),
            pem: pem.to_string(),
            reason: "not a PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
        },
    })
}

/// `verify-ca`: the chain must lead to a trusted root, the name is not
/// checked (libpq's meaning, and sqlx's `NoHostnameTlsVerifier`). webpki
/// checks the chain before the name, so a name error means the chain passed.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
