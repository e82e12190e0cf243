//! Throwaway PKIs minted with rcgen: a CA and leaves with chosen names, validity and usages.
//!
//! Used by `wsgate demo` and by the test suite (which needs expired, not-yet-valid, wrong-usage
//! and foreign-CA certificates too).

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SecureRandom;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;

/// Why a certificate could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or failed to sign.
    #[error("minting a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// No randomness for a serial number.
    #[error("no randomness available for a serial number")]
    Random,
}

/// A certificate authority that can sign leaves.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA certificate, DER.
    pub cert_der: CertificateDer<'static>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// What a leaf should say.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// Subject common name.
    pub common_name: String,
    /// URI SANs (SPIFFE IDs).
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// IP SANs.
    pub ips: Vec<IpAddr>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Include `serverAuth` in the extended key usage.
    pub server_auth: bool,
    /// Include `clientAuth` in the extended key usage.
    pub client_auth: bool,
}

impl LeafSpec {
    /// A leaf valid from an hour ago for a day, for both server and client authentication.
    pub fn new(common_name: &str) -> Self {
        let now = SystemTime::now();
        Self {
            common_name: common_name.to_owned(),
            uris: Vec::new(),
            dns: Vec::new(),
            ips: Vec::new(),
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(86_400),
            server_auth: true,
            client_auth: true,
        }
    }

    /// Adds a URI SAN.
    pub fn uri(mut self, uri: &str) -> Self {
        self.uris.push(uri.to_owned());
        self
    }

    /// Adds a DNS SAN.
    pub fn dns(mut self, name: &str) -> Self {
        self.dns.push(name.to_owned());
        self
    }

    /// Adds an IP SAN.
    pub fn ip(mut self, ip: IpAddr) -> Self {
        self.ips.push(ip);
        self
    }

    /// Sets the validity window.
    pub fn valid(mut self, not_before: SystemTime, not_after: SystemTime) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }

    /// Sets the extended key usages.
    pub fn usages(mut self, server_auth: bool, client_auth: bool) -> Self {
        self.server_auth = server_auth;
        self.client_auth = client_auth;
        self
    }
}

/// A minted leaf with its key.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// The serial number, lowercase hex (as `CertSummary::serial` prints it).
    pub serial: String,
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte, so the hex is always 32 digits
    Ok(SerialNumber::from_slice(&bytes))
}

impl Ca {
    /// A self-signed CA named `name`, valid from a day ago for ten years.
    pub fn new(name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(86_400)).into();
        params.not_after = (now + Duration::from_secs(3650 * 86_400)).into();
        params.serial_number = Some(random_serial()?);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Signs a new leaf (with a fresh P-256 key and a random serial).
    pub fn leaf(&self, spec: &LeafSpec) -> Result<Leaf, PkiError> {
        self.leaf_for(spec, KeyPair::generate()?)
    }

    /// Signs a new leaf for an existing key, given as PKCS#8 PEM (RSA or ECDSA). The returned
    /// `key_pem` is that PEM.
    pub fn leaf_for_key(&self, spec: &LeafSpec, pkcs8_pem: &str) -> Result<Leaf, PkiError> {
        let mut leaf = self.leaf_for(spec, KeyPair::from_pem(pkcs8_pem)?)?;
        leaf.key_pem = pkcs8_pem.to_owned();
        Ok(leaf)
    }

    fn leaf_for(&self, spec: &LeafSpec, key: KeyPair) -> Result<Leaf, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name.as_str());
        let mut sans = Vec::new();
        for uri in &spec.uris {
            sans.push(SanType::URI(uri.as_str().try_into()?));
        }
        for dns in &spec.dns {
            sans.push(SanType::DnsName(dns.as_str().try_into()?));
        }
        sans.extend(spec.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        params.not_before = spec.not_before.into();
        params.not_after = spec.not_after.into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        if spec.server_auth {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client_auth {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        if params.extended_key_usages.is_empty() {
            // Neither usage asked for: name another one, so the EKU extension is present.
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::CodeSigning);
        }
        let serial = random_serial()?;
        let serial_hex = crate::x509::hex(serial.to_bytes().as_slice());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            serial: serial_hex,
        })
    }
}
