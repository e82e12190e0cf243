//! The admin port: `/healthz`, `/readyz`, `/metrics`, and `POST /drain` (loopback only).
//!
//! Knows nothing of proxies or webhooks: it asks an [`AdminState`]. Served by the shared
//! `net::serve_http` loop within [`BOUNDS`]. Depends on `net`, `tls` (what readiness reports)
//! and hyper.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::net::HttpBounds;
use crate::tls::{NotServing, ServingNow};

/// The admin port's bounds: scraped by Prometheus and probed by the kubelet, never by many at
/// once, so a few connections with small heads suffice; 64 × 8 KiB of unfinished headers is
/// the most all peers together can make it hold, for 10 s each, and one address holds at most
/// 8 of the 64, so a flood from one peer cannot shut out the kubelet's probes.
pub const BOUNDS: HttpBounds = HttpBounds {
    max_connections: 64,
    max_per_ip: 8,
    max_head: 8 * 1024,
    header_timeout: Duration::from_secs(10),
    max_lifetime: Duration::from_secs(120),
    stop_grace: Duration::from_secs(1),
};

/// Why `/readyz` answers 503.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotReady {
    /// A drain or a stop has started.
    #[error("draining")]
    Draining,
    /// No valid certificate is served.
    #[error(transparent)]
    Serving(#[from] NotServing),
}

/// What the admin endpoints report on and act upon.
pub trait AdminState: Send + Sync + 'static {
    /// What is served when ready; otherwise why not.
    fn readiness(&self) -> Result<ServingNow, NotReady>;
    /// Prometheus text exposition.
    fn metrics(&self) -> String;
    /// Starts a graceful drain.
    fn drain(&self);
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Routes one admin request.
pub fn route<B>(state: &dyn AdminState, req: &Request<B>, peer: SocketAddr) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n".into()),
        (&Method::GET | &Method::HEAD, "/readyz") => match state.readiness() {
            Ok(summary) => text(StatusCode::OK, format!("ready: {summary}\n")),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
        },
        (&Method::GET, "/metrics") => {
            let mut resp = text(StatusCode::OK, state.metrics());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            resp
        }
        // `to_canonical`: on a dual-stack socket the loopback caller is ::ffff:127.0.0.1.
        (&Method::POST, "/drain") if peer.ip().to_canonical().is_loopback() => {
            state.drain();
            text(StatusCode::ACCEPTED, "draining\n".into())
        }
        (&Method::POST, "/drain") => text(
            StatusCode::FORBIDDEN,
            "drain is accepted from loopback only (the pod's own preStop hook)\n".into(),
        ),
        (_, "/healthz" | "/readyz" | "/metrics" | "/drain") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into())
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics\n".into(),
        ),
    }
}

/// Serves the admin endpoints on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, state: Arc<dyn AdminState>, stop: CancellationToken) {
    crate::net::serve_http(
        listener,
        BOUNDS,
        stop,
        |tcp, _| async move { Some(tcp) },
        move |req, peer| {
            let resp = route(state.as_ref(), &req, peer);
            async move { resp }
        },
    )
    .await;
}

/// Why `wsgate drain` failed.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// The admin port could not be reached.
    #[error("connecting to the proxy's admin port at {addr}: {source}")]
    Connect {
        /// The admin address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("asking the proxy at {addr} to drain: {source}")]
    Http {
        /// The admin address.
        addr: SocketAddr,
        /// What hyper said.
        source: hyper::Error,
    },
    /// The proxy answered something else than 202.
    #[error("the proxy at {addr} did not accept the drain: {status}")]
    Refused {
        /// The admin address.
        addr: SocketAddr,
        /// Its answer.
        status: StatusCode,
    },
    /// No answer within [`DRAIN_REQUEST_TIMEOUT`].
    #[error("the proxy at {0} did not answer within 10s")]
    Timeout(SocketAddr),
}

/// Longest wait for the proxy to accept a drain.
pub const DRAIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// `POST /drain` to a proxy's admin port (what `wsgate drain`, the preStop hook, runs).
pub async fn request_drain(addr: SocketAddr) -> Result<(), DrainError> {
    let ask = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| DrainError::Connect { addr, source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|source| DrainError::Http { addr, source })?;
        tokio::spawn(conn);
        let req = Request::post("/drain")
            .header(header::HOST, addr.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|_| DrainError::Timeout(addr))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| DrainError::Http { addr, source })?;
        match resp.status() {
            StatusCode::ACCEPTED => Ok(()),
            status => Err(DrainError::Refused { addr, status }),
        }
    };
    tokio::time::timeout(DRAIN_REQUEST_TIMEOUT, ask)
        .await
        .map_err(|_| DrainError::Timeout(addr))?
}
