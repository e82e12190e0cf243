//! One record per handshake attempt, from TCP accept to the 101 or the refusal.
//!
//! The inbound composition root fills it in as the connection moves through the stages, then
//! calls [`HandshakeRecord::finish`] exactly once: one structured log line, the handshake
//! metrics (and, with OTLP configured, one span). Never holds key material.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::{Array, KeyValue, StringValue, Value};

use super::Telemetry;
use super::metrics::HandshakeLabels;
use super::spans::{TraceStart, attr};
use crate::certs::summary::rfc3339;
use crate::tls::{PeerIdentity, TlsFacts};

/// Why a handshake failed: the fixed set of `error.type` values (documented in the README).
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

/// Everything known about one handshake attempt.
#[derive(Debug)]
pub struct HandshakeRecord {
    /// When the TCP connection was accepted (monotonic).
    pub started: Instant,
    /// When the TCP connection was accepted (wall clock, for spans).
    pub started_at: SystemTime,
    /// The client's address.
    pub peer: SocketAddr,
    /// The listener's port.
    pub server_port: u16,
    /// TLS parameters, once TLS completed.
    pub tls: Option<TlsFacts>,
    /// The verified client identity, once TLS completed.
    pub identity: Option<Arc<PeerIdentity>>,
    /// Serial of the certificate the proxy presented.
    pub serving_serial: Option<String>,
    /// `allow` or `deny`, once decided.
    pub decision: Option<&'static str>,
    /// The allow pattern that matched.
    pub matched_rule: Option<String>,
    /// The request path.
    pub path: Option<String>,
    /// The subprotocol the app chose.
    pub subprotocol: Option<String>,
    /// The upstream `host:port`.
    pub upstream: String,
    /// The status sent to the client (101 on success).
    pub status: Option<u16>,
    /// Time spent in TLS.
    pub tls_time: Option<Duration>,
    /// Time spent reading the upgrade request after TLS.
    pub upgrade_read_time: Option<Duration>,
    /// Time spent connecting to the app.
    pub upstream_connect_time: Option<Duration>,
    /// Why it failed, if it did.
    pub failure: Option<(FailureKind, String)>,
    /// Trace identity, fixed when the upgrade request was read (tracing on).
    pub trace: Option<TraceStart>,
}

impl HandshakeRecord {
    /// Starts a record at TCP accept.
    pub fn start(peer: SocketAddr, server_port: u16, upstream: String) -> Self {
        Self {
            started: Instant::now(),
            started_at: SystemTime::now(),
            peer,
            server_port,
            tls: None,
            identity: None,
            serving_serial: None,
            decision: None,
            matched_rule: None,
            path: None,
            subprotocol: None,
            upstream,
            status: None,
            tls_time: None,
            upgrade_read_time: None,
            upstream_connect_time: None,
            failure: None,
            trace: None,
        }
    }

    /// Marks the attempt failed; the first failure recorded wins.
    pub fn fail(&mut self, kind: FailureKind, reason: impl Into<String>) {
        if self.failure.is_none() {
            self.failure = Some((kind, reason.into()));
        }
    }

    /// Emits the log line, the metrics and the span. Call exactly once.
    pub fn finish(mut self, telemetry: &Telemetry) {
        let elapsed = self.started.elapsed();
        let metrics = &telemetry.metrics;
        let labels = HandshakeLabels {
            result: if self.failure.is_some() { "failure" } else { "success" },
            error_type: self.failure.as_ref().map(|(k, _)| k.as_str()).unwrap_or(""),
        };
        metrics.handshakes.get_or_create(&labels).inc();
        metrics
            .handshake_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        self.log(elapsed);
        let trace = self.trace.take();
        let failed = self.failure.as_ref().map(|(k, r)| (k.as_str(), r.as_str()));
        telemetry
            .tracer
            .end_handshake(trace, failed, self.started_at, || self.attributes());
    }

