//! The one swappable slot holding the configs currently served.
//!
//! One writer (the certificate watcher), many readers: each new connection calls
//! [`TlsStore::current`] once and keeps that `Arc` for its whole handshake, so a swap never
//! touches a handshake in progress or an established connection. Lock-free (arc-swap).

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rustls::ServerConfig;

use crate::certs::summary::{CertSummary, rfc3339};

/// What is being served now.
#[derive(Debug)]
pub struct Serving {
    /// The inbound server config.
    pub server: Arc<ServerConfig>,
    /// The leaf it presents.
    pub leaf: CertSummary,
    /// When it was installed.
    pub installed_at: SystemTime,
    /// Fingerprint of the files it was built from.
    pub fingerprint: [u8; 32],
}

impl Serving {
    /// What serving `bundle` with `server` looks like, installed now.
    pub fn new(server: Arc<ServerConfig>, bundle: crate::certs::CertBundle) -> Self {
        Self {
            server,
            leaf: bundle.leaf,
            installed_at: SystemTime::now(),
            fingerprint: bundle.fingerprint,
        }
    }
}

/// The swappable slot. Empty until the first valid set is installed.
#[derive(Debug, Default)]
pub struct TlsStore {
    current: ArcSwapOption<Serving>,
    last_error: ArcSwapOption<String>,
}

impl TlsStore {
    /// An empty store: nothing is served until [`TlsStore::install`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The configs to use for one new connection, or `None` while no valid set exists.
    pub fn current(&self) -> Option<Arc<Serving>> {
        self.current.load_full()
    }

    /// Publishes a new set; connections already holding the previous one keep it.
    pub fn install(&self, serving: Serving) {
        self.current.store(Some(Arc::new(serving)));
        self.last_error.store(None);
    }

    /// Remembers why the latest set was refused (for readiness while nothing is served).
    pub fn fail(&self, reason: &str) {
        self.last_error.store(Some(Arc::new(reason.to_owned())));
    }

    /// `Ok(summary)` while a valid certificate is served; otherwise why not.
    pub fn readiness(&self) -> Result<String, String> {
        let Some(serving) = self.current() else {
            let why = self
                .last_error
                .load_full()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "no certificate loaded yet".into());
            return Err(format!("no valid certificate: {why}"));
        };
        if SystemTime::now() > serving.leaf.not_after {
            return Err(format!(
                "the serving certificate (serial {}) expired at {}",
                serving.leaf.serial,
                rfc3339(serving.leaf.not_after)
            ));
        }
        Ok(format!(
            "serving certificate serial {}, valid until {}",
            serving.leaf.serial,
            rfc3339(serving.leaf.not_after)
        ))
    }
}
