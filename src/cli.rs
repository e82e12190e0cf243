//! The command line: subcommands and flags, each flag with a `WSGATE_…` environment twin.
//!
//! Parsing is the only thing done here; the typed, validated settings live in `config`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::authz::Policy;
use crate::config::{self, ConfigError, LogFormat, ProxyConfig, ReloadTiming, TlsMinVersion, Upstream};

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
    /// Run the inbound mTLS WebSocket sidecar.
    Proxy(Box<ProxyArgs>),
    /// Run everything on this machine with throwaway certificates and show rotation at work.
    Demo,
}

/// Flags of `wsgate proxy`.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Address of the mTLS listener.
    #[arg(long, env = "WSGATE_LISTEN", default_value = "0.0.0.0:8443", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// The app, as ws://HOST:PORT (loopback unless --allow-remote-upstream).
    #[arg(long, env = "WSGATE_UPSTREAM", value_name = "URL")]
    pub upstream: String,
    /// Allow an upstream that is not on loopback.
    #[arg(long, env = "WSGATE_ALLOW_REMOTE_UPSTREAM")]
    pub allow_remote_upstream: bool,
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
    /// dns:NAME ('*' one label) or cn:NAME.
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
    #[arg(long, env = "WSGATE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = config::parse_duration, value_name = "DURATION")]
    pub handshake_timeout: Duration,
    /// Longest wait for connections to close on drain.
    #[arg(long, env = "WSGATE_DRAIN_TIMEOUT", default_value = "30s", value_parser = config::parse_duration, value_name = "DURATION")]
    pub drain_timeout: Duration,
    /// Largest WebSocket message accepted from either side (e.g. 4MiB).
    #[arg(long, env = "WSGATE_MAX_MESSAGE_SIZE", default_value = "4MiB", value_parser = config::parse_size, value_name = "SIZE")]
    pub max_message_size: usize,
    /// Largest WebSocket frame accepted from either side.
    #[arg(long, env = "WSGATE_MAX_FRAME_SIZE", default_value = "1MiB", value_parser = config::parse_size, value_name = "SIZE")]
    pub max_frame_size: usize,
    /// Most connections open at once; more are refused at accept.
    #[arg(long, env = "WSGATE_MAX_CONNECTIONS", default_value_t = 10_000, value_name = "N")]
    pub max_connections: usize,
    /// How often the certificate files are re-read even without a file event.
    #[arg(long, env = "WSGATE_RELOAD_INTERVAL", default_value = "30s", value_parser = config::parse_duration, value_name = "DURATION")]
    pub reload_interval: Duration,
}

impl ProxyArgs {
    /// Validates the flags into settings.
    pub fn into_config(self) -> Result<ProxyConfig, ConfigError> {
        let upstream = Upstream::parse(&self.upstream, self.allow_remote_upstream)?;
        let policy = Policy::new(&self.allow, self.allow_any_authenticated)
            .map_err(|e| ConfigError::invalid("--allow", e.to_string()))?;
        if self.max_frame_size > self.max_message_size {
            return Err(ConfigError::invalid(
                "--max-frame-size",
                format!(
                    "{} is larger than --max-message-size {}",
                    self.max_frame_size, self.max_message_size
                ),
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::invalid("--max-connections", "must be at least 1"));
        }
        if self.handshake_timeout.is_zero() {
            return Err(ConfigError::invalid("--handshake-timeout", "must be more than 0"));
        }
        if self.reload_interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid("--reload-interval", "must be at least 1s"));
        }
        Ok(ProxyConfig {
            listen: self.listen,
            upstream,
            cert_dir: self.cert_dir,
            trust_bundle: self.trust_bundle,
            policy,
            admin: self.admin,
            tls_min_version: self.tls_min_version,
            handshake_timeout: self.handshake_timeout,
            drain_timeout: self.drain_timeout,
            limits: config::Limits {
                max_message_size: self.max_message_size,
                max_frame_size: self.max_frame_size,
                max_connections: self.max_connections,
            },
            reload: ReloadTiming {
                recheck: self.reload_interval,
                ..ReloadTiming::default()
            },
            otel: crate::telemetry::OtelSettings::from_env(),
        })
    }
}
