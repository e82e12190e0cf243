//! What an X.509 certificate says, in plain Rust types: names, validity, serial, usages.
//!
//! Shared by certificate validation (`certs::bundle`) and peer identity (`tls::identity`), so
//! that both read a certificate the same way. Pure; depends on x509-parser only.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a certificate could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SummaryError {
    /// The DER is not an X.509 certificate.
    #[error("not a valid X.509 certificate: {0}")]
    Malformed(String),
}

/// The facts wsgate needs from one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// Subject distinguished name, RFC 4514 style (`CN=app,O=shop`).
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// The subject's first common name, if any.
    pub common_name: Option<String>,
    /// URI subject alternative names (SPIFFE IDs live here).
    pub uri_sans: Vec<String>,
    /// DNS subject alternative names.
    pub dns_sans: Vec<String>,
    /// Serial number as lowercase hex without separators.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Extended key usage: `None` when the extension is absent (any usage allowed).
    pub eku: Option<Eku>,
    /// Whether the basic constraints mark it as a CA.
    pub is_ca: bool,
}

/// The extended key usages that matter to a TLS endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eku {
    /// `id-kp-serverAuth`.
    pub server_auth: bool,
    /// `id-kp-clientAuth`.
    pub client_auth: bool,
    /// `anyExtendedKeyUsage`.
    pub any: bool,
}

fn unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

impl CertSummary {
    /// Reads a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, SummaryError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| SummaryError::Malformed(e.to_string()))?;
        let mut uri_sans = Vec::new();
        let mut dns_sans = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => uri_sans.push((*u).to_owned()),
                    GeneralName::DNSName(d) => dns_sans.push((*d).to_owned()),
                    _ => {}
                }
            }
        }
        let eku = match cert.extended_key_usage() {
            Ok(Some(ext)) => Some(Eku {
                server_auth: ext.value.server_auth,
                client_auth: ext.value.client_auth,
                any: ext.value.any,
            }),
            _ => None,
        };
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let serial = hex(cert.raw_serial());
        Ok(Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            common_name,
            uri_sans,
            dns_sans,
            serial,
            not_before: unix(cert.validity().not_before.timestamp()),
            not_after: unix(cert.validity().not_after.timestamp()),
            eku,
            is_ca: cert.is_ca(),
        })
    }

    /// The SPIFFE ID: the first URI SAN with the `spiffe://` scheme.
    pub fn spiffe_id(&self) -> Option<&str> {
        self.uri_sans
            .iter()
            .map(String::as_str)
            .find(|u| u.starts_with("spiffe://"))
    }

    /// Whether the certificate may authenticate a TLS client.
    pub fn allows_client_auth(&self) -> bool {
        self.eku.is_none_or(|e| e.client_auth || e.any)
    }

    /// Whether the certificate may authenticate a TLS server.
    pub fn allows_server_auth(&self) -> bool {
        self.eku.is_none_or(|e| e.server_auth || e.any)
    }

    /// Seconds since the Unix epoch of `not_after` (negative before 1970).
    pub fn not_after_unix(&self) -> i64 {
        to_unix(self.not_after)
    }
}

/// Lowercase hex without separators (serials, fingerprints).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Seconds since the Unix epoch (negative before 1970).
pub fn to_unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// RFC 3339 in UTC (`2026-11-29T14:00:00Z`), for headers and logs.
pub fn rfc3339(t: SystemTime) -> String {
    let odt = time::OffsetDateTime::from(t);
    odt.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| to_unix(t).to_string())
}

#[cfg(test)]
impl CertSummary {
    /// A summary with just names, for unit tests of code that reads identities.
    pub(crate) fn fake(subject: &str, cn: Option<&str>, uris: &[&str], dns: &[&str]) -> Self {
        Self {
            subject: subject.to_owned(),
            issuer: "CN=ca".into(),
            common_name: cn.map(str::to_owned),
            uri_sans: uris.iter().map(|s| s.to_string()).collect(),
            dns_sans: dns.iter().map(|s| s.to_string()).collect(),
            serial: "01".into(),
            not_before: UNIX_EPOCH,
            not_after: UNIX_EPOCH,
            eku: None,
            is_ca: false,
        }
    }
}
