//! `--tls`: a certificate authority made for one run and a certificate of
//! it for the storage nodes (127.0.0.1 and localhost), so the demo shows the
//! `tls://` path end to end. Nothing is written here: the nodes take the
//! PEM text, and the binary hands the CA to the process's `SSL_CERT_FILE`.

use crate::error::DemoError;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The run's CA and the nodes' certificate and key, PEM.
#[derive(Clone)]
pub struct DemoTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for DemoTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.write_str("DemoTls")
    }
}

impl DemoTls {
    /// A new CA, and a server certificate of it for 127.0.0.1 and localhost.
    pub fn generate() -> Result<DemoTls, DemoError> {
        let failed = |e: rcgen::Error| DemoError::Tls(e.to_string());
        let ca_key = KeyPair::generate().map_err(failed)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        ca.distinguished_name
            .push(DnType::CommonName, "gitaly-replicator demo CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).map_err(failed)?;
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate().map_err(failed)?;
        let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .map_err(failed)?;
        leaf.distinguished_name
            .push(DnType::CommonName, "gitaly-replicator demo storage node");
        leaf.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = leaf.signed_by(&key, &issuer).map_err(failed)?;
        Ok(DemoTls {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
