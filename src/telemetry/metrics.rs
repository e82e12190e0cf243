//! The Prometheus registry and the handles the hot paths increment.
//!
//! Handles for fixed label sets are resolved once at start, so the data path only touches
//! atomics. Names follow Prometheus conventions: `wsgate_…_total` counters, base units.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

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
    /// `inbound` (mTLS clients to the app) or `outbound` (the app to a remote over mTLS).
    pub direction: &'static str,
}

/// The `direction` label alone (`inbound` or `outbound`), of `wsgate_connections_open`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
}

/// The `direction` label of a connection served by the inbound listener.
pub const INBOUND: &str = "inbound";
/// The `direction` label of a connection accepted on an `--outbound` listener.
pub const OUTBOUND: &str = "outbound";

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
    /// Who closed first: `client`, `upstream` or `proxy` (outbound: the client is the local
    /// app, the upstream the remote).
    pub initiator: &'static str,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
}

/// Labels of `wsgate_connections_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// Which limit refused it: `max_connections`, `max_pending`, `max_pending_per_ip`,
    /// `max_connections_per_identity` (inbound), `max_connections_per_destination` (outbound).
    pub reason: &'static str,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
}

/// Labels of `wsgate_certificate_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `success` or `failure`.
    pub result: &'static str,
}

/// Labels of `wsgate_certificate_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertInfoLabels {
    /// Serial of the certificate being served, hex.
    pub serial: String,
    /// Its not-after, RFC 3339.
    pub not_after: String,
}

/// Labels of `wsgate_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// The crate version.
    pub version: &'static str,
}

/// The limits that refuse inbound connections (`reason` of `wsgate_connections_refused_total`).
const INBOUND_LIMITS: [&str; 4] = [
    "max_connections",
    "max_pending",
    "max_pending_per_ip",
    "max_connections_per_identity",
];
/// The limits that refuse outbound connections.
const OUTBOUND_LIMITS: [&str; 3] = ["max_connections", "max_pending", "max_connections_per_destination"];

