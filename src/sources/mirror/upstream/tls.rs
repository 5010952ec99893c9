//! TLS for upstreams: the system's roots (honouring `SSL_CERT_FILE` and
//! `SSL_CERT_DIR`) plus, for a host given `--upstream-ca`, its extra CA.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::UpstreamError;

pub(super) fn tls_config(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, UpstreamError> {
    let mut roots = rustls::RootCertStore::empty();
    // The system store, honouring SSL_CERT_FILE / SSL_CERT_DIR.
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "skipping an unreadable system certificate");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect())
            .map_err(|e| UpstreamError::Ca {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(UpstreamError::Ca {
                path: path.to_owned(),
                message: "no certificates in the file".into(),
            });
        }
        for cert in certs {
            roots.add(cert).map_err(|e| UpstreamError::Ca {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
