//! Reads a pod's `wsgate.dev/*` annotations into validated options, or says which annotation
//! and value are wrong. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use super::settings::InjectSettings;
use crate::authz::{Policy, PolicyError};

/// `"true"` injects, `"false"` opts out (also in an enabled namespace).
pub const INJECT: &str = "wsgate.dev/inject";
/// The app's port; may be omitted when the pod declares exactly one container port.
pub const UPSTREAM_PORT: &str = "wsgate.dev/upstream-port";
/// The sidecar's mTLS port (default 8443).
pub const PORT: &str = "wsgate.dev/port";
/// Comma-separated allow patterns.
pub const ALLOW: &str = "wsgate.dev/allow";
/// The Secret with tls.crt/tls.key/ca.crt (default `wsgate-<serviceaccount>`).
pub const SECRET: &str = "wsgate.dev/secret";
/// A ConfigMap holding the CA bundle.
pub const TRUST_BUNDLE: &str = "wsgate.dev/trust-bundle";
/// Extra DNS SANs for the certificate, comma-separated.
pub const DNS_NAMES: &str = "wsgate.dev/dns-names";
/// Comma-separated `PORT=wss://HOST:PORT` entries: the sidecar listens on `127.0.0.1:PORT` and
/// dials the remote over mTLS for the app ([`Outbound`]).
pub const OUTBOUND: &str = "wsgate.dev/outbound";
/// Comma-separated `PORT=PATTERN` entries: the identity the remote of the outbound entry on
/// local port `PORT` must have (an allow pattern, at most one per port).
pub const OUTBOUND_EXPECT: &str = "wsgate.dev/outbound-expect";
/// The sidecar's CPU request, overriding `--sidecar-cpu-request` for this pod.
pub const CPU_REQUEST: &str = "wsgate.dev/cpu-request";
/// The sidecar's memory request, overriding `--sidecar-memory-request` for this pod.
pub const MEMORY_REQUEST: &str = "wsgate.dev/memory-request";
/// The sidecar's CPU limit, overriding `--sidecar-cpu-limit` for this pod.
pub const CPU_LIMIT: &str = "wsgate.dev/cpu-limit";
/// The sidecar's memory limit, overriding `--sidecar-memory-limit` for this pod.
pub const MEMORY_LIMIT: &str = "wsgate.dev/memory-limit";
/// Annotation the injector writes on injected pods: the sidecar's image and version, as JSON.
pub const STATUS: &str = "wsgate.dev/status";
/// Namespace label that turns injection on for every pod in it.
pub const NAMESPACE_LABEL: &str = "wsgate.dev/injection";
/// Label the injector puts on injected pods (the certificate controller watches it).
pub const INJECTED_LABEL: &str = "wsgate.dev/injected";

/// The sidecar's default mTLS port.
pub const DEFAULT_PORT: u16 = 8443;
/// The sidecar's admin port (fixed: probes and the preStop hook use it).
pub const ADMIN_PORT: u16 = 9901;

/// Most entries in `wsgate.dev/outbound`: each is a listener and a dialer in the sidecar, and a
/// pod calls a handful of services.
pub const MAX_OUTBOUND: usize = 16;
/// Longest value of `wsgate.dev/outbound` or `wsgate.dev/outbound-expect`, in bytes: 16 entries
/// with 253-byte host names fit in about 4.5 KiB.
pub const MAX_OUTBOUND_VALUE: usize = 8 * 1024;
/// The only address the sidecar's outbound listeners bind: the app reaches them on loopback and
/// nothing outside the pod can.
pub const OUTBOUND_HOST: &str = "127.0.0.1";

/// A bad annotation: the pod is denied with this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationError {
    /// The annotation key.
    pub annotation: &'static str,
    /// Its value.
    pub value: String,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.value.is_empty() {
            write!(f, "annotation {} {}", self.annotation, self.reason)
        } else {
            write!(f, "annotation {}: '{}' {}", self.annotation, self.value, self.reason)
        }
    }
}

impl std::error::Error for AnnotationError {}

/// What the annotations ask for, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodOptions {
    /// The sidecar's inbound side; `None` for an outbound-only pod (`wsgate.dev/outbound`
    /// entries, no app port to forward to): its sidecar binds no mTLS listener.
    pub inbound: Option<Inbound>,
    /// The Secret mounted as the sidecar's certificate.
    pub secret: String,
    /// The trust-bundle ConfigMap, if any.
    pub trust_bundle: Option<String>,
    /// Extra DNS SANs.
    pub dns_names: Vec<String>,
    /// The pod's service account.
    pub service_account: String,
    /// The sidecar's `OTEL_SERVICE_NAME`: `<workload>-wsgate` ([`service_name`]).
    pub service_name: String,
    /// The sidecar's requests and limits this pod asks for, over the injector's defaults.
    pub resources: ResourceOverrides,
    /// The outbound entries (`wsgate.dev/outbound`, `wsgate.dev/outbound-expect`), in order.
    pub outbound: Vec<Outbound>,
    /// Warnings for the user, sent with the admission (none today).
    pub warnings: Vec<String>,
}

/// The sidecar's inbound side, validated: it listens with mTLS on `port` and forwards the
/// clients `allow` admits to the app on `upstream_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The app's port on localhost.
    pub upstream_port: u16,
    /// The sidecar's mTLS port.
    pub port: u16,
    /// Allow patterns.
    pub allow: Vec<String>,
}

/// The sidecar's CPU and memory requests and limits a pod sets by annotation (Kubernetes
/// quantities, checked); `None` keeps the injector's `--sidecar-*` value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceOverrides {
    /// `wsgate.dev/cpu-request`.
    pub cpu_request: Option<String>,
    /// `wsgate.dev/memory-request`.
    pub memory_request: Option<String>,
    /// `wsgate.dev/cpu-limit`.
    pub cpu_limit: Option<String>,
    /// `wsgate.dev/memory-limit`.
    pub memory_limit: Option<String>,
}

