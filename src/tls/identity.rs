//! The verified peer: who the client certificate says it is, and how TLS was negotiated.
//!
//! Also writes the identity the way Envoy does, for the `X-Forwarded-Client-Cert` header: the
//! subject in RFC 2253 form (what BoringSSL's `X509_NAME_print_ex(XN_FLAG_RFC2253)` prints, which
//! is what Envoy calls), then XFCC quoting. Every value is escaped down to printable ASCII, so the
//! header can always be built whatever the certificate holds.
//!
//! Pure apart from reading the rustls connection state. Depends on `x509` and x509-parser.

use std::borrow::Cow;
use std::fmt::Write as _;

use rustls::CommonState;
use x509_parser::asn1_rs::{Any, Class, Tag};
use x509_parser::prelude::{FromDer, X509Certificate, X509Name};

use crate::x509::{CertSummary, SummaryError, hex, rfc3339};

/// The identity carried by a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The certificate's names, validity and serial.
    pub cert: CertSummary,
    /// SHA-256 of the certificate's DER.
    pub sha256: [u8; 32],
    /// The subject in RFC 2253 form as Envoy writes it (see [`rfc2253`]): printable ASCII only.
    pub subject_rfc2253: String,
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
    /// Negotiated key-exchange group by its IANA name, e.g. `X25519`, `secp256r1` or the
    /// post-quantum hybrid `X25519MLKEM768`.
    pub curve: String,
}

/// Quotes an XFCC value when it holds a separator, escaping `"` and `\` (Envoy's rule).
/// `value` must already be printable ASCII (see [`header_safe`] and [`rfc2253`]).
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

/// A SAN as header-safe text: control characters (C0, DEL) and non-ASCII bytes are
/// percent-encoded (`%0D`), which is how a URI escapes them anyway; anything else is unchanged.
fn header_safe(value: &str) -> Cow<'_, str> {
    if value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for b in value.bytes() {
        if (0x20..0x7f).contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    Cow::Owned(out)
}

/// OpenSSL/BoringSSL short names of the attribute types they know; others print as a dotted OID.
const SHORT_NAMES: [(&str, &str); 25] = [
    ("2.5.4.3", "CN"),
    ("2.5.4.4", "SN"),
    ("2.5.4.5", "serialNumber"),
    ("2.5.4.6", "C"),
    ("2.5.4.7", "L"),
    ("2.5.4.8", "ST"),
    ("2.5.4.9", "street"),
    ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"),
    ("2.5.4.12", "title"),
    ("2.5.4.13", "description"),
    ("2.5.4.15", "businessCategory"),
    ("2.5.4.16", "postalAddress"),
    ("2.5.4.17", "postalCode"),
    ("2.5.4.41", "name"),
    ("2.5.4.42", "GN"),
    ("2.5.4.43", "initials"),
    ("2.5.4.44", "generationQualifier"),
    ("2.5.4.45", "x500UniqueIdentifier"),
    ("2.5.4.46", "dnQualifier"),
    ("2.5.4.65", "pseudonym"),
    ("2.5.4.72", "role"),
    ("1.2.840.113549.1.9.1", "emailAddress"),
    ("0.9.2342.19200300.100.1.25", "DC"),
    ("0.9.2342.19200300.100.1.1", "UID"),
];

/// The characters of a string value, decoded as BoringSSL decodes them before printing; `None`
/// for a type it does not print as text (or an undecodable value), which is dumped as hex.
fn decode(value: &Any<'_>) -> Option<Vec<char>> {
    if value.header.class() != Class::Universal || value.header.is_constructed() {
        return None;
    }
    let data = value.data;
    match value.header.tag() {
        Tag::Utf8String => std::str::from_utf8(data).ok().map(|s| s.chars().collect()),
        // Read as Latin-1, one byte per character.
        Tag::NumericString
        | Tag::PrintableString
        | Tag::T61String
        | Tag::Ia5String
        | Tag::UtcTime
        | Tag::GeneralizedTime
        | Tag::VisibleString => Some(data.iter().map(|&b| char::from(b)).collect()),
        Tag::BmpString if data.len().is_multiple_of(2) => data
            .chunks_exact(2)
            .map(|c| char::from_u32(u32::from(u16::from_be_bytes([c[0], c[1]]))))
            .collect(),
        Tag::UniversalString if data.len().is_multiple_of(4) => data
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        _ => None,
    }
}

