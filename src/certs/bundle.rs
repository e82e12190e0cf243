//! Turns the bytes of a certificate set into a validated [`CertBundle`], or says why it cannot.
//!
//! Validation is what keeps a bad set from ever replacing a good one: the PEM parses, the key is
//! PKCS#1, SEC1 or PKCS#8 and matches the leaf, the leaf is inside its validity window, allows the
//! usage the proxy needs, and chains to the trust roots. Pure (time is a parameter); depends on
//! rustls (key loading), rustls-webpki (chain building) and `x509`.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use super::source::{CA_CRT, RawSet, TLS_CRT, TLS_KEY};
use crate::x509::{CertSummary, SummaryError, rfc3339};

/// Why a certificate set was rejected. The previous set keeps serving.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    /// A file holds no certificate at all.
    #[error("{file} holds no PEM certificate")]
    NoCertificate {
        /// `tls.crt`, `ca.crt` or the trust bundle.
        file: &'static str,
    },
    /// A file is not valid PEM.
    #[error("{file} is not valid PEM: {reason}")]
    Pem {
        /// The file.
        file: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
    /// `tls.key` holds no private key.
    #[error("tls.key holds no private key (expected PKCS#1, SEC1 or PKCS#8 PEM)")]
    NoKey,
    /// The key could not be loaded.
    #[error("tls.key cannot be used: {0}")]
    BadKey(String),
    /// The key belongs to another certificate.
    #[error("tls.key does not match the certificate in tls.crt")]
    KeyMismatch,
    /// The leaf could not be parsed.
    #[error("the certificate in tls.crt cannot be read: {0}")]
    Leaf(#[from] SummaryError),
    /// The leaf is not valid yet.
    #[error("the certificate in tls.crt (serial {serial}) is not valid before {not_before}")]
    NotYetValid {
        /// Serial, hex.
        serial: String,
        /// RFC 3339.
        not_before: String,
    },
    /// The leaf has expired.
    #[error("the certificate in tls.crt (serial {serial}) expired at {not_after}")]
    Expired {
        /// Serial, hex.
        serial: String,
        /// RFC 3339.
        not_after: String,
    },
    /// The leaf's extended key usage forbids what the proxy needs.
    #[error(
        "the certificate in tls.crt does not allow {0} authentication (extended key usage); issue it with usages [server auth, client auth]"
    )]
    Usage(&'static str),
    /// The leaf does not chain to the trust roots.
    #[error("the certificate in tls.crt does not chain to the trust roots in {roots}: {reason}")]
    Untrusted {
        /// Where the roots came from.
        roots: &'static str,
        /// webpki's reason.
        reason: ChainError,
    },
}

/// Why webpki refused the chain.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// A trust root is not a usable certificate.
    #[error("a trust root cannot be parsed: {0}")]
    Root(webpki::Error),
    /// The leaf is not a usable end-entity certificate.
    #[error("{0}")]
    Leaf(webpki::Error),
    /// The chain does not verify for a usage the proxy needs.
    #[error("{0:?}")]
    Verify(webpki::Error),
}

/// What the proxy's own certificate must be good for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// Serving TLS (the inbound proxy, the webhook).
    Server,
    /// Dialling as a TLS client.
    Client,
    /// Both.
    Both,
}

impl Usage {
    fn needs_server(self) -> bool {
        matches!(self, Usage::Server | Usage::Both)
    }

    fn needs_client(self) -> bool {
        matches!(self, Usage::Client | Usage::Both)
    }
}

/// A validated certificate set, ready to build rustls configs from.
#[derive(Debug, Clone)]
pub struct CertBundle {
    /// Chain and loaded signing key, checked to match.
    pub certified: Arc<CertifiedKey>,
    /// The trust roots (from the trust bundle if configured, else `ca.crt`).
    pub roots: Vec<CertificateDer<'static>>,
    /// What the leaf says.
    pub leaf: CertSummary,
    /// Fingerprint of the bytes this came from.
    pub fingerprint: [u8; 32],
}

fn certs(file: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BundleError::Pem {
            file,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(BundleError::NoCertificate { file });
    }
    Ok(certs)
}

const TRUST_BUNDLE: &str = "the trust bundle";

impl CertBundle {
    /// Validates a raw set at time `now` for `usage`, using `provider` to load the key.
    pub fn from_raw(
        raw: &RawSet,
        usage: Usage,
        now: SystemTime,
        provider: &CryptoProvider,
    ) -> Result<Self, BundleError> {
        let chain = certs(TLS_CRT, &raw.cert)?;
        let key = match PrivateKeyDer::from_pem_slice(&raw.key) {
            Ok(k) => k,
            Err(rustls_pki_types::pem::Error::NoItemsFound) => return Err(BundleError::NoKey),
            Err(e) => {
                return Err(BundleError::Pem {
                    file: TLS_KEY,
                    reason: e.to_string(),
                });
            }
        };
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| BundleError::BadKey(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(BundleError::KeyMismatch);
            }
            Err(e) => return Err(BundleError::BadKey(format!("cannot check it against tls.crt: {e}"))),
        }
        let leaf_der = &certified.cert[0];
        let leaf = CertSummary::from_der(leaf_der)?;
        if now < leaf.not_before {
            return Err(BundleError::NotYetValid {
                serial: leaf.serial.clone(),
                not_before: rfc3339(leaf.not_before),
            });
        }
        if now > leaf.not_after {
            return Err(BundleError::Expired {
                serial: leaf.serial.clone(),
                not_after: rfc3339(leaf.not_after),
            });
        }
        if usage.needs_server() && !leaf.allows_server_auth() {
            return Err(BundleError::Usage("server"));
        }
        if usage.needs_client() && !leaf.allows_client_auth() {
            return Err(BundleError::Usage("client"));
        }
        let (roots_name, roots) = match (&raw.trust, &raw.ca) {
            (Some(trust), _) => (TRUST_BUNDLE, certs(TRUST_BUNDLE, trust)?),
            (None, Some(ca)) => (CA_CRT, certs(CA_CRT, ca)?),
            (None, None) => return Err(BundleError::NoCertificate { file: CA_CRT }),
        };
        verify_chain(&certified.cert, &roots, usage, now, provider).map_err(|reason| BundleError::Untrusted {
            roots: roots_name,
            reason,
        })?;
        Ok(Self {
            certified: Arc::new(certified),
            roots,
            leaf,
            fingerprint: raw.fingerprint(),
        })
    }
}

fn verify_chain(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
    usage: Usage,
    now: SystemTime,
    provider: &CryptoProvider,
) -> Result<(), ChainError> {
    let anchors = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ChainError::Root)?;
    let ee = webpki::EndEntityCert::try_from(&chain[0]).map_err(ChainError::Leaf)?;
    let time = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
    let algs = provider.signature_verification_algorithms.all;
    let mut usages = Vec::new();
    if usage.needs_server() {
        usages.push(webpki::KeyUsage::server_auth());
    }
    if usage.needs_client() {
        usages.push(webpki::KeyUsage::client_auth());
    }
    for usage in usages {
        ee.verify_for_usage(algs, &anchors, &chain[1..], time, usage, None, None)
            .map_err(ChainError::Verify)?;
    }
    Ok(())
}
