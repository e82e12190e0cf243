//! `wsgate proxy`: binds the ports, starts the certificate watcher, the accept loop and the
//! admin server, and drains gracefully.
//!
//! The inbound data path is a chain of stages, each its own module with its own error type:
//! `accept` (TCP + TLS → authenticated stream and identity), `exchange` (the client's upgrade
//! request and its answer), `dial` (the app and its upgrade), `pump` (the relay). `outcome` is
//! the shared set of `error.type` values, `record` the one record per attempt, `upgrade` the
//! pure header rules, `settings` the typed configuration, `trust` the registry of open
//! connections verified again when the trust roots change. The stages do not import one another;
//! `inbound` composes them per connection; `outbound` composes them in the other order for the
//! `--outbound` routes (with `secure`, the TLS client step); this file composes the process. Depends on every
//! module below it: `net`, `lifecycle`, `admin`, `certs`, `tls`, `authz`, `telemetry`, `x509`.

pub mod accept;
pub mod admission;
pub mod budget;
pub mod dial;
pub mod exchange;
pub mod inbound;
pub mod outbound;
pub mod outcome;
pub mod pump;
pub mod record;
pub mod secure;
pub mod settings;
pub mod trust;
pub mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState, NotReady};
use crate::certs::watch::{CertWatcher, ReloadReport};
use crate::certs::{CertBundle, SecretSource, Usage};
use crate::lifecycle::Lifecycle;
use crate::telemetry::spans::attr;
use crate::telemetry::{Metrics, Telemetry, Tracer};
use crate::tls::reloader::{ReloadHooks, Reloader};
use crate::tls::{Configs, Serving, ServingNow, TlsStore};
use crate::x509::rfc3339;
use settings::ProxyConfig;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The OTLP exporter could not be built.
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::spans::SpanError),
    /// A port could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// `listener` or `admin`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Shared state behind `/readyz`, `/metrics`, `/drain`.
struct Status {
    store: Arc<TlsStore>,
    metrics: Arc<Metrics>,
    budget: Arc<budget::MemoryBudget>,
    life: Lifecycle,
}

impl AdminState for Status {
    fn readiness(&self) -> Result<ServingNow, NotReady> {
        if self.life.is_draining() {
            return Err(NotReady::Draining);
        }
        Ok(self.store.readiness()?)
    }

    fn metrics(&self) -> String {
        self.metrics.budget_used.set(self.budget.used() as i64);
        self.metrics.budget_limit.set(self.budget.limit() as i64);
        self.metrics.encode()
    }

    fn drain(&self) {
        self.life.drain();
    }
}

/// What the proxy does around a reload: metrics, a span, and when the trust roots changed, the
/// re-verification of every open connection.
struct InboundHooks {
    telemetry: Arc<Telemetry>,
    trust: Arc<trust::TrustRegistry>,
}

impl InboundHooks {
    /// Holds the open connections to `roots`: when they changed, verifies every open client
    /// chain again on a blocking thread (signature checks) and ends those that fail.
    fn hold_to(&self, roots: &[rustls_pki_types::CertificateDer<'static>]) {
        let recheck = match self.trust.set_roots(roots) {
            Ok(Some(recheck)) => recheck,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(target: "wsgate::trust", %error, "open connections not verified again");
                return;
            }
        };
        let metrics = self.telemetry.metrics.clone();
        let run = move || {
            let open = recheck.len();
            let ended = recheck.run();
            for one in &ended {
                inbound::report_untrusted(&metrics, one);
            }
            metrics.trust_rechecks.inc();
            tracing::info!(
                target: "wsgate::trust",
                open,
                closed = ended.len(),
                "trust roots changed: open connections verified again"
            );
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(run)),
            Err(_) => run(),
        }
    }
}

impl ReloadHooks for InboundHooks {
    fn installed(&mut self, bundle: &CertBundle) {
        self.telemetry
            .metrics
            .certificate_served(&bundle.leaf.serial, bundle.leaf.not_after);
        // Before the new config is served: see `TrustRegistry::set_roots`.
        self.hold_to(&bundle.roots);
    }

    fn reported(&mut self, report: &ReloadReport, serving: Option<&Serving>) {
        self.telemetry.metrics.reloaded(report.result.is_ok());
        let result = if report.result.is_ok() { "success" } else { "failure" };
        let mut attributes = vec![
            opentelemetry::KeyValue::new(attr::RELOAD_RESULT, result),
            opentelemetry::KeyValue::new(attr::RELOAD_TRIGGER, report.trigger.as_str()),
        ];
        match &report.result {
            Ok(installed) => {
                attributes.push(opentelemetry::KeyValue::new(
                    attr::CERT_SERIAL,
                    installed.serial.clone(),
                ));
                attributes.push(opentelemetry::KeyValue::new(
                    attr::CERT_NOT_AFTER,
                    rfc3339(installed.not_after),
                ));
                self.telemetry.tracer.reload(report.started, attributes, None);
            }
            Err(error) => {
                let reason = error.to_string();
                attributes.push(opentelemetry::KeyValue::new(attr::RELOAD_REASON, reason.clone()));
                if let Some(serving) = serving {
                    attributes.push(opentelemetry::KeyValue::new(
                        attr::CERT_SERIAL,
                        serving.leaf.serial.clone(),
                    ));
                    attributes.push(opentelemetry::KeyValue::new(
                        attr::CERT_NOT_AFTER,
                        rfc3339(serving.leaf.not_after),
                    ));
                }
                self.telemetry.tracer.reload(report.started, attributes, Some(&reason));
            }
        }
    }

