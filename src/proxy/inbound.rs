//! The inbound composition root: one accepted TCP connection from accept to close.
//!
//! accept (TLS, identity) → authorize (allow-list) → exchange (the upgrade request) → dial (the
//! app and its 101) → the client's 101 → pump. Each stage returns its own typed error; this
//! file turns the first one into the attempt's outcome, in one place ([`HandshakeError`]), and
//! fills the [`HandshakeRecord`] from what the stages return. Wires `accept`, `exchange`,
//! `dial`, `upgrade`, `pump`, `record`, `authz`, `tls` and `telemetry`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::accept::{self, AcceptError};
use super::admission::{Admission, IdentitySlot, Refusal};
use super::budget::{Hold, MemoryBudget};
use super::dial::{self, DialError};
use super::exchange::{self, ExchangeError};
use super::outcome::FailureKind;
use super::pump::{self, Direction, RelayMeter, Stopper};
use super::record::{Failure, HandshakeRecord};
use super::settings::{Limits, Upstream};
use super::trust::{self, TrustRegistry, Untrusted};
use super::upgrade::{self, IdentityHeaderError, NotUpgrade};
use crate::authz::{Decision, Denied, Policy};
use crate::telemetry::metrics::{CloseLabels, INBOUND};
use crate::telemetry::{Metrics, Telemetry};
use crate::tls::{PeerIdentity, TlsStore};
use opentelemetry::trace::SpanKind;
use rustls_pki_types::CertificateDer;

