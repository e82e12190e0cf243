//! Watches the certificate directories and installs each new valid set; keeps the last good one.
//!
//! `notify` watches the directories (never the files: the kubelet swaps `..data`, the visible
//! symlinks never change). The kubelet's update ends with one atomic rename onto `..data`: that
//! event means the new set is complete, so it is read at once. Other events (a plain directory
//! rewritten file by file) are debounced. Then the whole set is read (`source`) and validated
//! (`bundle`). A set identical to the one being served is ignored; a new valid set is
//! handed to the [`ReloadSink`]; a bad or half-written set is reported and retried with back-off
//! while the previous set keeps serving. A periodic re-check catches any missed event, and the
//! directories may not exist at start (the kubelet may mount them later).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use notify::{RecursiveMode, Watcher as _};
use rustls::crypto::CryptoProvider;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::bundle::{BundleError, CertBundle, Usage};
use super::source::{SecretSource, SourceError};

/// What woke the watcher up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The first load at start.
    Start,
    /// A file-system event in a watched directory.
    Event,
    /// The periodic re-check.
    Recheck,
    /// A retry after a failed load.
    Retry,
}

impl Trigger {
    /// Lowercase name for logs and span attributes.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::Event => "event",
            Trigger::Recheck => "recheck",
            Trigger::Retry => "retry",
        }
    }
}

/// Why a certificate set was not installed. The previous set keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The files could not be read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The files were read but are not a valid set.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The set is valid but the TLS config could not be built from it.
    #[error("{0}")]
    Install(Box<dyn std::error::Error + Send + Sync>),
    /// The blocking read task failed.
    #[error("certificate load task failed: {0}")]
    Task(String),
}

impl ReloadError {
    /// Whether the set is merely not there yet (not an error while waiting for the kubelet).
    pub fn waiting(&self) -> bool {
        matches!(
            self,
            Self::Source(SourceError::DirMissing(_) | SourceError::FileMissing { .. })
        )
    }
}

/// The leaf of a set that was installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Its serial, hex.
    pub serial: String,
    /// Its expiry.
    pub not_after: SystemTime,
}

/// The outcome of one load attempt that changed something or failed.
#[derive(Debug, Clone)]
pub struct ReloadReport {
    /// What triggered it.
    pub trigger: Trigger,
    /// When the attempt started.
    pub started: SystemTime,
    /// How long reading, validating and installing took.
    pub duration: Duration,
    /// The installed leaf, or why the set was refused.
    pub result: Result<Installed, Arc<ReloadError>>,
    /// Consecutive failures so far (0 after a success).
    pub failures: u32,
}

/// Receives validated sets and reports. Implemented by the composition root, which builds the
/// rustls configs and publishes them.
pub trait ReloadSink: Send + 'static {
    /// Installs a validated set that differs from the one being served; an error keeps the old one.
    fn install(&mut self, bundle: CertBundle) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
    /// Called after each attempt that installed a set or failed.
    fn report(&mut self, report: &ReloadReport);
    /// Called after every attempt: whether the files on disk are those being served.
    fn checked(&mut self, disk_matches_served: bool) {
        let _ = disk_matches_served;
    }
}

/// Logs one reload report: `certificate installed`, or `certificate set refused; keeping the
/// previous one` with the reason and the serial still served.
pub fn log_report(report: &ReloadReport, still_serving: Option<&str>) {
    match &report.result {
        Ok(Installed { serial, not_after }) => tracing::info!(
            target: "wsgate::certs",
            trigger = report.trigger.as_str(),
            serial = %serial,
            not_after = %crate::x509::rfc3339(*not_after),
            duration_ms = report.duration.as_secs_f64() * 1e3,
            "certificate installed"
        ),
        Err(reason) => tracing::warn!(
            target: "wsgate::certs",
            trigger = report.trigger.as_str(),
            reason = %reason,
            consecutive_failures = report.failures,
            still_serving = still_serving.unwrap_or("nothing"),
            "certificate set refused; keeping the previous one"
        ),
    }
}

/// Timings of the certificate watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadTiming {
    /// Quiet time after a file event before the set is read, for files written one by one. The
    /// kubelet's rename onto `..data` is read at once.
    pub debounce: Duration,
    /// Longest wait for file events to stop before reading anyway.
    pub max_debounce: Duration,
    /// Re-read the set this often even without events, to catch a missed one.
    pub recheck: Duration,
    /// First retry delay after a bad set; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest retry delay after repeated bad sets.
    pub max_backoff: Duration,
}

