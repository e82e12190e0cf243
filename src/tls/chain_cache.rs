//! A client-certificate verifier that remembers the chains it has verified.
//!
//! Verifying a client's chain costs an ECDSA (or RSA) signature check per link: about a tenth of
//! the CPU of a whole mTLS handshake through wsgate (see docs/performance.md). A sidecar's
//! clients are few and reconnect with the same certificate until cert-manager renews it, so the
//! same chain is verified again and again against the same roots. [`CachingVerifier`] wraps the
//! webpki verifier and keeps, for each chain it accepted, the time its first certificate
//! expires; the same bytes presented again before then are accepted without the signature
//! checks.
//!
//! What keeps it sound:
//! - the key is the SHA-256 of the exact DER of every certificate presented, in order; a
//!   chain that differs in one byte is verified in full;
//! - one cache per verifier, and a verifier per set of roots: a new CA bundle starts empty, so
//!   nothing verified against old roots is accepted under new ones;
//! - an entry is used only before the earliest `notAfter` of its chain, so an expired
//!   certificate is refused as webpki would refuse it (`notBefore` was checked when it was
//!   verified, and time only moves on);
//! - refusals are never cached: a bad chain is verified (and refused) every time;
//! - the proof of possession (the client's CertificateVerify signature) is checked on every
//!   handshake, by the wrapped verifier: a cached chain is worth nothing without its key;
//! - at most [`CAPACITY`] entries (about 64 bytes each), so a peer presenting ever new chains
//!   costs bounded memory and only evicts.
//!
//! Depends on rustls, aws-lc-rs (SHA-256), x509-parser (the validity) and quick_cache.

use std::fmt;
use std::sync::Arc;

use aws_lc_rs::digest;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

/// Most chains one verifier remembers.
pub const CAPACITY: usize = 1024;

/// Wraps a client-certificate verifier and skips its chain verification for a chain it has
/// accepted before and that has not expired since (see the module's doc for why that is sound).
pub struct CachingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    /// SHA-256 of the presented chain → the earliest `notAfter` in it, in Unix seconds.
    verified: quick_cache::sync::Cache<[u8; 32], u64>,
}

impl fmt::Debug for CachingVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachingVerifier")
            .field("inner", &self.inner)
            .field("remembered", &self.verified.len())
            .finish()
    }
}

impl CachingVerifier {
    /// A cache of at most [`CAPACITY`] chains in front of `inner`.
    pub fn new(inner: Arc<dyn ClientCertVerifier>) -> Self {
        Self {
            inner,
            verified: quick_cache::sync::Cache::new(CAPACITY),
        }
    }

    /// How many verified chains are remembered now.
    pub fn remembered(&self) -> usize {
        self.verified.len()
    }
}

