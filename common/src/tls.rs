//! The rustls client configuration every TLS client here uses: the ring provider (no
//! aws-lc), safe default protocol versions, and either the Mozilla roots (webpki-roots)
//! or the CA certificates of a PEM file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Why the TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file could not be read, holds a malformed certificate, or none.
    #[error("reading CA certificates from {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("cannot build the TLS client configuration: {0}")]
    Setup(#[from] rustls::Error),
}

/// A client configuration trusting the certificates of `ca_file` (PEM), else the Mozilla
/// roots.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            let fail = |reason: String| TlsError::CaFile {
                path: path.to_owned(),
                reason,
            };
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| fail(e.to_string()))?;
            for cert in certs {
                let cert = cert.map_err(|e| fail(e.to_string()))?;
                roots.add(cert).map_err(|e| fail(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(fail("no certificate in it".to_owned()));
            }
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        assert!(client_config(None).is_ok());
        let dir = std::env::temp_dir().join(format!("tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").ok();
        let e = client_config(Some(&empty)).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("no certificate")));
        let missing = client_config(Some(&dir.join("missing.pem"))).err();
        assert!(matches!(missing, Some(TlsError::CaFile { .. })));
        std::fs::remove_dir_all(&dir).ok();
    }
}
