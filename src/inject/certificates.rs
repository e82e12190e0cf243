//! The certificate controller: every service account whose pods are injected gets a
//! cert-manager `Certificate` for the Secret those pods mount.
//!
//! It watches injected pods (label `wsgate.dev/injected=true`) with kube-runtime; for each,
//! it computes the Certificate its Secret needs (URI SAN = the service account's SPIFFE ID,
//! DNS SANs = the union of `wsgate.dev/dns-names` over the pods that mount that Secret),
//! compares it with what the API server has, and applies it with server-side apply only when
//! something differs. The Certificate is owned by the ServiceAccount, so it goes away with it.
//! A cluster without cert-manager is tolerated: a clear log line, retries every five minutes.
//!
//! It never reads Secrets (its RBAC has no rule on them). It only requests Certificates for Secret
//! names reserved to the pod's service account (`wsgate-<sa>` or `wsgate-<sa>-…`, see
//! [`secret_reserved_for`]), so a pod cannot point cert-manager at a Secret made by someone else.
//! A name outside that reservation, a Secret claimed by another service account, or a
//! Certificate of that name not managed by wsgate is a refusal: a Warning Event on the pod
//! ([`super::events`]) and a reconcile metric.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::controller::{Action, Config, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::annotations::{
    DNS_NAMES, INJECTED_LABEL, SECRET, default_secret, dns_name_allowed, secret_reserved_for, service_account,
};
use super::events::{PodEvents, Reason};
use super::metrics::{InjectMetrics, ReconcileLabels};
use super::settings::InjectSettings;

/// The field manager of every apply, stable across versions.
pub const FIELD_MANAGER: &str = "wsgate-injector";
/// How often an up-to-date Certificate is checked again.
const RECHECK: Duration = Duration::from_secs(600);
/// How often to look again when cert-manager is not installed.
const NO_CERT_MANAGER_RETRY: Duration = Duration::from_secs(300);

/// Why a reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// An API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// Why no Certificate is requested for a pod's Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// Pods of different service accounts mount the same Secret: one certificate cannot carry
    /// both identities, and alternating would re-issue it on every reconcile.
    SharedSecret {
        /// The service accounts involved.
        service_accounts: Vec<String>,
    },
    /// The Secret's name is not reserved to the pod's service account (the injected label and
    /// the annotation were set without the webhook): cert-manager would overwrite whatever
    /// Secret of that name exists.
    NotReserved {
        /// The Secret the pod names.
        secret: String,
        /// The pod's service account.
        service_account: String,
    },
}

/// The Certificate a Secret needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Namespace of the pods, the Secret and the Certificate.
    pub namespace: String,
    /// Name of the Secret (and of the Certificate).
    pub secret: String,
    /// The service account the pods run as.
    pub service_account: String,
    /// DNS SANs, lowercase, sorted and deduplicated (only names of the namespace's own Services).
    pub dns_names: Vec<String>,
    /// DNS names asked for but refused (not the namespace's own).
    pub refused_dns_names: Vec<String>,
}

/// The Secret a pod mounts as its sidecar certificate.
pub fn secret_of(pod: &Pod) -> String {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SECRET))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| default_secret(&service_account(pod)))
}

fn is_injected(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.get(INJECTED_LABEL).map(String::as_str) == Some("true"))
}

