//! One record per handshake attempt, from TCP accept to the 101 or the refusal.
//!
//! The composition root fills in the facts each stage returns, then calls
//! [`HandshakeRecord::finish`] exactly once with the attempt's result: one structured log line,
//! the handshake metrics and (with OTLP configured) one span, all from the same error kind.
//! Never holds key material. Depends on `outcome`, `tls::identity`, `x509` and `telemetry`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::trace::SpanKind;
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

/// Which way an attempt goes: a label on its metrics, its log line and the kind of its span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// An mTLS client to the app (span kind SERVER).
    Inbound,
    /// The local app to a remote over mTLS (span kind CLIENT).
    Outbound,
}

impl Flow {
    /// The `direction` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Flow::Inbound => crate::telemetry::metrics::INBOUND,
            Flow::Outbound => crate::telemetry::metrics::OUTBOUND,
        }
    }

    /// The span kind.
    pub fn span_kind(self) -> SpanKind {
        match self {
            Flow::Inbound => SpanKind::Server,
            Flow::Outbound => SpanKind::Client,
        }
    }
}

/// Everything known about one handshake attempt.
#[derive(Debug)]
pub struct HandshakeRecord {
    /// Inbound or outbound.
    pub flow: Flow,
    /// Outbound: the remote's host and port (`server.address`, `server.port`).
    pub remote: Option<(String, u16)>,
    /// When the TCP connection was accepted (monotonic).
    pub started: Instant,
    /// When the TCP connection was accepted (wall clock, for spans).
    pub started_at: SystemTime,
    /// The client's address (outbound: the local app's).
    pub peer: SocketAddr,
    /// The listener's port.
    pub server_port: u16,
    /// TLS parameters, once TLS completed.
    pub tls: Option<TlsFacts>,
    /// The verified peer identity, once TLS completed: the client's (inbound), the remote's
    /// (outbound).
    pub identity: Option<Arc<PeerIdentity>>,
    /// Serial of the certificate the proxy presented (as server inbound, as client outbound).
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
            flow: Flow::Inbound,
            remote: None,
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

    /// Starts the record of an outbound attempt at the local accept: `peer` is the app,
    /// `local_port` the outbound listener's port, the remote is `host:port`.
    pub fn start_outbound(peer: SocketAddr, local_port: u16, host: &str, port: u16, authority: String) -> Self {
        let mut rec = Self::start(peer, local_port, authority);
        rec.flow = Flow::Outbound;
        rec.remote = Some((host.to_owned(), port));
        rec
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
        telemetry.metrics.handshake_done(
            self.flow.as_str(),
            self.failure.as_ref().map(|(k, _)| k.as_str()),
            elapsed,
        );
        self.log(elapsed);
        let trace = self.trace.take();
        let failed = self.failure.as_ref().map(|(k, r)| (k.as_str(), r.as_str()));
        telemetry
            .tracer
            .end_handshake(trace, failed, self.started_at, self.flow.span_kind(), || {
                self.attributes()
            });
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
                    direction = self.flow.as_str(),
                    peer = %self.peer,
                    identity,
                    tls.version = version,
                    tls.cipher = cipher,
                    path = self.path.as_deref().unwrap_or(""),
                    upstream = self.upstream.as_str(),
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
        let outbound = self.flow == Flow::Outbound;
        if let Some((host, port)) = &self.remote {
            // A CLIENT span: the remote is the server, the local app the client.
            a.push(KeyValue::new(attr::SERVER_ADDRESS, host.clone()));
            a.push(KeyValue::new(attr::SERVER_PORT, i64::from(*port)));
            a.push(KeyValue::new(attr::CLIENT_ADDRESS, self.peer.ip().to_string()));
            a.push(KeyValue::new(attr::CLIENT_PORT, i64::from(self.peer.port())));
            a.push(KeyValue::new(attr::LOCAL_PORT, i64::from(self.server_port)));
        } else {
            a.push(KeyValue::new(attr::NETWORK_PEER_ADDRESS, self.peer.ip().to_string()));
            a.push(KeyValue::new(attr::NETWORK_PEER_PORT, i64::from(self.peer.port())));
            a.push(KeyValue::new(attr::SERVER_PORT, i64::from(self.server_port)));
        }
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
            // Inbound the peer is the TLS client; outbound it is the TLS server.
            let [subject, issuer, not_after, hash, spiffe_id, uri_sans, dns_sans] =
                if outbound { attr::PEER_SERVER } else { attr::PEER_CLIENT };
            a.push(KeyValue::new(subject, id.cert.subject.clone()));
            a.push(KeyValue::new(issuer, id.cert.issuer.clone()));
            a.push(KeyValue::new(not_after, rfc3339(id.cert.not_after)));
            a.push(KeyValue::new(hash, id.sha256_hex().to_ascii_uppercase()));
            if let Some(spiffe) = id.cert.spiffe_id() {
                a.push(KeyValue::new(spiffe_id, spiffe.to_owned()));
            }
            if !id.cert.uri_sans.is_empty() {
                a.push(KeyValue::new(uri_sans, strings(&id.cert.uri_sans)));
            }
            if !id.cert.dns_sans.is_empty() {
                a.push(KeyValue::new(dns_sans, strings(&id.cert.dns_sans)));
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
            let key = if outbound {
                attr::CLIENT_CERT_SERIAL
            } else {
                attr::SERVER_CERT_SERIAL
            };
            a.push(KeyValue::new(key, serial.clone()));
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