/// Writes a value RFC 2253 style (BoringSSL's `ASN1_STRFLGS_RFC2253`): each character as UTF-8,
/// every byte above 0x7F and every control byte as `\XX`; `\ " , + < > ;`, a leading space or
/// `#` and a trailing space backslash-escaped.
fn escape_2253(out: &mut String, chars: &[char]) {
    let last = chars.len().saturating_sub(1);
    for (i, c) in chars.iter().enumerate() {
        let mut utf8 = [0u8; 4];
        let bytes = c.encode_utf8(&mut utf8).as_bytes();
        for (j, &b) in bytes.iter().enumerate() {
            let first_byte = i == 0 && j == 0;
            let last_byte = i == last && j == bytes.len() - 1;
            if !(0x20..0x7f).contains(&b) {
                let _ = write!(out, "\\{b:02X}");
            } else if matches!(b, b'\\' | b'"' | b',' | b'+' | b'<' | b'>' | b';')
                || (first_byte && (b == b' ' || b == b'#'))
                || (last_byte && b == b' ')
            {
                out.push('\\');
                out.push(char::from(b));
            } else {
                out.push(char::from(b));
            }
        }
    }
}

/// Writes `#` and the value's DER in uppercase hex (RFC 2253 §2.4, BoringSSL's `DUMP_DER`).
fn dump_der(out: &mut String, value: &Any<'_>) {
    out.push('#');
    let header = &value.header;
    match header.raw_tag() {
        Some(raw) => raw.iter().for_each(|b| {
            let _ = write!(out, "{b:02X}");
        }),
        None => {
            let tag = header.tag().0;
            let ident = ((header.class() as u8) << 6) | (u8::from(header.is_constructed()) << 5);
            if tag < 31 {
                let _ = write!(out, "{:02X}", ident | tag as u8);
            } else {
                let _ = write!(out, "{:02X}", ident | 0x1f);
                let mut groups = Vec::new();
                let mut t = tag;
                loop {
                    groups.push((t & 0x7f) as u8);
                    t >>= 7;
                    if t == 0 {
                        break;
                    }
                }
                for (i, g) in groups.iter().enumerate().rev() {
                    let _ = write!(out, "{:02X}", if i == 0 { *g } else { g | 0x80 });
                }
            }
        }
    }
    let len = value.data.len();
    if len < 0x80 {
        let _ = write!(out, "{len:02X}");
    } else {
        let be = len.to_be_bytes();
        let skip = be.iter().take_while(|&&b| b == 0).count();
        let _ = write!(out, "{:02X}", 0x80 | (be.len() - skip));
        be[skip..].iter().for_each(|b| {
            let _ = write!(out, "{b:02X}");
        });
    }
    value.data.iter().for_each(|b| {
        let _ = write!(out, "{b:02X}");
    });
}

/// A distinguished name as Envoy writes it (BoringSSL's `X509_NAME_print_ex` with
/// `XN_FLAG_RFC2253`): attributes in reverse order, `,` between RDNs and `+` inside a
/// multi-valued one, short names (`CN`, `O`, …) or a dotted OID whose value is then dumped as
/// `#` and hex DER, values escaped by [`escape_2253`]. The result is printable ASCII.
pub fn rfc2253(name: &X509Name<'_>) -> String {
    let entries: Vec<_> = name
        .iter()
        .enumerate()
        .flat_map(|(set, rdn)| rdn.iter().map(move |atv| (set, atv)))
        .collect();
    let mut out = String::with_capacity(64);
    let mut prev = None;
    for (set, atv) in entries.into_iter().rev() {
        if let Some(p) = prev {
            out.push(if p == set { '+' } else { ',' });
        }
        prev = Some(set);
        let oid = atv.attr_type().to_id_string();
        let short = SHORT_NAMES.iter().find(|(o, _)| *o == oid).map(|(_, sn)| *sn);
        out.push_str(short.unwrap_or(&oid));
        out.push('=');
        match (short, decode(atv.attr_value())) {
            (Some(_), Some(chars)) => escape_2253(&mut out, &chars),
            _ => dump_der(&mut out, atv.attr_value()),
        }
    }
    out
}