/// The Certificate needed for `pod`'s Secret, given all known pods (the pod itself included).
/// `Ok(None)` for a pod that is not injected. The pods' annotations are checked again here:
/// the injected label can be set by anyone who creates pods, bypassing the webhook; a DNS name
/// is kept only when it is `NAME.NAMESPACE.svc` or `NAME.NAMESPACE.svc.<cluster_domain>`.
pub fn desired_for<'a>(
    pod: &'a Pod,
    all: impl IntoIterator<Item = &'a Pod>,
    cluster_domain: &str,
) -> Result<Option<Desired>, Conflict> {
    if !is_injected(pod) {
        return Ok(None);
    }
    let Some(namespace) = pod.metadata.namespace.clone() else {
        return Ok(None);
    };
    let secret = secret_of(pod);
    if !secret_reserved_for(&secret, &service_account(pod)) {
        return Err(Conflict::NotReserved {
            secret,
            service_account: service_account(pod),
        });
    }
    let mut dns = BTreeSet::new();
    let mut refused = BTreeSet::new();
    let mut accounts = BTreeSet::new();
    let siblings = all.into_iter().filter(|p| {
        is_injected(p) && p.metadata.namespace.as_deref() == Some(namespace.as_str()) && secret_of(p) == secret
    });
    for p in siblings.chain(std::iter::once(pod)) {
        accounts.insert(service_account(p));
        if let Some(names) = p.metadata.annotations.as_ref().and_then(|a| a.get(DNS_NAMES)) {
            for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if dns_name_allowed(name, &namespace, cluster_domain) {
                    // DNS is case-insensitive; the approval policy admits lowercase names only.
                    dns.insert(name.to_ascii_lowercase());
                } else {
                    refused.insert(name.to_owned());
                }
            }
        }
    }
    if accounts.len() > 1 {
        return Err(Conflict::SharedSecret {
            service_accounts: accounts.into_iter().collect(),
        });
    }
    Ok(Some(Desired {
        namespace,
        secret,
        service_account: service_account(pod),
        dns_names: dns.into_iter().collect(),
        refused_dns_names: refused.into_iter().collect(),
    }))
}

/// Longest label value Kubernetes accepts.
pub const MAX_LABEL_VALUE: usize = 63;
/// Hex digits of SHA-256 kept when a label value is shortened.
const LABEL_HASH_LEN: usize = 10;

/// `value` as a label value: as it is when it fits in [`MAX_LABEL_VALUE`] characters, otherwise
/// a readable prefix, `-`, and the first [`LABEL_HASH_LEN`] hex digits of its SHA-256 (so two
/// long names with one prefix still differ). Service-account names may be 253 characters long;
/// a Certificate with a longer label value would be refused by the API server.
pub fn label_value(value: &str) -> String {
    if value.len() <= MAX_LABEL_VALUE {
        return value.to_owned();
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, value.as_bytes());
    let hash: String = digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .chars()
        .take(LABEL_HASH_LEN)
        .collect();
    let keep = MAX_LABEL_VALUE - 1 - LABEL_HASH_LEN;
    let prefix: String = value
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(keep)
        .collect();
    // A label value starts and ends with an alphanumeric character.
    let prefix = prefix.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if prefix.is_empty() {
        hash
    } else {
        format!("{prefix}-{hash}")
    }
}

/// The Certificate manifest, owned by the service account with `owner_uid`.
pub fn manifest(desired: &Desired, owner_uid: &str, settings: &InjectSettings) -> Value {
    let mut spec = json!({
        "secretName": desired.secret,
        "uris": [settings.spiffe_id(&desired.namespace, &desired.service_account)],
        "usages": ["server auth", "client auth"],
        "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
        "duration": settings.cert_duration,
        "renewBefore": settings.cert_renew_before,
        "issuerRef": {"name": settings.issuer.name, "kind": super::settings::value_name(&settings.issuer.kind), "group": settings.issuer.group},
    });
    if !desired.dns_names.is_empty() {
        spec["dnsNames"] = json!(desired.dns_names);
    }
    json!({
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": {
            "name": desired.secret,
            "namespace": desired.namespace,
            "labels": {
                "app.kubernetes.io/managed-by": FIELD_MANAGER,
                "wsgate.dev/service-account": label_value(&desired.service_account),
            },
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "name": desired.service_account,
                "uid": owner_uid,
            }],
        },
        "spec": spec,
    })
}

/// The spec fields the controller manages; any difference in one of them means an apply.
const MANAGED_SPEC: [&str; 8] = [
    "secretName",
    "uris",
    "dnsNames",
    "usages",
    "privateKey",
    "duration",
    "renewBefore",
    "issuerRef",
];

/// Whether `existing` (as the API server returned it) already says everything `wanted` says.
pub fn up_to_date(existing: &Value, wanted: &Value) -> bool {
    let spec_ok = MANAGED_SPEC.iter().all(|k| {
        let have = &existing["spec"][k];
        let want = &wanted["spec"][k];
        match (want, have) {
            // privateKey may gain defaults (encoding); compare only what we set.
            (Value::Object(w), Value::Object(h)) => w.iter().all(|(k, v)| h.get(k) == Some(v)),
            _ => have == want,
        }
    });
    let labels_ok = wanted["metadata"]["labels"]
        .as_object()
        .is_some_and(|w| w.iter().all(|(k, v)| existing["metadata"]["labels"][k] == *v));
    let uid = &wanted["metadata"]["ownerReferences"][0]["uid"];
    let owner_ok = existing["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|refs| refs.iter().any(|r| r["uid"] == *uid));
    spec_ok && labels_ok && owner_ok
}

/// The cert-manager Certificate resource.
pub fn certificate_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
        "certificates",
    )
}

