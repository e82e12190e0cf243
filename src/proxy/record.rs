//! One record per handshake attempt, from TCP accept to the 101 or the refusal.
//!
//! The composition root fills in the facts each stage returns, then calls
//! [`HandshakeRecord::finish`] exactly once with the attempt's result: one structured log line,
//! the handshake metrics and (with OTLP configured) one span, all from the same error kind.
//! Never holds key material. Depends on `outcome`, `tls::identity`, `x509` and `telemetry`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::{Array, KeyValue, StringValue, Value};

use super::outcome::FailureKind;
use crate::telemetry::Telemetry;
use crate::telemetry::spans::{TraceStart, attr};
use crate::tls::{PeerIdentity, TlsFacts};
use crate::x509::rfc3339;

/// A failed attempt as the record needs it: its kind, its one-line reason, the status sent.
pub trait Failure: std::fmt::Display {
    /// The `error.type` of this failure.
    fn kind(&self) -> FailureKind;
    /// The HTTP status sent to the client, if one was.
    fn status(&self) -> Option<u16> {
        None
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
    /// Why it failed, if it did: set only by [`HandshakeRecord::finish`].
    failure: Option<(FailureKind, String)>,
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

    /// Records the attempt's result (the one place a failure is written), then emits the log
    /// line, the metrics and the span. Consumes the record: called exactly once.
    pub fn finish(mut self, result: Result<(), &dyn Failure>, telemetry: &Telemetry) {
        match result {
            Ok(()) => self.status = Some(101),
            Err(failure) => {
                self.status = failure.status().or(self.status);
                self.failure = Some((failure.kind(), failure.to_string()));
            }
        }
        let elapsed = self.started.elapsed();
        telemetry
            .metrics
            .handshake_done(self.failure.as_ref().map(|(k, _)| k.as_str()), elapsed);
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