/// One `wsgate.dev/outbound` entry, validated: the app connects to `127.0.0.1:local_port` in
/// plain `ws://`, and the sidecar dials `remote` with the pod's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// The port the sidecar listens on, on [`OUTBOUND_HOST`] only.
    pub local_port: u16,
    /// The remote, as `wss://HOST:PORT` (scheme lowercased, no trailing `/`).
    pub remote: String,
    /// The identity the remote must have (`wsgate.dev/outbound-expect`), if the pod gives one.
    pub expect: Option<String>,
}

impl Outbound {
    /// The loopback socket address the sidecar listens on (the proxy's `LOCAL`).
    pub fn local(&self) -> String {
        format!("{OUTBOUND_HOST}:{}", self.local_port)
    }
}

/// Whether the pod asks for injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Inject.
    Yes,
    /// Leave it alone (not opted in, or opted out).
    No,
}

fn err(annotation: &'static str, value: &str, reason: impl Into<String>) -> AnnotationError {
    AnnotationError {
        annotation,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

fn annotations(pod: &Pod) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    pod.metadata.annotations.as_ref().unwrap_or(&EMPTY)
}

/// Decides from `wsgate.dev/inject` and the namespace's label whether to inject.
pub fn wanted(pod: &Pod, namespace_enabled: bool) -> Result<Wanted, AnnotationError> {
    match annotations(pod).get(INJECT).map(|v| v.trim()) {
        Some("true") => Ok(Wanted::Yes),
        Some("false") => Ok(Wanted::No),
        Some(other) => Err(err(INJECT, other, "is neither \"true\" nor \"false\"")),
        None if namespace_enabled => Ok(Wanted::Yes),
        None => Ok(Wanted::No),
    }
}

/// A port number, or what is wrong with it (to follow the value in a message).
fn port_number(value: &str) -> Result<u16, &'static str> {
    match value.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(_) => Err("is out of range: a port is 1 to 65535"),
        Err(_) => Err("is not a port number"),
    }
}

fn port(annotation: &'static str, value: &str) -> Result<u16, AnnotationError> {
    port_number(value).map_err(|reason| err(annotation, value, reason))
}

/// An RFC 1123 subdomain, as Kubernetes object names are.
fn is_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_dns_name(s: &str) -> bool {
    is_host_name(s.strip_prefix("*.").unwrap_or(s))
}

/// A DNS name without a wildcard: letters, digits and `-` in labels of 1 to 63 bytes.
fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Whether `name` is a name of the pod's own namespace's Services: exactly `NAME.NAMESPACE.svc`
/// or `NAME.NAMESPACE.svc.CLUSTER_DOMAIN` (NAME one label, or a `*` wildcard standing for one).
/// Any other name would let a pod author have the workload CA sign a name that belongs to
/// someone else (`x.a.svc.b.svc.cluster.local`, `api.a.svc.attacker.example`).
pub fn dns_name_allowed(name: &str, namespace: &str, cluster_domain: &str) -> bool {
    if !is_dns_name(name) {
        return false;
    }
    let labels: Vec<&str> = name.split('.').collect();
    let domain: Vec<&str> = cluster_domain.trim_matches('.').split('.').collect();
    let [_, ns, svc, rest @ ..] = labels.as_slice() else {
        return false;
    };
    let rest_ok = rest.is_empty()
        || (rest.len() == domain.len() && rest.iter().zip(&domain).all(|(a, b)| a.eq_ignore_ascii_case(b)));
    ns.eq_ignore_ascii_case(namespace) && svc.eq_ignore_ascii_case("svc") && rest_ok
}

/// Whether `value` has the shape of a Kubernetes quantity (`50m`, `128Mi`, `0.5`): the same
/// check as the `--sidecar-*` flags' (`cli::quantity`); the API server has the last word.
pub fn is_quantity(value: &str) -> bool {
    quantity_value(value).is_some()
}

/// The value of a Kubernetes quantity in its base unit (`50m` → 0.05, `2Ki` → 2048, `1.5` →
/// 1.5); `None` when `value` does not have a quantity's shape (a number of digits and dots, then
/// one of the decimal or binary suffixes).
pub fn quantity_value(value: &str) -> Option<f64> {
    let (num, suffix) = value.split_at(
        value
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(value.len()),
    );
    const SUFFIXES: [(&str, f64); 14] = [
        ("", 1.0),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
    ];
    let scale = SUFFIXES.iter().find(|(s, _)| *s == suffix)?.1;
    Some(num.parse::<f64>().ok()? * scale)
}

/// A resource annotation's quantity, if the pod sets one.
fn quantity(a: &BTreeMap<String, String>, annotation: &'static str) -> Result<Option<String>, AnnotationError> {
    match a.get(annotation) {
        None => Ok(None),
        Some(v) if is_quantity(v.trim()) => Ok(Some(v.trim().to_owned())),
        Some(v) => Err(err(annotation, v, "is not a Kubernetes quantity (e.g. 50m, 128Mi)")),
    }
}

fn list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// All TCP container ports the app containers declare.
fn declared_ports(pod: &Pod) -> Vec<(String, u16)> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| {
            c.ports.iter().flatten().filter_map(move |p| {
                let tcp = p.protocol.as_deref().is_none_or(|proto| proto == "TCP");
                (tcp && (1..=65535).contains(&p.container_port)).then(|| (c.name.clone(), p.container_port as u16))
            })
        })
        .collect()
}