/// What reconcile shares.
pub struct Context {
    /// The API client.
    pub client: kube::Client,
    /// The injected pods (the controller's own cache).
    pub pods: Store<Pod>,
    /// Settings (issuer, durations, trust domain).
    pub settings: InjectSettings,
    /// Metrics.
    pub metrics: Arc<InjectMetrics>,
    /// Events on pods for refusals and failures.
    pub events: PodEvents,
    /// Certificates known to be up to date: what they were checked against, and when.
    checked: Mutex<HashMap<(String, String), (Desired, Instant)>>,
    /// When the missing-cert-manager warning was last logged.
    warned: Mutex<Option<Instant>>,
}

impl Context {
    /// A context over `client` and the pods in `pods`.
    pub fn new(client: kube::Client, pods: Store<Pod>, settings: InjectSettings, metrics: Arc<InjectMetrics>) -> Self {
        Self {
            events: PodEvents::new(client.clone()),
            client,
            pods,
            settings,
            metrics,
            checked: Mutex::new(HashMap::new()),
            warned: Mutex::new(None),
        }
    }

    fn count(&self, result: &'static str) {
        self.metrics.reconciles.get_or_create(&ReconcileLabels { result }).inc();
    }
}

fn crd_missing(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => {
            s.code == 404
                && (s.details.as_ref().is_none_or(|d| d.name.is_empty())
                    || s.message.contains("could not find the requested resource"))
        }
        _ => false,
    }
}

