//! Spans: one per handshake attempt and one per certificate reload, exported over OTLP.
//!
//! Spans are built whole when the attempt ends (every fact is known by then) and pushed into a
//! bounded queue that a task on the proxy's own runtime drains into the OTLP exporter. That
//! keeps the data path free of locks and I/O, and lets a slow or dead collector cost nothing
//! but dropped (and counted) spans. Sampling is decided here: a failed handshake is always
//! recorded; a successful one follows the configured sampler, decided when the upgrade request
//! arrives so that the `traceparent` sent to the app carries the right flag.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample, SpanData, SpanEvents, SpanLinks,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use super::otel::{OtelSettings, Protocol};

/// Span attribute names (semantic conventions where they exist, `wsgate.` otherwise).
pub mod attr {
    /// Client IP.
    pub const NETWORK_PEER_ADDRESS: &str = "network.peer.address";
    /// Client port.
    pub const NETWORK_PEER_PORT: &str = "network.peer.port";
    /// Listener port (inbound); the remote's port (outbound).
    pub const SERVER_PORT: &str = "server.port";
    /// The remote's host as dialled (outbound).
    pub const SERVER_ADDRESS: &str = "server.address";
    /// The local app's address (outbound).
    pub const CLIENT_ADDRESS: &str = "client.address";
    /// The local app's port (outbound).
    pub const CLIENT_PORT: &str = "client.port";
    /// The outbound listener's port the app dialled (outbound).
    pub const LOCAL_PORT: &str = "wsgate.outbound.local_port";
    /// Always `tls`.
    pub const TLS_PROTOCOL_NAME: &str = "tls.protocol.name";
    /// `1.2` or `1.3`.
    pub const TLS_PROTOCOL_VERSION: &str = "tls.protocol.version";
    /// IANA cipher suite name.
    pub const TLS_CIPHER: &str = "tls.cipher";
    /// Key-exchange group.
    pub const TLS_CURVE: &str = "tls.curve";
    /// Whether the TLS handshake completed.
    pub const TLS_ESTABLISHED: &str = "tls.established";
    /// Whether the session was resumed.
    pub const TLS_RESUMED: &str = "tls.resumed";
    /// Negotiated ALPN protocol.
    pub const TLS_NEXT_PROTOCOL: &str = "tls.next_protocol";
    /// Client certificate subject.
    pub const TLS_CLIENT_SUBJECT: &str = "tls.client.subject";
    /// Client certificate issuer.
    pub const TLS_CLIENT_ISSUER: &str = "tls.client.issuer";
    /// Client certificate not-after, RFC 3339.
    pub const TLS_CLIENT_NOT_AFTER: &str = "tls.client.not_after";
    /// SHA-256 of the client certificate's DER, uppercase hex.
    pub const TLS_CLIENT_HASH_SHA256: &str = "tls.client.hash.sha256";
    /// Server certificate subject (outbound: the remote's).
    pub const TLS_SERVER_SUBJECT: &str = "tls.server.subject";
    /// Server certificate issuer.
    pub const TLS_SERVER_ISSUER: &str = "tls.server.issuer";
    /// Server certificate not-after, RFC 3339.
    pub const TLS_SERVER_NOT_AFTER: &str = "tls.server.not_after";
    /// SHA-256 of the server certificate's DER, uppercase hex.
    pub const TLS_SERVER_HASH_SHA256: &str = "tls.server.hash.sha256";
    /// The remote's SPIFFE ID (outbound).
    pub const SERVER_SPIFFE_ID: &str = "wsgate.server.spiffe_id";
    /// The remote's URI SANs (outbound).
    pub const SERVER_URI_SANS: &str = "wsgate.server.uri_sans";
    /// The remote's DNS SANs (outbound).
    pub const SERVER_DNS_SANS: &str = "wsgate.server.dns_sans";
    /// Serial of the certificate wsgate presented as a TLS client (outbound).
    pub const CLIENT_CERT_SERIAL: &str = "wsgate.client.certificate.serial";
    /// The peer-certificate attributes of an inbound span: subject, issuer, not-after, hash,
    /// SPIFFE ID, URI SANs, DNS SANs.
    pub const PEER_CLIENT: [&str; 7] = [
        TLS_CLIENT_SUBJECT,
        TLS_CLIENT_ISSUER,
        TLS_CLIENT_NOT_AFTER,
        TLS_CLIENT_HASH_SHA256,
        CLIENT_SPIFFE_ID,
        CLIENT_URI_SANS,
        CLIENT_DNS_SANS,
    ];
    /// The same of an outbound span (the remote is the TLS server).
    pub const PEER_SERVER: [&str; 7] = [
        TLS_SERVER_SUBJECT,
        TLS_SERVER_ISSUER,
        TLS_SERVER_NOT_AFTER,
        TLS_SERVER_HASH_SHA256,
        SERVER_SPIFFE_ID,
        SERVER_URI_SANS,
        SERVER_DNS_SANS,
    ];
    /// Request path.
    pub const URL_PATH: &str = "url.path";
    /// Status sent to the client.
    pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
    /// Why the attempt failed (one of `FailureKind`).
    pub const ERROR_TYPE: &str = "error.type";
    /// The client's SPIFFE ID.
    pub const CLIENT_SPIFFE_ID: &str = "wsgate.client.spiffe_id";
    /// The client's URI SANs.
    pub const CLIENT_URI_SANS: &str = "wsgate.client.uri_sans";
    /// The client's DNS SANs.
    pub const CLIENT_DNS_SANS: &str = "wsgate.client.dns_sans";
    /// `allow` or `deny`.
    pub const AUTHZ_DECISION: &str = "wsgate.authz.decision";
    /// The allow pattern that matched.
    pub const AUTHZ_RULE: &str = "wsgate.authz.rule";
    /// The subprotocol the app chose.
    pub const SUBPROTOCOL: &str = "wsgate.websocket.subprotocol";
    /// The app's `host:port`.
    pub const UPSTREAM_ADDRESS: &str = "wsgate.upstream.address";
    /// Serial of the certificate wsgate presented.
    pub const SERVER_CERT_SERIAL: &str = "wsgate.server.certificate.serial";
    /// Milliseconds in TLS.
    pub const PHASE_TLS_MS: &str = "wsgate.phase.tls_ms";
    /// Milliseconds from TLS done to the upgrade request read.
    pub const PHASE_UPGRADE_READ_MS: &str = "wsgate.phase.upgrade_read_ms";
    /// Milliseconds to connect to the app.
    pub const PHASE_UPSTREAM_CONNECT_MS: &str = "wsgate.phase.upstream_connect_ms";
    /// Serial of a loaded certificate.
    pub const CERT_SERIAL: &str = "wsgate.certificate.serial";
    /// Not-after of a loaded certificate, RFC 3339.
    pub const CERT_NOT_AFTER: &str = "wsgate.certificate.not_after";
    /// `success` or `failure`.
    pub const RELOAD_RESULT: &str = "wsgate.reload.result";
    /// What triggered a reload.
    pub const RELOAD_TRIGGER: &str = "wsgate.reload.trigger";
    /// Why a reload was refused.
    pub const RELOAD_REASON: &str = "wsgate.reload.reason";
}

