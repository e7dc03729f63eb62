//! The rustls client configuration for `https://` endpoints, built once per node at start
//! (reading the CA file or the system trust store) and shared by every shard's client through
//! an `Arc`: never per request.
//!
//! Roots: `proxy.ca_file` when set (only those CAs are trusted), else the system's trust store
//! through `rustls-native-certs` — the certificates the operator manages with the OS (and any
//! private CA installed there), updated with the OS rather than frozen into the binary as
//! `webpki-roots` would be. Crypto is rustls's `ring` provider (no C toolchain beyond `cc`).

use crate::config::ProxyConfig;
use std::sync::Arc;

/// Builds the client configuration. Errors name what is wrong with the CA file; an empty
/// system store is not an error here (`Config::validate` refuses an `https://` endpoint
/// without roots), it only fails each TLS call with an unknown-issuer error.
pub fn client_config(opts: &ProxyConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut config = build(&opts.ca_file, None)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration trusting the CAs of `ca_file` (PEM), or the system's trust store
/// when it is empty, presenting `identity` (certificate chain and key) when given. Shared with
/// the Redis link (`rediss://`).
pub fn build(
    ca_file: &str,
    identity: Option<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    if ca_file.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "system CA certificates: some could not be read");
        }
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        tracing::debug!(added, ignored, "system CA certificates loaded");
    } else {
        for cert in crate::config::pem_certs(ca_file)? {
            roots
                .add(cert)
                .map_err(|e| format!("{ca_file:?}: bad CA certificate: {e}"))?;
        }
    }
    // rustls 0.23.48 marks the ring provider deprecated for lacking post-quantum key exchange
    // (aws-lc-rs has it). We stay on ring on purpose: aws-lc-rs needs cmake and a C build.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("client certificate and key: {e}")),
    }
}