impl Default for ReloadTiming {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(100),
            max_debounce: Duration::from_secs(2),
            recheck: Duration::from_secs(30),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// The name the kubelet renames each new generation of a Secret or ConfigMap volume onto.
const DATA_LINK: &str = "..data";

/// Whether `event` is the kubelet's commit of a new generation: `..data_tmp` renamed onto
/// `..data` (inotify reports the rename's target as a name change or, on some platforms, a
/// create). After it every file of the new set is in place.
fn commits_generation(event: &notify::Event) -> bool {
    use notify::EventKind;
    use notify::event::{ModifyKind, RenameMode};
    let lands_on_data = event
        .paths
        .iter()
        .any(|p| p.file_name().is_some_and(|n| n == DATA_LINK));
    lands_on_data
        && matches!(
            event.kind,
            EventKind::Create(_)
                | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both | RenameMode::Any))
        )
}

/// The certificate watcher for one source.
pub struct CertWatcher {
    source: SecretSource,
    usage: Usage,
    timing: ReloadTiming,
    provider: Arc<CryptoProvider>,
}

enum Attempt {
    Unchanged,
    Installed(Installed),
    Failed(ReloadError),
}

impl CertWatcher {
    /// A watcher for `source` whose leaf must be good for `usage`.
    pub fn new(source: SecretSource, usage: Usage, timing: ReloadTiming, provider: Arc<CryptoProvider>) -> Self {
        Self {
            source,
            usage,
            timing,
            provider,
        }
    }

    /// Reads and validates the set (blocking). `Ok(None)` when its bytes are those of `known`,
    /// the set being served.
    pub fn load(&self, known: Option<[u8; 32]>) -> Result<Option<CertBundle>, ReloadError> {
        let raw = self.source.read()?;
        if Some(raw.fingerprint()) == known {
            return Ok(None);
        }
        Ok(Some(CertBundle::from_raw(
            &raw,
            self.usage,
            SystemTime::now(),
            &self.provider,
        )?))
    }

    fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(16);
        self.timing
            .min_backoff
            .saturating_mul(1u32 << exp)
            .min(self.timing.max_backoff)
    }

    fn start_notify(&self, wake: &Arc<Notify>, committed: &Arc<AtomicBool>) -> Option<notify::RecommendedWatcher> {
        let (wake, committed) = (wake.clone(), committed.clone());
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Reading the files is an event too (inotify reports opens): only changes count, or
            // a plain file or directory would make every reload trigger the next.
            if let Ok(event) = res
                && !matches!(event.kind, notify::EventKind::Access(_))
            {
                if commits_generation(&event) {
                    committed.store(true, Ordering::Release);
                }
                wake.notify_one();
            }
        })
        .ok()?;
        for dir in self.source.watch_dirs() {
            if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot watch yet; relying on re-checks");
                return None;
            }
        }
        Some(watcher)
    }

    /// Runs until `cancel` fires: loads at once, then on every event, re-check and retry.
    pub async fn run<S: ReloadSink>(self, mut sink: S, cancel: CancellationToken) {
        let this = Arc::new(self);
        let wake = Arc::new(Notify::new());
        let committed = Arc::new(AtomicBool::new(false));
        let mut fs_watch = None;
        let mut served: Option<[u8; 32]> = None;
        let mut failures: u32 = 0;
        let mut trigger = Trigger::Start;
        loop {
            if fs_watch.is_none() {
                fs_watch = this.start_notify(&wake, &committed);
            }
            let started = SystemTime::now();
            let t0 = Instant::now();
            let worker = this.clone();
            let known = served;
            let attempt = tokio::task::spawn_blocking(move || worker.load(known)).await;
            let attempt = match attempt {
                Ok(Ok(None)) => Attempt::Unchanged,
                Ok(Ok(Some(bundle))) => {
                    let fp = bundle.fingerprint;
                    let installed = Installed {
                        serial: bundle.leaf.serial.clone(),
                        not_after: bundle.leaf.not_after,
                    };
                    match sink.install(bundle) {
                        Ok(()) => {
                            served = Some(fp);
                            Attempt::Installed(installed)
                        }
                        Err(e) => Attempt::Failed(ReloadError::Install(e)),
                    }
                }
                Ok(Err(e)) => Attempt::Failed(e),
                Err(join) => Attempt::Failed(ReloadError::Task(join.to_string())),
            };
            sink.checked(matches!(attempt, Attempt::Unchanged | Attempt::Installed(..)));
            let next = match attempt {
                Attempt::Unchanged => {
                    failures = 0;
                    this.timing.recheck
                }
                Attempt::Installed(installed) => {
                    failures = 0;
                    sink.report(&ReloadReport {
                        trigger,
                        started,
                        duration: t0.elapsed(),
                        result: Ok(installed),
                        failures,
                    });
                    this.timing.recheck
                }
                Attempt::Failed(error) => {
                    failures = failures.saturating_add(1);
                    if error.waiting() {
                        // The directory may be replaced when it finally appears: watch it afresh.
                        fs_watch = None;
                    }
                    sink.report(&ReloadReport {
                        trigger,
                        started,
                        duration: t0.elapsed(),
                        result: Err(Arc::new(error)),
                        failures,
                    });
                    this.backoff(failures)
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = wake.notified() => {
                    trigger = Trigger::Event;
                    // The kubelet's rename onto `..data` completes a set: read it now. Anything
                    // else (files rewritten one by one) is debounced: wait until the events stop,
                    // or a commit arrives, but not for ever.
                    let give_up = tokio::time::Instant::now() + this.timing.max_debounce;
                    while !committed.swap(false, Ordering::AcqRel) {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(this.timing.debounce) => break,
                            _ = tokio::time::sleep_until(give_up) => break,
                            _ = wake.notified() => {}
                        }
                    }
                }
                _ = tokio::time::sleep(next) => {
                    trigger = if failures > 0 { Trigger::Retry } else { Trigger::Recheck };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watcher(min: u64, max: u64) -> CertWatcher {
        CertWatcher::new(
            SecretSource {
                cert_dir: "/nonexistent".into(),
                trust_bundle: None,
            },
            Usage::Server,
            ReloadTiming {
                min_backoff: Duration::from_millis(min),
                max_backoff: Duration::from_millis(max),
                ..ReloadTiming::default()
            },
            crate::tls::provider(),
        )
    }

    #[test]
    fn only_the_rename_onto_data_commits_a_generation() {
        use notify::event::{CreateKind, DataChange, ModifyKind, RemoveKind, RenameMode};
        use notify::{Event, EventKind};
        let at = |kind: EventKind, names: &[&str]| {
            names
                .iter()
                .fold(Event::new(kind), |e, n| e.add_path(format!("/vol/{n}").into()))
        };
        let rename = |mode| EventKind::Modify(ModifyKind::Name(mode));
        assert!(commits_generation(&at(rename(RenameMode::To), &["..data"])));
        assert!(commits_generation(&at(
            rename(RenameMode::Both),
            &["..data_tmp", "..data"]
        )));
        assert!(commits_generation(&at(EventKind::Create(CreateKind::Any), &["..data"])));
        // The steps before it, and plain files rewritten one by one, are debounced.
        assert!(!commits_generation(&at(rename(RenameMode::From), &["..data_tmp"])));
        assert!(!commits_generation(&at(
            EventKind::Create(CreateKind::Folder),
            &["..2026_12_01_12_00_00.1"]
        )));
        assert!(!commits_generation(&at(
            EventKind::Create(CreateKind::Any),
            &["..data_tmp"]
        )));
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert!(!commits_generation(&at(write, &["tls.crt"])));
        assert!(!commits_generation(&at(
            EventKind::Remove(RemoveKind::Any),
            &["..data"]
        )));
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let w = watcher(500, 30_000);
        let delays: Vec<u64> = (1..=10).map(|n| w.backoff(n).as_millis() as u64).collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000, 30_000]
        );
        assert_eq!(w.backoff(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn a_missing_directory_is_reported_as_waiting_not_as_an_error() {
        let err = watcher(1, 1).load(None).unwrap_err();
        assert!(err.waiting(), "{err:?}");
        let reason = err.to_string();
        assert!(
            reason.contains("/nonexistent") && reason.contains("does not exist"),
            "{reason}"
        );
    }
}