/// Every metric wsgate exports, with the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    /// Handshakes by result and `error.type`.
    pub handshakes: Family<HandshakeLabels, Counter>,
    /// Duration from TCP accept to the 101 or the refusal.
    pub handshake_duration: Family<HandshakeLabels, Histogram>,
    /// Proxied WebSocket connections open now, by direction.
    pub connections_open: Family<FlowLabels, Gauge>,
    /// Connections closed, by close code and initiator.
    pub connections_closed: Family<CloseLabels, Counter>,
    /// Connections refused by a limit, by the limit (never by identity or address).
    pub connections_refused: Family<RefusedLabels, Counter>,
    /// Bytes charged to the memory budget for unfinished messages now.
    pub budget_used: Gauge,
    /// The memory budget's limit.
    pub budget_limit: Gauge,
    /// Connections closed because new trust roots no longer admit their client's chain.
    pub connections_untrusted: Counter,
    /// Re-verifications of the open connections after the trust roots changed.
    pub trust_rechecks: Counter,
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
    /// The serving certificate's serial, as an info metric.
    pub cert_info: Family<CertInfoLabels, Gauge>,
    /// Earliest not-after among the certificates of connected clients; absent when none.
    client_earliest_not_after: Family<Vec<(String, String)>, Gauge<f64, AtomicU64>>,
    /// Not-afters of connected clients' certificates (a multiset), behind the gauge above.
    client_not_afters: Mutex<BTreeMap<i64, u32>>,
    /// Seconds since the files on disk stopped matching the certificate served (0 when equal).
    cert_stale: Gauge<f64, AtomicU64>,
    /// Since when the files on disk differ from the certificate served.
    stale_since: Mutex<Option<SystemTime>>,
    /// Spans dropped: queue full or export failed.
    pub spans_dropped: Counter,
    /// Spans exported.
    pub spans_exported: Counter,
    /// Export requests that failed.
    pub span_export_failures: Counter,
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
            "TLS + WebSocket handshakes attempted, by result, error.type and direction (inbound or outbound)",
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
        let connections_open = Family::<FlowLabels, Gauge>::default();
        // Inbound from the start (0, not absent); outbound once an outbound listener exists.
        drop(connections_open.get_or_create(&FlowLabels { direction: INBOUND }));
        registry.register(
            "connections_open",
            "Proxied WebSocket connections open now, by direction",
            connections_open.clone(),
        );
        let connections_refused = Family::<RefusedLabels, Counter>::default();
        // Every inbound reason from the start: a limit never hit reads 0, not absent.
        for reason in INBOUND_LIMITS {
            drop(connections_refused.get_or_create(&RefusedLabels {
                reason,
                direction: INBOUND,
            }));
        }
        registry.register(
            "connections_refused",
            "Connections refused by a limit, by reason and direction",
            connections_refused.clone(),
        );
        let budget_used = Gauge::default();
        registry.register_with_unit(
            "memory_budget_used",
            "Bytes held for unfinished messages beyond each connection's allowance, charged to the budget",
            prometheus_client::registry::Unit::Bytes,
            budget_used.clone(),
        );
        let budget_limit = Gauge::default();
        registry.register_with_unit(
            "memory_budget_limit",
            "The memory budget for unfinished messages (--memory-budget)",
            prometheus_client::registry::Unit::Bytes,
            budget_limit.clone(),
        );
        let connections_closed = Family::<CloseLabels, Counter>::default();
        registry.register(
            "connections_closed",
            "Proxied WebSocket connections closed, by first close code, who sent it and direction",
            connections_closed.clone(),
        );
        let connections_untrusted = Counter::default();
        registry.register(
            "connections_untrusted",
            "Connections closed (1008) because new trust roots no longer admit their client certificate",
            connections_untrusted.clone(),
        );
        let trust_rechecks = Counter::default();
        registry.register(
            "trust_rechecks",
            "Re-verifications of the open connections' client certificates after the trust roots changed",
            trust_rechecks.clone(),
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
        let reloads = register_reloads(
            &mut registry,
            "Certificate set loads that installed a new set (success) or were refused (failure)",
        );
        let cert_not_after = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "certificate_not_after",
            "Not-after of the certificate being served, Unix time",
            prometheus_client::registry::Unit::Seconds,
            cert_not_after.clone(),
        );
        let cert_info = Family::<CertInfoLabels, Gauge>::default();
        registry.register(
            "certificate_info",
            "The certificate being served: serial and not-after as labels, value 1",
            cert_info.clone(),
        );
        let client_earliest_not_after = Family::<Vec<(String, String)>, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "client_certificate_earliest_not_after",
            "Earliest not-after among the certificates of connected clients, Unix time (absent when none is connected)",
            prometheus_client::registry::Unit::Seconds,
            client_earliest_not_after.clone(),
        );
        let cert_stale = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "certificate_stale",
            "Time since the certificate files on disk stopped matching the one served (0 when they match)",
            prometheus_client::registry::Unit::Seconds,
            cert_stale.clone(),
        );
        let spans_dropped = Counter::default();
        registry.register(
            "otel_spans_dropped",
            "Spans dropped because the export queue was full or the export failed",
            spans_dropped.clone(),
        );
        let spans_exported = Counter::default();
        registry.register(
            "otel_spans_exported",
            "Spans exported to the OTLP collector",
            spans_exported.clone(),
        );
        let span_export_failures = Counter::default();
        registry.register(
            "otel_export_failures",
            "OTLP export requests that failed or timed out",
            span_export_failures.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "wsgate build: version as a label, value 1", build);
        Arc::new(Self {
            cert_info,
            client_earliest_not_after,
            client_not_afters: Mutex::new(BTreeMap::new()),
            cert_stale,
            stale_since: Mutex::new(None),
            spans_dropped,
            spans_exported,
            span_export_failures,
            handshakes,
            handshake_duration,
            connections_open,
            connections_closed,
            connections_untrusted,
            trust_rechecks,
            messages_in: messages.get_or_create_owned(&inbound),
            messages_out: messages.get_or_create_owned(&outbound),
            bytes_in: bytes.get_or_create_owned(&inbound),
            bytes_out: bytes.get_or_create_owned(&outbound),
            reloads,
            connections_refused,
            budget_used,
            budget_limit,
            cert_not_after,
            registry,
        })
    }

    /// Creates the outbound series (open connections, refusal reasons) at 0, for a proxy with
    /// `--outbound` routes: a limit never hit reads 0, not absent.
    pub fn outbound_configured(&self) {
        drop(self.connections_open.get_or_create(&FlowLabels { direction: OUTBOUND }));
        for reason in OUTBOUND_LIMITS {
            drop(self.connections_refused.get_or_create(&RefusedLabels {
                reason,
                direction: OUTBOUND,
            }));
        }
    }

    /// The open-connections gauge of `direction`.
    pub fn open(&self, direction: &'static str) -> Gauge {
        self.connections_open.get_or_create_owned(&FlowLabels { direction })
    }

    /// Counts one finished handshake attempt (`error_type` is `None` on success) of
    /// `direction` and its duration.
    pub fn handshake_done(
        &self,
        direction: &'static str,
        error_type: Option<&'static str>,
        elapsed: std::time::Duration,
    ) {
        let labels = HandshakeLabels {
            result: if error_type.is_some() { "failure" } else { "success" },
            error_type: error_type.unwrap_or(""),
            direction,
        };
        self.handshakes.get_or_create(&labels).inc();
        self.handshake_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// A connection with a client certificate valid until `not_after` (Unix seconds) opened.
    pub fn client_connected(&self, not_after: i64) {
        if let Ok(mut set) = self.client_not_afters.lock() {
            *set.entry(not_after).or_insert(0) += 1;
            self.publish_earliest(&set);
        }
    }

    /// That connection closed.
    pub fn client_disconnected(&self, not_after: i64) {
        if let Ok(mut set) = self.client_not_afters.lock() {
            if let Some(n) = set.get_mut(&not_after) {
                *n -= 1;
                if *n == 0 {
                    set.remove(&not_after);
                }
            }
            self.publish_earliest(&set);
        }
    }

    fn publish_earliest(&self, set: &BTreeMap<i64, u32>) {
        match set.keys().next() {
            Some(earliest) => {
                self.client_earliest_not_after
                    .get_or_create(&Vec::new())
                    .set(*earliest as f64);
            }
            None => self.client_earliest_not_after.clear(),
        }
    }

    /// A new certificate is served.
    pub fn certificate_served(&self, serial: &str, not_after: SystemTime) {
        self.cert_not_after.set(crate::x509::to_unix(not_after) as f64);
        self.cert_info.clear();
        self.cert_info
            .get_or_create(&CertInfoLabels {
                serial: serial.to_owned(),
                not_after: crate::x509::rfc3339(not_after),
            })
            .set(1);
    }

    /// Whether the files on disk differ from the certificate served, as of now.
    pub fn disk_differs(&self, differs: bool) {
        if let Ok(mut since) = self.stale_since.lock() {
            match (differs, *since) {
                (true, None) => *since = Some(SystemTime::now()),
                (false, _) => *since = None,
                (true, Some(_)) => {}
            }
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let stale = self
            .stale_since
            .lock()
            .ok()
            .and_then(|s| *s)
            .and_then(|t| t.elapsed().ok())
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.cert_stale.set(stale);
        encode(&self.registry)
    }

    /// Counts one connection of `direction` refused by the limit named `reason`.
    pub fn refused(&self, direction: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&RefusedLabels { reason, direction })
            .inc();
    }

    /// Counts one certificate reload by result.
    pub fn reloaded(&self, ok: bool) {
        count_reload(&self.reloads, ok);
    }
}

/// Registers `certificate_reloads` (by `result`) in `registry`: the proxy and the webhook
/// count their serving-certificate reloads the same way.
pub fn register_reloads(registry: &mut Registry, help: &str) -> Family<ReloadLabels, Counter> {
    let reloads = Family::<ReloadLabels, Counter>::default();
    registry.register("certificate_reloads", help, reloads.clone());
    reloads
}

/// Counts one reload in a family made by [`register_reloads`].
pub fn count_reload(reloads: &Family<ReloadLabels, Counter>, ok: bool) {
    let result = if ok { "success" } else { "failure" };
    reloads.get_or_create(&ReloadLabels { result }).inc();
}

/// The OpenMetrics text of a registry (served as `application/openmetrics-text`).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::with_capacity(8192);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
