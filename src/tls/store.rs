//! The one swappable slot holding the configs currently served.
//!
//! One writer (the [`super::reloader::Reloader`], fed by the certificate watcher), many readers: each new connection calls
//! [`TlsStore::current`] once and keeps that `Arc` for its whole handshake, so a swap never
//! touches a handshake in progress or an established connection. Lock-free (arc-swap).

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rustls::{ClientConfig, ServerConfig};

use crate::certs::ReloadError;
use crate::x509::{CertSummary, rfc3339};

/// Why nothing valid is served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotServing {
    /// No set has been read yet.
    #[error("no valid certificate: no certificate loaded yet")]
    NothingYet,
    /// Every set read so far was refused; the latest reason.
    #[error("no valid certificate: {0}")]
    Refused(Arc<ReloadError>),
    /// The served certificate has expired and no newer one arrived.
    #[error("the serving certificate (serial {serial}) expired at {}", rfc3339(*.not_after))]
    Expired {
        /// Its serial, hex.
        serial: String,
        /// When it expired.
        not_after: SystemTime,
    },
}

/// The certificate being served, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingNow {
    /// Its serial, hex.
    pub serial: String,
    /// Its expiry.
    pub not_after: SystemTime,
}

impl std::fmt::Display for ServingNow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "serving certificate serial {}, valid until {}",
            self.serial,
            rfc3339(self.not_after)
        )
    }
}

/// The configs built from one validated set: the server config, and the outbound client config
/// when the command dials out (the proxy with `--outbound`).
#[derive(Debug, Clone)]
pub struct Configs {
    /// The inbound server config.
    pub server: Arc<ServerConfig>,
    /// The outbound client config.
    pub client: Option<Arc<ClientConfig>>,
}

impl Configs {
    /// A server config alone (the webhook).
    pub fn server_only(server: Arc<ServerConfig>) -> Self {
        Self { server, client: None }
    }
}

/// What is being served now.
#[derive(Debug)]
pub struct Serving {
    /// The inbound server config.
    pub server: Arc<ServerConfig>,
    /// The outbound client config, built from the same set (swapped with the server config).
    pub client: Option<Arc<ClientConfig>>,
    /// The leaf it presents.
    pub leaf: CertSummary,
    /// When it was installed.
    pub installed_at: SystemTime,
    /// Fingerprint of the files it was built from.
    pub fingerprint: [u8; 32],
    /// [`super::roots_digest`] of the trust roots its client verifier uses.
    pub roots: [u8; 32],
}

impl Serving {
    /// What serving `bundle` with `configs` looks like, installed now.
    pub fn new(configs: Configs, bundle: crate::certs::CertBundle) -> Self {
        Self {
            server: configs.server,
            client: configs.client,
            leaf: bundle.leaf,
            installed_at: SystemTime::now(),
            fingerprint: bundle.fingerprint,
            roots: super::roots_digest(&bundle.roots),
        }
    }
}

/// The swappable slot. Empty until the first valid set is installed.
#[derive(Debug, Default)]
pub struct TlsStore {
    current: ArcSwapOption<Serving>,
    last_error: ArcSwapOption<ReloadError>,
}

impl TlsStore {
    /// An empty store: nothing is served until its reloader installs a set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The configs to use for one new connection, or `None` while no valid set exists.
    pub fn current(&self) -> Option<Arc<Serving>> {
        self.current.load_full()
    }

    /// Publishes a new set; connections already holding the previous one keep it. Only the
    /// reloader writes.
    pub(super) fn install(&self, serving: Serving) {
        self.current.store(Some(Arc::new(serving)));
        self.last_error.store(None);
    }

    /// Remembers why the latest set was refused (for readiness while nothing is served).
    pub(super) fn fail(&self, error: Arc<ReloadError>) {
        self.last_error.store(Some(error));
    }

    /// What is served while a valid certificate is; otherwise why not.
    pub fn readiness(&self) -> Result<ServingNow, NotServing> {
        let Some(serving) = self.current() else {
            return Err(match self.last_error.load_full() {
                Some(e) => NotServing::Refused(e),
                None => NotServing::NothingYet,
            });
        };
        if SystemTime::now() > serving.leaf.not_after {
            return Err(NotServing::Expired {
                serial: serving.leaf.serial.clone(),
                not_after: serving.leaf.not_after,
            });
        }
        Ok(ServingNow {
            serial: serving.leaf.serial.clone(),
            not_after: serving.leaf.not_after,
        })
    }
}
