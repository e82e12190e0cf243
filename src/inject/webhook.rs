//! The admission webhook over HTTPS: `POST /mutate` (namespace not enabled) and
//! `POST /mutate/namespace-enabled` (namespace labelled `wsgate.dev/injection: enabled`).
//!
//! The serving certificate comes from a mounted Secret and is hot-rotated through the same
//! `certs` + `tls::reloader` code as the proxy; connections are served by `net::serve_http`
//! within [`BOUNDS`]. A malformed review gets HTTP 400, never a panic. A review is read within
//! `review`'s caps and answered on a blocking thread, at most [`REVIEW_PERMITS`] at once; one
//! that waits longer than [`PERMIT_WAIT`] for its turn gets 503.
//! Dry-run requests are answered like any other: the webhook has no side effects at all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use k8s_openapi::api::core::v1::Pod;
use kube::core::TypeMeta;
use kube::core::admission::{AdmissionResponse, Operation};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::annotations::{Wanted, wanted};
use super::metrics::{InjectMetrics, ReviewLabels};
use super::patch::{Mutation, mutate};
use super::review::{OverLimit, RequestView, ReviewView};
use super::settings::InjectSettings;
use crate::tls::TlsStore;

/// The API server sends at most 3 MiB per request.
const MAX_BODY: usize = 3 << 20;
/// Longest TLS handshake.
const TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a request's headers, also between requests on a kept-alive connection
/// (an idle connection is closed; the API server's client opens a new one).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest time to read one request's body and answer it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// On stop, in-flight reviews get this long to finish.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Why a review could not be answered (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The body is not an AdmissionReview.
    #[error("the body is not an admission.k8s.io/v1 AdmissionReview: {0}")]
    Malformed(String),
    /// The review has no request.
    #[error("the AdmissionReview carries no request")]
    NoRequest,
}

/// The webhook's logic, independent of HTTP.
pub struct Webhook {
    /// Injection settings.
    pub settings: InjectSettings,
    /// Whether the cluster runs native sidecars (decided from its version, or by setting).
    pub native: Arc<AtomicBool>,
    /// Metrics.
    pub metrics: Arc<InjectMetrics>,
}

impl Webhook {
    /// Answers one review body. `namespace_enabled` comes from the path.
    ///
    /// The body is read within bounds ([`super::review`]): only the fields the mutation reads,
    /// every kept list capped, the rest skipped unbuilt. A pod past a cap is answered by
    /// [`Webhook::over_limit`]. CPU-bound (milliseconds for the largest body): the server calls
    /// it off the async workers.
    pub fn review(&self, body: &[u8], namespace_enabled: bool) -> Result<Vec<u8>, ReviewError> {
        let review: ReviewView = serde_json::from_slice(body).map_err(|e| ReviewError::Malformed(e.to_string()))?;
        let types = TypeMeta {
            api_version: review.api_version,
            kind: review.kind,
        };
        let request = review.request.ok_or(ReviewError::NoRequest)?;
        let response = self.decide(types, &request, namespace_enabled);
        serde_json::to_vec(&response.into_review()).map_err(|e| ReviewError::Malformed(e.to_string()))
    }

    fn count(&self, result: &'static str) {
        self.metrics.reviews.get_or_create(&ReviewLabels { result }).inc();
    }

