//! The injector's settings: what every injected sidecar looks like, and how workload
//! certificates are requested. Parsed once at start from `wsgate inject` flags; pure.

use crate::config::LogFormat;

/// Whether the sidecar is injected as a native sidecar (an init container with
/// `restartPolicy: Always`, Kubernetes 1.29+) or as an ordinary container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativeSidecar {
    /// Decide from the API server's version.
    Auto,
    /// Always native.
    On,
    /// Always an ordinary container.
    Off,
}

impl std::str::FromStr for NativeSidecar {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" | "true" => Ok(Self::On),
            "off" | "false" => Ok(Self::Off),
            other => Err(format!("'{other}' is not auto, on or off")),
        }
    }
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
    pub kind: String,
    /// Usually `cert-manager.io`.
    pub group: String,
}

/// Everything the patch and the certificate controller need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectSettings {
    /// SPIFFE trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// The sidecar image.
    pub image: String,
    /// Its pull policy.
    pub pull_policy: String,
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
    pub otlp: Option<(String, String)>,
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
            image: "ghcr.io/wsgate/wsgate:0.1.0".into(),
            pull_policy: "IfNotPresent".into(),
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
                kind: "ClusterIssuer".into(),
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
