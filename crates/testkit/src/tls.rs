//! Certificate authorities and certificates made for one test, written as
//! PEM files into a directory of their own.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// A CA: its certificate as a PEM file, and the key that signs leaves.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate, PEM.
    pub cert_file: PathBuf,
    dir: tempfile::TempDir,
}

/// A leaf certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, in a directory of its own.
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("a self-signed CA");
        let dir = tempfile::tempdir().expect("a directory for certificates");
        let cert_file = dir.path().join(format!("{name}.pem"));
        std::fs::write(&cert_file, cert.pem()).expect("writing the CA");
        TestCa {
            issuer: Issuer::new(params, key),
            cert_file,
            dir,
        }
    }

    /// The directory the CA's files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A certificate for `names` (DNS names or IP addresses), good for
    /// servers and clients, signed by this CA; files `<file>.pem` and
    /// `<file>-key.pem`.
    pub fn leaf(&self, file: &str, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().expect("a leaf key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("leaf parameters");
        params.distinguished_name.push(DnType::CommonName, file);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("a signed leaf");
        let cert_file = self.dir.path().join(format!("{file}.pem"));
        let key_file = self.dir.path().join(format!("{file}-key.pem"));
        std::fs::write(&cert_file, cert.pem()).expect("writing the leaf");
        std::fs::write(&key_file, key.serialize_pem()).expect("writing the leaf's key");
        Leaf {
            cert_file,
            key_file,
        }
    }
}

impl Leaf {
    /// The storage node's flags that serve TLS with this certificate.
    pub fn node_flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert_file.display().to_string(),
            "--tls-key".into(),
            self.key_file.display().to_string(),
        ]
    }
}