    fn log(&self, elapsed: Duration) {
        let identity = self.identity.as_ref().map(|i| i.name()).unwrap_or("");
        let (version, cipher) = self
            .tls
            .as_ref()
            .map(|t| (t.version, t.cipher.as_str()))
            .unwrap_or(("", ""));
        let (outcome, error_type, reason) = match &self.failure {
            None => ("accepted", "", ""),
            Some((kind, reason)) => ("refused", kind.as_str(), reason.as_str()),
        };
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: "wsgate::handshake",
                    peer = %self.peer,
                    identity,
                    tls.version = version,
                    tls.cipher = cipher,
                    path = self.path.as_deref().unwrap_or(""),
                    status = self.status.unwrap_or(0),
                    outcome,
                    error.type = error_type,
                    reason,
                    duration_ms = elapsed.as_secs_f64() * 1e3,
                    "handshake"
                )
            };
        }
        if self.failure.is_some() {
            line!(warn);
        } else {
            line!(info);
        }
    }

    /// The span attributes (only built when the span is recorded).
    fn attributes(&self) -> Vec<KeyValue> {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        let strings = |v: &[String]| Value::Array(Array::String(v.iter().cloned().map(StringValue::from).collect()));
        let mut a = Vec::with_capacity(32);
        a.push(KeyValue::new(attr::NETWORK_PEER_ADDRESS, self.peer.ip().to_string()));
        a.push(KeyValue::new(attr::NETWORK_PEER_PORT, i64::from(self.peer.port())));
        a.push(KeyValue::new(attr::SERVER_PORT, i64::from(self.server_port)));
        a.push(KeyValue::new(attr::TLS_PROTOCOL_NAME, "tls"));
        a.push(KeyValue::new(attr::TLS_ESTABLISHED, self.tls.is_some()));
        a.push(KeyValue::new(attr::UPSTREAM_ADDRESS, self.upstream.clone()));
        if let Some(tls) = &self.tls {
            a.push(KeyValue::new(attr::TLS_PROTOCOL_VERSION, tls.version));
            a.push(KeyValue::new(attr::TLS_CIPHER, tls.cipher.clone()));
            a.push(KeyValue::new(attr::TLS_RESUMED, tls.resumed));
            if !tls.curve.is_empty() {
                a.push(KeyValue::new(attr::TLS_CURVE, tls.curve.clone()));
            }
            a.push(KeyValue::new(attr::TLS_NEXT_PROTOCOL, "http/1.1"));
        }
        if let Some(id) = &self.identity {
            a.push(KeyValue::new(attr::TLS_CLIENT_SUBJECT, id.cert.subject.clone()));
            a.push(KeyValue::new(attr::TLS_CLIENT_ISSUER, id.cert.issuer.clone()));
            a.push(KeyValue::new(attr::TLS_CLIENT_NOT_AFTER, rfc3339(id.cert.not_after)));
            a.push(KeyValue::new(
                attr::TLS_CLIENT_HASH_SHA256,
                id.sha256_hex().to_ascii_uppercase(),
            ));
            if let Some(spiffe) = id.cert.spiffe_id() {
                a.push(KeyValue::new(attr::CLIENT_SPIFFE_ID, spiffe.to_owned()));
            }
            if !id.cert.uri_sans.is_empty() {
                a.push(KeyValue::new(attr::CLIENT_URI_SANS, strings(&id.cert.uri_sans)));
            }
            if !id.cert.dns_sans.is_empty() {
                a.push(KeyValue::new(attr::CLIENT_DNS_SANS, strings(&id.cert.dns_sans)));
            }
        }
        if let Some(decision) = self.decision {
            a.push(KeyValue::new(attr::AUTHZ_DECISION, decision));
        }
        if let Some(rule) = &self.matched_rule {
            a.push(KeyValue::new(attr::AUTHZ_RULE, rule.clone()));
        }
        if let Some(path) = &self.path {
            a.push(KeyValue::new(attr::URL_PATH, path.clone()));
        }
        if let Some(status) = self.status {
            a.push(KeyValue::new(attr::HTTP_RESPONSE_STATUS_CODE, i64::from(status)));
        }
        if let Some(sub) = &self.subprotocol {
            a.push(KeyValue::new(attr::SUBPROTOCOL, sub.clone()));
        }
        if let Some(serial) = &self.serving_serial {
            a.push(KeyValue::new(attr::SERVER_CERT_SERIAL, serial.clone()));
        }
        for (key, value) in [
            (attr::PHASE_TLS_MS, ms(self.tls_time)),
            (attr::PHASE_UPGRADE_READ_MS, ms(self.upgrade_read_time)),
            (attr::PHASE_UPSTREAM_CONNECT_MS, ms(self.upstream_connect_time)),
        ] {
            if let Some(v) = value {
                a.push(KeyValue::new(key, v));
            }
        }
        a
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
