//! The outbound composition root: one connection from the local app to a remote, from the
//! loopback accept to close.
//!
//! The inbound stages in the other order: net accept on the route's plain listener → exchange
//! (the app's upgrade request) → dial (TCP to the remote) → secure (TLS with the pod's client
//! certificate; the remote verified against the trust roots and its host name) → the
//! `--outbound-expect` check (authz) → dial's upgrade over TLS (the remote's 101 or its own
//! refusal) → the app's 101 → pump. Each stage returns its own typed error; this file turns the
//! first one into the attempt's outcome and the status the app gets ([`OutboundError`]): 502
//! when the remote is unreachable, its TLS fails or its identity is not the expected one (the
//! body says why), 504 when it does not answer within `--outbound-dial-timeout`, the remote's
//! own status when it refuses the upgrade, 429 beyond the per-destination cap, 503 while
//! draining or before a certificate is loaded. Wires `exchange`, `dial`, `secure`, `upgrade`,
//! `pump`, `record`, `admission`, `budget`, `authz`, `tls` and `telemetry`; shares the leg
//! settings and close accounting of `inbound`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use opentelemetry::trace::SpanKind;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::admission::{Admission, IdentitySlot, Refusal};
use super::budget::{Hold, MemoryBudget};
use super::dial::{self, DialError};
use super::exchange::{self, ExchangeError};
use super::inbound::{closed, frame_limits};
use super::outcome::FailureKind;
use super::pump::{self, Stopper};
use super::record::{Failure, HandshakeRecord};
use super::secure::{self, SecureError};
use super::settings::{Limits, OutboundRoute};
use super::upgrade::{self, NotUpgrade};
use crate::authz::Decision;
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::OUTBOUND;
use crate::tls::{PeerIdentity, TlsStore};

