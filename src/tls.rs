//! The optional TLS listener (`[tls]`): rustls with the ring provider, TLS 1.2 and
//! 1.3. A TLS connection is served by the same connection task as a plain one: rustls
//! runs inside it as a state machine over the non-blocking socket (see
//! [`crate::conn`]), so there is no extra task, copy layer or thread per connection.

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// Loads the certificate chain and key named by `[tls]`. Errors name the key and file.
pub fn server_config(cfg: &mychat_config::TlsConfig) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("tls.cert_file {}: {e}", cfg.cert_file.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "tls.cert_file {}: no certificate in it",
        cfg.cert_file.display()
    );
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .map_err(|e| anyhow::anyhow!("tls.key_file {}: {e}", cfg.key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("tls.cert_file / tls.key_file: {e}"))?;
    Ok(Arc::new(sc))
}