impl PeerIdentity {
    /// Reads the leaf of a verified chain.
    pub fn from_der(der: &[u8]) -> Result<Self, SummaryError> {
        let cert = CertSummary::from_der(der)?;
        let (_, parsed) = X509Certificate::from_der(der).map_err(|e| SummaryError::Malformed(e.to_string()))?;
        let subject_rfc2253 = rfc2253(parsed.subject());
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(digest.as_ref());
        Ok(Self {
            cert,
            sha256,
            subject_rfc2253,
        })
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
    /// `Hash=<sha256>;URI=<uri san>;DNS=<dns san>;Subject="<RFC 2253 subject>"`. Always
    /// printable ASCII: SANs have control and non-ASCII bytes percent-encoded, the subject has
    /// them as RFC 2253 `\XX` escapes; values holding `,` `;` `=` `"` are quoted.
    pub fn xfcc(&self) -> String {
        let mut out = String::with_capacity(160);
        out.push_str("Hash=");
        out.push_str(&self.sha256_hex());
        for uri in &self.cert.uri_sans {
            out.push_str(";URI=");
            xfcc_value(&mut out, &header_safe(uri), false);
        }
        for dns in &self.cert.dns_sans {
            out.push_str(";DNS=");
            xfcc_value(&mut out, &header_safe(dns), false);
        }
        out.push_str(";Subject=");
        xfcc_value(&mut out, &header_safe(&self.subject_rfc2253), true);
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
            subject_rfc2253: subject.to_owned(),
        }
    }

