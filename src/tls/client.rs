//! Builds the outbound `ClientConfig`: the pod's own certificate presented as the client
//! certificate, the remote's certificate verified against the same trust roots the inbound side
//! uses, with its host name (webpki).
//!
//! Built by the reloader from the same validated bundle as the server config and installed with
//! it in one `Serving`, so a rotation swaps both at once. Depends on `certs::bundle`.

use std::sync::Arc;

use rustls::ClientConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::sign::SingleCertAndKey;

use super::{TlsError, TlsMinVersion, provider, root_store, versions};
use crate::certs::CertBundle;

/// A client config that presents the bundle's chain and key and accepts a server whose
/// certificate chains to the bundle's roots (server-auth usage) and names the dialled host.
/// ALPN offers `http/1.1` only, as the server side does. Resumption is off: every handshake
/// verifies the remote's certificate again (and sees the current roots).
pub fn client_config(bundle: &CertBundle, min: TlsMinVersion) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(root_store(&bundle.roots)?), provider())
        .build()
        .map_err(TlsError::ServerVerifier)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(min))?
        .with_webpki_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(bundle.certified.clone())));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}
