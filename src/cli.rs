//! The command line: subcommands and flags, each flag with a `WSGATE_…` environment twin.
//!
//! Parsing and validating flags is all that happens here: closed sets of values are
//! `clap::ValueEnum`s owned by the module that uses them, durations are read by kube's
//! `Duration` (Go syntax, as cert-manager and Kubernetes read them), and the result is the typed
//! settings of `proxy::settings` and `inject`. May depend on every module's settings types.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::authz::Policy;
use crate::certs::ReloadTiming;
use crate::inject::settings::{IssuerKind, NativeSidecar, PullPolicy};
use crate::proxy::settings::{Limits, Outbound, ProxyConfig, SettingsError, Upstream};
use crate::telemetry::LogFormat;
use crate::telemetry::otel::Protocol;
use crate::tls::TlsMinVersion;

/// Why the flags were refused: a usage error (exit 64), raised before any port is bound.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// A flag's value is not acceptable.
    #[error("{flag}: {reason}")]
    Invalid {
        /// The flag, e.g. `--cert-duration`.
        flag: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// A proxy setting is not acceptable.
    #[error(transparent)]
    Proxy(#[from] SettingsError),
}

impl CliError {
    fn invalid(flag: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            flag,
            reason: reason.into(),
        }
    }
}

/// Parses a duration the way Go and Kubernetes do (`250ms`, `1.5h`, `1h30m`, kube's
/// `Duration`), or a bare number of seconds (`7`). Negative durations are refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("is empty: write e.g. 500ms, 10s, 1.5h, 1h30m".into());
    }
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|_| format!("'{s}' is out of range"));
    }
    let d: kube::core::Duration = s
        .parse()
        .map_err(|e| format!("'{s}' is not a duration ({e}): write e.g. 500ms, 10s, 1.5h, 1h30m"))?;
    if d.is_negative() {
        return Err(format!("'{s}' is negative"));
    }
    Ok(d.into())
}

/// Parses a size in bytes: `4096`, `64KiB`, `16MiB` (also `k`/`K`/`KB` = KiB, `M`/`MB` = MiB).
/// Hand-written because every suffix is binary here, as in nginx's sizes; the size crates read
/// `KB` as 1000.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: usize = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size: write e.g. 65536, 64KiB, 4MiB"))?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "KB" | "KiB" => 1 << 10,
        "M" | "MB" | "MiB" => 1 << 20,
        "G" | "GB" | "GiB" => 1 << 30,
        other => return Err(format!("'{s}': unknown unit '{other}', use KiB, MiB or GiB")),
    };
    value.checked_mul(scale).ok_or_else(|| format!("'{s}' is out of range"))
}

/// wsgate: the mTLS WebSocket sidecar.
#[derive(Debug, Parser)]
#[command(name = "wsgate", version, about, propagate_version = true)]
pub struct Cli {
    /// Log line format: text or json. The level comes from RUST_LOG (default info).
    #[arg(
        long,
        global = true,
        env = "WSGATE_LOG_FORMAT",
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the mTLS WebSocket sidecar (inbound, and outbound with --outbound).
    Proxy(Box<ProxyArgs>),
    /// Run the admission webhook that injects the sidecar, and the certificate controller.
    Inject(Box<InjectArgs>),
    /// Ask the local proxy to drain (for a preStop hook): POST /drain on its admin port.
    Drain(DrainArgs),
    /// Run everything on this machine with throwaway certificates and show rotation at work.
    Demo,
}

/// Flags of `wsgate drain`.
#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The proxy's admin address.
    #[arg(
        long,
        env = "WSGATE_ADMIN_LOCAL",
        default_value = "127.0.0.1:9901",
        value_name = "ADDR"
    )]
    pub admin: SocketAddr,
}