/// Why a handshake attempt did not end in a relayed WebSocket: the first stage that refused.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// `--max-connections` connections are open.
    #[error("{0} connections already open (--max-connections)")]
    TooManyConnections(usize),
    /// The proxy is draining.
    #[error("draining: no new connections")]
    Draining,
    /// No valid certificate has been loaded yet.
    #[error("no valid certificate loaded yet")]
    NotReady,
    /// TLS + upgrade took longer than `--handshake-timeout`.
    #[error("TLS and upgrade not done within {}s", .0.as_secs_f64())]
    Timeout(Duration),
    /// The TLS stage refused.
    #[error(transparent)]
    Accept(#[from] AcceptError),
    /// The client's HTTP exchange failed.
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    /// The request is not a WebSocket upgrade (426).
    #[error(transparent)]
    NotUpgrade(#[from] NotUpgrade),
    /// The identity is not allowed (403).
    #[error(transparent)]
    Denied(#[from] Denied),
    /// The identity has too many connections open (429).
    #[error(transparent)]
    Limit(#[from] Refusal),
    /// The app could not be reached or refused (502 or its own answer).
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The verified identity could not be written into the app's request (500, never forwarded
    /// without it).
    #[error(transparent)]
    IdentityHeader(#[from] IdentityHeaderError),
}

impl Failure for HandshakeError {
    fn kind(&self) -> FailureKind {
        match self {
            Self::TooManyConnections(_) => FailureKind::LimitExceeded,
            Self::Draining | Self::NotReady => FailureKind::NotReady,
            Self::Timeout(_) => FailureKind::HandshakeTimeout,
            Self::Accept(e) => e.kind(),
            Self::Exchange(e) => e.kind(),
            Self::NotUpgrade(_) => FailureKind::NotWebsocket,
            Self::Denied(_) => FailureKind::IdentityNotAllowed,
            Self::Limit(_) => FailureKind::LimitExceeded,
            Self::Dial(e) => e.kind(),
            Self::IdentityHeader(_) => FailureKind::BadCertificate,
        }
    }
}

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
    /// Handshake slots per address and in all, connection slots per identity.
    pub admission: Arc<Admission>,
    /// What all connections may hold for unfinished messages.
    pub budget: Arc<MemoryBudget>,
    /// The open connections' client chains, verified again when the trust roots change.
    pub trust: Arc<TrustRegistry>,
}

/// A connection past its handshake: both upgraded legs, and its identity's slot held for its life.
struct Established {
    client: Upgraded,
    app: Upgraded,
    _slot: IdentitySlot,
    /// Who the client is, and the chain it presented.
    identity: Arc<PeerIdentity>,
    chain: Vec<CertificateDer<'static>>,
    /// Digest of the roots the handshake verified the chain against.
    roots: [u8; 32],
}

/// A connection ready to relay: what [`Inbound::open`] hands to the long-lived part of the
/// connection's task.
struct Open {
    client: TokioIo<Upgraded>,
    app: TokioIo<Upgraded>,
    _slot: IdentitySlot,
    _trust: trust::TrustGuard,
    stopper: Arc<Stopper>,
    /// The client certificate's expiry, on the runtime's clock and as a Unix time.
    expires_at: Option<tokio::time::Instant>,
    client_not_after: Option<i64>,
    /// What each leg holds of an unfinished message (client's, app's).
    holds: (Arc<Hold>, Arc<Hold>),
    peer: SocketAddr,
}

/// Counts and logs a connection ended because its client is no longer trusted.
pub(super) fn report_untrusted(metrics: &Metrics, ended: &Untrusted) {
    metrics.connections_untrusted.inc();
    tracing::info!(
        target: "wsgate::trust",
        peer = %ended.peer,
        identity = %ended.name,
        reason = %ended.reason,
        "closing connection: client certificate no longer trusted (trust roots changed)"
    );
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

/// The frame and message limits of the relay (shared with the outbound root).
pub(super) fn frame_limits(limits: &Limits) -> pump::FrameLimits {
    pump::FrameLimits {
        max_frame: limits.max_frame_size,
        max_message: limits.max_message_size,
    }
}

/// Counts and logs a relayed connection's end (shared with the outbound root).
pub(super) fn closed(metrics: &Metrics, direction: &'static str, summary: &pump::CloseSummary, peer: SocketAddr) {
    metrics
        .connections_closed
        .get_or_create(&CloseLabels {
            code: summary.code.map_or_else(|| "none".to_owned(), |c| c.to_string()),
            initiator: summary.initiator.as_str(),
            direction,
        })
        .inc();
    tracing::debug!(
        target: "wsgate::connection",
        direction,
        peer = %peer,
        initiator = summary.initiator.as_str(),
        code = summary.code.unwrap_or(0),
        reason = %summary.reason,
        "connection closed"
    );
}

impl Inbound {
    /// Serves one accepted connection to its end.
    ///
    /// This future is the connection's task for its whole life, so it holds only what the relay
    /// needs: the handshake and the relay's set-up run boxed ([`Self::open`]), and so does the
    /// relay itself (its size is the pump's, with no copy of the values moved into it).
    pub async fn handle(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, permit: Option<OwnedSemaphorePermit>) {
        let Some(open) = Box::pin(self.open(tcp, peer, permit.is_some())).await else {
            return;
        };
        self.relay(open).await;
        // The connection slot is held until the relay ends.
        drop(permit);
    }

    /// Admission, the handshake and the relay's set-up: the attempt's record is finished here,
    /// and a connection that will be relayed comes back ready to pump.
    async fn open(self: &Arc<Self>, tcp: TcpStream, peer: SocketAddr, admitted: bool) -> Option<Box<Open>> {
        let server_port = tcp.local_addr().map(|a| a.port()).unwrap_or(0);
        // A handshake slot first: refused before a byte is read, counted, and logged at debug
        // only (a flood must not become a log flood). Held until the handshake ends.
        let pending = if admitted && !self.drain.is_cancelled() {
            match self.admission.pending(peer.ip()) {
                Ok(slot) => Some(slot),
                Err(refusal) => {
                    self.telemetry.metrics.refused(INBOUND, refusal.label());
                    tracing::debug!(target: "wsgate::limits", %peer, reason = %refusal, "connection refused");
                    return None;
                }
            }
        } else {
            None
        };
        let mut rec = HandshakeRecord::start(peer, server_port, self.upstream.authority());
        let result = if !admitted {
            self.telemetry.metrics.refused(INBOUND, "max_connections");
            Err(HandshakeError::TooManyConnections(self.limits.max_connections))
        } else if self.drain.is_cancelled() {
            Err(HandshakeError::Draining)
        } else {
            let timeout = self.handshake_timeout;
            match tokio::time::timeout(timeout, self.handshake(tcp, &mut rec)).await {
                Ok(result) => result,
                Err(_) => Err(HandshakeError::Timeout(timeout)),
            }
        };
        drop(pending);
        let client_expiry = rec.identity.as_ref().map(|id| id.cert.not_after);
        let legs = match result {
            Ok(legs) => {
                rec.finish(Ok(()), &self.telemetry);
                legs
            }
            Err(e) => {
                if let HandshakeError::Limit(refusal) = &e {
                    self.telemetry.metrics.refused(INBOUND, refusal.label());
                }
                rec.finish(Err(&e), &self.telemetry);
                return None;
            }
        };
        Some(Box::new(self.prepare(legs, client_expiry, peer).await))
    }

    /// TLS, identity, the upgrade on both legs; returns the client's and the app's streams.
    async fn handshake(
        self: &Arc<Self>,
        tcp: TcpStream,
        rec: &mut HandshakeRecord,
    ) -> Result<Established, HandshakeError> {
        // Stage 1: accept. The config is taken once: a swap never touches this handshake.
        let serving = self.store.current().ok_or(HandshakeError::NotReady)?;
        rec.serving_serial = Some(serving.leaf.serial.clone());
        let roots = serving.roots;
        let accepted = accept::accept(tcp, &serving).await?;
        drop(serving);
        rec.tls_time = Some(accepted.elapsed);
        rec.tls = Some(accepted.tls);
        rec.identity = Some(accepted.identity.clone());
        let identity = accepted.identity;
        let chain = accepted.chain;

        // Stage 2: authorize (answered once the request is read, so the client gets a 403).
        let decision = self.policy.decide(&identity.cert);
        match &decision {
            Decision::Allow(rule) => {
                rec.decision = Some("allow");
                rec.matched_rule = Some(rule.clone());
            }
            Decision::Deny(_) => rec.decision = Some("deny"),
        }

        // Stage 3: the client's upgrade request.
        let tls_done = Instant::now();
        let pending = exchange::read_request(accepted.stream).await?;
        rec.upgrade_read_time = Some(tls_done.elapsed());
        rec.path = Some(pending.request.uri().path().to_owned());
        // The trace is fixed first, so that refusals join the client's trace too.
        let trace_headers = match self
            .telemetry
            .tracer
            .start_handshake(pending.request.headers(), SpanKind::Server)
        {
            Some((trace, headers)) => {
                rec.trace = Some(trace);
                headers
            }
            None => Vec::new(),
        };
        if self.drain.is_cancelled() {
            let answer = upgrade::text_response(StatusCode::SERVICE_UNAVAILABLE, "503 service unavailable: draining");
            rec.status = Some(503);
            pending.refuse(answer).await;
            return Err(HandshakeError::Draining);
        }
        if let Decision::Deny(denied) = decision {
            let answer = upgrade::text_response(StatusCode::FORBIDDEN, &format!("403 forbidden: {denied}"));
            rec.status = Some(403);
            pending.refuse(answer).await;
            return Err(denied.into());
        }
        if let Err(not) = upgrade::check_client_request(&pending.request) {
            rec.status = Some(426);
            pending.refuse(upgrade::upgrade_required(&not)).await;
            return Err(not.into());
        }
        let slot = match self.admission.identity(identity.name()) {
            Ok(slot) => slot,
            Err(refusal) => {
                let answer = upgrade::text_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    &format!("429 too many requests: {refusal}"),
                );
                rec.status = Some(429);
                pending.refuse(answer).await;
                return Err(refusal.into());
            }
        };

        // Stage 4: dial the app and perform its upgrade.
        let app_request = match upgrade::upstream_request(&pending.request, &identity, rec.peer.ip(), &trace_headers) {
            Ok(request) => request,
            Err(e) => {
                rec.status = Some(500);
                let line = format!("500 internal server error: {e}");
                pending
                    .refuse(upgrade::text_response(StatusCode::INTERNAL_SERVER_ERROR, &line))
                    .await;
                return Err(e.into());
            }
        };
        let dialed = dial::dial(&self.upstream, app_request).await.and_then(|app| {
            let (answer, subprotocol) = upgrade::switching_response(pending.request.headers(), &app.headers)?;
            Ok((app, answer, subprotocol))
        });
        let (app, answer, subprotocol) = match dialed {
            Ok(done) => done,
            Err(mut e) => {
                rec.status = Some(e.status().as_u16());
                pending.refuse(e.take_answer()).await;
                return Err(e.into());
            }
        };
        rec.upstream_connect_time = Some(app.connect_time);
        rec.subprotocol = subprotocol;

        // The client's 101.
        rec.status = Some(101);
        let client = pending.switch(answer).await?;
        Ok(Established {
            client,
            app: app.io,
            _slot: slot,
            identity,
            chain,
            roots,
        })
    }

    /// Registers the connection with the trust registry; ends it at once if the roots changed
    /// since its handshake and no longer admit its chain.
    fn watch_trust(
        &self,
        stopper: &Arc<Stopper>,
        identity: &PeerIdentity,
        chain: Vec<CertificateDer<'static>>,
        roots: [u8; 32],
        peer: SocketAddr,
    ) -> trust::TrustGuard {
        let weak = Arc::downgrade(stopper);
        let stop: trust::Stop = Box::new(move || {
            weak.upgrade().is_some_and(|stopper| {
                let ending = !stopper.is_stopped();
                stopper.stop(pump::StopReason::Untrusted);
                ending
            })
        });
        let (guard, ended) = self.trust.register(trust::Connection {
            chain,
            name: identity.name().to_owned(),
            peer,
            not_after: identity.cert.not_after,
            verified_with: roots,
            stop,
        });
        if let Some(ended) = ended {
            report_untrusted(&self.telemetry.metrics, &ended);
        }
        guard
    }

    /// Everything the relay needs: both legs (upgraded), the holds, the stopper registered
    /// with the trust registry.
    async fn prepare(&self, legs: Established, client_expiry: Option<SystemTime>, peer: SocketAddr) -> Open {
        let Established {
            client,
            app,
            _slot,
            identity,
            chain,
            roots,
        } = legs;
        let (client_hold, app_hold) = (Hold::new(self.budget.clone()), Hold::new(self.budget.clone()));
        let (client, app) = (TokioIo::new(client), TokioIo::new(app));
        let expires_at = client_expiry.map(|at| {
            let left = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::Instant::now() + left
        });
        let stopper = Stopper::new(&self.drain);
        // Held until the relay ends: a change of trust roots verifies this chain again.
        let trust = self.watch_trust(&stopper, &identity, chain, roots, peer);
        Open {
            client,
            app,
            _slot,
            _trust: trust,
            stopper,
            expires_at,
            client_not_after: client_expiry.map(crate::x509::to_unix),
            holds: (client_hold, app_hold),
            peer,
        }
    }

    /// Relays between the two legs until both close.
    async fn relay(&self, open: Box<Open>) {
        // Moved out of the box at once (which frees it): what this future keeps across the
        // relay is the guards and the boxed pump.
        let Open {
            client,
            app,
            _slot,
            _trust,
            stopper,
            expires_at,
            client_not_after,
            holds: (client_hold, app_hold),
            peer,
        } = {
            let open = open;
            *open
        };
        let metrics = &self.telemetry.metrics;
        let open = metrics.open(INBOUND);
        open.inc();
        if let Some(t) = client_not_after {
            metrics.client_connected(t);
        }
        let control = pump::Control {
            stopper,
            expires_at,
            keepalive: self.limits.keepalive,
            holds: Some((client_hold, app_hold, self.limits.message_timeout)),
            queues: Some((Hold::new(self.budget.clone()), Hold::new(self.budget.clone()))),
            limits: frame_limits(&self.limits),
            meter: metrics.as_ref(),
        };
        let relay = Box::pin(pump::relay(client, app, control));
        let summary = tokio::select! {
            summary = relay => summary,
            // The drain timeout passed: drop the connection (both sockets close).
            _ = self.kill.cancelled() => pump::CloseSummary {
                initiator: pump::Initiator::Proxy,
                code: None,
                reason: "drain timeout: connection dropped".into(),
            },
        };
        open.dec();
        if let Some(t) = client_not_after {
            metrics.client_disconnected(t);
        }
        closed(metrics, INBOUND, &summary, peer);
    }
}
