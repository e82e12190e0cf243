//! TLS: rustls configs (server and outbound client) built from a validated bundle, the one swappable store, peer identity.
//!
//! One crypto provider (aws-lc-rs) everywhere, so no second one is linked in.

pub mod chain_cache;
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

/// The process-wide crypto provider: aws-lc-rs, with the key-exchange groups of [`KX_GROUPS`].
///
/// aws-lc-rs rather than ring: it costs less CPU per handshake (`benches/handshake.rs`) and it
/// has ML-KEM, so a post-quantum hybrid key exchange can be offered.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                kx_groups: KX_GROUPS.to_vec(),
                ..rustls::crypto::aws_lc_rs::default_provider()
            })
        })
        .clone()
}

/// The key-exchange groups, most preferred first: the post-quantum hybrid X25519MLKEM768
/// (TLS 1.3 only), then the classic X25519, P-256 and P-384. Named here rather than left to
/// rustls' `prefer-post-quantum` feature, which any crate in the tree could switch.
///
/// A server takes the first group of the *client's* list that it supports, so a classic client
/// (X25519 offered, and its key share sent) gets X25519 without a HelloRetryRequest; the order
/// here decides what wsgate offers when it is the client.
pub static KX_GROUPS: &[&dyn rustls::crypto::SupportedKxGroup] = &[
    rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768,
    rustls::crypto::aws_lc_rs::kx_group::X25519,
    rustls::crypto::aws_lc_rs::kx_group::SECP256R1,
    rustls::crypto::aws_lc_rs::kx_group::SECP384R1,
];

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
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
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
