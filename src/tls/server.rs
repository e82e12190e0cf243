//! Builds the inbound `ServerConfig`: client certificate required and verified against the roots.
//!
//! Depends on `certs::bundle`.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::SingleCertAndKey;

use super::{TlsError, TlsMinVersion, provider, root_store, versions};
use crate::certs::CertBundle;

/// A server config that requires a client certificate chaining to the bundle's roots (with the
/// client-auth usage, checked by webpki) and serves the bundle's chain. ALPN offers `http/1.1`
/// only: WebSocket upgrades are an HTTP/1.1 mechanism.
pub fn server_config(bundle: &CertBundle, min: TlsMinVersion) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(&bundle.roots)?), provider.clone()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions(min))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(bundle.certified.clone())));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
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