/// Flags of `wsgate inject`.
#[derive(Debug, Args)]
pub struct InjectArgs {
    /// Address of the HTTPS webhook (POST /mutate, POST /mutate/namespace-enabled).
    #[arg(long, env = "WSGATE_LISTEN", default_value = "0.0.0.0:9443", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Address of the admin server (/healthz, /readyz, /metrics).
    #[arg(long, env = "WSGATE_ADMIN", default_value = "0.0.0.0:9901", value_name = "ADDR")]
    pub admin: SocketAddr,
    /// The webhook's serving certificate: a mounted cert-manager Secret (tls.crt, tls.key, ca.crt).
    #[arg(
        long,
        env = "WSGATE_CERT_DIR",
        default_value = "/var/run/wsgate/webhook-tls",
        value_name = "DIR"
    )]
    pub cert_dir: PathBuf,
    /// SPIFFE trust domain of workload identities.
    #[arg(
        long,
        env = "WSGATE_TRUST_DOMAIN",
        default_value = "cluster.local",
        value_name = "DOMAIN"
    )]
    pub trust_domain: String,
    /// The cluster's DNS domain: wsgate.dev/dns-names may only name NAME.NAMESPACE.svc or
    /// NAME.NAMESPACE.svc.DOMAIN (the pod's own namespace).
    #[arg(
        long,
        env = "WSGATE_CLUSTER_DOMAIN",
        default_value = "cluster.local",
        value_name = "DOMAIN"
    )]
    pub cluster_domain: String,
    /// The sidecar image.
    #[arg(long, env = "WSGATE_SIDECAR_IMAGE", value_name = "IMAGE")]
    pub sidecar_image: String,
    /// The sidecar's image pull policy.
    #[arg(
        long,
        env = "WSGATE_SIDECAR_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent",
        value_name = "POLICY"
    )]
    pub sidecar_image_pull_policy: PullPolicy,
    /// The sidecar's CPU request (empty: none).
    #[arg(
        long,
        env = "WSGATE_SIDECAR_CPU_REQUEST",
        default_value = "50m",
        value_name = "QUANTITY"
    )]
    pub sidecar_cpu_request: String,
    /// The sidecar's memory request (empty: none).
    #[arg(
        long,
        env = "WSGATE_SIDECAR_MEMORY_REQUEST",
        default_value = "32Mi",
        value_name = "QUANTITY"
    )]
    pub sidecar_memory_request: String,
    /// The sidecar's CPU limit (empty: none, the usual advice for proxies).
    #[arg(long, env = "WSGATE_SIDECAR_CPU_LIMIT", default_value = "", value_name = "QUANTITY")]
    pub sidecar_cpu_limit: String,
    /// The sidecar's memory limit (empty: none).
    #[arg(
        long,
        env = "WSGATE_SIDECAR_MEMORY_LIMIT",
        default_value = "128Mi",
        value_name = "QUANTITY"
    )]
    pub sidecar_memory_limit: String,
    /// Allow pattern for pods without wsgate.dev/allow (repeatable; comma-separated in the
    /// environment); {namespace} and {trust-domain} are filled in.
    #[arg(
        long = "default-allow",
        env = "WSGATE_DEFAULT_ALLOW",
        value_delimiter = ',',
        default_value = "spiffe://{trust-domain}/ns/{namespace}/sa/*",
        value_name = "PATTERN"
    )]
    pub default_allow: Vec<String>,
    /// Inject native sidecars (init containers with restartPolicy Always): auto (from the API
    /// server's version: 1.29 and later), on or off.
    #[arg(long, env = "WSGATE_NATIVE_SIDECAR", default_value = "auto", value_name = "MODE")]
    pub native_sidecar: NativeSidecar,
    /// The sidecar's log format: text or json.
    #[arg(
        long,
        env = "WSGATE_SIDECAR_LOG_FORMAT",
        default_value = "json",
        value_name = "FORMAT"
    )]
    pub sidecar_log_format: LogFormat,
    /// OTLP collector endpoint given to every sidecar (plain http://).
    #[arg(long, env = "WSGATE_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// OTLP protocol given to every sidecar: grpc or http/protobuf.
    #[arg(
        long,
        env = "WSGATE_OTLP_PROTOCOL",
        default_value = "http/protobuf",
        value_name = "PROTOCOL"
    )]
    pub otlp_protocol: Protocol,
    /// cert-manager issuer of workload certificates: name.
    #[arg(long, env = "WSGATE_ISSUER_NAME", default_value = "wsgate-ca", value_name = "NAME")]
    pub issuer_name: String,
    /// cert-manager issuer kind: Issuer or ClusterIssuer.
    #[arg(
        long,
        env = "WSGATE_ISSUER_KIND",
        default_value = "ClusterIssuer",
        value_name = "KIND"
    )]
    pub issuer_kind: IssuerKind,
    /// cert-manager issuer group.
    #[arg(
        long,
        env = "WSGATE_ISSUER_GROUP",
        default_value = "cert-manager.io",
        value_name = "GROUP"
    )]
    pub issuer_group: String,
    /// Workload certificate lifetime (a Go duration: 24h, 1.5h, 90m).
    #[arg(long, env = "WSGATE_CERT_DURATION", default_value = "24h", value_parser = parse_duration, value_name = "DURATION")]
    pub cert_duration: Duration,
    /// Renew workload certificates this long before they expire.
    #[arg(
        long,
        env = "WSGATE_CERT_RENEW_BEFORE",
        default_value = "8h",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub cert_renew_before: Duration,
    /// On SIGTERM, stay up this long (not ready, still answering) before stopping, so endpoints
    /// and the API server's connections move to the other replica first.
    #[arg(long, env = "WSGATE_SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub shutdown_delay: Duration,
    /// Run the certificate controller (true or false).
    #[arg(long, env = "WSGATE_CERTIFICATE_CONTROLLER", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub certificate_controller: bool,
}