/// The name of the handshake span.
pub const HANDSHAKE_SPAN: &str = "wsgate.handshake";
/// The name of the certificate reload span.
pub const RELOAD_SPAN: &str = "wsgate.certificate.reload";

/// The trace identity of one handshake, fixed when its upgrade request is read.
#[derive(Debug, Clone)]
pub struct TraceStart {
    /// The parent taken from the request's `traceparent`, if any.
    parent: Option<SpanContext>,
    /// This span's context (sampled flag = the decision for a successful handshake).
    own: SpanContext,
}

/// Makes spans and hands them to the export task. Cheap to share; inert when tracing is off.
pub struct Tracer {
    queue: Option<mpsc::Sender<SpanData>>,
    sampler: Sampler,
    propagator: TextMapCompositePropagator,
    scope: InstrumentationScope,
    ids: RandomIdGenerator,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("enabled", &self.enabled())
            .finish_non_exhaustive()
    }
}

/// Why the exporter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SpanError {
    /// The OTLP exporter refused its configuration.
    #[error("building the OTLP exporter: {0}")]
    Exporter(String),
}

fn propagator(settings: &OtelSettings) -> TextMapCompositePropagator {
    let mut list: Vec<Box<dyn TextMapPropagator + Send + Sync>> = Vec::new();
    if settings.propagators.tracecontext {
        list.push(Box::new(TraceContextPropagator::new()));
    }
    if settings.propagators.baggage {
        list.push(Box::new(BaggagePropagator::new()));
    }
    TextMapCompositePropagator::new(list)
}

fn build_exporter(settings: &OtelSettings, endpoint: &str) -> Result<opentelemetry_otlp::SpanExporter, SpanError> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
    let retry = opentelemetry_otlp::RetryPolicy::recommended()
        .with_max_retries(1)
        .with_initial_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(500));
    let exporter = match settings.protocol {
        Protocol::Grpc => {
            let mut metadata = tonic::metadata::MetadataMap::new();
            for (k, v) in &settings.headers {
                if let (Ok(k), Ok(v)) = (
                    tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes()),
                    v.parse(),
                ) {
                    metadata.insert(k, v);
                }
            }
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(settings.timeout)
                .with_metadata(metadata)
                .with_retry_policy(retry)
                .build()
        }
        Protocol::HttpProtobuf => {
            let client = opentelemetry_http::hyper::HyperClient::with_default_connector(settings.timeout, None);
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(client)
                .with_endpoint(endpoint)
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_timeout(settings.timeout)
                .with_headers(settings.headers.iter().cloned().collect())
                .with_retry_policy(retry)
                .build()
        }
    };
    exporter.map_err(|e| SpanError::Exporter(e.to_string()))
}