/// The service account a pod runs as (`default` when it names none).
pub fn service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// The Secret a pod mounts when `wsgate.dev/secret` does not name one.
pub fn default_secret(service_account: &str) -> String {
    format!("wsgate-{service_account}")
}

/// Whether pods of `service_account` may have wsgate request a certificate into `secret`: its
/// default name `wsgate-<service account>`, or a name that begins with `wsgate-<service
/// account>-`. cert-manager overwrites whatever Secret a Certificate names, and the controller
/// never reads Secrets (its RBAC has no rule on them), so it cannot tell a hand-made Secret from a
/// missing one: instead, the names it may write are reserved, and each service account has its
/// own. A pod can neither point cert-manager at a Secret made by someone else (`db-tls`) nor claim
/// another service account's name before that account has pods.
pub fn secret_reserved_for(secret: &str, service_account: &str) -> bool {
    let own = default_secret(service_account);
    secret
        .strip_prefix(own.as_str())
        .is_some_and(|rest| rest.is_empty() || (rest.len() > 1 && rest.starts_with('-')))
}

/// The label naming the application (the Kubernetes recommended label).
pub const APP_NAME_LABEL: &str = "app.kubernetes.io/name";
/// The label a Deployment's ReplicaSet and pods carry: the suffix of the ReplicaSet's name.
pub const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// The name of the workload a pod belongs to: its `app.kubernetes.io/name` label; else its
/// controller's name (a Deployment's for a ReplicaSet whose name ends in `-<pod-template-hash>`,
/// the Job's, StatefulSet's, DaemonSet's or other controller's otherwise); else its
/// generateName without the trailing `-`, or its name. `None` when the pod has none of these.
pub fn workload_name(pod: &Pod) -> Option<String> {
    let m = &pod.metadata;
    let label = |key: &str| {
        m.labels
            .as_ref()
            .and_then(|l| l.get(key))
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    if let Some(app) = label(APP_NAME_LABEL) {
        return Some(app.to_owned());
    }
    let owners = m.owner_references.iter().flatten();
    let controller = owners
        .clone()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.clone().next())
        .filter(|o| !o.name.is_empty());
    if let Some(owner) = controller {
        let hash = label(POD_TEMPLATE_HASH_LABEL);
        let deployment = hash
            .filter(|_| owner.kind == "ReplicaSet")
            .and_then(|h| owner.name.strip_suffix(h))
            .and_then(|n| n.strip_suffix('-'))
            .filter(|n| !n.is_empty());
        return Some(deployment.unwrap_or(&owner.name).to_owned());
    }
    m.generate_name
        .as_deref()
        .map(|g| g.trim_end_matches('-'))
        .filter(|g| !g.is_empty())
        .or(m.name.as_deref().filter(|n| !n.is_empty()))
        .map(str::to_owned)
}

/// The sidecar's `OTEL_SERVICE_NAME`: `<workload>-wsgate`, or `wsgate` when the pod names no
/// workload ([`workload_name`]). A `$` is doubled, so the kubelet does not expand it.
pub fn service_name(pod: &Pod) -> String {
    match workload_name(pod) {
        Some(w) => format!("{}-wsgate", w.replace('$', "$$")),
        None => "wsgate".to_owned(),
    }
}

/// The sidecar's mTLS port as the pod asks for it (the default when the annotation is absent
/// or not a port), for messages about a pod that is not injected.
pub fn requested_port(pod: &Pod) -> u16 {
    annotations(pod)
        .get(PORT)
        .and_then(|v| port(PORT, v).ok())
        .unwrap_or(DEFAULT_PORT)
}

/// The remote of an outbound entry: `wss://HOST:PORT` or `wss://HOST:PORT/`, HOST a DNS name,
/// an IPv4 address or a bracketed IPv6 address. Returns the canonical form (scheme lowercased,
/// no `/`), or what is wrong.
fn remote(value: &str) -> Result<String, String> {
    let expected = "expected wss://HOST:PORT";
    let Some((scheme, rest)) = value.split_once("://") else {
        return Err(format!("has a remote that is not a URL; {expected}"));
    };
    if scheme.eq_ignore_ascii_case("ws") {
        return Err("has a plain ws:// remote: the sidecar dials wss:// only, with the pod's certificate".to_owned());
    }
    if !scheme.eq_ignore_ascii_case("wss") {
        return Err(format!("has a remote with scheme {scheme}://; {expected}"));
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) {
        return Err(format!("has a remote with a path, query or user part; {expected}"));
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((ip, port)) if ip.parse::<std::net::Ipv6Addr>().is_ok() => (&authority[..ip.len() + 2], port),
            _ => return Err(format!("has a remote with a bad IPv6 address; {expected}")),
        },
        None => match authority.find(':') {
            Some(i) => (&authority[..i], &authority[i..]),
            None => (authority, ""),
        },
    };
    let Some(port) = port.strip_prefix(':') else {
        return Err(format!("has a remote without a port; {expected}"));
    };
    let port = port_number(port).map_err(|reason| format!("has a remote port '{port}' that {reason}"))?;
    let bracketed = host.starts_with('[');
    if !bracketed && host.parse::<std::net::Ipv4Addr>().is_err() && !is_host_name(host) {
        return Err(format!(
            "has a remote host '{host}' that is neither a DNS name nor an IP address"
        ));
    }
    Ok(format!("wss://{host}:{port}"))
}

/// The local port of an outbound entry (or expectation), or what is wrong with it.
fn local_port(value: &str) -> Result<u16, String> {
    if value.contains(':') {
        return Err(format!(
            "has local '{value}', which is not a port: give the port alone, the sidecar listens on {OUTBOUND_HOST} only"
        ));
    }
    port_number(value).map_err(|reason| format!("has local port '{value}' that {reason}"))
}