    fn checked(&mut self, disk_matches_served: bool, serving: bool) {
        self.telemetry.metrics.disk_differs(serving && !disk_matches_served);
    }
}

/// A running proxy.
pub struct ProxyHandle {
    /// Where the mTLS listener is bound (the configured `--listen`, unbound, when the proxy is
    /// outbound only).
    pub listen_addr: SocketAddr,
    /// Where each `--outbound` route's local listener is bound, in the order given.
    pub outbound_addrs: Vec<SocketAddr>,
    /// Where the admin server is bound.
    pub admin_addr: SocketAddr,
    /// The TLS store (tests and the demo read the serving serial from it).
    pub store: Arc<TlsStore>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    status: Arc<Status>,
}

impl ProxyHandle {
    /// Starts a graceful drain (idempotent): stop accepting, Close 1001 on every connection.
    pub fn drain(&self) {
        self.status.life.drain();
    }

    /// Waits until the drain has finished (all connections closed, or the drain timeout).
    pub async fn wait(self) {
        self.status.life.wait().await;
    }

    /// Resolves once a drain has started (by [`ProxyHandle::drain`] or `POST /drain`).
    pub async fn drained(&self) {
        self.status.life.drained().await;
    }

    /// The readiness answer `/readyz` would give.
    pub fn readiness(&self) -> Result<ServingNow, NotReady> {
        self.status.readiness()
    }
}

