//! Telemetry, a leaf on the side of the data path: structured logs, Prometheus metrics, OTLP
//! spans.
//!
//! It receives finished facts (the proxy's `record` hands over one finished handshake; the
//! reloader's hooks one reload) and never sits between two stages. Depends on `x509` (RFC 3339)
//! and on tracing, prometheus-client and opentelemetry.

pub mod logs;
pub mod metrics;
pub mod otel;
pub mod spans;

use std::sync::Arc;

pub use logs::LogFormat;
pub use metrics::Metrics;
pub use otel::OtelSettings;
pub use spans::Tracer;

/// Metrics and the span tracer, shared by everything that reports.
#[derive(Debug)]
pub struct Telemetry {
    /// The Prometheus registry and handles.
    pub metrics: Arc<Metrics>,
    /// The OTLP span tracer (inert when no endpoint is configured).
    pub tracer: Tracer,
}
