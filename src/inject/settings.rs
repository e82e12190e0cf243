//! The injector's settings: what every injected sidecar looks like, and how workload
//! certificates are requested. Parsed once at start from `wsgate inject` flags; pure.

use clap::ValueEnum;

use crate::telemetry::LogFormat;
use crate::telemetry::otel::Protocol;

/// Whether the sidecar is injected as a native sidecar (an init container with
/// `restartPolicy: Always`, Kubernetes 1.29+) or as an ordinary container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NativeSidecar {
    /// Decide from the API server's version.
    Auto,
    /// Always native.
    #[value(alias = "true")]
    On,
    /// Always an ordinary container.
    #[value(alias = "false")]
    Off,
}

/// The sidecar's `imagePullPolicy`, as Kubernetes spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PullPolicy {
    /// Pull only when the node does not have the image.
    #[value(name = "IfNotPresent")]
    IfNotPresent,
    /// Pull on every start.
    #[value(name = "Always")]
    Always,
    /// Never pull.
    #[value(name = "Never")]
    Never,
}

/// The kind of cert-manager issuer, as cert-manager spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IssuerKind {
    /// A namespaced `Issuer` (in each workload's namespace).
    #[value(name = "Issuer")]
    Issuer,
    /// A cluster-wide `ClusterIssuer`.
    #[value(name = "ClusterIssuer")]
    ClusterIssuer,
}

/// The name clap parses for a value, which is also how Kubernetes or the sidecar spells it.
pub fn value_name<V: ValueEnum>(value: &V) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

/// CPU and memory requests and limits of the sidecar, as Kubernetes quantities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    /// e.g. `50m`.
    pub cpu_request: Option<String>,
    /// e.g. `32Mi`.
    pub memory_request: Option<String>,
    /// None: no CPU limit (the usual advice for latency-sensitive proxies).
    pub cpu_limit: Option<String>,
    /// e.g. `128Mi`.
    pub memory_limit: Option<String>,
}

/// The cert-manager issuer workload certificates are requested from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerRef {
    /// Issuer or ClusterIssuer name.
    pub name: String,
    /// `Issuer` or `ClusterIssuer`.
    pub kind: IssuerKind,
    /// Usually `cert-manager.io`.
    pub group: String,
}

/// Everything the patch and the certificate controller need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectSettings {
    /// SPIFFE trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// The cluster's DNS domain (`cluster.local`): the only suffix allowed after
    /// `NAME.NAMESPACE.svc` in `wsgate.dev/dns-names`.
    pub cluster_domain: String,
    /// The sidecar image.
    pub image: String,
    /// Its pull policy.
    pub pull_policy: PullPolicy,
    /// Its resources.
    pub resources: Resources,
    /// Allow patterns used when a pod has no `wsgate.dev/allow`; may contain the placeholders
    /// `{namespace}` and `{trust-domain}`.
    pub default_allow: Vec<String>,
    /// Native sidecar mode.
    pub native: NativeSidecar,
    /// The sidecar's log format.
    pub log_format: LogFormat,
    /// OTLP endpoint and protocol given to every sidecar, if any.
    pub otlp: Option<(String, Protocol)>,
    /// Where workload certificates come from.
    pub issuer: IssuerRef,
    /// Certificate duration (Go duration, as cert-manager reads it).
    pub cert_duration: String,
    /// Renew this long before expiry.
    pub cert_renew_before: String,
}

impl InjectSettings {
    /// A complete example, for tests and documentation.
    pub fn example() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            cluster_domain: "cluster.local".into(),
            image: "ghcr.io/wsgate/wsgate:0.1.0".into(),
            pull_policy: PullPolicy::IfNotPresent,
            resources: Resources {
                cpu_request: Some("50m".into()),
                memory_request: Some("32Mi".into()),
                cpu_limit: None,
                memory_limit: Some("128Mi".into()),
            },
            default_allow: vec!["spiffe://{trust-domain}/ns/{namespace}/sa/*".into()],
            native: NativeSidecar::Auto,
            log_format: LogFormat::Json,
            otlp: None,
            issuer: IssuerRef {
                name: "wsgate-ca".into(),
                kind: IssuerKind::ClusterIssuer,
                group: "cert-manager.io".into(),
            },
            cert_duration: "24h".into(),
            cert_renew_before: "8h".into(),
        }
    }

    /// The SPIFFE ID of a service account.
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> String {
        format!("spiffe://{}/ns/{namespace}/sa/{service_account}", self.trust_domain)
    }

    /// The default allow patterns with the placeholders filled in for `namespace`.
    pub fn default_allow_for(&self, namespace: &str) -> Vec<String> {
        self.default_allow
            .iter()
            .map(|p| {
                p.replace("{namespace}", namespace)
                    .replace("{trust-domain}", &self.trust_domain)
            })
            .collect()
    }
}
