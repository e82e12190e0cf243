//! `wsgate proxy`: binds the ports, starts the certificate watcher, the accept loop and the
//! admin server, and drains gracefully.
//!
//! `listener`, `upgrade`, `pump` are the stages; `inbound` wires them per connection; this file
//! wires the process. Everything here is reachable from the library, so the demo and the tests
//! run the real proxy in-process.

pub mod inbound;
pub mod listener;
pub mod pump;
pub mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::certs::summary::rfc3339;
use crate::certs::watch::{CertWatcher, ReloadReport, ReloadSink};
use crate::certs::{CertBundle, SecretSource, Usage};
use crate::config::{ProxyConfig, TlsMinVersion};
use crate::telemetry::metrics::ReloadLabels;
use crate::telemetry::spans::attr;
use crate::telemetry::{Metrics, Telemetry, Tracer};
use crate::tls::{Serving, TlsStore};

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
pub struct Status {
    store: Arc<TlsStore>,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
    drain: CancellationToken,
}

impl AdminState for Status {
    fn readiness(&self) -> Result<String, String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("draining".into());
        }
        self.store.readiness()
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.drain.cancel();
    }
}

/// Installs validated bundles into the store and reports reloads.
struct InboundSink {
    store: Arc<TlsStore>,
    telemetry: Arc<Telemetry>,
    min_version: TlsMinVersion,
}

impl ReloadSink for InboundSink {
    fn install(&mut self, bundle: CertBundle) -> Result<(), String> {
        let server = crate::tls::server::server_config(&bundle, self.min_version).map_err(|e| e.to_string())?;
        self.telemetry
            .metrics
            .certificate_served(&bundle.leaf.serial, bundle.leaf.not_after);
        self.store.install(Serving::new(server, bundle));
        Ok(())
    }

    fn report(&mut self, report: &ReloadReport) {
        let result = if report.result.is_ok() { "success" } else { "failure" };
        self.telemetry
            .metrics
            .reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
        let mut attributes = vec![
            opentelemetry::KeyValue::new(attr::RELOAD_RESULT, result),
            opentelemetry::KeyValue::new(attr::RELOAD_TRIGGER, report.trigger.as_str()),
        ];
        match &report.result {
            Ok((serial, not_after)) => {
                attributes.push(opentelemetry::KeyValue::new(attr::CERT_SERIAL, serial.clone()));
                attributes.push(opentelemetry::KeyValue::new(attr::CERT_NOT_AFTER, rfc3339(*not_after)));
                self.telemetry.tracer.reload(report.started, attributes, None);
            }
            Err(reason) => {
                self.store.fail(reason);
                attributes.push(opentelemetry::KeyValue::new(attr::RELOAD_REASON, reason.clone()));
                if let Some(serving) = self.store.current() {
                    attributes.push(opentelemetry::KeyValue::new(
                        attr::CERT_SERIAL,
                        serving.leaf.serial.clone(),
                    ));
                    attributes.push(opentelemetry::KeyValue::new(
                        attr::CERT_NOT_AFTER,
                        rfc3339(serving.leaf.not_after),
                    ));
                }
                self.telemetry.tracer.reload(report.started, attributes, Some(reason));
            }
        }
        let serving = self.store.current();
        crate::certs::watch::log_report(report, serving.as_ref().map(|s| s.leaf.serial.as_str()));
    }

    fn checked(&mut self, disk_matches_served: bool) {
        let serving = self.store.current().is_some();
        self.telemetry.metrics.disk_differs(serving && !disk_matches_served);
    }
}

/// A running proxy.
pub struct ProxyHandle {
    /// Where the mTLS listener is bound.
    pub listen_addr: SocketAddr,
    /// Where the admin server is bound.
    pub admin_addr: SocketAddr,
    /// The TLS store (tests and the demo read the serving serial from it).
    pub store: Arc<TlsStore>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    status: Arc<Status>,
    done: tokio::task::JoinHandle<()>,
}