/// Checks the shape of a Kubernetes quantity (`50m`, `128Mi`). Hand-written because k8s-openapi's
/// `Quantity` is an unchecked string and no crate parses the format; the API server has the
/// last word anyway.
fn quantity(flag: &'static str, value: &str) -> Result<Option<String>, CliError> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(None);
    }
    if !crate::inject::annotations::is_quantity(v) {
        return Err(CliError::invalid(
            flag,
            format!("'{v}' is not a Kubernetes quantity (e.g. 50m, 128Mi)"),
        ));
    }
    Ok(Some(v.to_owned()))
}

/// A duration as Go writes it (`24h0m0s` is `24h`, `5400s` is `1h30m`), for cert-manager.
pub fn go_format(d: Duration) -> String {
    let total = d.as_secs();
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

impl InjectArgs {
    /// Validates the flags into settings.
    pub fn into_config(self) -> Result<crate::inject::InjectConfig, CliError> {
        use crate::inject::settings::{InjectSettings, IssuerRef, Resources};
        if self.sidecar_image.trim().is_empty() {
            return Err(CliError::invalid("--sidecar-image", "is required"));
        }
        if self.trust_domain.is_empty() || self.trust_domain.contains(['/', ':', ' ']) {
            return Err(CliError::invalid(
                "--trust-domain",
                format!("'{}' is not a trust domain", self.trust_domain),
            ));
        }
        let cluster_domain = self.cluster_domain.trim().trim_matches('.').to_ascii_lowercase();
        let domain_ok = !cluster_domain.is_empty()
            && cluster_domain.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !domain_ok {
            return Err(CliError::invalid(
                "--cluster-domain",
                format!("'{}' is not a DNS domain", self.cluster_domain),
            ));
        }
        for p in &self.default_allow {
            let filled = p
                .replace("{namespace}", "ns")
                .replace("{trust-domain}", &self.trust_domain);
            Policy::check_pattern(&filled).map_err(|e| CliError::invalid("--default-allow", e.to_string()))?;
        }
        if self.cert_duration < Duration::from_secs(3600) {
            // cert-manager's own minimum for a Certificate's duration.
            return Err(CliError::invalid("--cert-duration", "must be at least 1h"));
        }
        if self.cert_renew_before >= self.cert_duration {
            return Err(CliError::invalid(
                "--cert-renew-before",
                format!(
                    "{} is not shorter than --cert-duration {}: the certificate would be renewed for ever",
                    go_format(self.cert_renew_before),
                    go_format(self.cert_duration)
                ),
            ));
        }
        let otlp = match self.otlp_endpoint.filter(|e| !e.trim().is_empty()) {
            None => None,
            Some(endpoint) => {
                if !endpoint.starts_with("http://") {
                    return Err(CliError::invalid(
                        "--otlp-endpoint",
                        format!("'{endpoint}' must be a plain http:// URL"),
                    ));
                }
                Some((endpoint, self.otlp_protocol))
            }
        };
        let settings = InjectSettings {
            trust_domain: self.trust_domain,
            cluster_domain,
            image: self.sidecar_image,
            pull_policy: self.sidecar_image_pull_policy,
            resources: Resources {
                cpu_request: quantity("--sidecar-cpu-request", &self.sidecar_cpu_request)?,
                memory_request: quantity("--sidecar-memory-request", &self.sidecar_memory_request)?,
                cpu_limit: quantity("--sidecar-cpu-limit", &self.sidecar_cpu_limit)?,
                memory_limit: quantity("--sidecar-memory-limit", &self.sidecar_memory_limit)?,
            },
            default_allow: self.default_allow,
            native: self.native_sidecar,
            log_format: self.sidecar_log_format,
            otlp,
            issuer: IssuerRef {
                name: self.issuer_name,
                kind: self.issuer_kind,
                group: self.issuer_group,
            },
            cert_duration: go_format(self.cert_duration),
            cert_renew_before: go_format(self.cert_renew_before),
        };
        Ok(crate::inject::InjectConfig {
            listen: self.listen,
            admin: self.admin,
            cert_dir: self.cert_dir,
            settings,
            certificate_controller: self.certificate_controller,
            reload: ReloadTiming::default(),
            shutdown_delay: self.shutdown_delay,
        })
    }
}

/// Flags of `wsgate proxy`.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Address of the mTLS listener.
    #[arg(long, env = "WSGATE_LISTEN", default_value = "0.0.0.0:8443", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// The app, as ws://HOST:PORT (loopback unless --allow-remote-upstream). Required unless
    /// --outbound is given: without it the proxy is outbound only and binds no mTLS listener.
    #[arg(long, env = "WSGATE_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,
    /// Allow an upstream that is not on loopback.
    #[arg(long, env = "WSGATE_ALLOW_REMOTE_UPSTREAM")]
    pub allow_remote_upstream: bool,
    /// Outbound route LOCAL=REMOTE (repeatable; comma-separated in the environment): the app
    /// dials plain ws:// on LOCAL (IP:PORT, loopback) and wsgate forwards each upgrade to REMOTE
    /// (wss://HOST:PORT) over mTLS with the pod's certificate, e.g.
    /// 127.0.0.1:9001=wss://chat.shop.svc.cluster.local:8443.
    #[arg(
        long = "outbound",
        env = "WSGATE_OUTBOUND",
        value_delimiter = ',',
        value_name = "LOCAL=REMOTE"
    )]
    pub outbound: Vec<String>,
    /// Identity the remote of the route on LOCAL must carry (repeatable: any of them;
    /// comma-separated in the environment), same patterns as --allow, e.g.
    /// 127.0.0.1:9001=spiffe://cluster.local/ns/shop/sa/chat.
    #[arg(
        long = "outbound-expect",
        env = "WSGATE_OUTBOUND_EXPECT",
        value_delimiter = ',',
        value_name = "LOCAL=PATTERN"
    )]
    pub outbound_expect: Vec<String>,
    /// Allow an --outbound LOCAL that is not on loopback.
    #[arg(long, env = "WSGATE_ALLOW_REMOTE_OUTBOUND_LISTEN")]
    pub allow_remote_outbound_listen: bool,
    /// Longest time to connect to an outbound remote, finish TLS and get its answer to the
    /// upgrade; the app gets 504 after it.
    #[arg(long, env = "WSGATE_OUTBOUND_DIAL_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub outbound_dial_timeout: Duration,
    /// Most outbound connections open at once to one remote (host:port); the next is answered
    /// 429 (default: a tenth of --max-connections).
    #[arg(long, env = "WSGATE_OUTBOUND_MAX_CONNECTIONS_PER_DESTINATION", value_name = "N")]
    pub outbound_max_connections_per_destination: Option<usize>,
    /// The mounted Secret volume holding tls.crt, tls.key and ca.crt.
    #[arg(
        long,
        env = "WSGATE_CERT_DIR",
        default_value = "/var/run/wsgate/tls",
        value_name = "DIR"
    )]
    pub cert_dir: PathBuf,
    /// A PEM file or mounted ConfigMap directory of trust roots used instead of ca.crt.
    #[arg(long, env = "WSGATE_TRUST_BUNDLE", value_name = "PATH")]
    pub trust_bundle: Option<PathBuf>,
    /// Client identity allowed in (repeatable; comma-separated in the environment):
    /// a URI SAN such as spiffe://cluster.local/ns/shop/sa/* ('*' one segment, '**' any),
    /// dns:NAME ('*' one label) or cn:NAME. Checked but unused without --upstream.
    #[arg(long = "allow", env = "WSGATE_ALLOW", value_delimiter = ',', value_name = "PATTERN")]
    pub allow: Vec<String>,
    /// Admit every client whose certificate chains to the trust roots.
    #[arg(long, env = "WSGATE_ALLOW_ANY_AUTHENTICATED")]
    pub allow_any_authenticated: bool,
    /// Address of the admin server (/healthz, /readyz, /metrics, POST /drain).
    #[arg(long, env = "WSGATE_ADMIN", default_value = "0.0.0.0:9901", value_name = "ADDR")]
    pub admin: SocketAddr,
    /// Lowest TLS version accepted: 1.2 or 1.3.
    #[arg(long, env = "WSGATE_TLS_MIN_VERSION", default_value = "1.3", value_name = "VERSION")]
    pub tls_min_version: TlsMinVersion,
    /// Longest time from TCP accept to the 101 (e.g. 10s, 500ms).
    #[arg(long, env = "WSGATE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub handshake_timeout: Duration,
    /// Longest wait for connections to close on drain.
    #[arg(long, env = "WSGATE_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub drain_timeout: Duration,
    /// Largest WebSocket message accepted from either side, all its fragments together (e.g.
    /// 1MiB). Fragments are forwarded as they arrive; each direction holds one frame at most.
    #[arg(long, env = "WSGATE_MAX_MESSAGE_SIZE", default_value = "1MiB", value_parser = parse_size, value_name = "SIZE")]
    pub max_message_size: usize,
    /// Largest WebSocket frame accepted from either side.
    #[arg(long, env = "WSGATE_MAX_FRAME_SIZE", default_value = "1MiB", value_parser = parse_size, value_name = "SIZE")]
    pub max_frame_size: usize,
    /// Most connections open at once; more are refused at accept (default: 10000, or in a
    /// container with a memory limit as many as half of it holds at 32 KiB each: 2048 in 128Mi).
    #[arg(long, env = "WSGATE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Most connections still in their TLS handshake or upgrade, in all (default: half of
    /// --max-connections, at most 512); must be below --max-connections.
    #[arg(long, env = "WSGATE_MAX_PENDING", value_name = "N")]
    pub max_pending: Option<usize>,
    /// Most connections still in their handshake from one source address (default: half of
    /// --max-pending, at most 64); must be below --max-pending.
    #[arg(long, env = "WSGATE_MAX_PENDING_PER_IP", value_name = "N")]
    pub max_pending_per_ip: Option<usize>,
    /// Most open connections of one client identity; the next is refused with 429 (default: a
    /// tenth of --max-connections, so one client never takes the room of all the others).
    #[arg(long, env = "WSGATE_MAX_CONNECTIONS_PER_IDENTITY", value_name = "N")]
    pub max_connections_per_identity: Option<usize>,
    /// Close a connection after this long without any frame from one of its peers (each is
    /// pinged every --ping-interval, and a Pong counts); 0 turns pings and this off.
    #[arg(long, env = "WSGATE_IDLE_TIMEOUT", default_value = "90s", value_parser = parse_duration, value_name = "DURATION")]
    pub idle_timeout: Duration,
    /// How often each leg of a connection is pinged; below --idle-timeout.
    #[arg(long, env = "WSGATE_PING_INTERVAL", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub ping_interval: Duration,
    /// Longest time a peer may take to finish a message it started (Close 1008 after it).
    #[arg(long, env = "WSGATE_MESSAGE_TIMEOUT", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub message_timeout: Duration,
    /// Bytes all connections together may hold for unfinished messages beyond 64 KiB each
    /// (Close 1013 to the peer that would exceed it); default: a quarter of the container's
    /// memory limit (cgroup memory.max), or 32MiB without one.
    #[arg(long, env = "WSGATE_MEMORY_BUDGET", value_parser = parse_size, value_name = "SIZE")]
    pub memory_budget: Option<usize>,
    /// How often the certificate files are re-read even without a file event.
    #[arg(long, env = "WSGATE_RELOAD_INTERVAL", default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub reload_interval: Duration,
}