/// One entry of an outbound annotation: as written, its local port, what follows its first `=`.
type Entry<'a> = (&'a str, u16, &'a str);

/// The entries of an outbound annotation's value. Denied when the value is longer than
/// [`MAX_OUTBOUND_VALUE`], holds no entry, or an entry is not `PORT=…`.
fn entries<'a>(annotation: &'static str, value: &'a str, shape: &str) -> Result<Vec<Entry<'a>>, AnnotationError> {
    if value.len() > MAX_OUTBOUND_VALUE {
        return Err(err(
            annotation,
            "",
            format!(
                "is {} bytes long; wsgate takes at most {MAX_OUTBOUND_VALUE}",
                value.len()
            ),
        ));
    }
    let items: Vec<&str> = value.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if items.is_empty() {
        return Err(err(annotation, value, format!("holds no entry ({shape})")));
    }
    items
        .into_iter()
        .map(|item| {
            let Some((local, rest)) = item.split_once('=') else {
                return Err(err(annotation, item, format!("is not {shape}")));
            };
            let port = local_port(local.trim()).map_err(|reason| err(annotation, item, reason))?;
            Ok((item, port, rest.trim()))
        })
        .collect()
}

/// Reads `wsgate.dev/outbound` and `wsgate.dev/outbound-expect`: at most [`MAX_OUTBOUND`]
/// entries, each local port on none of the sidecar's other ports (`mtls`, admin), nor the
/// app's (`upstream`), nor another entry's; each expectation naming one entry, once, with a
/// pattern the proxy's `--allow` parser accepts. The ports the pod's containers declare are
/// checked with the sidecar's others by the patch. An outbound-only pod (`inbound` `None`) has
/// no mTLS port nor app port to avoid.
fn outbound(a: &BTreeMap<String, String>, inbound: Option<&Inbound>) -> Result<Vec<Outbound>, AnnotationError> {
    let Some(v) = a.get(OUTBOUND) else {
        return match a.get(OUTBOUND_EXPECT) {
            Some(e) => Err(err(OUTBOUND_EXPECT, e, format!("is set but {OUTBOUND} is not"))),
            None => Ok(Vec::new()),
        };
    };
    let listed = entries(OUTBOUND, v, "PORT=wss://HOST:PORT")?;
    if listed.len() > MAX_OUTBOUND {
        return Err(err(
            OUTBOUND,
            "",
            format!("has {} entries; wsgate takes at most {MAX_OUTBOUND}", listed.len()),
        ));
    }
    let mut out: Vec<Outbound> = Vec::with_capacity(listed.len());
    for (entry, local_port, to) in listed {
        let remote = remote(to).map_err(|reason| err(OUTBOUND, entry, reason))?;
        let taken = if let Some(mtls) = inbound.map(|i| i.port).filter(|p| *p == local_port) {
            Some(format!("the sidecar's mTLS port {mtls}"))
        } else if local_port == ADMIN_PORT {
            Some(format!("the sidecar's admin port {ADMIN_PORT}"))
        } else if let Some(upstream) = inbound.map(|i| i.upstream_port).filter(|p| *p == local_port) {
            Some(format!("the app's port {upstream} ({UPSTREAM_PORT})"))
        } else if out.iter().any(|o| o.local_port == local_port) {
            Some("the local port of another entry".to_owned())
        } else {
            None
        };
        if let Some(what) = taken {
            return Err(err(
                OUTBOUND,
                entry,
                format!("uses local port {local_port}, which is {what}; choose another"),
            ));
        }
        out.push(Outbound {
            local_port,
            remote,
            expect: None,
        });
    }
    let Some(v) = a.get(OUTBOUND_EXPECT) else {
        return Ok(out);
    };
    for (item, local_port, pattern) in entries(OUTBOUND_EXPECT, v, "PORT=PATTERN")? {
        Policy::check_pattern(pattern).map_err(|e| {
            let reason = match e {
                PolicyError::BadPattern { reason, .. } => reason,
                other => other.to_string(),
            };
            err(OUTBOUND_EXPECT, item, format!("has a bad pattern: {reason}"))
        })?;
        let Some(entry) = out.iter_mut().find(|o| o.local_port == local_port) else {
            return Err(err(
                OUTBOUND_EXPECT,
                item,
                format!("names local port {local_port}, which no {OUTBOUND} entry has"),
            ));
        };
        if entry.expect.is_some() {
            return Err(err(
                OUTBOUND_EXPECT,
                item,
                format!(
                    "gives local port {local_port} a second pattern; give one per port ('*' and '**' match several names)"
                ),
            ));
        }
        entry.expect = Some(pattern.to_owned());
    }
    Ok(out)
}

