//! A throwaway PKI for TLS tests: a CA, and a certificate for localhost / 127.0.0.1
//! that it signed, as PEM files in a temporary directory (`ca.pem`, `cert.pem`,
//! `key.pem`). Shared by `tests/tls.rs` (through `common`) and the CLI's TLS test
//! (`client/tests/cli.rs`, by path).
#![allow(dead_code)]

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        Pki { dir }
    }

    /// One of the PEM files: `ca.pem`, `cert.pem` or `key.pem`.
    pub fn path(&self, f: &str) -> std::path::PathBuf {
        self.dir.path().join(f)
    }
}
