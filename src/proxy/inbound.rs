//! The inbound composition root: one accepted TCP connection from accept to close.
//!
//! TCP → TLS (config loaded once from the store) → peer identity → allow-list → HTTP/1.1
//! upgrade request → dial the app → relay the app's answer → frame pump. Every attempt ends in
//! one [`HandshakeRecord`]. Wires `tls`, `authz`, `proxy::upgrade`, `proxy::pump` and `telemetry`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::LazyConfigAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;

use super::pump::{self, Direction, RelayMeter};
use super::upgrade;
use crate::authz::{Decision, Policy};
use crate::config::{Limits, Upstream};
use crate::telemetry::metrics::CloseLabels;
use crate::telemetry::spans::TraceStart;
use crate::telemetry::{FailureKind, HandshakeRecord, Metrics, Telemetry};
use crate::tls::{PeerIdentity, TlsFacts, TlsStore};

/// Largest body of an app's refusal relayed to the client.
const MAX_REFUSAL_BODY: usize = 64 * 1024;
/// Read buffer of the client's leg. rustls already holds the decrypted bytes, so reading them out
/// in smaller pieces costs copies, not system calls; a sidecar holds many idle connections.
const CLIENT_READ_BUFFER: usize = 2 * 1024;
/// Read buffer of the app's leg (plain TCP: each read is a system call).
const APP_READ_BUFFER: usize = 4 * 1024;
/// Bytes buffered before tungstenite writes on its own (the pump flushes earlier when idle).
const WRITE_BUFFER: usize = 16 * 1024;

/// Everything the inbound path needs, shared by all connections.
pub struct Inbound {
    /// The swappable TLS configs.
    pub store: Arc<TlsStore>,
    /// The allow-list.
    pub policy: Policy,
    /// The app.
    pub upstream: Upstream,
    /// Size limits.
    pub limits: Limits,
    /// From accept to 101.
    pub handshake_timeout: Duration,
    /// Metrics and spans.
    pub telemetry: Arc<Telemetry>,
    /// Fires when the proxy drains: Close 1001 on every connection.
    pub drain: CancellationToken,
    /// Fires when the drain timeout has passed: connections still open are dropped.
    pub kill: CancellationToken,
}

impl RelayMeter for Metrics {
    fn relayed(&self, dir: Direction, messages: u64, bytes: u64) {
        let (m, b) = match dir {
            Direction::ClientToUpstream => (&self.messages_in, &self.bytes_in),
            Direction::UpstreamToClient => (&self.messages_out, &self.bytes_out),
        };
        m.inc_by(messages);
        b.inc_by(bytes);
    }
}

/// What the HTTP exchange produced, filled in by the request handler.
#[derive(Default)]
struct Exchange {
    status: Option<u16>,
    failure: Option<(FailureKind, String)>,
    path: Option<String>,
    subprotocol: Option<String>,
    upgrade_read: Option<Duration>,
    upstream_connect: Option<Duration>,
    legs: Option<(OnUpgrade, Upgraded)>,
    trace: Option<TraceStart>,
}

type Slot = Arc<Mutex<Exchange>>;

/// Moves what the HTTP exchange recorded into the handshake record; returns the upgraded legs.
fn take_exchange(slot: &Slot, rec: &mut HandshakeRecord) -> Option<(OnUpgrade, Upgraded)> {
    let mut ex = slot.lock().map(|mut ex| std::mem::take(&mut *ex)).unwrap_or_default();
    rec.path = ex.path.take().or(rec.path.take());
    rec.status = ex.status.or(rec.status);
    rec.subprotocol = ex.subprotocol.take();
    rec.upgrade_read_time = ex.upgrade_read;
    rec.upstream_connect_time = ex.upstream_connect;
    rec.trace = ex.trace.take();
    if let Some((kind, reason)) = ex.failure.take() {
        rec.fail(kind, reason);
    }
    ex.legs.take()
}

fn with_slot(slot: &Slot, f: impl FnOnce(&mut Exchange)) {
    if let Ok(mut ex) = slot.lock() {
        f(&mut ex);
    }
}