/// Binds the ports and starts everything; returns once the ports are bound.
pub async fn start(cfg: ProxyConfig) -> Result<ProxyHandle, ProxyError> {
    let bind = |what: &'static str, addr: SocketAddr| async move {
        crate::net::bind(addr).map_err(|source| ProxyError::Bind { what, addr, source })
    };
    // No upstream: a client-only pod, with no inbound listener at all.
    let listener = match &cfg.upstream {
        Some(_) => Some(bind("listener", cfg.listen).await?),
        None => None,
    };
    let mut outbound_listeners = Vec::with_capacity(cfg.outbound.routes.len());
    for route in &cfg.outbound.routes {
        outbound_listeners.push(bind("outbound listener", route.local).await?);
    }
    let admin_listener = bind("admin", cfg.admin).await?;
    let listen_addr = listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .unwrap_or(cfg.listen);
    let outbound_addrs: Vec<SocketAddr> = outbound_listeners
        .iter()
        .zip(&cfg.outbound.routes)
        .map(|(l, r)| l.local_addr().unwrap_or(r.local))
        .collect();
    let admin_addr = admin_listener.local_addr().unwrap_or(cfg.admin);
    let metrics = Metrics::new();
    if !cfg.outbound.routes.is_empty() {
        metrics.outbound_configured();
    }
    let life = Lifecycle::new();
    let (tracer, exporter_task) = Tracer::start(&cfg.otel, metrics.clone(), life.stop_token())?;
    let telemetry = Arc::new(Telemetry {
        metrics: metrics.clone(),
        tracer,
    });
    let store = Arc::new(TlsStore::new());
    let memory_budget = budget::MemoryBudget::new(cfg.limits.memory_budget);
    let status = Arc::new(Status {
        store: store.clone(),
        metrics: metrics.clone(),
        budget: memory_budget.clone(),
        life: life.clone(),
    });

    let source = SecretSource {
        cert_dir: cfg.cert_dir.clone(),
        trust_bundle: cfg.trust_bundle.clone(),
    };
    let dials_out = !cfg.outbound.routes.is_empty();
    // The leaf must allow what it is used for: server auth inbound, client auth outbound.
    let usage = match (cfg.upstream.is_some(), dials_out) {
        (true, true) => Usage::Both,
        (false, true) => Usage::Client,
        _ => Usage::Server,
    };
    let watcher = CertWatcher::new(source, usage, cfg.reload, crate::tls::provider());
    let min_version = cfg.tls_min_version;
    let trust = trust::TrustRegistry::new();
    let reloader = Reloader::new(
        store.clone(),
        // Both configs from the same set, installed together: a rotation swaps both.
        Box::new(move |bundle| {
            let server = crate::tls::server::server_config(bundle, min_version)?;
            let client = if dials_out {
                Some(crate::tls::client::client_config(bundle, min_version)?)
            } else {
                None
            };
            Ok(Configs { server, client })
        }),
        InboundHooks {
            telemetry: telemetry.clone(),
            trust: trust.clone(),
        },
    );
    life.spawn(watcher.run(reloader, life.stop_token()));
    life.spawn(admin::serve(admin_listener, status.clone(), life.stop_token()));

    // Fires when the drain timeout has passed: connections still open are dropped.
    let kill = tokio_util::sync::CancellationToken::new();
    let connections = TaskTracker::new();
    let mut accepts = Vec::new();
    if let (Some(listener), Some(upstream)) = (listener, cfg.upstream.clone()) {
        let inbound = Arc::new(inbound::Inbound {
            store: store.clone(),
            policy: cfg.policy.clone(),
            upstream,
            limits: cfg.limits,
            handshake_timeout: cfg.handshake_timeout,
            telemetry: telemetry.clone(),
            drain: life.drain_token(),
            kill: kill.clone(),
            admission: admission::Admission::new(admission::AdmissionLimits {
                max_pending: cfg.limits.max_pending,
                max_pending_per_ip: cfg.limits.max_pending_per_ip,
                max_per_identity: cfg.limits.max_connections_per_identity,
            }),
            budget: memory_budget.clone(),
            trust,
        });
        accepts.push(serve(
            listener,
            &cfg.limits,
            &life,
            &connections,
            move |stream, peer, permit| inbound.clone().handle(stream, peer, permit),
        ));
    }
    // One keeper for every route: handshakes in all (every app connects from loopback, so no
    // per-address share), connections per destination.
    let outbound_admission = admission::Admission::new(admission::AdmissionLimits {
        max_pending: cfg.limits.max_pending,
        max_pending_per_ip: cfg.limits.max_pending,
        max_per_identity: cfg.outbound.max_per_destination,
    });
    for (listener, route) in outbound_listeners.into_iter().zip(cfg.outbound.routes.iter().cloned()) {
        let outbound = Arc::new(outbound::Outbound {
            route,
            store: store.clone(),
            limits: cfg.limits,
            handshake_timeout: cfg.handshake_timeout,
            dial_timeout: cfg.outbound.dial_timeout,
            telemetry: telemetry.clone(),
            drain: life.drain_token(),
            kill: kill.clone(),
            admission: outbound_admission.clone(),
            budget: memory_budget.clone(),
        });
        accepts.push(serve(
            listener,
            &cfg.limits,
            &life,
            &connections,
            move |stream, peer, permit| outbound.clone().handle(stream, peer, permit),
        ));
    }
    let routes: Vec<String> = cfg
        .outbound
        .routes
        .iter()
        .zip(&outbound_addrs)
        .map(|(r, a)| format!("{a}={}", r.remote.url))
        .collect();
    tracing::info!(
        listen = %cfg.upstream.as_ref().map_or_else(|| "none".to_owned(), |_| listen_addr.to_string()),
        admin = %admin_addr,
        upstream = %cfg.upstream.as_ref().map_or_else(|| "none".to_owned(), |u| u.authority()),
        outbound = %routes.join(","),
        cert_dir = %cfg.cert_dir.display(),
        "wsgate proxy started"
    );
    let drain_timeout = cfg.drain_timeout;
    let sequence = life.clone();
    life.spawn(async move {
        sequence.drained().await;
        for accept in accepts {
            let _ = accept.await;
        }
        connections.close();
        tracing::info!(
            open = connections.len(),
            "draining: sent Close 1001 to every connection"
        );
        if tokio::time::timeout(drain_timeout, connections.wait()).await.is_err() {
            tracing::warn!(
                open = connections.len(),
                "drain timeout reached; dropping the connections still open"
            );
            kill.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
        }
        sequence.stop();
        if let Some(task) = exporter_task {
            // The exporter flushes what is queued (bounded by its own timeout).
            let _ = task.await;
        }
        tracing::info!("wsgate proxy stopped");
    });
    Ok(ProxyHandle {
        listen_addr,
        outbound_addrs,
        admin_addr,
        store,
        metrics,
        status,
    })
}

/// Spawns the accept loop of one listener (the mTLS one or an outbound route's): at most
/// `--max-connections` at once, stopped by the drain, each connection tracked by `connections`.
fn serve<H, F>(
    listener: TcpListener,
    limits: &settings::Limits,
    life: &Lifecycle,
    connections: &TaskTracker,
    handle: H,
) -> tokio::task::JoinHandle<()>
where
    H: Fn(tokio::net::TcpStream, SocketAddr, Option<tokio::sync::OwnedSemaphorePermit>) -> F + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(crate::net::accept_loop(
        listener,
        limits.max_connections,
        life.drain_token(),
        connections.clone(),
        handle,
    ))
}