/// The label that marks Certificates this controller owns; others are never touched.
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The service account a wsgate Certificate (as the API server returned it) was made for: the
/// name of its ServiceAccount owner.
fn certificate_service_account(current: &Value) -> Option<&str> {
    current["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["kind"] == "ServiceAccount")
        .and_then(|r| r["name"].as_str())
}

/// Ensures the Certificate for `pod`'s Secret exists and is up to date.
pub async fn reconcile(pod: Arc<Pod>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let all = ctx.pods.state();
    let desired = match desired_for(&pod, all.iter().map(|p| p.as_ref()), &ctx.settings.cluster_domain) {
        Ok(Some(d)) => d,
        Ok(None) => return Ok(Action::await_change()),
        Err(Conflict::SharedSecret { service_accounts }) => {
            ctx.count("conflict");
            let secret = secret_of(&pod);
            tracing::warn!(
                target: "wsgate::certificates",
                namespace = ?pod.metadata.namespace,
                %secret,
                ?service_accounts,
                "pods of several service accounts mount one Secret; no Certificate requested (give each its own wsgate.dev/secret)"
            );
            let note = format!(
                "Secret {secret} is mounted by pods of several service accounts ({}): no Certificate requested; give each its own wsgate.dev/secret",
                service_accounts.join(", ")
            );
            ctx.events.warn_logged(&pod, Reason::SecretClaimed, note).await;
            return Ok(Action::requeue(RECHECK));
        }
        Err(Conflict::NotReserved {
            secret,
            service_account,
        }) => {
            ctx.count("secret_not_reserved");
            let own = default_secret(&service_account);
            tracing::warn!(
                target: "wsgate::certificates",
                namespace = ?pod.metadata.namespace,
                %secret,
                %service_account,
                "the Secret's name is not reserved to the pod's service account; no Certificate requested"
            );
            let note = format!(
                "Secret {secret} is not a name reserved for service account {service_account}: no Certificate requested; use {own} or a name beginning with {own}-"
            );
            ctx.events.warn_logged(&pod, Reason::SecretNotReserved, note).await;
            return Ok(Action::requeue(RECHECK));
        }
    };
    if !desired.refused_dns_names.is_empty() {
        tracing::warn!(
            target: "wsgate::certificates",
            namespace = %desired.namespace,
            refused = ?desired.refused_dns_names,
            "DNS names outside the namespace's own Services are left out of the Certificate"
        );
        let note = format!(
            "DNS names left out of Certificate {} (only NAME.{}.svc names of the namespace's Services): {}",
            desired.secret,
            desired.namespace,
            desired.refused_dns_names.join(", ")
        );
        ctx.events.warn_logged(&pod, Reason::DnsNamesRefused, note).await;
    }
    let key = (desired.namespace.clone(), desired.secret.clone());
    // Known to be up to date: no API call at all (pod status churn triggers reconciles).
    if let Ok(checked) = ctx.checked.lock()
        && let Some((known, at)) = checked.get(&key)
        && *known == desired
        && at.elapsed() < RECHECK
    {
        return Ok(Action::requeue(RECHECK));
    }
    let sa_api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &desired.namespace);
    let Some(sa) = sa_api.get_opt(&desired.service_account).await? else {
        tracing::warn!(
            target: "wsgate::certificates",
            namespace = %desired.namespace,
            service_account = %desired.service_account,
            "service account not found; no Certificate requested"
        );
        let note = format!(
            "ServiceAccount {} not found: no Certificate requested for Secret {}",
            desired.service_account, desired.secret
        );
        ctx.events.warn_logged(&pod, Reason::ServiceAccountNotFound, note).await;
        return Ok(Action::requeue(Duration::from_secs(60)));
    };
    let uid = sa.metadata.uid.unwrap_or_default();
    let wanted = manifest(&desired, &uid, &ctx.settings);
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &desired.namespace, &certificate_resource());
    let existing = match api.get_opt(&desired.secret).await {
        Ok(existing) => existing,
        Err(e) if crd_missing(&e) => return Ok(no_cert_manager(&pod, &ctx).await),
        Err(e) => return Err(e.into()),
    };
    let current = existing.as_ref().and_then(|o| serde_json::to_value(o).ok());
    if let Some(current) = &current
        && current["metadata"]["labels"][MANAGED_BY] != FIELD_MANAGER
    {
        ctx.count("foreign");
        tracing::warn!(
            target: "wsgate::certificates",
            namespace = %desired.namespace,
            certificate = %desired.secret,
            "a Certificate of that name exists and is not managed by wsgate; it is left alone"
        );
        let note = format!(
            "Certificate {} exists and is not managed by wsgate (label {MANAGED_BY}={FIELD_MANAGER}): left alone",
            desired.secret
        );
        ctx.events.warn_logged(&pod, Reason::CertificateNotManaged, note).await;
        return Ok(Action::requeue(RECHECK));
    }
    if let Some(current) = &current
        && let Some(other) = certificate_service_account(current)
        && other != desired.service_account
    {
        // Our Certificate, made for another service account whose pods are gone: rewriting it
        // would hand that identity's Secret to this one.
        ctx.count("conflict");
        tracing::warn!(
            target: "wsgate::certificates",
            namespace = %desired.namespace,
            certificate = %desired.secret,
            claimed_by = other,
            service_account = %desired.service_account,
            "the Secret is claimed by another service account's Certificate; left alone"
        );
        let note = format!(
            "Secret {} is claimed by the Certificate of service account {other}: no Certificate requested for {}",
            desired.secret, desired.service_account
        );
        ctx.events.warn_logged(&pod, Reason::SecretClaimed, note).await;
        return Ok(Action::requeue(RECHECK));
    }
    if current.as_ref().is_some_and(|c| up_to_date(c, &wanted)) {
        ctx.count("unchanged");
    } else {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api.patch(&desired.secret, &params, &Patch::Apply(&wanted)).await {
            Ok(_) => {}
            Err(e) if crd_missing(&e) => return Ok(no_cert_manager(&pod, &ctx).await),
            Err(e) => return Err(e.into()),
        }
        ctx.count("applied");
        tracing::info!(
            target: "wsgate::certificates",
            namespace = %desired.namespace,
            certificate = %desired.secret,
            spiffe_id = %ctx.settings.spiffe_id(&desired.namespace, &desired.service_account),
            dns_names = ?desired.dns_names,
            created = existing.is_none(),
            "Certificate applied"
        );
    }
    if let Ok(mut checked) = ctx.checked.lock() {
        checked.insert(key, (desired, Instant::now()));
    }
    Ok(Action::requeue(RECHECK))
}

