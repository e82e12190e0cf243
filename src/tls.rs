//! TLS: rustls configs (server and outbound client) built from a validated bundle, the one swappable store, peer identity.
//!
//! One crypto provider (ring) everywhere, so no second one is linked in.

pub mod client;
pub mod identity;
pub mod reloader;
pub mod server;
pub mod store;

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

pub use identity::{PeerIdentity, TlsFacts};
pub use store::{Configs, NotServing, Serving, ServingNow, TlsStore};

/// Why a rustls config could not be built from a bundle.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the roots, versions or key.
    #[error("building the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built from the roots.
    #[error("building the client-certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The server verifier (outbound) could not be built from the roots.
    #[error("building the server-certificate verifier: {0}")]
    ServerVerifier(rustls::server::VerifierBuilderError),
}

/// The process-wide crypto provider (ring).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The lowest TLS version accepted (`--tls-min-version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMinVersion {
    /// TLS 1.2 and 1.3.
    #[value(name = "1.2")]
    Tls12,
    /// TLS 1.3 only (the default: every current client speaks it).
    #[value(name = "1.3")]
    Tls13,
}

fn versions(min: TlsMinVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
    static TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    match min {
        TlsMinVersion::Tls12 => BOTH,
        TlsMinVersion::Tls13 => TLS13,
    }
}

/// A digest of a set of trust roots, independent of their order and of duplicates: two sets
/// with the same digest trust the same certificates.
pub fn roots_digest(roots: &[rustls_pki_types::CertificateDer<'static>]) -> [u8; 32] {
    let mut sorted: Vec<&[u8]> = roots.iter().map(|r| r.as_ref()).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for der in sorted {
        ctx.update(&(der.len() as u64).to_be_bytes());
        ctx.update(der);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn root_store(roots: &[rustls_pki_types::CertificateDer<'static>]) -> Result<rustls::RootCertStore, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone())?;
    }
    Ok(store)
}
