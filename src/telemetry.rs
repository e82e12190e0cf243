//! Telemetry, cross-cutting: structured logs, Prometheus metrics, and the per-handshake record.
//!
//! The stages report facts; this module turns them into one log line, metrics and (with OTLP
//! configured) one span per handshake. Depends on tracing, prometheus-client, and the identity
//! and TLS fact types.

pub mod handshake;
pub mod logs;
pub mod metrics;

pub use handshake::{FailureKind, HandshakeRecord};
pub use metrics::Metrics;