/// The cache key of a presented chain: SHA-256 over each certificate's length and bytes.
fn chain_key(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for cert in std::iter::once(end_entity).chain(intermediates) {
        ctx.update(&(cert.len() as u64).to_be_bytes());
        ctx.update(cert.as_ref());
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

/// The earliest `notAfter` of the chain in Unix seconds; `None` when a certificate does not
/// parse (the chain is then not remembered).
fn earliest_not_after(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Option<u64> {
    std::iter::once(end_entity)
        .chain(intermediates)
        .map(|cert| {
            let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
            u64::try_from(parsed.validity().not_after.timestamp()).ok()
        })
        .try_fold(u64::MAX, |min, t| t.map(|t| min.min(t)))
}

impl ClientCertVerifier for CachingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let key = chain_key(end_entity, intermediates);
        if let Some(not_after) = self.verified.get(&key) {
            // webpki accepts up to and including `notAfter`; the cache stops a second earlier.
            if now.as_secs() < not_after {
                return Ok(ClientCertVerified::assertion());
            }
            self.verified.remove(&key);
        }
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if let Some(not_after) = earliest_not_after(end_entity, intermediates) {
            self.verified.insert(key, not_after);
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use rustls::server::WebPkiClientVerifier;

    use super::*;
    use crate::demo::pki::{Ca, LeafSpec};

    fn webpki(ca: &Ca) -> Arc<dyn ClientCertVerifier> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der.clone()).unwrap();
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
            .build()
            .unwrap()
    }

    fn at(t: SystemTime) -> UnixTime {
        UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap())
    }

    fn leaf(ca: &Ca, not_after: SystemTime) -> CertificateDer<'static> {
        let spec = LeafSpec::new("frontend")
            .uri("spiffe://cluster.local/ns/a/sa/frontend")
            .valid(SystemTime::now() - Duration::from_secs(3600), not_after);
        ca.leaf(&spec).unwrap().cert_der
    }

    #[test]
    fn an_accepted_chain_is_remembered_and_accepted_again() {
        let ca = Ca::new("A").unwrap();
        let verifier = CachingVerifier::new(webpki(&ca));
        let cert = leaf(&ca, SystemTime::now() + Duration::from_secs(3600));
        let now = at(SystemTime::now());
        verifier.verify_client_cert(&cert, &[], now).unwrap();
        assert_eq!(verifier.remembered(), 1);
        verifier.verify_client_cert(&cert, &[], now).unwrap();
        assert_eq!(verifier.remembered(), 1, "the same chain is one entry");
    }

    #[test]
    fn a_remembered_chain_is_refused_once_it_has_expired() {
        let ca = Ca::new("A").unwrap();
        let verifier = CachingVerifier::new(webpki(&ca));
        let not_after = SystemTime::now() + Duration::from_secs(600);
        let cert = leaf(&ca, not_after);
        verifier.verify_client_cert(&cert, &[], at(SystemTime::now())).unwrap();
        assert_eq!(verifier.remembered(), 1);
        let later = at(not_after + Duration::from_secs(1));
        let err = verifier.verify_client_cert(&cert, &[], later).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidCertificate(rustls::CertificateError::Expired)
                    | Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. })
            ),
            "{err:?}"
        );
        assert_eq!(verifier.remembered(), 0, "the expired entry is gone");
    }

    #[test]
    fn refused_chains_are_never_remembered() {
        let (ca, other) = (Ca::new("A").unwrap(), Ca::new("Other").unwrap());
        let verifier = CachingVerifier::new(webpki(&ca));
        let foreign = leaf(&other, SystemTime::now() + Duration::from_secs(3600));
        for _ in 0..2 {
            assert!(
                verifier
                    .verify_client_cert(&foreign, &[], at(SystemTime::now()))
                    .is_err()
            );
        }
        assert_eq!(verifier.remembered(), 0);
    }

    #[test]
    fn a_chain_remembered_under_old_roots_is_verified_again_under_new_ones() {
        let (old, new) = (Ca::new("Old").unwrap(), Ca::new("New").unwrap());
        let cert = leaf(&old, SystemTime::now() + Duration::from_secs(3600));
        let before = CachingVerifier::new(webpki(&old));
        before.verify_client_cert(&cert, &[], at(SystemTime::now())).unwrap();
        // A rotation of the CA bundle builds a new verifier, with a cache of its own.
        let after = CachingVerifier::new(webpki(&new));
        assert!(after.verify_client_cert(&cert, &[], at(SystemTime::now())).is_err());
    }

    #[test]
    fn a_chain_differing_in_its_intermediates_is_verified_in_full() {
        let (ca, other) = (Ca::new("A").unwrap(), Ca::new("Other").unwrap());
        let verifier = CachingVerifier::new(webpki(&ca));
        let cert = leaf(&ca, SystemTime::now() + Duration::from_secs(3600));
        let now = at(SystemTime::now());
        verifier.verify_client_cert(&cert, &[], now).unwrap();
        // Same leaf, one more (irrelevant) certificate: another key, a full verification, and
        // webpki still accepts it, so now two entries.
        verifier
            .verify_client_cert(&cert, std::slice::from_ref(&other.cert_der), now)
            .unwrap();
        assert_eq!(verifier.remembered(), 2);
        assert_ne!(
            chain_key(&cert, &[]),
            chain_key(&cert, std::slice::from_ref(&other.cert_der))
        );
    }

    #[test]
    fn the_earliest_not_after_of_the_chain_bounds_the_entry() {
        let ca = Ca::new("A").unwrap();
        let soon = SystemTime::now() + Duration::from_secs(600);
        let cert = leaf(&ca, soon);
        let secs = soon.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let got = earliest_not_after(&cert, std::slice::from_ref(&ca.cert_der)).unwrap();
        assert!(got.abs_diff(secs) <= 1, "{got} vs {secs}");
    }
}
