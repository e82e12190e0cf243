//! The admin port: `/healthz`, `/readyz`, `/metrics`, and `POST /drain` (loopback only).
//!
//! Knows nothing of proxies or webhooks: it asks an [`AdminState`]. Depends on hyper.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the admin endpoints report on and act upon.
pub trait AdminState: Send + Sync + 'static {
    /// `Ok(summary)` when ready to serve; `Err(reason)` otherwise.
    fn readiness(&self) -> Result<String, String>;
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
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = route(state.as_ref(), &req, peer);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = &mut conn => {}
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}
