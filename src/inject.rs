//! `wsgate inject`: the mutating admission webhook that injects the sidecar, and the controller
//! that requests a cert-manager Certificate for every service account whose pods are injected.
//!
//! `settings` and `annotations` are pure; `patch` is the pure injection; `review` reads a
//! review within bounds (pure); `webhook` serves it over HTTPS; `certificates` is the
//! controller and `events` writes its Events on pods. Shares the proxy's building blocks, not
//! the proxy: depends on `net`, `lifecycle`, `admin`, `certs`, `tls`, `telemetry` and `authz`.

pub mod annotations;
pub mod certificates;
pub mod events;
pub mod metrics;
pub mod patch;
pub mod review;
pub mod settings;
pub mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::admin::{AdminState, NotReady};
use crate::certs::ReloadTiming;
use crate::certs::watch::{CertWatcher, ReloadReport};
use crate::certs::{SecretSource, Usage};
use crate::lifecycle::Lifecycle;
use crate::telemetry::metrics::count_reload;
use crate::tls::reloader::{ReloadHooks, Reloader};
use crate::tls::{Serving, ServingNow, TlsStore};
use metrics::InjectMetrics;
use settings::{InjectSettings, NativeSidecar};

/// Everything `wsgate inject` needs, validated.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// The HTTPS webhook address.
    pub listen: SocketAddr,
    /// The admin address.
    pub admin: SocketAddr,
    /// The webhook's serving certificate (a mounted cert-manager Secret).
    pub cert_dir: PathBuf,
    /// What to inject and how to request certificates.
    pub settings: InjectSettings,
    /// Run the certificate controller.
    pub certificate_controller: bool,
    /// Serving-certificate watcher timings.
    pub reload: ReloadTiming,
    /// On SIGTERM, stay up (not ready, still answering) this long, so the Service's endpoints
    /// and the API server's connections move away before the webhook stops.
    pub shutdown_delay: Duration,
}

/// Why the injector could not start.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A port could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// `webhook` or `admin`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What the webhook reports around a reload of its serving certificate.
struct WebhookHooks {
    metrics: Arc<InjectMetrics>,
}

impl ReloadHooks for WebhookHooks {
    fn reported(&mut self, report: &ReloadReport, _serving: Option<&Serving>) {
        count_reload(&self.metrics.reloads, report.result.is_ok());
    }
}

/// State behind the injector's admin endpoints.
struct InjectStatus {
    store: Arc<TlsStore>,
    metrics: Arc<InjectMetrics>,
    life: Lifecycle,
}

impl AdminState for InjectStatus {
    fn readiness(&self) -> Result<ServingNow, NotReady> {
        if self.life.is_draining() {
            return Err(NotReady::Draining);
        }
        Ok(self.store.readiness()?)
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    fn drain(&self) {
        self.life.drain();
    }
}

/// The first two numbers of a Kubernetes version (`1.29.3-gke.1` → (1, 29)).
pub fn parse_version(major: &str, minor: &str) -> Option<(u32, u32)> {
    let digits = |s: &str| {
        s.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    };
    Some((digits(major)?, digits(minor)?))
}

/// Whether a cluster of this version runs native sidecars by default (beta, on, since 1.29).
pub fn supports_native_sidecars(version: (u32, u32)) -> bool {
    version >= (1, 29)
}

/// Whether every kubelet runs native sidecars: the API server's version and each node's kubelet
/// version must be 1.29 or later. Kubelets may run up to three minor versions behind the API
/// server (the control plane is upgraded first): a 1.28 kubelet would run a native sidecar as
/// an init container that never ends, and the pod would never start. `None` when it cannot
/// tell (the caller keeps ordinary containers).
async fn detect_native(client: &kube::Client) -> Option<bool> {
    let info = match client.apiserver_version().await {
        Ok(info) => info,
        Err(e) => {
            tracing::warn!(error = %e, "cannot ask the API server for its version");
            return None;
        }
    };
    let Some(server) = parse_version(&info.major, &info.minor) else {
        tracing::warn!(major = %info.major, minor = %info.minor, "cannot read the API server's version");
        return None;
    };
    if !supports_native_sidecars(server) {
        return Some(false);
    }
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
    let list = match nodes.list(&Default::default()).await {
        Ok(list) => list,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list nodes to check their kubelet versions; injecting ordinary containers");
            return None;
        }
    };
    let versions: Vec<String> = list
        .items
        .iter()
        .filter_map(|n| n.status.as_ref()?.node_info.as_ref().map(|i| i.kubelet_version.clone()))
        .collect();
    Some(kubelets_support_native_sidecars(versions.iter().map(String::as_str)))
}

/// Whether every kubelet version (`v1.29.3`, `v1.30.1-eks-…`) runs native sidecars; true for no
/// nodes at all. An unreadable version counts as too old.
pub fn kubelets_support_native_sidecars<'a>(mut versions: impl Iterator<Item = &'a str>) -> bool {
    versions.all(|v| {
        let mut parts = v.trim_start_matches('v').split('.');
        match (parts.next(), parts.next()) {
            (Some(major), Some(minor)) => parse_version(major, minor).is_some_and(supports_native_sidecars),
            _ => false,
        }
    })
}