    fn decide(&self, types: TypeMeta, request: &RequestView, namespace_enabled: bool) -> AdmissionResponse {
        let mut allowed = AdmissionResponse::invalid("");
        allowed.types = types;
        allowed.uid = request.uid.clone();
        allowed.allowed = true;
        allowed.result = Default::default();
        let view = match (&request.operation, &request.object) {
            (Operation::Create, Some(pod)) if request.kind.kind == "Pod" => pod,
            _ => {
                self.count("skipped");
                return allowed;
            }
        };
        let pod = view.to_pod();
        let namespace = request
            .namespace
            .clone()
            .or_else(|| pod.metadata.namespace.clone())
            .unwrap_or_else(|| "default".to_owned());
        let name = pod
            .metadata
            .name
            .clone()
            .or_else(|| pod.metadata.generate_name.as_ref().map(|g| format!("{g}*")))
            .unwrap_or_default();
        if let Some(over) = view.over_limit() {
            return self.over_limit(allowed, &pod, &over, namespace_enabled, (&namespace, &name));
        }
        let native = self.native.load(Ordering::Relaxed);
        match mutate(&pod, &namespace, namespace_enabled, &self.settings, native) {
            Mutation::Skip(why) => {
                self.count("skipped");
                tracing::debug!(target: "wsgate::inject", %namespace, pod = %name, why, "not injected");
                allowed
            }
            Mutation::Decline(why) => {
                self.count("skipped");
                tracing::info!(target: "wsgate::inject", %namespace, pod = %name, why = %why, "not injected");
                let mut resp = allowed;
                resp.warnings = Some(vec![why]);
                resp
            }
            Mutation::Deny(e) => {
                self.count("denied");
                tracing::info!(target: "wsgate::inject", %namespace, pod = %name, reason = %e, "pod denied");
                allowed.deny(format!("wsgate: {e}"))
            }
            Mutation::Inject { patch, options } => match allowed.clone().with_patch(patch) {
                Ok(mut resp) => {
                    self.count("injected");
                    if !options.warnings.is_empty() {
                        resp.warnings = Some(options.warnings.clone());
                    }
                    tracing::info!(
                        target: "wsgate::inject",
                        %namespace,
                        pod = %name,
                        native,
                        secret = %options.secret,
                        upstream_port = %options
                            .inbound
                            .as_ref()
                            .map_or_else(|| "none".to_owned(), |i| i.upstream_port.to_string()),
                        dry_run = request.dry_run,
                        "sidecar injected"
                    );
                    resp
                }
                Err(e) => {
                    self.count("invalid");
                    allowed.deny(format!("wsgate: could not encode the patch: {e}"))
                }
            },
        }
    }