    /// DER: tag, short or long length, content.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if content.len() < 0x80 {
            out.push(content.len() as u8);
        } else {
            out.extend([0x82, (content.len() >> 8) as u8, content.len() as u8]);
        }
        out.extend_from_slice(content);
        out
    }

    const CN: &[u8] = &[0x55, 0x04, 0x03];
    const OU: &[u8] = &[0x55, 0x04, 0x0b];
    const O: &[u8] = &[0x55, 0x04, 0x0a];
    const C: &[u8] = &[0x55, 0x04, 0x06];
    const DC: &[u8] = &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19];
    const UTF8: u8 = 0x0c;
    const PRINTABLE: u8 = 0x13;

    /// An AttributeTypeAndValue.
    fn atv(oid: &[u8], tag: u8, value: &[u8]) -> Vec<u8> {
        tlv(0x30, &[tlv(0x06, oid), tlv(tag, value)].concat())
    }

    /// The RFC 2253 form of a Name made of these RDNs (each a set of attributes).
    fn name_2253(rdns: &[&[Vec<u8>]]) -> String {
        let seq: Vec<u8> = rdns.iter().flat_map(|rdn| tlv(0x31, &rdn.concat())).collect();
        let der = tlv(0x30, &seq);
        let (rest, name) = X509Name::from_der(&der).unwrap();
        assert!(rest.is_empty());
        rfc2253(&name)
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
    fn rfc2253_reverses_rdns_and_joins_multi_valued_ones_with_plus() {
        // RFC 2253 §5's examples, stored most significant first as in a certificate.
        let v = name_2253(&[
            &[atv(C, PRINTABLE, b"US")],
            &[atv(O, UTF8, b"Widget Inc.")],
            &[atv(OU, UTF8, b"Sales"), atv(CN, UTF8, b"J. Smith")],
        ]);
        // BoringSSL reverses attributes one by one, so inside the RDN too.
        assert_eq!(v, "CN=J. Smith+OU=Sales,O=Widget Inc.,C=US");
        let v = name_2253(&[
            &[atv(C, PRINTABLE, b"GB")],
            &[atv(O, UTF8, b"Sue, Grabbit and Runn")],
            &[atv(CN, UTF8, b"L. Eagle")],
        ]);
        assert_eq!(v, "CN=L. Eagle,O=Sue\\, Grabbit and Runn,C=GB");
        let v = name_2253(&[&[atv(DC, 0x16, b"example")], &[atv(CN, UTF8, b"x")]]);
        assert_eq!(v, "CN=x,DC=example");
    }

    #[test]
    fn rfc2253_escapes_specials_leading_hash_and_spaces() {
        let v = name_2253(&[&[atv(CN, UTF8, br#"a,b+c"d\e<f>g;h=i"#)]]);
        assert_eq!(v, r#"CN=a\,b\+c\"d\\e\<f\>g\;h=i"#);
        assert_eq!(name_2253(&[&[atv(CN, UTF8, b"#1")]]), "CN=\\#1");
        assert_eq!(name_2253(&[&[atv(CN, UTF8, b"a#1")]]), "CN=a#1");
        assert_eq!(name_2253(&[&[atv(CN, UTF8, b" a b ")]]), "CN=\\ a b\\ ");
        assert_eq!(name_2253(&[&[atv(CN, UTF8, b" ")]]), "CN=\\ ");
    }

    #[test]
    fn rfc2253_hex_escapes_control_and_non_ascii_bytes() {
        let v = name_2253(&[&[atv(CN, UTF8, b"evil\r\nX-Injected: 1\0\x7f\t")]]);
        assert_eq!(v, "CN=evil\\0D\\0AX-Injected: 1\\00\\7F\\09");
        assert_eq!(name_2253(&[&[atv(CN, UTF8, "caf\u{e9}".as_bytes())]]), "CN=caf\\C3\\A9");
        // Latin-1 types are read a byte per character, then written as UTF-8.
        assert_eq!(name_2253(&[&[atv(CN, 0x14, b"caf\xe9")]]), "CN=caf\\C3\\A9");
        // BMPString: UTF-16 code units.
        assert_eq!(
            name_2253(&[&[atv(CN, 0x1e, &[0x00, 0x41, 0x20, 0xac])]]),
            "CN=A\\E2\\82\\AC"
        );
    }

    #[test]
    fn rfc2253_dumps_unknown_attributes_and_undecodable_values_as_hex_der() {
        let v = name_2253(&[&[atv(&[0x2a, 0x03, 0x04], UTF8, b"abc")]]);
        assert_eq!(v, "1.2.3.4=#0C03616263");
        let v = name_2253(&[&[atv(CN, UTF8, &[0xff, 0xfe])]]);
        assert_eq!(v, "CN=#0C02FFFE");
        let v = name_2253(&[&[atv(CN, 0x04, b"\r\n")]]);
        assert_eq!(v, "CN=#04020D0A");
        let long = vec![b'a'; 200];
        let v = name_2253(&[&[atv(&[0x2a, 0x03, 0x04], UTF8, &long)]]);
        assert_eq!(v, format!("1.2.3.4=#0C81C8{}", "61".repeat(200)));
    }

    #[test]
    fn a_real_certificate_with_cr_lf_and_commas_gives_a_header_safe_xfcc() {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CountryName, "DE");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Shop, Inc.");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            "front\r\nX-Forwarded-Client-Cert: URI=spiffe://td/admin",
        );
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://td/ns/shop/sa/frontend".try_into().unwrap(),
        )];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let id = PeerIdentity::from_der(cert.der()).unwrap();
        assert_eq!(
            id.subject_rfc2253,
            "CN=front\\0D\\0AX-Forwarded-Client-Cert: URI=spiffe://td/admin,O=Shop\\, Inc.,C=DE"
        );
        let xfcc = id.xfcc();
        assert!(http::HeaderValue::from_str(&xfcc).is_ok(), "{xfcc}");
        assert!(
            xfcc.ends_with(
                r#";URI=spiffe://td/ns/shop/sa/frontend;Subject="CN=front\\0D\\0AX-Forwarded-Client-Cert: URI=spiffe://td/admin,O=Shop\\, Inc.,C=DE""#
            ),
            "{xfcc}"
        );
    }

    #[test]
    fn sans_with_control_or_non_ascii_bytes_are_percent_encoded() {
        let id = identity("CN=x", &["spiffe://td/a\r\nb"], &["d\u{e9}.svc"]);
        let v = id.xfcc();
        assert!(v.contains(";URI=spiffe://td/a%0D%0Ab;DNS=d%C3%A9.svc;"), "{v}");
        assert!(http::HeaderValue::from_str(&v).is_ok());
    }

    #[test]
    fn xfcc_quotes_and_escapes_hostile_values() {
        // The RFC 2253 form of CN `a"b\c` is `CN=a\"b\\c`; XFCC quoting escapes it once more.
        let id = identity(r#"CN=a\"b\\c"#, &["spiffe://td/x;URI=spiffe://td/admin"], &[]);
        let v = id.xfcc();
        assert!(v.contains("URI=\"spiffe://td/x;URI=spiffe://td/admin\""), "{v}");
        assert!(v.ends_with(r#"Subject="CN=a\\\"b\\\\c""#), "{v}");
    }

    #[test]
    fn name_prefers_the_spiffe_id() {
        let id = identity("CN=x", &["https://a", "spiffe://td/ns/a/sa/b"], &["d"]);
        assert_eq!(id.name(), "spiffe://td/ns/a/sa/b");
        assert_eq!(identity("CN=x", &[], &["d.svc"]).name(), "d.svc");
        assert_eq!(identity("CN=x", &[], &[]).name(), "CN=x");
    }
}