impl ProxyHandle {
    /// Starts a graceful drain (idempotent): stop accepting, Close 1001 on every connection.
    pub fn drain(&self) {
        self.status.drain();
    }

    /// Waits until the drain has finished (all connections closed, or the drain timeout).
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    /// Resolves once a drain has started (by [`ProxyHandle::drain`] or `POST /drain`).
    pub async fn drained(&self) {
        self.status.drain.cancelled().await;
    }

    /// The readiness answer `/readyz` would give.
    pub fn readiness(&self) -> Result<String, String> {
        self.status.readiness()
    }
}

/// Binds the ports and starts everything; returns once the ports are bound.
pub async fn start(cfg: ProxyConfig) -> Result<ProxyHandle, ProxyError> {
    let listener = TcpListener::bind(cfg.listen).await.map_err(|source| ProxyError::Bind {
        what: "listener",
        addr: cfg.listen,
        source,
    })?;
    let admin_listener = TcpListener::bind(cfg.admin).await.map_err(|source| ProxyError::Bind {
        what: "admin",
        addr: cfg.admin,
        source,
    })?;
    let listen_addr = listener.local_addr().unwrap_or(cfg.listen);
    let admin_addr = admin_listener.local_addr().unwrap_or(cfg.admin);
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let (tracer, exporter_task) = Tracer::start(&cfg.otel, metrics.clone(), stop.clone())?;
    let telemetry = Arc::new(Telemetry {
        metrics: metrics.clone(),
        tracer,
    });
    let store = Arc::new(TlsStore::new());
    let drain = CancellationToken::new();
    let kill = CancellationToken::new();
    let status = Arc::new(Status {
        store: store.clone(),
        metrics: metrics.clone(),
        draining: AtomicBool::new(false),
        drain: drain.clone(),
    });

    let source = SecretSource {
        cert_dir: cfg.cert_dir.clone(),
        trust_bundle: cfg.trust_bundle.clone(),
    };
    let watcher = CertWatcher::new(source, Usage::Server, cfg.reload, crate::tls::provider());
    let sink = InboundSink {
        store: store.clone(),
        telemetry: telemetry.clone(),
        min_version: cfg.tls_min_version,
    };
    tokio::spawn(watcher.run(sink, stop.clone()));
    tokio::spawn(admin::serve(admin_listener, status.clone(), stop.clone()));

    let inbound = Arc::new(inbound::Inbound {
        store: store.clone(),
        policy: cfg.policy.clone(),
        upstream: cfg.upstream.clone(),
        limits: cfg.limits,
        handshake_timeout: cfg.handshake_timeout,
        telemetry,
        drain: drain.clone(),
        kill: kill.clone(),
    });
    let tracker = TaskTracker::new();
    let accept = tokio::spawn(listener::accept_loop(
        listener,
        cfg.limits.max_connections,
        drain.clone(),
        tracker.clone(),
        move |stream, peer, permit| inbound.clone().handle(stream, peer, permit),
    ));
    tracing::info!(
        listen = %listen_addr,
        admin = %admin_addr,
        upstream = %cfg.upstream.authority(),
        cert_dir = %cfg.cert_dir.display(),
        "wsgate proxy started"
    );
    let drain_timeout = cfg.drain_timeout;
    let done = tokio::spawn(async move {
        drain.cancelled().await;
        let _ = accept.await;
        tracker.close();
        tracing::info!(open = tracker.len(), "draining: sent Close 1001 to every connection");
        if tokio::time::timeout(drain_timeout, tracker.wait()).await.is_err() {
            tracing::warn!(
                open = tracker.len(),
                "drain timeout reached; dropping the connections still open"
            );
            kill.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
        }
        stop.cancel();
        if let Some(task) = exporter_task {
            // The exporter flushes what is queued (bounded by its own timeout).
            let _ = task.await;
        }
        tracing::info!("wsgate proxy stopped");
    });
    Ok(ProxyHandle {
        listen_addr,
        admin_addr,
        store,
        metrics,
        status,
        done,
    })
}
