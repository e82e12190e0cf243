//! The one writer of a [`TlsStore`]: turns each validated certificate set the watcher hands
//! over into the served configs (server, and outbound client), and remembers why a set was refused.
//!
//! The proxy and the webhook differ only in how a config is built and what they report, so
//! both pass those in. Depends on `certs` (the watcher's sink and report) and `tls::store`.

use std::sync::Arc;

use super::TlsError;
use super::store::{Configs, Serving, TlsStore};
use crate::certs::CertBundle;
use crate::certs::watch::{ReloadReport, ReloadSink, log_report};

/// What a command does around a reload: metrics, spans. Every method has a default.
pub trait ReloadHooks: Send + 'static {
    /// A new set is being served.
    fn installed(&mut self, bundle: &CertBundle) {
        let _ = bundle;
    }
    /// An attempt installed a set or failed; `serving` is what is served after it.
    fn reported(&mut self, report: &ReloadReport, serving: Option<&Serving>) {
        let _ = (report, serving);
    }
    /// After every attempt: whether the files on disk are those being served, and whether
    /// anything is served at all.
    fn checked(&mut self, disk_matches_served: bool, serving: bool) {
        let _ = (disk_matches_served, serving);
    }
}

/// Builds the configs (server, and client when dialling out) from a validated set.
pub type Build = Box<dyn Fn(&CertBundle) -> Result<Configs, TlsError> + Send>;

/// The store's only writer.
pub struct Reloader<H> {
    store: Arc<TlsStore>,
    build: Build,
    hooks: H,
}

impl<H: ReloadHooks> Reloader<H> {
    /// A reloader for `store` that builds configs with `build` and reports to `hooks`.
    pub fn new(store: Arc<TlsStore>, build: Build, hooks: H) -> Self {
        Self { store, build, hooks }
    }
}

impl<H: ReloadHooks> ReloadSink for Reloader<H> {
    fn install(&mut self, bundle: CertBundle) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        // Both configs or neither: a set is installed whole, so a rotation swaps both.
        let configs = (self.build)(&bundle)?;
        self.hooks.installed(&bundle);
        self.store.install(Serving::new(configs, bundle));
        Ok(())
    }

    fn report(&mut self, report: &ReloadReport) {
        if let Err(e) = &report.result {
            self.store.fail(e.clone());
        }
        let serving = self.store.current();
        self.hooks.reported(report, serving.as_deref());
        log_report(report, serving.as_ref().map(|s| s.leaf.serial.as_str()));
    }

    fn checked(&mut self, disk_matches_served: bool) {
        let serving = self.store.current().is_some();
        self.hooks.checked(disk_matches_served, serving);
    }
}
