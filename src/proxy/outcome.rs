//! The outcome of a handshake attempt: the fixed set of `error.type` values, and how a TLS
//! error maps onto it.
//!
//! Every stage's error names its kind here, so the log line, the metric label and the span
//! attribute agree. A leaf of `proxy`: the stages depend on it, it depends on rustls only.

/// Why a handshake failed: the fixed set of `error.type` values (documented in docs/telemetry.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The client sent no certificate.
    NoClientCertificate,
    /// The client certificate does not chain to the trust roots.
    UnknownCa,
    /// The client certificate has expired.
    CertificateExpired,
    /// The client certificate is not valid yet.
    CertificateNotYetValid,
    /// The client certificate does not allow client authentication.
    BadCertificateUsage,
    /// The client certificate is otherwise unacceptable (bad signature, malformed, revoked).
    BadCertificate,
    /// The verified identity is not in the allow-list.
    IdentityNotAllowed,
    /// TLS failed after the ClientHello (unsupported version, alert from the client, …).
    TlsProtocolError,
    /// The bytes on the port were not TLS at all (plain HTTP, random bytes).
    NotTls,
    /// The peer closed the connection before the handshake completed.
    ClientClosed,
    /// TLS + upgrade did not finish within `--handshake-timeout`.
    HandshakeTimeout,
    /// The request was not a WebSocket upgrade (answered 426).
    NotWebsocket,
    /// The app could not be reached (answered 502).
    UpstreamUnavailable,
    /// The app answered the upgrade with an error status, relayed to the client.
    UpstreamRejected,
    /// A limit was hit: connection count, header size.
    LimitExceeded,
    /// No valid certificate has been loaded yet: the proxy serves nothing.
    NotReady,
}

impl FailureKind {
    /// Every kind, for documentation and tests.
    pub const ALL: [FailureKind; 16] = [
        Self::NoClientCertificate,
        Self::UnknownCa,
        Self::CertificateExpired,
        Self::CertificateNotYetValid,
        Self::BadCertificateUsage,
        Self::BadCertificate,
        Self::IdentityNotAllowed,
        Self::TlsProtocolError,
        Self::NotTls,
        Self::ClientClosed,
        Self::HandshakeTimeout,
        Self::NotWebsocket,
        Self::UpstreamUnavailable,
        Self::UpstreamRejected,
        Self::LimitExceeded,
        Self::NotReady,
    ];

    /// The `error.type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoClientCertificate => "no_client_certificate",
            Self::UnknownCa => "unknown_ca",
            Self::CertificateExpired => "certificate_expired",
            Self::CertificateNotYetValid => "certificate_not_yet_valid",
            Self::BadCertificateUsage => "bad_certificate_usage",
            Self::BadCertificate => "bad_certificate",
            Self::IdentityNotAllowed => "identity_not_allowed",
            Self::TlsProtocolError => "tls_protocol_error",
            Self::NotTls => "not_tls",
            Self::ClientClosed => "client_closed",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::NotWebsocket => "not_websocket",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamRejected => "upstream_rejected",
            Self::LimitExceeded => "limit_exceeded",
            Self::NotReady => "not_ready",
        }
    }

    /// Classifies a failed TLS handshake by the rustls error inside the I/O error.
    pub fn of_tls_error(err: &std::io::Error) -> (Self, String) {
        use rustls::CertificateError as C;
        let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
            let kind = match err.kind() {
                std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe => Self::ClientClosed,
                _ => Self::TlsProtocolError,
            };
            return (kind, err.to_string());
        };
        let kind = match tls {
            rustls::Error::NoCertificatesPresented => Self::NoClientCertificate,
            rustls::Error::InvalidCertificate(c) => match c {
                C::UnknownIssuer => Self::UnknownCa,
                C::Expired | C::ExpiredContext { .. } => Self::CertificateExpired,
                C::NotValidYet | C::NotValidYetContext { .. } => Self::CertificateNotYetValid,
                C::InvalidPurpose | C::InvalidPurposeContext { .. } => Self::BadCertificateUsage,
                _ => Self::BadCertificate,
            },
            _ => Self::TlsProtocolError,
        };
        (kind, tls.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_types_are_distinct_snake_case_names() {
        let names: std::collections::HashSet<_> = FailureKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), FailureKind::ALL.len());
        assert!(
            names
                .iter()
                .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        );
    }

    #[test]
    fn rustls_certificate_errors_map_to_their_error_type() {
        let cases = [
            (rustls::Error::NoCertificatesPresented, FailureKind::NoClientCertificate),
            (
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
                FailureKind::UnknownCa,
            ),
            (
                rustls::Error::InvalidCertificate(rustls::CertificateError::Expired),
                FailureKind::CertificateExpired,
            ),
            (
                rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYet),
                FailureKind::CertificateNotYetValid,
            ),
            (
                rustls::Error::InvalidCertificate(rustls::CertificateError::InvalidPurpose),
                FailureKind::BadCertificateUsage,
            ),
            (
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature),
                FailureKind::BadCertificate,
            ),
            (
                rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoCipherSuitesInCommon),
                FailureKind::TlsProtocolError,
            ),
        ];
        for (err, want) in cases {
            let io = std::io::Error::new(std::io::ErrorKind::InvalidData, err);
            assert_eq!(FailureKind::of_tls_error(&io).0, want);
        }
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(FailureKind::of_tls_error(&eof).0, FailureKind::ClientClosed);
    }
}