impl Tracer {
    /// A tracer that records nothing.
    pub fn disabled(metrics: Arc<Metrics>) -> Self {
        Self {
            queue: None,
            sampler: Sampler::AlwaysOff,
            propagator: TextMapCompositePropagator::new(Vec::new()),
            scope: InstrumentationScope::builder("wsgate").build(),
            ids: RandomIdGenerator::default(),
            metrics,
        }
    }

    /// Builds the tracer and spawns its export task (on the current runtime). With no endpoint,
    /// returns a disabled tracer and spawns nothing. `stop` flushes and ends the task; the
    /// returned handle resolves when it has.
    pub fn start(
        settings: &OtelSettings,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Result<(Self, Option<tokio::task::JoinHandle<()>>), SpanError> {
        let Some(endpoint) = settings.endpoint.as_deref() else {
            return Ok((Self::disabled(metrics), None));
        };
        let mut exporter = build_exporter(settings, endpoint)?;
        let resource = Resource::builder_empty()
            .with_detector(Box::new(opentelemetry_sdk::resource::TelemetryResourceDetector))
            .with_attributes(settings.resource.iter().cloned())
            .build();
        opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &resource);
        let (tx, rx) = mpsc::channel(settings.batching.max_queue);
        let task = tokio::spawn(export_loop(
            rx,
            exporter,
            settings.batching,
            settings.timeout,
            metrics.clone(),
            stop,
        ));
        let tracer = Self {
            queue: Some(tx),
            sampler: settings.sampler.clone(),
            propagator: propagator(settings),
            scope: InstrumentationScope::builder("wsgate")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            ids: RandomIdGenerator::default(),
            metrics,
        };
        tracing::info!(endpoint, protocol = ?settings.protocol, "exporting handshake spans over OTLP");
        Ok((tracer, Some(task)))
    }

    /// Whether spans are recorded at all.
    pub fn enabled(&self) -> bool {
        self.queue.is_some()
    }