    /// The answer for a pod past one of [`super::review`]'s caps, which wsgate cannot inspect.
    ///
    /// If the path and the pod's annotations (read within caps of their own) say the pod does
    /// not want the sidecar (not opted in, or `wsgate.dev/inject: "false"`), it is admitted
    /// unchanged, like any such pod: the `/mutate` entry sees every pod of every ordinary
    /// namespace, and wsgate must not turn into a policy that rejects pods it has no part in.
    ///
    /// Otherwise it is **denied**, with a message naming the cap. In an opted-in namespace (or
    /// with `wsgate.dev/inject: "true"`) a pod wsgate cannot inspect must not run without its
    /// sidecar: admitting it unpatched would make the caps a way around the injection, and a
    /// security review of the platform would rightly call that fail-open. The denial costs only
    /// that one pod, which no real workload resembles; what stopped every pod creation before
    /// (gigabytes of memory, seconds of a runtime worker) is bounded before this decision.
    fn over_limit(
        &self,
        allowed: AdmissionResponse,
        pod: &Pod,
        over: &OverLimit,
        namespace_enabled: bool,
        (namespace, name): (&str, &str),
    ) -> AdmissionResponse {
        if let Ok(Wanted::No) = wanted(pod, namespace_enabled) {
            self.count("skipped");
            tracing::debug!(target: "wsgate::inject", %namespace, pod = %name, %over, "not injected, over a cap");
            return allowed;
        }
        self.count("denied");
        tracing::warn!(target: "wsgate::inject", %namespace, pod = %name, reason = %over, "pod denied: over a cap");
        allowed.deny(format!("wsgate: cannot inspect this pod for injection: {over}"))
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    resp
}

/// Reviews parsed and mutated at once, each on a blocking thread: the API server sends a few
/// at a time, and each costs about its body (at most 3 MiB) in memory and milliseconds of CPU.
pub const REVIEW_PERMITS: usize = 4;
/// Longest wait for one of the [`REVIEW_PERMITS`]; past it the review gets 503 (the API server
/// applies the webhook's failurePolicy, its client retries). Real reviews hold a permit for
/// about a millisecond, so a wait this long means the injector is flooded.
pub const PERMIT_WAIT: Duration = Duration::from_secs(2);

/// Bytes of request bodies held at once, in all: 256 connections × 3 MiB would be 768 MiB,
/// three times the injector's memory limit. A body takes its Content-Length (or, without one,
/// the 3 MiB maximum) from this budget before it is read; past [`PERMIT_WAIT`] it gets 503.
pub const BODY_BUDGET: usize = 32 << 20;
/// The unit the body budget is counted in.
const BODY_UNIT: usize = 1024;

/// The 503 a flooded injector answers (the API server applies the failurePolicy; it retries).
fn busy(webhook: &Webhook, what: &str) -> Response<Full<Bytes>> {
    webhook.count("busy");
    tracing::warn!(target: "wsgate::inject", "review refused: {what} for {PERMIT_WAIT:?}");
    let msg = format!("the injector is busy: {what}; retry\n");
    let mut resp = respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", msg.into_bytes());
    resp.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    resp
}

/// The shares of the body budget a request needs.
fn body_units(req: &Request<Incoming>) -> u32 {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(MAX_BODY)
        .min(MAX_BODY);
    u32::try_from(declared.div_ceil(BODY_UNIT).max(1)).unwrap_or(u32::MAX)
}

/// What bounds the work of the reviews in flight.
#[derive(Clone)]
pub struct Permits {
    /// Reviews parsed at once.
    reviews: Arc<Semaphore>,
    /// Body bytes held at once, in [`BODY_UNIT`]s.
    bodies: Arc<Semaphore>,
}

impl Permits {
    fn new() -> Self {
        Self {
            reviews: Arc::new(Semaphore::new(REVIEW_PERMITS)),
            bodies: Arc::new(Semaphore::new(BODY_BUDGET / BODY_UNIT)),
        }
    }
}

async fn handle(webhook: Arc<Webhook>, permits: Permits, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let namespace_enabled = match req.uri().path() {
        "/mutate" => false,
        "/mutate/namespace-enabled" => true,
        _ => {
            return respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                b"not found: POST /mutate\n".to_vec(),
            );
        }
    };
    if req.method() != Method::POST {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", b"use POST\n".to_vec());
    }
    let t0 = Instant::now();
    let units = body_units(&req);
    let Ok(Ok(body_permit)) = tokio::time::timeout(PERMIT_WAIT, permits.bodies.acquire_many_owned(units)).await else {
        return busy(&webhook, "the request bodies in progress fill the body budget");
    };
    let body = match tokio::time::timeout(REQUEST_TIMEOUT, Limited::new(req.into_body(), MAX_BODY).collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            let msg = format!("reading the body: {e}\n");
            return respond(StatusCode::BAD_REQUEST, "text/plain", msg.into_bytes());
        }
        Err(_) => {
            let msg = b"the body did not arrive in time\n".to_vec();
            return respond(StatusCode::REQUEST_TIMEOUT, "text/plain", msg);
        }
    };
    let Ok(Ok(permit)) = tokio::time::timeout(PERMIT_WAIT, permits.reviews.acquire_owned()).await else {
        return busy(&webhook, &format!("{REVIEW_PERMITS} reviews in progress"));
    };
    let hook = webhook.clone();
    // The permits live as long as the work, even if this request is dropped meanwhile.
    let answer = tokio::task::spawn_blocking(move || {
        let _held = (permit, body_permit);
        hook.review(&body, namespace_enabled)
    })
    .await;
    let resp = match answer {
        Ok(Ok(json)) => respond(StatusCode::OK, "application/json", json),
        Ok(Err(e)) => {
            webhook.count("invalid");
            tracing::warn!(target: "wsgate::inject", error = %e, "malformed admission review");
            respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n").into_bytes())
        }
        Err(e) => {
            webhook.count("invalid");
            tracing::error!(target: "wsgate::inject", error = %e, "the review task failed");
            let msg = b"the review could not be answered\n".to_vec();
            respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", msg)
        }
    };
    webhook.metrics.review_duration.observe(t0.elapsed().as_secs_f64());
    resp
}

/// The webhook's bounds: the API server opens a few kept-alive connections; 256 connections
/// with 16 KiB heads are far more than it uses, and bound what an unauthenticated peer can hold.
pub const BOUNDS: crate::net::HttpBounds = crate::net::HttpBounds {
    max_connections: 256,
    max_per_ip: 64,
    max_head: 16 * 1024,
    header_timeout: HEADER_TIMEOUT,
    max_lifetime: Duration::from_secs(600),
    stop_grace: STOP_GRACE,
};

/// Serves the webhook on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, store: Arc<TlsStore>, webhook: Arc<Webhook>, stop: CancellationToken) {
    let permits = Permits::new();
    crate::net::serve_http(
        listener,
        BOUNDS,
        stop,
        move |tcp, peer| tls_accept(store.clone(), tcp, peer),
        move |req, _peer| handle(webhook.clone(), permits.clone(), req),
    )
    .await;
}

/// The TLS handshake with the serving certificate of the moment; `None` drops the connection.
async fn tls_accept(
    store: Arc<TlsStore>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let Some(serving) = store.current() else {
        tracing::debug!(%peer, "no serving certificate yet; closing");
        return None;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(serving.server.clone());
    drop(serving);
    match tokio::time::timeout(TLS_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
            None
        }
        Err(_) => None,
    }
}
