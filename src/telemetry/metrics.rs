//! The Prometheus registry and the handles the hot paths increment.
//!
//! Handles for fixed label sets are resolved once at start, so the data path only touches
//! atomics. Names follow Prometheus conventions: `wsgate_…_total` counters, base units.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `wsgate_handshakes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `success` or `failure`.
    pub result: &'static str,
    /// The failure's `error.type`, empty on success.
    pub error_type: &'static str,
}

/// Labels of the relay counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `client_to_upstream` or `upstream_to_client`.
    pub direction: &'static str,
}

/// Labels of `wsgate_connections_closed_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// The WebSocket close code seen first (`1000`, `1001`, …), or `none` when the peer vanished.
    pub code: String,
    /// Who closed first: `client`, `upstream` or `proxy`.
    pub initiator: &'static str,
}

/// Labels of `wsgate_certificate_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `success` or `failure`.
    pub result: &'static str,
}

/// Every metric wsgate exports, with the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    /// Handshakes by result and `error.type`.
    pub handshakes: Family<HandshakeLabels, Counter>,
    /// Duration from TCP accept to the 101 or the refusal.
    pub handshake_duration: Family<HandshakeLabels, Histogram>,
    /// Proxied WebSocket connections open now.
    pub connections_open: Gauge,
    /// Connections closed, by close code and initiator.
    pub connections_closed: Family<CloseLabels, Counter>,
    /// Messages relayed client → app.
    pub messages_in: Counter,
    /// Messages relayed app → client.
    pub messages_out: Counter,
    /// Payload bytes relayed client → app.
    pub bytes_in: Counter,
    /// Payload bytes relayed app → client.
    pub bytes_out: Counter,
    /// Certificate reload attempts by result.
    pub reloads: Family<ReloadLabels, Counter>,
    /// The serving certificate's not-after, Unix seconds.
    pub cert_not_after: Gauge<f64, AtomicU64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("wsgate");
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "handshakes",
            "TLS + WebSocket handshakes attempted, by result and error.type",
            handshakes.clone(),
        );
        let handshake_duration = Family::<HandshakeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register_with_unit(
            "handshake_duration",
            "Time from TCP accept to the 101 (or the refusal)",
            prometheus_client::registry::Unit::Seconds,
            handshake_duration.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Proxied WebSocket connections open now",
            connections_open.clone(),
        );
        let connections_closed = Family::<CloseLabels, Counter>::default();
        registry.register(
            "connections_closed",
            "Proxied WebSocket connections closed, by first close code and who sent it",
            connections_closed.clone(),
        );
        let messages = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "messages_relayed",
            "WebSocket data messages relayed, by direction",
            messages.clone(),
        );
        let bytes = Family::<DirectionLabels, Counter>::default();
        registry.register_with_unit(
            "payload_relayed",
            "WebSocket message payload relayed, by direction",
            prometheus_client::registry::Unit::Bytes,
            bytes.clone(),
        );
        let inbound = DirectionLabels {
            direction: "client_to_upstream",
        };
        let outbound = DirectionLabels {
            direction: "upstream_to_client",
        };
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "certificate_reloads",
            "Certificate set loads that installed a new set (success) or were refused (failure)",
            reloads.clone(),
        );
        let cert_not_after = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "certificate_not_after",
            "Not-after of the certificate being served, Unix time",
            prometheus_client::registry::Unit::Seconds,
            cert_not_after.clone(),
        );
        Arc::new(Self {
            handshakes,
            handshake_duration,
            connections_open,
            connections_closed,
            messages_in: messages.get_or_create_owned(&inbound),
            messages_out: messages.get_or_create_owned(&outbound),
            bytes_in: bytes.get_or_create_owned(&inbound),
            bytes_out: bytes.get_or_create_owned(&outbound),
            reloads,
            cert_not_after,
            registry,
        })
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
