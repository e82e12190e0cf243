//! Telemetry, cross-cutting: structured logs, Prometheus metrics, OTLP spans, and the
//! per-handshake record that feeds all three.
//!
//! The stages report facts; this module turns them into one log line, metrics and (with OTLP
//! configured) one span per handshake. Depends on tracing, prometheus-client, opentelemetry,
//! and the identity and TLS fact types.

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