/// A running injector.
pub struct InjectHandle {
    /// The webhook's address.
    pub listen_addr: SocketAddr,
    /// The admin address.
    pub admin_addr: SocketAddr,
    /// The webhook's TLS store.
    pub store: Arc<TlsStore>,
    /// Whether sidecars are injected as native sidecars now.
    pub native: Arc<AtomicBool>,
    /// Metrics.
    pub metrics: Arc<InjectMetrics>,
    status: Arc<InjectStatus>,
}

impl InjectHandle {
    /// Stops everything now.
    pub fn stop(&self) {
        self.status.life.stop();
    }

    /// Starts a drain (SIGTERM, `POST /drain`): not ready at once, still answering reviews for
    /// the configured shutdown delay, then stopped.
    pub fn drain(&self) {
        self.status.life.drain();
    }

    /// The readiness answer `/readyz` would give.
    pub fn readiness(&self) -> Result<ServingNow, NotReady> {
        self.status.readiness()
    }

    /// Resolves once a drain or a stop has started.
    pub async fn drained(&self) {
        self.status.life.drained().await;
    }

    /// Waits until the injector has stopped and every task has ended.
    pub async fn wait(self) {
        self.status.life.wait().await;
    }
}

/// Starts the webhook, its certificate watcher, the admin server and (with a client) the
/// certificate controller and the native-sidecar detection.
pub async fn start(cfg: InjectConfig, client: Option<kube::Client>) -> Result<InjectHandle, InjectError> {
    let listener = crate::net::bind(cfg.listen).map_err(|source| InjectError::Bind {
        what: "webhook",
        addr: cfg.listen,
        source,
    })?;
    let admin = crate::net::bind(cfg.admin).map_err(|source| InjectError::Bind {
        what: "admin",
        addr: cfg.admin,
        source,
    })?;
    let listen_addr = listener.local_addr().unwrap_or(cfg.listen);
    let admin_addr = admin.local_addr().unwrap_or(cfg.admin);
    let metrics = InjectMetrics::new();
    let store = Arc::new(TlsStore::new());
    let life = Lifecycle::new();
    let stop = life.stop_token();

    let native = Arc::new(AtomicBool::new(false));
    match (cfg.settings.native, &client) {
        (NativeSidecar::On, _) => native.store(true, Ordering::Relaxed),
        (NativeSidecar::Off, _) => native.store(false, Ordering::Relaxed),
        (NativeSidecar::Auto, None) => {
            tracing::warn!(
                "no Kubernetes API access: injecting ordinary containers (set --native-sidecar on to change)"
            );
        }
        (NativeSidecar::Auto, Some(client)) => {
            let first = detect_native(client).await;
            native.store(first.unwrap_or(false), Ordering::Relaxed);
            let (client, native, stop, metrics) = (client.clone(), native.clone(), stop.clone(), metrics.clone());
            life.spawn(async move {
                // The cluster may be upgraded while the injector runs; an unknown answer is asked
                // again sooner.
                let mut known = first.is_some();
                loop {
                    let wait = if known { 600 } else { 30 };
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
                    }
                    let now = detect_native(&client).await;
                    known = now.is_some();
                    if let Some(now) = now {
                        native.store(now, Ordering::Relaxed);
                        metrics.native_sidecars.set(i64::from(now));
                    }
                }
            });
        }
    }
    let is_native = native.load(Ordering::Relaxed);
    metrics.native_sidecars.set(i64::from(is_native));

    let source = SecretSource {
        cert_dir: cfg.cert_dir.clone(),
        trust_bundle: None,
    };
    let watcher = CertWatcher::new(source, Usage::Server, cfg.reload, crate::tls::provider());
    let reloader = Reloader::new(
        store.clone(),
        Box::new(|bundle| {
            crate::tls::server::server_config_no_client_auth(bundle).map(crate::tls::Configs::server_only)
        }),
        WebhookHooks {
            metrics: metrics.clone(),
        },
    );
    life.spawn(watcher.run(reloader, stop.clone()));
    let status = Arc::new(InjectStatus {
        store: store.clone(),
        metrics: metrics.clone(),
        life: life.clone(),
    });
    life.spawn(crate::admin::serve(admin, status.clone(), stop.clone()));
    // A drain keeps answering (not ready) for the shutdown delay, so the Service's endpoints and
    // the API server's connections move away first; then everything stops.
    let (sequence, delay) = (life.clone(), cfg.shutdown_delay);
    life.spawn(async move {
        tokio::select! {
            _ = sequence.drained() => {}
            _ = sequence.stopped() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => sequence.stop(),
            _ = sequence.stopped() => {}
        }
    });
    let hook = Arc::new(webhook::Webhook {
        settings: cfg.settings.clone(),
        native: native.clone(),
        metrics: metrics.clone(),
    });
    life.spawn(webhook::serve(listener, store.clone(), hook, stop.clone()));
    match (cfg.certificate_controller, client) {
        (true, Some(client)) => {
            life.spawn(certificates::run(
                client,
                cfg.settings.clone(),
                metrics.clone(),
                stop.clone(),
            ));
        }
        (true, None) => tracing::warn!("no Kubernetes API access: the certificate controller is off"),
        (false, _) => tracing::info!("certificate controller disabled by --certificate-controller false"),
    }
    tracing::info!(
        listen = %listen_addr,
        admin = %admin_addr,
        native_sidecars = is_native,
        cert_dir = %cfg.cert_dir.display(),
        "wsgate injector started"
    );
    Ok(InjectHandle {
        listen_addr,
        admin_addr,
        store,
        native,
        metrics,
        status,
    })
}
