//! Kubernetes Events (`events.k8s.io/v1`) for what the certificate controller refuses or fails
//! to do, written on the pod concerned so that `kubectl describe pod` shows why it has no
//! certificate.
//!
//! Reconciles repeat (every pod change, every re-check), and so would the Events: at most one
//! Event per pod and reason is written per [`EVENT_INTERVAL`]. A repeat after that is written by
//! kube-runtime's [`Recorder`] as a patch of the earlier Event's series when it is still recent
//! (hence RBAC `create` and `patch` on `events.events.k8s.io`). An Event that cannot be written
//! is logged and otherwise ignored: it never fails a reconcile.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// The reporting controller named in every Event.
pub const REPORTER: &str = "wsgate-injector";
/// At most one Event per pod and reason in this interval.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(300);

/// Why an Event could not be written.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The API server refused it or could not be reached.
    #[error("writing the Event: {0}")]
    Kube(#[from] kube::Error),
}

/// Why the controller wrote an Event; the variant's name is the Event's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The Secret's name is not reserved to the pod's service account.
    SecretNotReserved,
    /// The Secret is claimed by pods or a Certificate of another service account.
    SecretClaimed,
    /// A Certificate of the Secret's name exists and is not managed by wsgate.
    CertificateNotManaged,
    /// The pod's service account does not exist.
    ServiceAccountNotFound,
    /// Some of the pod's `wsgate.dev/dns-names` were left out of the Certificate.
    DnsNamesRefused,
    /// cert-manager is not installed.
    CertManagerMissing,
    /// A reconcile failed (an API error); it is retried.
    ReconcileFailed,
}

impl Reason {
    /// The Event's `reason` (PascalCase, as Kubernetes writes them).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SecretNotReserved => "SecretNotReserved",
            Self::SecretClaimed => "SecretClaimed",
            Self::CertificateNotManaged => "CertificateNotManaged",
            Self::ServiceAccountNotFound => "ServiceAccountNotFound",
            Self::DnsNamesRefused => "DnsNamesRefused",
            Self::CertManagerMissing => "CertManagerMissing",
            Self::ReconcileFailed => "ReconcileFailed",
        }
    }
}

/// Writes rate-limited Warning Events on pods.
pub struct PodEvents {
    recorder: Recorder,
    /// When an Event was last written, by (namespace, pod, reason).
    last: Mutex<HashMap<(String, String, Reason), Instant>>,
}

impl std::fmt::Debug for PodEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodEvents").finish_non_exhaustive()
    }
}

impl PodEvents {
    /// Events written with `client`.
    pub fn new(client: kube::Client) -> Self {
        Self {
            recorder: Recorder::new(client, Reporter::from(REPORTER)),
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Whether an Event for `key` is due now; if so, records that it is written now.
    fn due(&self, key: (String, String, Reason)) -> bool {
        let Ok(mut last) = self.last.lock() else {
            return true;
        };
        last.retain(|_, at| at.elapsed() < EVENT_INTERVAL);
        if last.contains_key(&key) {
            return false;
        }
        last.insert(key, Instant::now());
        true
    }

    /// Writes a Warning Event with `reason` and `note` on `pod`, unless one with that reason was
    /// written on it less than [`EVENT_INTERVAL`] ago. `Ok(true)` when written.
    pub async fn warn(&self, pod: &Pod, reason: Reason, note: String) -> Result<bool, EventError> {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        if !self.due((namespace, name, reason)) {
            return Ok(false);
        }
        let event = Event {
            type_: EventType::Warning,
            reason: reason.as_str().to_owned(),
            // An Event's note is at most 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: "RequestCertificate".to_owned(),
            secondary: None,
        };
        self.recorder.publish(&event, &pod.object_ref(&())).await?;
        Ok(true)
    }

    /// [`Self::warn`], logging a failure instead of returning it.
    pub async fn warn_logged(&self, pod: &Pod, reason: Reason, note: String) {
        if let Err(e) = self.warn(pod, reason, note).await {
            tracing::warn!(
                target: "wsgate::certificates",
                namespace = ?pod.metadata.namespace,
                pod = ?pod.metadata.name,
                reason = reason.as_str(),
                error = %e,
                "could not write the Event"
            );
        }
    }
}