/// Reads the inbound side's annotations: the app's port (`wsgate.dev/upstream-port`, else the
/// pod's only declared TCP port), the mTLS port and the allow-list. `None` for an outbound-only
/// pod: it has `wsgate.dev/outbound` entries, declares no container port and names no upstream
/// port. Such a pod may not set `wsgate.dev/port` or `wsgate.dev/allow`: nothing would listen,
/// and the pod is denied rather than injected with a listener it does not get (a pod whose app
/// listens without declaring its port learns at admission that it must name it).
fn inbound(
    a: &BTreeMap<String, String>,
    declared: &[(String, u16)],
    namespace: &str,
    settings: &InjectSettings,
) -> Result<Option<Inbound>, AnnotationError> {
    let upstream_port = match a.get(UPSTREAM_PORT) {
        Some(v) => port(UPSTREAM_PORT, v)?,
        None => match declared {
            [(_, p)] => *p,
            [] if a.contains_key(OUTBOUND) => {
                for annotation in [PORT, ALLOW] {
                    if let Some(v) = a.get(annotation) {
                        return Err(err(
                            annotation,
                            v,
                            format!(
                                "is set, but the sidecar of this pod only dials out and has no inbound listener: the pod declares no container port and sets no {UPSTREAM_PORT}; set {UPSTREAM_PORT} to the app's port to receive connections too, or remove {annotation}"
                            ),
                        ));
                    }
                }
                return Ok(None);
            }
            _ => {
                return Err(err(
                    UPSTREAM_PORT,
                    "",
                    format!(
                        "is required: the pod declares {} TCP container ports, not exactly one",
                        declared.len()
                    ),
                ));
            }
        },
    };
    let port = match a.get(PORT) {
        Some(v) => self::port(PORT, v)?,
        None => DEFAULT_PORT,
    };
    if let Some(v) = a.get(PORT) {
        if port == upstream_port {
            return Err(err(
                PORT,
                v,
                "is the app's own port; the sidecar needs a port of its own",
            ));
        }
        if port == ADMIN_PORT {
            return Err(err(PORT, v, format!("is the sidecar's admin port {ADMIN_PORT}")));
        }
    }
    if let Some((container, _)) = declared.iter().find(|(_, p)| *p == port) {
        return Err(err(
            PORT,
            &port.to_string(),
            format!("is already used by container {container}; choose another with {PORT}"),
        ));
    }
    if upstream_port == ADMIN_PORT {
        return Err(err(
            UPSTREAM_PORT,
            &upstream_port.to_string(),
            format!("collides with the sidecar's admin port {ADMIN_PORT}"),
        ));
    }
    if upstream_port == port {
        return Err(err(
            UPSTREAM_PORT,
            &upstream_port.to_string(),
            format!("is the sidecar's own port; set {PORT}"),
        ));
    }
    let allow = match a.get(ALLOW) {
        Some(v) => {
            let patterns = list(v);
            if patterns.is_empty() {
                return Err(err(ALLOW, v, "holds no pattern"));
            }
            for p in &patterns {
                Policy::check_pattern(p).map_err(|e| err(ALLOW, v, format!("has a bad pattern: {e}")))?;
            }
            patterns
        }
        None => settings.default_allow_for(namespace),
    };
    Ok(Some(Inbound {
        upstream_port,
        port,
        allow,
    }))
}

