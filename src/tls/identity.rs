//! The verified peer: who the client certificate says it is, and how TLS was negotiated.
//!
//! Pure apart from reading the rustls connection state. Depends on `x509`.

use rustls::CommonState;

use crate::x509::{CertSummary, SummaryError, hex, rfc3339};

/// The identity carried by a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The certificate's names, validity and serial.
    pub cert: CertSummary,
    /// SHA-256 of the certificate's DER.
    pub sha256: [u8; 32],
}

/// How the TLS session was negotiated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsFacts {
    /// `1.2` or `1.3`.
    pub version: &'static str,
    /// IANA name of the cipher suite, e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher: String,
    /// Whether the session was resumed.
    pub resumed: bool,
    /// Negotiated key-exchange group, e.g. `X25519`.
    pub curve: String,
}

/// Quotes an XFCC value when it holds a separator, escaping `"` and `\` (Envoy's rule).
fn xfcc_value(out: &mut String, value: &str, always_quote: bool) {
    if always_quote || value.contains([',', ';', '=', '"']) {
        out.push('"');
        for c in value.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    } else {
        out.push_str(value);
    }
}

impl PeerIdentity {
    /// Reads the leaf of a verified chain.
    pub fn from_der(der: &[u8]) -> Result<Self, SummaryError> {
        let cert = CertSummary::from_der(der)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(digest.as_ref());
        Ok(Self { cert, sha256 })
    }

    /// The one name to show in logs: SPIFFE ID, else first URI, DNS name, CN or subject.
    pub fn name(&self) -> &str {
        self.cert
            .spiffe_id()
            .or(self.cert.uri_sans.first().map(String::as_str))
            .or(self.cert.dns_sans.first().map(String::as_str))
            .or(self.cert.common_name.as_deref())
            .unwrap_or(&self.cert.subject)
    }

    /// Lowercase hex SHA-256 of the certificate.
    pub fn sha256_hex(&self) -> String {
        hex(&self.sha256)
    }

    /// `not_after` as RFC 3339.
    pub fn not_after_rfc3339(&self) -> String {
        rfc3339(self.cert.not_after)
    }

    /// The `X-Forwarded-Client-Cert` value in Envoy's format:
    /// `Hash=<sha256>;URI=<uri san>;DNS=<dns san>;Subject="<subject>"`.
    pub fn xfcc(&self) -> String {
        let mut out = String::with_capacity(160);
        out.push_str("Hash=");
        out.push_str(&self.sha256_hex());
        for uri in &self.cert.uri_sans {
            out.push_str(";URI=");
            xfcc_value(&mut out, uri, false);
        }
        for dns in &self.cert.dns_sans {
            out.push_str(";DNS=");
            xfcc_value(&mut out, dns, false);
        }
        out.push_str(";Subject=");
        xfcc_value(&mut out, &self.cert.subject, true);
        out
    }
}

impl TlsFacts {
    /// Reads version, suite, resumption and group from an established connection.
    pub fn of(state: &CommonState) -> Self {
        let version = match state.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
            _ => "",
        };
        let cipher = state
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or_default()
            .to_owned();
        let curve = state
            .negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name()))
            .unwrap_or_default();
        let resumed = matches!(state.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
        Self {
            version,
            cipher,
            resumed,
            curve,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(subject: &str, uris: &[&str], dns: &[&str]) -> PeerIdentity {
        PeerIdentity {
            cert: CertSummary::fake(subject, None, uris, dns),
            sha256: [0xab; 32],
        }
    }

    #[test]
    fn xfcc_follows_envoys_format() {
        let id = identity(
            "CN=frontend,O=shop",
            &["spiffe://td/ns/shop/sa/frontend"],
            &["frontend.shop.svc"],
        );
        assert_eq!(
            id.xfcc(),
            format!(
                "Hash={};URI=spiffe://td/ns/shop/sa/frontend;DNS=frontend.shop.svc;Subject=\"CN=frontend,O=shop\"",
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn xfcc_quotes_and_escapes_hostile_values() {
        let id = identity("CN=a\"b", &["spiffe://td/x;URI=spiffe://td/admin"], &[]);
        let v = id.xfcc();
        assert!(v.contains("URI=\"spiffe://td/x;URI=spiffe://td/admin\""), "{v}");
        assert!(v.ends_with("Subject=\"CN=a\\\"b\""), "{v}");
    }

    #[test]
    fn name_prefers_the_spiffe_id() {
        let id = identity("CN=x", &["https://a", "spiffe://td/ns/a/sa/b"], &["d"]);
        assert_eq!(id.name(), "spiffe://td/ns/a/sa/b");
        assert_eq!(identity("CN=x", &[], &["d.svc"]).name(), "d.svc");
        assert_eq!(identity("CN=x", &[], &[]).name(), "CN=x");
    }
}
