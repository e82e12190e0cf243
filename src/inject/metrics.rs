//! The injector's Prometheus metrics: admission reviews and certificate reconciles.
//!
//! Uses the registry helpers of `telemetry::metrics`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::telemetry::metrics::{encode, register_reloads};

/// Labels of `wsgate_inject_reviews_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    /// `injected`, `skipped`, `denied` or `invalid`.
    pub result: &'static str,
}

/// Labels of `wsgate_inject_certificate_reconciles_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `applied`, `unchanged`, `conflict` (one Secret, several service accounts), `foreign` (a
    /// Certificate of that name not managed by wsgate), `secret_not_reserved` (the Secret's name is
    /// not reserved to the pod's service account), `no_cert_manager` or `error`.
    pub result: &'static str,
}

/// The injector's metrics.
pub struct InjectMetrics {
    registry: Registry,
    /// Admission reviews by result.
    pub reviews: Family<ReviewLabels, Counter>,
    /// Time to answer a review.
    pub review_duration: Histogram,
    /// Certificate reconciles by result.
    pub reconciles: Family<ReconcileLabels, Counter>,
    /// Whether sidecars are injected as native sidecars now (1) or ordinary containers (0).
    pub native_sidecars: Gauge,
    /// Webhook serving-certificate reloads by result.
    pub reloads: Family<crate::telemetry::metrics::ReloadLabels, Counter>,
}

impl std::fmt::Debug for InjectMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InjectMetrics").finish_non_exhaustive()
    }
}

impl InjectMetrics {
    /// Creates and registers the metrics.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("wsgate_inject");
        let reviews = Family::<ReviewLabels, Counter>::default();
        registry.register("reviews", "Admission reviews answered, by result", reviews.clone());
        let review_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 14));
        registry.register_with_unit(
            "review_duration",
            "Time to answer an admission review",
            prometheus_client::registry::Unit::Seconds,
            review_duration.clone(),
        );
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "certificate_reconciles",
            "Workload Certificate reconciles, by result",
            reconciles.clone(),
        );
        let native_sidecars = Gauge::default();
        registry.register(
            "native_sidecars",
            "1 when sidecars are injected as native sidecars (init containers with restartPolicy Always)",
            native_sidecars.clone(),
        );
        let reloads = register_reloads(&mut registry, "Webhook serving-certificate loads, by result");
        Arc::new(Self {
            registry,
            reviews,
            review_duration,
            reconciles,
            native_sidecars,
            reloads,
        })
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}