impl ProxyArgs {
    /// Validates the flags into settings.
    pub fn into_config(self) -> Result<ProxyConfig, CliError> {
        let routes = Outbound::parse_routes(&self.outbound, &self.outbound_expect, self.allow_remote_outbound_listen)?;
        let upstream = match self.upstream.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
            Some(url) => Some(Upstream::parse(url, self.allow_remote_upstream)?),
            None if routes.is_empty() => {
                return Err(CliError::invalid(
                    "--upstream",
                    "is required (the app, ws://HOST:PORT) unless --outbound routes are given",
                ));
            }
            None => None,
        };
        let policy = match (&upstream, self.allow.is_empty() && !self.allow_any_authenticated) {
            (Some(_), _) => Policy::new(&self.allow, self.allow_any_authenticated)
                .map_err(|e| CliError::invalid("--allow", e.to_string()))?,
            // Outbound only: there is no inbound listener to admit anyone to.
            (None, true) => Policy::nobody(),
            (None, false) => {
                Policy::new(&self.allow, self.allow_any_authenticated)
                    .map_err(|e| CliError::invalid("--allow", e.to_string()))?;
                Policy::nobody()
            }
        };
        if self.max_frame_size > self.max_message_size {
            return Err(CliError::invalid(
                "--max-frame-size",
                format!(
                    "{} is larger than --max-message-size {}",
                    self.max_frame_size, self.max_message_size
                ),
            ));
        }
        let max_connections = self.max_connections.unwrap_or_else(|| {
            crate::proxy::settings::max_connections_for(crate::proxy::budget::cgroup_memory_limit())
        });
        if !(1..=1_000_000).contains(&max_connections) {
            return Err(CliError::invalid("--max-connections", "must be between 1 and 1000000"));
        }
        let max_pending = match self.max_pending {
            None => crate::proxy::settings::default_max_pending(max_connections),
            Some(n) if n == 0 || n >= max_connections => {
                return Err(CliError::invalid(
                    "--max-pending",
                    format!(
                        "{n} must be between 1 and --max-connections {max_connections} - 1, so that handshakes cannot take every slot"
                    ),
                ));
            }
            Some(n) => n,
        };
        let max_pending_per_ip = match self.max_pending_per_ip {
            None => crate::proxy::settings::default_max_pending_per_ip(max_pending),
            Some(n) if n == 0 || (n >= max_pending && max_pending > 1) => {
                return Err(CliError::invalid(
                    "--max-pending-per-ip",
                    format!(
                        "{n} must be between 1 and --max-pending {max_pending} - 1, so that one address cannot take every handshake slot"
                    ),
                ));
            }
            Some(n) => n,
        };
        let max_connections_per_identity = match self.max_connections_per_identity {
            None => crate::proxy::settings::default_max_connections_per_identity(max_connections),
            Some(0) => {
                return Err(CliError::invalid(
                    "--max-connections-per-identity",
                    "must be at least 1",
                ));
            }
            Some(n) => n,
        };
        let keepalive = if self.idle_timeout.is_zero() {
            None
        } else if self.ping_interval.is_zero() || self.ping_interval >= self.idle_timeout {
            return Err(CliError::invalid(
                "--ping-interval",
                format!(
                    "{} must be more than 0 and below --idle-timeout {}",
                    go_format(self.ping_interval),
                    go_format(self.idle_timeout)
                ),
            ));
        } else {
            Some(crate::proxy::pump::Keepalive {
                ping_interval: self.ping_interval,
                idle_timeout: self.idle_timeout,
            })
        };
        if self.message_timeout.is_zero() {
            return Err(CliError::invalid("--message-timeout", "must be more than 0"));
        }
        if self.handshake_timeout.is_zero() {
            return Err(CliError::invalid("--handshake-timeout", "must be more than 0"));
        }
        if self.reload_interval < Duration::from_secs(1) {
            return Err(CliError::invalid("--reload-interval", "must be at least 1s"));
        }
        if self.outbound_dial_timeout.is_zero() {
            return Err(CliError::invalid("--outbound-dial-timeout", "must be more than 0"));
        }
        let max_per_destination = match self.outbound_max_connections_per_destination {
            None => crate::proxy::settings::default_max_connections_per_identity(max_connections),
            Some(0) => {
                return Err(CliError::invalid(
                    "--outbound-max-connections-per-destination",
                    "must be at least 1",
                ));
            }
            Some(n) => n,
        };
        Ok(ProxyConfig {
            listen: self.listen,
            upstream,
            outbound: Outbound {
                routes,
                dial_timeout: self.outbound_dial_timeout,
                max_per_destination,
            },
            cert_dir: self.cert_dir,
            trust_bundle: self.trust_bundle,
            policy,
            admin: self.admin,
            tls_min_version: self.tls_min_version,
            handshake_timeout: self.handshake_timeout,
            drain_timeout: self.drain_timeout,
            limits: Limits {
                max_message_size: self.max_message_size,
                max_frame_size: self.max_frame_size,
                max_connections,
                max_pending,
                max_pending_per_ip,
                max_connections_per_identity,
                keepalive,
                message_timeout: self.message_timeout,
                memory_budget: self.memory_budget.unwrap_or_else(crate::proxy::budget::default_budget),
            },
            reload: ReloadTiming {
                recheck: self.reload_interval,
                ..ReloadTiming::default()
            },
            otel: crate::telemetry::OtelSettings::from_env(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_read_as_go_and_kubernetes_read_them() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("90ms"), Ok(Duration::from_millis(90)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        // A bare number is seconds, as before the Go syntax was accepted.
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
    }

    #[test]
    fn durations_that_are_garbage_or_negative_are_refused_with_the_value_named() {
        let err = parse_duration("ten").unwrap_err();
        assert!(err.contains("'ten'"), "{err}");
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
        assert!(parse_duration("-5").is_err());
    }

    #[test]
    fn sizes_accept_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn go_format_writes_what_cert_manager_reads() {
        assert_eq!(go_format(Duration::from_secs(24 * 3600)), "24h");
        assert_eq!(go_format(Duration::from_secs(5400)), "1h30m");
        assert_eq!(go_format(Duration::from_secs(3661)), "1h1m1s");
        assert_eq!(go_format(Duration::ZERO), "0s");
    }

    fn inject(args: &[&str]) -> Result<crate::inject::InjectConfig, CliError> {
        let mut argv = vec!["wsgate", "inject", "--sidecar-image", "img"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Inject(a)) => a.into_config(),
            other => panic!("not an inject command: {other:?}"),
        }
    }

    #[test]
    fn renew_before_must_be_shorter_than_the_duration() {
        let err = inject(&["--cert-duration", "2h", "--cert-renew-before", "2h"]).unwrap_err();
        assert!(
            matches!(
                err,
                CliError::Invalid {
                    flag: "--cert-renew-before",
                    ..
                }
            ),
            "{err}"
        );
        let cfg = inject(&["--cert-duration", "1.5h", "--cert-renew-before", "30m"]).unwrap();
        assert_eq!(cfg.settings.cert_duration, "1h30m");
        assert_eq!(cfg.settings.cert_renew_before, "30m");
    }

    #[test]
    fn closed_sets_of_values_are_parsed_by_clap() {
        let cfg = inject(&[
            "--sidecar-image-pull-policy",
            "Always",
            "--issuer-kind",
            "Issuer",
            "--native-sidecar",
            "true",
            "--otlp-endpoint",
            "http://collector:4317",
            "--otlp-protocol",
            "grpc",
        ])
        .unwrap();
        assert_eq!(cfg.settings.pull_policy, PullPolicy::Always);
        assert_eq!(cfg.settings.issuer.kind, IssuerKind::Issuer);
        assert_eq!(cfg.settings.native, NativeSidecar::On);
        assert_eq!(
            cfg.settings.otlp,
            Some(("http://collector:4317".into(), Protocol::Grpc))
        );
        for (flag, bad) in [
            ("--sidecar-image-pull-policy", "Sometimes"),
            ("--issuer-kind", "Vault"),
            ("--otlp-protocol", "http/json"),
            ("--native-sidecar", "maybe"),
        ] {
            let argv = ["wsgate", "inject", "--sidecar-image", "img", flag, bad];
            let err = Cli::try_parse_from(argv).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue, "{flag} {bad}");
        }
    }
}