impl Inbound {
    fn ws_config(&self, read_buffer: usize) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(read_buffer)
            .write_buffer_size(WRITE_BUFFER)
            .max_write_buffer_size(WRITE_BUFFER + self.limits.max_message_size + 64)
            .max_message_size(Some(self.limits.max_message_size))
            .max_frame_size(Some(self.limits.max_frame_size))
    }

    /// Serves one accepted connection to its end.
    pub async fn handle(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, permit: Option<OwnedSemaphorePermit>) {
        let server_port = tcp.local_addr().map(|a| a.port()).unwrap_or(0);
        let mut rec = HandshakeRecord::start(peer, server_port, self.upstream.authority());
        if permit.is_none() {
            rec.fail(
                FailureKind::LimitExceeded,
                format!(
                    "{} connections already open (--max-connections)",
                    self.limits.max_connections
                ),
            );
            rec.finish(&self.telemetry);
            return;
        }
        if self.drain.is_cancelled() {
            rec.fail(FailureKind::NotReady, "draining: no new connections");
            rec.finish(&self.telemetry);
            return;
        }
        let timeout = self.handshake_timeout;
        // Boxed: the handshake's state (TLS, hyper on both legs) is large and short-lived;
        // inline, it would size this task for the whole life of the connection.
        let slot: Slot = Arc::default();
        let legs = match tokio::time::timeout(timeout, Box::pin(self.handshake(tcp, &mut rec, &slot))).await {
            Ok(legs) => legs,
            Err(_) => {
                // Keep what the HTTP exchange had learned (path, trace) for the log and the span.
                take_exchange(&slot, &mut rec);
                rec.fail(
                    FailureKind::HandshakeTimeout,
                    format!("TLS and upgrade not done within {}s", timeout.as_secs_f64()),
                );
                None
            }
        };
        drop(slot);
        let client_not_after = rec.identity.as_ref().map(|id| id.cert.not_after_unix());
        let client_expiry = rec.identity.as_ref().map(|id| id.cert.not_after);
        rec.finish(&self.telemetry);
        let Some((client, app)) = legs else { return };
        let metrics = &self.telemetry.metrics;
        metrics.connections_open.inc();
        if let Some(t) = client_not_after {
            metrics.client_connected(t);
        }
        let client_cfg = self.ws_config(CLIENT_READ_BUFFER);
        let app_cfg = self.ws_config(APP_READ_BUFFER);
        let client = WebSocketStream::from_raw_socket(TokioIo::new(client), Role::Server, Some(client_cfg)).await;
        let app = WebSocketStream::from_raw_socket(TokioIo::new(app), Role::Client, Some(app_cfg)).await;
        let expires_at = client_expiry.map(|at| {
            let left = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::Instant::now() + left
        });
        let relay = pump::relay(client, app, self.drain.clone(), expires_at, metrics.as_ref());
        let summary = tokio::select! {
            summary = relay => summary,
            // The drain timeout passed: drop the connection (both sockets close).
            _ = self.kill.cancelled() => pump::CloseSummary {
                initiator: pump::Initiator::Proxy,
                code: None,
                reason: "drain timeout: connection dropped".into(),
            },
        };
        metrics.connections_open.dec();
        if let Some(t) = client_not_after {
            metrics.client_disconnected(t);
        }
        metrics
            .connections_closed
            .get_or_create(&CloseLabels {
                code: summary.code.map_or_else(|| "none".to_owned(), |c| c.to_string()),
                initiator: summary.initiator.as_str(),
            })
            .inc();
        tracing::debug!(
            target: "wsgate::connection",
            peer = %peer,
            initiator = summary.initiator.as_str(),
            code = summary.code.unwrap_or(0),
            reason = %summary.reason,
            "connection closed"
        );
    }

    /// TLS, identity, HTTP upgrade; returns both upgraded legs on success.
    async fn handshake(
        self: &Arc<Self>,
        tcp: TcpStream,
        rec: &mut HandshakeRecord,
        slot: &Slot,
    ) -> Option<(Upgraded, Upgraded)> {
        let Some(serving) = self.store.current() else {
            rec.fail(FailureKind::NotReady, "no valid certificate loaded yet");
            return None;
        };
        rec.serving_serial = Some(serving.leaf.serial.clone());
        let t0 = Instant::now();
        let start = match LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await {
            Ok(start) => start,
            Err(e) => {
                let (kind, reason) = FailureKind::of_tls_error(&e);
                let kind = if kind == FailureKind::ClientClosed {
                    kind
                } else {
                    FailureKind::NotTls
                };
                rec.fail(kind, reason);
                return None;
            }
        };
        let tls = match start.into_stream(serving.server.clone()).await {
            Ok(tls) => tls,
            Err(e) => {
                let (kind, reason) = FailureKind::of_tls_error(&e);
                rec.fail(kind, reason);
                return None;
            }
        };
        drop(serving);
        rec.tls_time = Some(t0.elapsed());
        let conn = tls.get_ref().1;
        rec.tls = Some(TlsFacts::of(conn));
        let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
            rec.fail(FailureKind::NoClientCertificate, "no client certificate");
            return None;
        };
        let identity = match PeerIdentity::from_der(leaf) {
            Ok(id) => Arc::new(id),
            Err(e) => {
                rec.fail(FailureKind::BadCertificate, e.to_string());
                return None;
            }
        };
        rec.identity = Some(identity.clone());
        // A resumed session skips verification: its certificate may have expired since.
        if SystemTime::now() > identity.cert.not_after {
            rec.fail(
                FailureKind::CertificateExpired,
                "client certificate expired (resumed session)",
            );
            return None;
        }
        let decision = self.policy.decide(&identity.cert);
        match &decision {
            Decision::Allow(rule) => {
                rec.decision = Some("allow");
                rec.matched_rule = Some(rule.clone());
            }
            Decision::Deny(_) => rec.decision = Some("deny"),
        }

        let tls_done = Instant::now();
        let this = self.clone();
        let svc_slot = slot.clone();
        let peer = rec.peer;
        let service = hyper::service::service_fn(move |req| {
            let (this, identity, decision, slot) = (this.clone(), identity.clone(), decision.clone(), svc_slot.clone());
            async move {
                Ok::<_, std::convert::Infallible>(
                    this.on_request(req, &identity, &decision, peer, tls_done, &slot).await,
                )
            }
        });
        let served = hyper::server::conn::http1::Builder::new()
            .max_buf_size(16 * 1024)
            .max_headers(100)
            .serve_connection(TokioIo::new(tls), service)
            .with_upgrades()
            .await;
        let legs = take_exchange(slot, rec);
        if rec.failure.is_some() {
            return None;
        }
        if let Err(e) = served {
            let kind = if e.is_parse_too_large() {
                FailureKind::LimitExceeded
            } else if e.is_parse() {
                FailureKind::NotWebsocket
            } else {
                FailureKind::ClientClosed
            };
            rec.fail(kind, format!("HTTP: {e}"));
            return None;
        }
        let Some((client_upgrade, app)) = legs else {
            rec.fail(FailureKind::ClientClosed, "closed before sending an upgrade request");
            return None;
        };
        match client_upgrade.await {
            Ok(client) => Some((client, app)),
            Err(e) => {
                rec.fail(FailureKind::ClientClosed, format!("client upgrade failed: {e}"));
                None
            }
        }
    }

    /// Handles the one HTTP request of a connection.
    async fn on_request(
        &self,
        mut req: Request<Incoming>,
        identity: &PeerIdentity,
        decision: &Decision,
        peer: SocketAddr,
        tls_done: Instant,
        slot: &Slot,
    ) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        // The trace is fixed first, so that refusals join the client's trace too.
        let (trace, trace_headers) = match self.telemetry.tracer.start_handshake(req.headers()) {
            Some((trace, headers)) => (Some(trace), headers),
            None => (None, Vec::new()),
        };
        with_slot(slot, |ex| {
            ex.upgrade_read = Some(tls_done.elapsed());
            ex.path = Some(path);
            ex.trace = trace;
        });
        let refuse = |status: StatusCode, kind: FailureKind, reason: String, resp: Response<Full<Bytes>>| {
            with_slot(slot, |ex| {
                ex.status = Some(status.as_u16());
                ex.failure = Some((kind, reason));
            });
            resp
        };
        if self.drain.is_cancelled() {
            let resp = upgrade::text_response(StatusCode::SERVICE_UNAVAILABLE, "503 service unavailable: draining");
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                FailureKind::NotReady,
                "draining: no new connections".into(),
                resp,
            );
        }
        if let Decision::Deny(reason) = decision {
            let resp = upgrade::text_response(StatusCode::FORBIDDEN, &format!("403 forbidden: {reason}"));
            return refuse(
                StatusCode::FORBIDDEN,
                FailureKind::IdentityNotAllowed,
                reason.clone(),
                resp,
            );
        }
        if let Err(upgrade::NotUpgrade(reason)) = upgrade::check_client_request(&req) {
            let resp = upgrade::upgrade_required(&reason);
            return refuse(StatusCode::UPGRADE_REQUIRED, FailureKind::NotWebsocket, reason, resp);
        }
        let bad_gateway = |reason: String| {
            let resp = upgrade::text_response(StatusCode::BAD_GATEWAY, &format!("502 bad gateway: {reason}"));
            refuse(StatusCode::BAD_GATEWAY, FailureKind::UpstreamUnavailable, reason, resp)
        };
        let t0 = Instant::now();
        let tcp = match self.upstream.addr {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect((self.upstream.host.as_str(), self.upstream.port)).await,
        };
        let tcp = match tcp {
            Ok(tcp) => tcp,
            Err(e) => return bad_gateway(format!("connecting to the app at {}: {e}", self.upstream.authority())),
        };
        with_slot(slot, |ex| ex.upstream_connect = Some(t0.elapsed()));
        let _ = tcp.set_nodelay(true);
        let app_req = upgrade::upstream_request(&req, identity, peer.ip(), &trace_headers);
        let (mut sender, conn) = match hyper::client::conn::http1::Builder::new()
            .handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(tcp))
            .await
        {
            Ok(pair) => pair,
            Err(e) => return bad_gateway(format!("talking to the app: {e}")),
        };
        let mut conn = std::pin::pin!(conn.with_upgrades());
        let mut send = std::pin::pin!(sender.send_request(app_req));
        // The connection task may finish (handing the socket to the upgrade) in the same poll
        // that delivers the response, so a finished connection is not yet a failure.
        let sent = tokio::select! {
            biased;
            resp = &mut send => resp,
            ended = &mut conn => match ended {
                Ok(()) => send.await,
                Err(e) => return bad_gateway(format!("the app closed the connection before answering: {e}")),
            },
        };
        let mut resp = match sent {
            Ok(resp) => resp,
            Err(e) => return bad_gateway(format!("the app did not answer the upgrade: {e}")),
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status();
            let (parts, body) = resp.into_parts();
            let mut collect = std::pin::pin!(Limited::new(body, MAX_REFUSAL_BODY).collect());
            let body = tokio::select! {
                biased;
                b = &mut collect => b,
                _ = &mut conn => collect.await,
            }
            .map(|c| c.to_bytes());
            let body = match body {
                Ok(b) => b,
                Err(e) => return bad_gateway(format!("reading the app's {status} answer: {e}")),
            };
            let resp = upgrade::relay_refusal(parts, body);
            return refuse(
                status,
                FailureKind::UpstreamRejected,
                format!("the app answered {status}"),
                resp,
            );
        }
        let (client_resp, subprotocol) = match upgrade::switching_response(req.headers(), &resp) {
            Ok(pair) => pair,
            Err(reason) => return bad_gateway(reason),
        };
        let mut app_upgrade = hyper::upgrade::on(&mut resp);
        let app = tokio::select! {
            biased;
            up = &mut app_upgrade => up,
            ended = &mut conn => match ended {
                Ok(()) => app_upgrade.await,
                Err(e) => return bad_gateway(format!("the app's upgrade failed: {e}")),
            },
        };
        let app = match app {
            Ok(app) => app,
            Err(e) => return bad_gateway(format!("the app's upgrade failed: {e}")),
        };
        let client_upgrade = hyper::upgrade::on(&mut req);
        with_slot(slot, |ex| {
            ex.status = Some(101);
            ex.subprotocol = subprotocol;
            ex.legs = Some((client_upgrade, app));
        });
        client_resp
    }
}
