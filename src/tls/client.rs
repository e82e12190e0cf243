//! Builds a `ClientConfig` that presents the bundle's certificate and trusts its roots.
//!
//! Used by the demo's client and by tests; the outbound direction will use it too. Depends on
//! `certs::bundle`.

use std::sync::Arc;

use rustls::ClientConfig;
use rustls::sign::SingleCertAndKey;

use super::{TlsError, provider, root_store, versions};
use crate::certs::CertBundle;
use crate::config::TlsMinVersion;

/// A client config with the bundle's certificate as client certificate and its roots as trust.
pub fn client_config(bundle: &CertBundle, min: TlsMinVersion) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(min))?
        .with_root_certificates(root_store(&bundle.roots)?)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(bundle.certified.clone())));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