/// Why an outbound attempt did not end in a relayed WebSocket: the first stage that refused.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// The listener's `--max-connections` connections are open.
    #[error("{0} connections already open on this outbound listener (--max-connections)")]
    TooManyConnections(usize),
    /// The proxy is draining (503).
    #[error("draining: no new connections")]
    Draining,
    /// No valid certificate has been loaded yet (503).
    #[error("no valid client certificate loaded yet")]
    NotReady,
    /// The app did not send its upgrade request within `--handshake-timeout`.
    #[error("the app sent no upgrade request within {}s", .0.as_secs_f64())]
    RequestTimeout(Duration),
    /// The remote did not answer within `--outbound-dial-timeout` (504).
    #[error("the remote {remote} did not answer within {}s (--outbound-dial-timeout)", .after.as_secs_f64())]
    DialTimeout {
        /// The remote's `host:port`.
        remote: String,
        /// The timeout.
        after: Duration,
    },
    /// The app's HTTP exchange failed.
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    /// The app's request is not a WebSocket upgrade (426).
    #[error(transparent)]
    NotUpgrade(#[from] NotUpgrade),
    /// Too many connections to this remote (429).
    #[error(transparent)]
    Limit(#[from] Refusal),
    /// TLS to the remote failed (502).
    #[error(transparent)]
    Secure(#[from] SecureError),
    /// The remote's certificate does not carry an expected identity (502).
    #[error("the remote's identity {who} does not match --outbound-expect {expected}")]
    Unexpected {
        /// The remote's identity.
        who: String,
        /// The expected patterns.
        expected: String,
    },
    /// The remote could not be reached, or refused (502 or its own answer).
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The remote's 101 cannot be passed on to the app (502).
    #[error("the remote's 101 cannot be passed on: {0}")]
    BadAnswer(upgrade::BadAnswer),
}

impl Failure for OutboundError {
    fn kind(&self) -> FailureKind {
        match self {
            Self::TooManyConnections(_) | Self::Limit(_) => FailureKind::LimitExceeded,
            Self::Draining | Self::NotReady => FailureKind::NotReady,
            Self::RequestTimeout(_) | Self::DialTimeout { .. } => FailureKind::HandshakeTimeout,
            Self::Exchange(e) => e.kind(),
            Self::NotUpgrade(_) => FailureKind::NotWebsocket,
            Self::Secure(e) => e.kind(),
            Self::Unexpected { .. } => FailureKind::IdentityNotAllowed,
            Self::Dial(e) => e.kind(),
            Self::BadAnswer(_) => FailureKind::UpstreamUnavailable,
        }
    }
}

impl OutboundError {
    /// The status the app is answered with (its own answer for a remote's refusal).
    fn status(&self) -> StatusCode {
        match self {
            Self::Draining | Self::NotReady | Self::TooManyConnections(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::DialTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Exchange(_) => StatusCode::BAD_REQUEST,
            Self::NotUpgrade(_) => StatusCode::UPGRADE_REQUIRED,
            Self::Limit(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Secure(_) | Self::Unexpected { .. } | Self::BadAnswer(_) => StatusCode::BAD_GATEWAY,
            Self::Dial(e) => e.status(),
        }
    }

    /// The answer for the app: the remote's own refusal, or a one-line text that says why.
    fn take_answer(&mut self) -> http::Response<Full<Bytes>> {
        match self {
            Self::Dial(e) => e.take_answer(),
            Self::NotUpgrade(not) => upgrade::upgrade_required(not),
            other => {
                let status = other.status();
                let line = format!(
                    "{} {}: {other}",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("error").to_ascii_lowercase()
                );
                upgrade::text_response(status, &line)
            }
        }
    }
}

/// One outbound route with everything its connections share.
pub struct Outbound {
    /// The route: local listener, remote, expectation.
    pub route: OutboundRoute,
    /// The swappable TLS configs (the client config is taken once per connection).
    pub store: Arc<TlsStore>,
    /// Size limits, keep-alive, message timeout.
    pub limits: Limits,
    /// Longest wait for the app's upgrade request.
    pub handshake_timeout: Duration,
    /// Longest wait for TCP, TLS and the remote's answer.
    pub dial_timeout: Duration,
    /// Metrics and spans.
    pub telemetry: Arc<Telemetry>,
    /// Fires when the proxy drains: Close 1001 on every connection.
    pub drain: CancellationToken,
    /// Fires when the drain timeout has passed: connections still open are dropped.
    pub kill: CancellationToken,
    /// Handshake slots, and connection slots per destination (shared by every route).
    pub admission: Arc<Admission>,
    /// What all connections may hold for unfinished messages (shared with inbound).
    pub budget: Arc<MemoryBudget>,
}

/// A connection past its handshake: the app's and the remote's upgraded legs, and the
/// destination's slot held for its life.
struct Established {
    app: Upgraded,
    remote: Upgraded,
    _slot: IdentitySlot,
}

/// An upgrade request cleared to dial: the destination's slot, and the client config (with the
/// serial of the certificate it presents) taken once for this connection.
struct Ready {
    slot: IdentitySlot,
    serial: String,
    config: Arc<rustls::ClientConfig>,
}

impl Outbound {
    /// Serves one connection accepted on the route's local listener to its end.
    pub async fn handle(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, permit: Option<OwnedSemaphorePermit>) {
        let local_port = tcp.local_addr().map(|a| a.port()).unwrap_or(0);
        let metrics = &self.telemetry.metrics;
        let pending = if permit.is_some() && !self.drain.is_cancelled() {
            match self.admission.pending(peer.ip()) {
                Ok(slot) => Some(slot),
                Err(refusal) => {
                    metrics.refused(OUTBOUND, refusal.label());
                    tracing::debug!(target: "wsgate::limits", %peer, reason = %refusal, "outbound connection refused");
                    return;
                }
            }
        } else {
            None
        };
        let target = &self.route.remote.target;
        let mut rec = HandshakeRecord::start_outbound(peer, local_port, &target.host, target.port, target.authority());
        let result = if permit.is_none() {
            metrics.refused(OUTBOUND, "max_connections");
            Err(OutboundError::TooManyConnections(self.limits.max_connections))
        } else {
            Box::pin(self.handshake(tcp, &mut rec)).await
        };
        drop(pending);
        let legs = match result {
            Ok(legs) => {
                rec.finish(Ok(()), &self.telemetry);
                legs
            }
            Err(e) => {
                if let OutboundError::Limit(refusal) = &e {
                    metrics.refused(OUTBOUND, refusal.label());
                }
                rec.finish(Err(&e), &self.telemetry);
                return;
            }
        };
        self.relay(legs, peer).await;
    }

    /// The app's request, the remote's TLS and upgrade, the app's 101.
    async fn handshake(&self, tcp: TcpStream, rec: &mut HandshakeRecord) -> Result<Established, OutboundError> {
        // Stage 1: the app's upgrade request (bounded like an inbound handshake; header limits
        // are exchange's).
        let timeout = self.handshake_timeout;
        let pending = match tokio::time::timeout(timeout, exchange::read_request(tcp)).await {
            Ok(read) => read?,
            Err(_) => return Err(OutboundError::RequestTimeout(timeout)),
        };
        rec.upgrade_read_time = Some(rec.started.elapsed());
        rec.path = Some(pending.request.uri().path().to_owned());
        // The app's trace continues to the remote through this (CLIENT) span.
        let trace_headers = match self
            .telemetry
            .tracer
            .start_handshake(pending.request.headers(), SpanKind::Client)
        {
            Some((trace, headers)) => {
                rec.trace = Some(trace);
                headers
            }
            None => Vec::new(),
        };
        let refuse = |rec: &mut HandshakeRecord, mut e: OutboundError| {
            rec.status = Some(e.status().as_u16());
            let answer = e.take_answer();
            (e, answer)
        };
        let ready = match self.check(&pending.request) {
            Ok(ready) => ready,
            Err(e) => {
                let (e, answer) = refuse(rec, e);
                pending.refuse(answer).await;
                return Err(e);
            }
        };
        rec.serving_serial = Some(ready.serial);

        // Stages 2-5, bounded by the dial timeout: TCP, TLS, expectation, the remote's upgrade.
        let target = &self.route.remote.target;
        let request = upgrade::remote_request(&pending.request, &target.authority(), &trace_headers);
        let dialed = tokio::time::timeout(self.dial_timeout, self.dial(ready.config, request, rec))
            .await
            .unwrap_or_else(|_| {
                Err(OutboundError::DialTimeout {
                    remote: target.authority(),
                    after: self.dial_timeout,
                })
            })
            .and_then(|remote| {
                let (answer, subprotocol) =
                    upgrade::switching_response(pending.request.headers(), &remote.headers).map_err(DialError::from)?;
                Ok((remote, answer, subprotocol))
            });
        let (remote, answer, subprotocol) = match dialed {
            Ok(done) => done,
            Err(e) => {
                let (e, answer) = refuse(rec, e);
                pending.refuse(answer).await;
                return Err(e);
            }
        };
        rec.subprotocol = subprotocol;

        // The app's 101.
        rec.status = Some(101);
        let app = pending.switch(answer).await?;
        Ok(Established {
            app,
            remote: remote.io,
            _slot: ready.slot,
        })
    }

    /// What is decided before dialling: draining, the request, a certificate, the cap.
    fn check<B>(&self, request: &http::Request<B>) -> Result<Ready, OutboundError> {
        if self.drain.is_cancelled() {
            return Err(OutboundError::Draining);
        }
        upgrade::check_client_request(request)?;
        // The config is taken once: a rotation never touches this connection.
        let serving = self.store.current().ok_or(OutboundError::NotReady)?;
        let client = serving.client.clone().ok_or(OutboundError::NotReady)?;
        let slot = self.admission.destination(&self.route.remote.target.authority())?;
        Ok(Ready {
            slot,
            serial: serving.leaf.serial.clone(),
            config: client,
        })
    }

    /// TCP, TLS and the expectation, then the remote's upgrade.
    async fn dial(
        &self,
        config: Arc<rustls::ClientConfig>,
        request: http::Request<http_body_util::Empty<Bytes>>,
        rec: &mut HandshakeRecord,
    ) -> Result<dial::Dialed, OutboundError> {
        let remote = &self.route.remote;
        let (tcp, connect_time) = dial::connect(&remote.target, dial::REMOTE).await?;
        rec.upstream_connect_time = Some(connect_time);
        let secured = secure::secure(tcp, config, remote.server_name.clone(), &remote.target.authority()).await?;
        rec.tls_time = Some(secured.elapsed);
        rec.tls = Some(secured.tls);
        rec.identity = Some(secured.identity.clone());
        self.expect(&secured.identity, rec)?;
        Ok(dial::upgrade(secured.stream, request, dial::REMOTE).await?)
    }

    /// The `--outbound-expect` check on the remote's verified certificate.
    fn expect(&self, identity: &PeerIdentity, rec: &mut HandshakeRecord) -> Result<(), OutboundError> {
        let Some((policy, patterns)) = &self.route.expect else {
            return Ok(());
        };
        match policy.decide(&identity.cert) {
            Decision::Allow(rule) => {
                rec.decision = Some("allow");
                rec.matched_rule = Some(rule);
                Ok(())
            }
            Decision::Deny(_) => {
                rec.decision = Some("deny");
                Err(OutboundError::Unexpected {
                    who: identity.name().to_owned(),
                    expected: patterns.join(", "),
                })
            }
        }
    }

    /// Relays between the app and the remote until both close.
    async fn relay(&self, legs: Established, peer: SocketAddr) {
        let Established { app, remote, _slot } = legs;
        let metrics = &self.telemetry.metrics;
        let open = metrics.open(OUTBOUND);
        open.inc();
        let (app_hold, remote_hold) = (Hold::new(self.budget.clone()), Hold::new(self.budget.clone()));
        // The app is this proxy's client here: the relay's client side (its frames are masked).
        let (app, remote) = (TokioIo::new(app), TokioIo::new(remote));
        let control = pump::Control {
            stopper: Stopper::new(&self.drain),
            // The remote's wsgate ends the connection when this pod's certificate expires.
            expires_at: None,
            keepalive: self.limits.keepalive,
            holds: Some((app_hold, remote_hold, self.limits.message_timeout)),
            queues: Some((Hold::new(self.budget.clone()), Hold::new(self.budget.clone()))),
            limits: frame_limits(&self.limits),
            meter: metrics.as_ref(),
        };
        let relay = pump::relay(app, remote, control);
        let summary = tokio::select! {
            summary = relay => summary,
            _ = self.kill.cancelled() => pump::CloseSummary {
                initiator: pump::Initiator::Proxy,
                code: None,
                reason: "drain timeout: connection dropped".into(),
            },
        };
        open.dec();
        closed(metrics, OUTBOUND, &summary, peer);
    }
}
