//! Builds the inbound `ServerConfig`: client certificate required and verified against the roots.
//!
//! Depends on `certs::bundle` and `chain_cache`.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::SingleCertAndKey;
use rustls_pki_types::CertificateDer;

use super::chain_cache::CachingVerifier;
use super::{TlsError, TlsMinVersion, provider, root_store, versions};
use crate::certs::CertBundle;

/// A server config that requires a client certificate chaining to the bundle's roots (with the
/// client-auth usage, checked by webpki) and serves the bundle's chain. ALPN offers `http/1.1`
/// only: WebSocket upgrades are an HTTP/1.1 mechanism. No session is ever resumed: every
/// handshake is full and verifies the client.
pub fn server_config(bundle: &CertBundle, min: TlsMinVersion) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(bundle, min, provider())
}

/// [`server_config`] with another crypto provider: for the handshake benchmark, which compares
/// providers (the bundle's key must have been loaded by the same provider).
pub fn server_config_with(
    bundle: &CertBundle,
    min: TlsMinVersion,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = client_verifier_with(&bundle.roots, provider.clone())?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions(min))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(bundle.certified.clone())));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No session resumption: every connection verifies the client's chain against the roots
    // served now (a resumed session would skip that after a root change or for a revoked
    // chain), and issuing tickets nobody uses costs CPU on every handshake (rustls sends two by
    // default and keeps a session cache).
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The client-certificate verifier for `roots`: the one the served config uses, also used to
/// re-verify the chains of open connections when the roots change.
pub fn client_verifier(roots: &[CertificateDer<'static>]) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    client_verifier_with(roots, provider())
}

/// [`client_verifier`] with the given crypto provider: webpki's, behind a cache of the chains
/// it accepted ([`CachingVerifier`]: the same chain again is not verified again until it
/// expires; a new set of roots is a new verifier with an empty cache).
fn client_verifier_with(
    roots: &[CertificateDer<'static>],
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(roots)?), provider).build()?;
    Ok(Arc::new(CachingVerifier::new(webpki)))
}

/// A server config without client authentication, for the admission webhook (the API server
/// does not present a client certificate by default).
pub fn server_config_no_client_auth(bundle: &CertBundle) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(TlsMinVersion::Tls12))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(bundle.certified.clone())));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