async fn no_cert_manager(pod: &Pod, ctx: &Context) -> Action {
    ctx.count("no_cert_manager");
    let due = ctx
        .warned
        .lock()
        .map(|mut w| {
            let due = w.is_none_or(|t| t.elapsed() >= NO_CERT_MANAGER_RETRY);
            if due {
                *w = Some(Instant::now());
            }
            due
        })
        .unwrap_or(true);
    if due {
        tracing::warn!(
            target: "wsgate::certificates",
            "cert-manager is not installed (no certificates.cert-manager.io resource): workload Certificates cannot be requested; retrying every 5 minutes"
        );
    }
    let note = "cert-manager is not installed (no certificates.cert-manager.io resource): no Certificate requested; retrying every 5 minutes".to_owned();
    ctx.events.warn_logged(pod, Reason::CertManagerMissing, note).await;
    Action::requeue(NO_CERT_MANAGER_RETRY)
}

fn error_policy(pod: Arc<Pod>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    ctx.count("error");
    tracing::warn!(target: "wsgate::certificates", error = %error, "reconcile failed; retrying in 30 s");
    // The policy is synchronous; the Event is written on the side.
    let note = format!("requesting the Certificate failed, retrying in 30 s: {error}");
    tokio::spawn(async move { ctx.events.warn_logged(&pod, Reason::ReconcileFailed, note).await });
    Action::requeue(Duration::from_secs(30))
}

/// Runs the controller until `stop` fires.
pub async fn run(client: kube::Client, settings: InjectSettings, metrics: Arc<InjectMetrics>, stop: CancellationToken) {
    let pods: Api<Pod> = Api::all(client.clone());
    let controller = Controller::new(
        pods,
        watcher::Config::default().labels(&format!("{INJECTED_LABEL}=true")),
    )
    .with_config(Config::default().debounce(Duration::from_secs(1)));
    let ctx = Arc::new(Context::new(client, controller.store(), settings, metrics));
    controller
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(target: "wsgate::certificates", error = %e, "controller event");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_label_value(v: &str) -> bool {
        v.len() <= MAX_LABEL_VALUE
            && (v.is_empty()
                || (v.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && v.ends_with(|c: char| c.is_ascii_alphanumeric())
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))))
    }

    #[test]
    fn short_label_values_are_kept_and_long_ones_hashed_with_a_readable_prefix() {
        assert_eq!(label_value("checkout"), "checkout");
        let at_cap = "a".repeat(MAX_LABEL_VALUE);
        assert_eq!(label_value(&at_cap), at_cap);
        let long = format!("{}-reporting-batch-exporter", "payments-settlement".repeat(3));
        assert!(long.len() > MAX_LABEL_VALUE);
        let v = label_value(&long);
        assert!(valid_label_value(&v), "{v}");
        assert_eq!(v.len(), MAX_LABEL_VALUE);
        assert!(v.starts_with(&long[..50]), "{v}");
        assert_eq!(v, label_value(&long), "stable");
        let other = format!("{long}-2");
        assert_ne!(label_value(&other), v, "a different name, a different value");
        // The prefix is cut where it leaves a '-' or '.' last: still valid.
        let dotted = format!("{}.{}", "a".repeat(51), "b".repeat(30));
        assert!(valid_label_value(&label_value(&dotted)), "{}", label_value(&dotted));
    }

    #[test]
    fn a_seventy_character_service_account_gets_a_valid_certificate_label() {
        let sa = "s".repeat(70);
        let desired = Desired {
            namespace: "shop".into(),
            secret: "wsgate-long".into(),
            service_account: sa.clone(),
            dns_names: Vec::new(),
            refused_dns_names: Vec::new(),
        };
        let m = manifest(&desired, "uid-1", &InjectSettings::example());
        let labels = m["metadata"]["labels"].as_object().unwrap();
        for (k, v) in labels {
            assert!(valid_label_value(v.as_str().unwrap()), "{k}: {v}");
        }
        let label = labels["wsgate.dev/service-account"].as_str().unwrap();
        assert!(
            label.starts_with(&sa[..52]) && label.len() == MAX_LABEL_VALUE,
            "{label}"
        );
        // The identity and the owner keep the full name.
        assert_eq!(m["metadata"]["ownerReferences"][0]["name"], sa.as_str());
        assert!(m["spec"]["uris"][0].as_str().unwrap().ends_with(&sa));
        assert!(up_to_date(&m, &m));
    }
}