/// Reads and validates the options of a pod that is to be injected.
pub fn options(pod: &Pod, namespace: &str, settings: &InjectSettings) -> Result<PodOptions, AnnotationError> {
    let a = annotations(pod);
    let inbound = inbound(a, &declared_ports(pod), namespace, settings)?;
    let service_account = service_account(pod);
    let secret = match a.get(SECRET) {
        Some(v) if !is_object_name(v.trim()) => {
            return Err(err(SECRET, v, "is not a valid Secret name (lowercase RFC 1123)"));
        }
        Some(v) if !secret_reserved_for(v.trim(), &service_account) => {
            let own = default_secret(&service_account);
            return Err(err(
                SECRET,
                v,
                format!(
                    "is not a name reserved for service account {service_account}: use {own} or a name beginning with {own}- (wsgate never writes Secrets of other names)"
                ),
            ));
        }
        Some(v) => v.trim().to_owned(),
        None => default_secret(&service_account),
    };
    let trust_bundle = match a.get(TRUST_BUNDLE) {
        Some(v) if is_object_name(v.trim()) => Some(v.trim().to_owned()),
        Some(v) => {
            return Err(err(
                TRUST_BUNDLE,
                v,
                "is not a valid ConfigMap name (lowercase RFC 1123)",
            ));
        }
        None => None,
    };
    let dns_names = match a.get(DNS_NAMES) {
        Some(v) => {
            let names = list(v);
            if let Some(bad) = names.iter().find(|n| !is_dns_name(n)) {
                return Err(err(DNS_NAMES, v, format!("holds '{bad}', which is not a DNS name")));
            }
            let domain = &settings.cluster_domain;
            if let Some(bad) = names.iter().find(|n| !dns_name_allowed(n, namespace, domain)) {
                return Err(err(
                    DNS_NAMES,
                    v,
                    format!(
                        "holds '{bad}', which is not a Service name of namespace {namespace} (NAME.{namespace}.svc or NAME.{namespace}.svc.{domain})"
                    ),
                ));
            }
            names
        }
        None => Vec::new(),
    };
    let resources = ResourceOverrides {
        cpu_request: quantity(a, CPU_REQUEST)?,
        memory_request: quantity(a, MEMORY_REQUEST)?,
        cpu_limit: quantity(a, CPU_LIMIT)?,
        memory_limit: quantity(a, MEMORY_LIMIT)?,
    };
    let outbound = outbound(a, inbound.as_ref())?;
    Ok(PodOptions {
        inbound,
        secret,
        trust_bundle,
        dns_names,
        service_account,
        service_name: service_name(pod),
        resources,
        outbound,
        warnings: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn pod(annotations: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    ports: Some(vec![ContainerPort {
                        container_port: 8080,
                        ..ContainerPort::default()
                    }]),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn only_the_namespaces_own_service_names_are_allowed() {
        for good in [
            "api.a.svc",
            "api.a.svc.cluster.local",
            "API.A.SVC.Cluster.Local",
            "*.a.svc",
        ] {
            assert!(dns_name_allowed(good, "a", "cluster.local"), "{good}");
        }
        for bad in [
            "x.a.svc.b.svc.cluster.local",
            "api.a.svc.attacker.example",
            "api.a.svc.cluster",
            "api.a.svc.cluster.local.evil",
            "x.y.a.svc",
            "a.svc",
            "api.b.svc",
            "api.b.svc.cluster.local",
            "api.a.svc.cluster.local.",
            "api.example.com",
        ] {
            assert!(!dns_name_allowed(bad, "a", "cluster.local"), "{bad}");
        }
        assert!(dns_name_allowed("api.a.svc.k8s.corp", "a", "k8s.corp"));
        assert!(!dns_name_allowed("api.a.svc.cluster.local", "a", "k8s.corp"));
    }

    #[test]
    fn the_webhook_denies_names_outside_the_namespace_and_admits_both_good_forms() {
        let settings = InjectSettings::example();
        for bad in ["x.a.svc.b.svc.cluster.local", "api.a.svc.attacker.example"] {
            let e = options(&pod(&[(DNS_NAMES, bad)]), "a", &settings).unwrap_err();
            assert_eq!(e.annotation, DNS_NAMES);
            assert!(e.reason.contains(bad), "{e}");
        }
        let o = options(
            &pod(&[(DNS_NAMES, "api.a.svc, api.a.svc.cluster.local")]),
            "a",
            &settings,
        )
        .unwrap();
        assert_eq!(o.dns_names, ["api.a.svc", "api.a.svc.cluster.local"]);
    }

    #[test]
    fn only_secret_names_reserved_to_the_pods_own_service_account_are_accepted() {
        for (secret, sa, ok) in [
            ("wsgate-api", "api", true),
            ("wsgate-api-internal", "api", true),
            ("wsgate-api-", "api", false),
            ("wsgate-apiserver", "api", false),
            ("db-tls", "api", false),
            ("wsgate-billing", "api", false),
            ("wsgate", "api", false),
            ("wsgate-default", "default", true),
        ] {
            assert_eq!(secret_reserved_for(secret, sa), ok, "{secret} for {sa}");
        }
        let settings = InjectSettings::example();
        // A hand-made Secret (say, a database's TLS Secret) cannot be named: cert-manager would
        // overwrite it. The pod in this test runs as `default`.
        for bad in ["db-tls", "wsgate-billing"] {
            let e = options(&pod(&[(SECRET, bad)]), "a", &settings).unwrap_err();
            assert_eq!(e.annotation, SECRET);
            assert!(e.reason.contains("wsgate-default-"), "{e}");
        }
        let o = options(&pod(&[(SECRET, "wsgate-default-api")]), "a", &settings).unwrap();
        assert_eq!(o.secret, "wsgate-default-api");
        assert_eq!(options(&pod(&[]), "a", &settings).unwrap().secret, "wsgate-default");
    }

    fn owned(labels: &[(&str, &str)], owner: Option<(&str, &str)>, generate_name: Option<&str>) -> Pod {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let mut p = pod(&[]);
        p.metadata.name = Some("web-0".into());
        p.metadata.generate_name = generate_name.map(str::to_owned);
        p.metadata.labels = Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
        p.metadata.owner_references = owner.map(|(kind, name)| {
            vec![
                OwnerReference {
                    kind: "Other".into(),
                    name: "not-the-controller".into(),
                    ..OwnerReference::default()
                },
                OwnerReference {
                    kind: kind.into(),
                    name: name.into(),
                    controller: Some(true),
                    ..OwnerReference::default()
                },
            ]
        });
        p
    }

    #[test]
    fn the_service_name_says_which_workload_and_that_it_is_wsgate() {
        let hash = [(POD_TEMPLATE_HASH_LABEL, "5d4f8b")];
        for (pod, expected) in [
            (
                owned(
                    &[(APP_NAME_LABEL, "shop"), hash[0]],
                    Some(("ReplicaSet", "checkout-5d4f8b")),
                    None,
                ),
                "shop-wsgate",
            ),
            (
                owned(&hash, Some(("ReplicaSet", "checkout-5d4f8b")), None),
                "checkout-wsgate",
            ),
            (
                owned(&[], Some(("ReplicaSet", "checkout-5d4f8b")), None),
                "checkout-5d4f8b-wsgate",
            ),
            (owned(&hash, Some(("ReplicaSet", "5d4f8b")), None), "5d4f8b-wsgate"),
            (owned(&[], Some(("Job", "migrate")), Some("migrate-")), "migrate-wsgate"),
            (owned(&[], Some(("StatefulSet", "db")), None), "db-wsgate"),
            (owned(&[], Some(("DaemonSet", "agent")), Some("agent-")), "agent-wsgate"),
            (owned(&[(APP_NAME_LABEL, " ")], None, Some("batch-")), "batch-wsgate"),
            (owned(&[], None, None), "web-0-wsgate"),
            (pod(&[]), "wsgate"),
        ] {
            assert_eq!(service_name(&pod), expected, "{:?}", pod.metadata);
        }
        assert_eq!(
            service_name(&owned(&[(APP_NAME_LABEL, "a$(POD_NAME)")], None, None)),
            "a$$(POD_NAME)-wsgate"
        );
    }

    #[test]
    fn resource_annotations_override_and_bad_quantities_deny_naming_the_annotation() {
        let settings = InjectSettings::example();
        let o = options(
            &pod(&[(CPU_REQUEST, " 250m "), (MEMORY_LIMIT, "1Gi"), (CPU_LIMIT, "0.5")]),
            "a",
            &settings,
        )
        .unwrap();
        assert_eq!(
            o.resources,
            ResourceOverrides {
                cpu_request: Some("250m".into()),
                memory_request: None,
                cpu_limit: Some("0.5".into()),
                memory_limit: Some("1Gi".into()),
            }
        );
        for key in [CPU_REQUEST, MEMORY_REQUEST, CPU_LIMIT, MEMORY_LIMIT] {
            for bad in ["", "lots", "1Gb", "-1", "1.2.3m"] {
                let e = options(&pod(&[(key, bad)]), "a", &settings).unwrap_err();
                assert_eq!(e.annotation, key);
                assert!(e.to_string().contains(key) && e.reason.contains("quantity"), "{e}");
            }
        }
    }

    #[test]
    fn a_quantity_is_read_in_its_base_unit() {
        assert_eq!(quantity_value("50m"), Some(0.05));
        assert_eq!(quantity_value("1.5"), Some(1.5));
        assert_eq!(quantity_value("2Ki"), Some(2048.0));
        assert_eq!(quantity_value("3k"), Some(3000.0));
        for bad in ["", "lots", "1Gb", "-1", "1.2.3m", "1e3"] {
            assert_eq!(quantity_value(bad), None, "{bad}");
        }
    }

    fn outbound_of(annotations: &[(&str, &str)]) -> Result<Vec<Outbound>, AnnotationError> {
        options(&pod(annotations), "a", &InjectSettings::example()).map(|o| o.outbound)
    }

    fn entry(local_port: u16, remote: &str, expect: Option<&str>) -> Outbound {
        Outbound {
            local_port,
            remote: remote.to_owned(),
            expect: expect.map(str::to_owned),
        }
    }

    #[test]
    fn outbound_entries_are_read_in_order_with_their_expectations_and_remotes_in_one_form() {
        assert_eq!(outbound_of(&[]).unwrap(), []);
        assert_eq!(
            outbound_of(&[(OUTBOUND, "9001=wss://chat.shop.svc.cluster.local:8443")]).unwrap(),
            [entry(9001, "wss://chat.shop.svc.cluster.local:8443", None)]
        );
        let o = outbound_of(&[
            (
                OUTBOUND,
                " 9001 = WSS://chat.shop.svc:8443/ ,, 9002=wss://10.0.0.7:443, 9003=wss://[fd00::7]:8443",
            ),
            (
                OUTBOUND_EXPECT,
                "9003=dns:*.shop.svc, 9001=spiffe://cluster.local/ns/shop/sa/chat",
            ),
        ])
        .unwrap();
        assert_eq!(
            o,
            [
                entry(
                    9001,
                    "wss://chat.shop.svc:8443",
                    Some("spiffe://cluster.local/ns/shop/sa/chat")
                ),
                entry(9002, "wss://10.0.0.7:443", None),
                entry(9003, "wss://[fd00::7]:8443", Some("dns:*.shop.svc")),
            ]
        );
        assert_eq!(o[0].local(), "127.0.0.1:9001", "loopback only");
        let sixteen: Vec<String> = (0..MAX_OUTBOUND).map(|i| format!("{}=wss://a:1", 9100 + i)).collect();
        assert_eq!(
            outbound_of(&[(OUTBOUND, &sixteen.join(","))]).unwrap().len(),
            MAX_OUTBOUND
        );
    }

    #[test]
    fn a_bad_outbound_entry_denies_naming_the_entry_and_what_is_wrong() {
        for (value, fragment) in [
            ("", "holds no entry (PORT=wss://HOST:PORT)"),
            (" , ", "holds no entry"),
            ("wss://chat:8443", "'wss://chat:8443' is not PORT=wss://HOST:PORT"),
            (
                "9001=ws://chat:8080",
                "'9001=ws://chat:8080' has a plain ws:// remote: the sidecar dials wss:// only",
            ),
            ("9001=https://chat:443", "has a remote with scheme https://"),
            ("9001=chat:8443", "has a remote that is not a URL"),
            ("9001=wss://chat", "has a remote without a port"),
            ("9001=wss://chat:", "has a remote port '' that is not a port number"),
            (
                "9001=wss://chat:70000",
                "has a remote port '70000' that is out of range",
            ),
            ("9001=wss://chat:0", "remote port '0' that is out of range"),
            ("9001=wss://chat:8443/ws", "has a remote with a path"),
            (
                "9001=wss://chat:8443?x=1",
                "has a remote with a path, query or user part",
            ),
            ("9001=wss://u@chat:8443", "user part"),
            (
                "9001=wss://chat_svc:8443",
                "has a remote host 'chat_svc' that is neither a DNS name nor an IP address",
            ),
            ("9001=wss://*.shop.svc:8443", "host '*.shop.svc' that is neither"),
            ("9001=wss://-a.svc:8443", "host '-a.svc' that is neither"),
            ("9001=wss://[::g]:8443", "bad IPv6 address"),
            ("9001=wss://[::1]", "has a remote without a port"),
            ("9001=wss://:8443", "host '' that is neither"),
            ("0=wss://chat:8443", "has local port '0' that is out of range"),
            ("65536=wss://chat:8443", "has local port '65536' that is out of range"),
            ("x=wss://chat:8443", "has local port 'x' that is not a port number"),
            (
                "127.0.0.1:9001=wss://chat:8443",
                "'127.0.0.1:9001=wss://chat:8443' has local '127.0.0.1:9001', which is not a port: give the port alone, the sidecar listens on 127.0.0.1 only",
            ),
            ("0.0.0.0:9001=wss://chat:8443", "is not a port"),
            (
                "8443=wss://chat:8443",
                "uses local port 8443, which is the sidecar's mTLS port 8443",
            ),
            ("9901=wss://chat:8443", "which is the sidecar's admin port 9901"),
            (
                "8080=wss://chat:8443",
                "which is the app's port 8080 (wsgate.dev/upstream-port)",
            ),
            (
                "9001=wss://a:1,9001=wss://b:1",
                "'9001=wss://b:1' uses local port 9001, which is the local port of another entry",
            ),
        ] {
            let e = outbound_of(&[(OUTBOUND, value)]).unwrap_err();
            assert_eq!(e.annotation, OUTBOUND, "{value}");
            assert!(e.to_string().contains(fragment), "{value}: {e}");
        }
        let seventeen: Vec<String> = (0..=MAX_OUTBOUND).map(|i| format!("{}=wss://a:1", 9100 + i)).collect();
        let e = outbound_of(&[(OUTBOUND, &seventeen.join(","))]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "annotation wsgate.dev/outbound has 17 entries; wsgate takes at most 16"
        );
        let long = format!("9001=wss://{}:1", "a.".repeat(MAX_OUTBOUND_VALUE / 2));
        let e = outbound_of(&[(OUTBOUND, &long)]).unwrap_err();
        assert!(e.value.is_empty(), "a long value is not echoed");
        assert!(e.reason.contains("wsgate takes at most 8192"), "{e}");
    }

    #[test]
    fn a_bad_outbound_expectation_denies_naming_it() {
        let outbound = (OUTBOUND, "9001=wss://chat:8443, 9002=wss://feed:8443");
        for (value, fragment) in [
            ("", "holds no entry (PORT=PATTERN)"),
            ("spiffe://cluster.local/ns/shop/sa/chat", "is not PORT=PATTERN"),
            ("9001=chat", "'9001=chat' has a bad pattern: expected a URI"),
            (
                "9001=spiffe://cluster.local/ns/sh*p",
                "has a bad pattern: '*' and '**' must stand",
            ),
            ("9001=", "has a bad pattern"),
            (
                "9003=dns:chat.shop.svc",
                "names local port 9003, which no wsgate.dev/outbound entry has",
            ),
            ("x=dns:chat.shop.svc", "has local port 'x' that is not a port number"),
            (
                "9001=dns:chat.shop.svc, 9001=dns:chat2.shop.svc",
                "gives local port 9001 a second pattern",
            ),
        ] {
            let e = outbound_of(&[outbound, (OUTBOUND_EXPECT, value)]).unwrap_err();
            assert_eq!(e.annotation, OUTBOUND_EXPECT, "{value}");
            assert!(e.to_string().contains(fragment), "{value}: {e}");
        }
        let e = outbound_of(&[(OUTBOUND_EXPECT, "9001=dns:chat.shop.svc")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "annotation wsgate.dev/outbound-expect: '9001=dns:chat.shop.svc' is set but wsgate.dev/outbound is not"
        );
    }

    fn without_ports(annotations: &[(&str, &str)]) -> Pod {
        let mut p = pod(annotations);
        p.spec.as_mut().unwrap().containers[0].ports = None;
        p
    }

    /// A pod with outbound entries and no app port gets a sidecar without an inbound side; the
    /// local ports it could not use because of that side (8443) are free.
    #[test]
    fn a_pod_that_only_dials_out_gets_a_sidecar_without_an_inbound_side() {
        let settings = InjectSettings::example();
        let o = options(
            &without_ports(&[(OUTBOUND, "9001=wss://chat:8443, 8443=wss://feed:8443")]),
            "a",
            &settings,
        )
        .unwrap();
        assert_eq!(o.inbound, None);
        assert_eq!(
            o.outbound,
            [
                entry(9001, "wss://chat:8443", None),
                entry(8443, "wss://feed:8443", None)
            ]
        );
        assert!(o.warnings.is_empty());
        // An app port, declared or named, keeps both directions.
        for p in [
            pod(&[(OUTBOUND, "9001=wss://chat:8443")]),
            without_ports(&[(OUTBOUND, "9001=wss://chat:8443"), (UPSTREAM_PORT, "8080")]),
        ] {
            let o = options(&p, "a", &settings).unwrap();
            let inbound = o.inbound.expect("both directions");
            assert_eq!((inbound.upstream_port, inbound.port), (8080, DEFAULT_PORT));
            assert_eq!(inbound.allow, settings.default_allow_for("a"));
            assert_eq!(o.outbound.len(), 1);
        }
    }

    /// `wsgate.dev/port` and `wsgate.dev/allow` ask for a listener an outbound-only sidecar does
    /// not have: the pod is denied, saying which annotation and both ways out.
    #[test]
    fn an_outbound_only_pod_that_sets_port_or_allow_is_denied_saying_how_to_fix_it() {
        for (annotation, value) in [(PORT, "9443"), (ALLOW, "dns:*.a.svc")] {
            let e = options(
                &without_ports(&[(OUTBOUND, "9001=wss://chat:8443"), (annotation, value)]),
                "a",
                &InjectSettings::example(),
            )
            .unwrap_err();
            assert_eq!((e.annotation, e.value.as_str()), (annotation, value));
            assert!(
                e.reason.contains("only dials out and has no inbound listener")
                    && e.reason.contains(&format!("set {UPSTREAM_PORT}"))
                    && e.reason.ends_with(&format!("or remove {annotation}")),
                "{e}"
            );
        }
    }

    /// Without outbound entries a pod with no declared port still names its app port, and with
    /// several declared ports the app's port is ambiguous, outbound entries or not.
    #[test]
    fn a_pod_without_exactly_one_port_still_needs_an_upstream_port_unless_it_only_dials_out() {
        let e = options(&without_ports(&[]), "a", &InjectSettings::example()).unwrap_err();
        assert_eq!(e.annotation, UPSTREAM_PORT);
        assert!(e.reason.contains("declares 0 TCP container ports"), "{e}");
        let mut two = pod(&[(OUTBOUND, "9001=wss://chat:8443")]);
        two.spec.as_mut().unwrap().containers[0]
            .ports
            .as_mut()
            .unwrap()
            .push(ContainerPort {
                container_port: 8081,
                ..ContainerPort::default()
            });
        let e = options(&two, "a", &InjectSettings::example()).unwrap_err();
        assert_eq!(e.annotation, UPSTREAM_PORT);
        assert!(e.reason.contains("declares 2 TCP container ports"), "{e}");
    }
}