    /// Reads the parent from the upgrade request, fixes this handshake's trace and span ids and
    /// the sampling decision for success, and returns the headers to send to the app
    /// (`traceparent`, `tracestate`, `baggage`), which replace any the client sent. `kind` is
    /// SERVER inbound, CLIENT outbound (where the headers go to the remote).
    pub fn start_handshake(
        &self,
        request: &HeaderMap,
        kind: SpanKind,
    ) -> Option<(TraceStart, Vec<(HeaderName, HeaderValue)>)> {
        if !self.enabled() {
            return None;
        }
        let parent_cx = self.propagator.extract(&HeaderExtractor(request));
        let parent = parent_cx.span().span_context().clone();
        let parent = parent.is_valid().then_some(parent);
        let trace_id = parent
            .as_ref()
            .map(|p| p.trace_id())
            .unwrap_or_else(|| self.ids.new_trace_id());
        let decision = self.sampler.should_sample(
            parent.as_ref().map(|_| &parent_cx),
            trace_id,
            HANDSHAKE_SPAN,
            &kind,
            &[],
            &[],
        );
        let flags = if decision.decision == SamplingDecision::RecordAndSample {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let state = parent
            .as_ref()
            .map(|p| p.trace_state().clone())
            .unwrap_or_else(TraceState::default);
        let own = SpanContext::new(trace_id, self.ids.new_span_id(), flags, false, state);
        let mut out = HeaderMap::new();
        self.propagator.inject_context(
            &parent_cx.with_remote_span_context(own.clone()),
            &mut HeaderInjector(&mut out),
        );
        let headers = out.into_iter().filter_map(|(k, v)| k.map(|k| (k, v))).collect();
        Some((TraceStart { parent, own }, headers))
    }

    /// Records the handshake span. `failed` spans are always recorded.
    pub fn end_handshake(
        &self,
        trace: Option<TraceStart>,
        failed: Option<(&'static str, &str)>,
        started_at: SystemTime,
        kind: SpanKind,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) {
        let Some(queue) = &self.queue else { return };
        let trace = match trace {
            Some(t) => t,
            None => {
                // Failed before the upgrade request (TLS, timeout): a root span.
                let trace_id = self.ids.new_trace_id();
                let sampled = failed.is_some()
                    || self
                        .sampler
                        .should_sample(None, trace_id, HANDSHAKE_SPAN, &kind, &[], &[])
                        .decision
                        == SamplingDecision::RecordAndSample;
                let flags = if sampled {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                };
                TraceStart {
                    parent: None,
                    own: SpanContext::new(trace_id, self.ids.new_span_id(), flags, false, TraceState::default()),
                }
            }
        };
        if failed.is_none() && !trace.own.is_sampled() {
            return;
        }
        let own = SpanContext::new(
            trace.own.trace_id(),
            trace.own.span_id(),
            TraceFlags::SAMPLED,
            false,
            trace.own.trace_state().clone(),
        );
        let mut attributes = attributes();
        if let Some((kind, _)) = failed {
            attributes.push(KeyValue::new(attr::ERROR_TYPE, kind));
        }
        let parent = trace.parent.as_ref().map(|p| p.span_id());
        let span = self.span(
            own,
            parent,
            kind,
            HANDSHAKE_SPAN,
            started_at,
            attributes,
            failed.map(|f| f.1),
        );
        self.push(queue, span);
    }

    /// Records a certificate reload span (always: reloads are rare and each one matters).
    pub fn reload(&self, started_at: SystemTime, attributes: Vec<KeyValue>, error: Option<&str>) {
        let Some(queue) = &self.queue else { return };
        let own = SpanContext::new(
            self.ids.new_trace_id(),
            self.ids.new_span_id(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let span = self.span(
            own,
            None,
            SpanKind::Internal,
            RELOAD_SPAN,
            started_at,
            attributes,
            error,
        );
        self.push(queue, span);
    }

    /// A finished span ending now; `error` sets status Error with that description.
    #[allow(clippy::too_many_arguments)]
    fn span(
        &self,
        own: SpanContext,
        remote_parent: Option<SpanId>,
        kind: SpanKind,
        name: &'static str,
        started_at: SystemTime,
        attributes: Vec<KeyValue>,
        error: Option<&str>,
    ) -> SpanData {
        SpanData {
            span_context: own,
            parent_span_id: remote_parent.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: remote_parent.is_some(),
            span_kind: kind,
            name: Cow::Borrowed(name),
            start_time: started_at,
            end_time: SystemTime::now(),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: match error {
                Some(reason) => Status::Error {
                    description: Cow::Owned(reason.to_owned()),
                },
                None => Status::Unset,
            },
            instrumentation_scope: self.scope.clone(),
        }
    }

    fn push(&self, queue: &mpsc::Sender<SpanData>, span: SpanData) {
        if queue.try_send(span).is_err() {
            self.metrics.spans_dropped.inc();
        }
    }
}

/// Rate limit of export-failure log lines.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);
/// Longest time spent flushing at stop.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

async fn export_loop(
    mut rx: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    batching: super::otel::Batching,
    timeout: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    use opentelemetry_sdk::trace::SpanExporter as _;
    let mut last_error_log: Option<Instant> = None;
    let mut suppressed = 0u64;
    let mut stopping = false;
    // Set when stopping: the whole flush gets FLUSH_TIMEOUT, not each batch.
    let mut flush_deadline: Option<tokio::time::Instant> = None;
    loop {
        let mut batch = Vec::with_capacity(batching.max_batch.min(64));
        // Wait for the first span of a batch, then fill it until full or the delay has passed.
        if !stopping {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(s) => batch.push(s),
                    None => return,
                },
                _ = stop.cancelled() => stopping = true,
            }
        }
        let deadline = tokio::time::Instant::now() + batching.delay;
        while batch.len() < batching.max_batch {
            if stopping {
                match rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
                continue;
            }
            tokio::select! {
                span = rx.recv() => match span {
                    Some(s) => batch.push(s),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
                _ = stop.cancelled() => stopping = true,
            }
        }
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        // The exporter has its own timeout (and one retry); this bounds everything it does.
        let limit = if stopping {
            let deadline = *flush_deadline.get_or_insert_with(|| tokio::time::Instant::now() + FLUSH_TIMEOUT);
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                metrics.spans_dropped.inc_by(n + rx.len() as u64);
                return;
            }
            left
        } else {
            timeout * 3
        };
        let result = match tokio::time::timeout(limit, exporter.export(batch)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("export did not finish within {}s", limit.as_secs())),
        };
        match result {
            Ok(()) => {
                metrics.spans_exported.inc_by(n);
            }
            Err(reason) => {
                metrics.span_export_failures.inc();
                metrics.spans_dropped.inc_by(n);
                let due = last_error_log.is_none_or(|t| t.elapsed() >= ERROR_LOG_INTERVAL);
                if due {
                    tracing::warn!(
                        target: "wsgate::otel",
                        error = %reason,
                        spans_lost = n,
                        failures_since_last_log = suppressed,
                        "span export failed; spans are dropped while the collector is unreachable"
                    );
                    last_error_log = Some(Instant::now());
                    suppressed = 0;
                } else {
                    suppressed += 1;
                }
            }
        }
    }
}
