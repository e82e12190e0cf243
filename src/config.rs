//! Validated, typed settings for `wsgate proxy`, and the pure parsers behind them.
//!
//! Everything here is parsed once at start-up; an error is a usage error (exit 64) raised before
//! any port is bound. Depends on `authz` (the allow policy is part of the settings) and std only.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::authz::Policy;

/// Why a setting was refused. Every message names the flag and the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A flag's value could not be parsed.
    #[error("{flag}: {reason}")]
    Invalid {
        /// The flag, e.g. `--listen`.
        flag: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
}

impl ConfigError {
    /// Shorthand for an [`ConfigError::Invalid`] naming `flag`.
    pub fn invalid(flag: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            flag,
            reason: reason.into(),
        }
    }
}

/// The lowest TLS version the proxy accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMinVersion {
    /// TLS 1.2 and 1.3.
    Tls12,
    /// TLS 1.3 only (the default: every current client speaks it).
    Tls13,
}

impl std::str::FromStr for TlsMinVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "1.2" => Ok(Self::Tls12),
            "1.3" => Ok(Self::Tls13),
            other => Err(format!("'{other}' is not a TLS version: use 1.2 or 1.3")),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable key=value lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("'{other}' is not a log format: use text or json")),
        }
    }
}

/// Where the app listens: the plain `ws://` upstream inside the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The host as written in the URL (`127.0.0.1`, `localhost`, `app.local`).
    pub host: String,
    /// The TCP port.
    pub port: u16,
    /// The resolved address when the host is an IP literal or `localhost`; `None` means resolve
    /// the name at each dial (only possible with `--allow-remote-upstream`).
    pub addr: Option<SocketAddr>,
}

impl Upstream {
    /// Parses `ws://HOST:PORT`. The client's path and query are forwarded as they are, so the URL
    /// takes no path of its own; a non-loopback host is refused unless `allow_remote` is set.
    pub fn parse(url: &str, allow_remote: bool) -> Result<Self, ConfigError> {
        let flag = "--upstream";
        let uri: http::Uri = url
            .parse()
            .map_err(|e| ConfigError::invalid(flag, format!("'{url}' is not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("ws") => {}
            Some(other) => {
                return Err(ConfigError::invalid(
                    flag,
                    format!("'{url}': scheme {other} is not supported, the app is dialled over plain ws://"),
                ));
            }
            None => {
                return Err(ConfigError::invalid(
                    flag,
                    format!("'{url}' has no scheme: write ws://HOST:PORT"),
                ));
            }
        }
        let authority = uri
            .authority()
            .ok_or_else(|| ConfigError::invalid(flag, format!("'{url}' has no host")))?;
        if let Some(pq) = uri.path_and_query()
            && (pq.as_str() != "/" && !pq.as_str().is_empty())
        {
            return Err(ConfigError::invalid(
                flag,
                format!(
                    "'{url}' has a path or query: the client's own path and query are forwarded, write ws://HOST:PORT"
                ),
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(80);
        let ip = if host.eq_ignore_ascii_case("localhost") {
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        } else {
            host.parse::<IpAddr>().ok()
        };
        let loopback = ip.is_some_and(|ip| ip.is_loopback());
        if !loopback && !allow_remote {
            return Err(ConfigError::invalid(
                flag,
                format!(
                    "'{url}' is not on loopback: the app runs in the same pod; pass --allow-remote-upstream to dial it anyway"
                ),
            ));
        }
        Ok(Self {
            host,
            port,
            addr: ip.map(|ip| SocketAddr::new(ip, port)),
        })
    }

    /// `HOST:PORT`, as written in logs and span attributes.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Limits that protect the proxy (and the app) from hostile or runaway peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest WebSocket message accepted from either side, in bytes.
    pub max_message_size: usize,
    /// Largest single WebSocket frame accepted from either side, in bytes.
    pub max_frame_size: usize,
    /// Most connections (handshaking or open) at once; more are refused at accept.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: 1 << 20,
            max_frame_size: 1 << 20,
            max_connections: 10_000,
        }
    }
}

/// Timings of the certificate watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadTiming {
    /// Quiet time after a file event before the set is read (the kubelet writes several entries).
    pub debounce: Duration,
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
            recheck: Duration::from_secs(30),
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// Everything `wsgate proxy` needs, validated.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where the mTLS listener binds.
    pub listen: SocketAddr,
    /// The app behind the proxy.
    pub upstream: Upstream,
    /// The mounted Secret volume: `tls.crt`, `tls.key`, `ca.crt`.
    pub cert_dir: PathBuf,
    /// A PEM file or mounted ConfigMap directory that replaces `ca.crt` as the trust roots.
    pub trust_bundle: Option<PathBuf>,
    /// Who may connect.
    pub policy: Policy,
    /// Where `/healthz`, `/readyz`, `/metrics` and `/drain` are served.
    pub admin: SocketAddr,
    /// Lowest TLS version accepted.
    pub tls_min_version: TlsMinVersion,
    /// From TCP accept to the 101 (or the refusal), at most this long.
    pub handshake_timeout: Duration,
    /// On drain, wait at most this long for connections to close.
    pub drain_timeout: Duration,
    /// Size and count limits.
    pub limits: Limits,
    /// Certificate watcher timings.
    pub reload: ReloadTiming,
    /// OpenTelemetry export (from the `OTEL_*` variables); off by default.
    pub otel: crate::telemetry::OtelSettings,
}

/// Parses a duration: `250ms`, `10s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration: write e.g. 500ms, 10s, 2m"))?;
    let scale = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("'{s}': unknown unit '{unit}', use ms, s, m or h")),
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a size in bytes: `4096`, `64KiB`, `16MiB` (also `k`/`K`/`KB` = KiB, `M`/`MB` = MiB).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_units_and_bare_seconds() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn durations_reject_garbage_with_the_value_named() {
        let err = parse_duration("ten").unwrap_err();
        assert!(err.contains("'ten'"), "{err}");
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("").is_err());
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
    fn loopback_upstreams_are_accepted() {
        let up = Upstream::parse("ws://127.0.0.1:8080", false).unwrap();
        assert_eq!(up.addr, Some("127.0.0.1:8080".parse().unwrap()));
        let up = Upstream::parse("ws://localhost:9000/", false).unwrap();
        assert_eq!(up.addr, Some("127.0.0.1:9000".parse().unwrap()));
        let up = Upstream::parse("ws://[::1]:81", false).unwrap();
        assert_eq!(up.addr, Some("[::1]:81".parse().unwrap()));
        assert_eq!(up.authority(), "[::1]:81");
        assert_eq!(Upstream::parse("ws://127.0.0.1", false).unwrap().port, 80);
    }

    #[test]
    fn remote_upstreams_need_the_explicit_flag() {
        let err = Upstream::parse("ws://10.0.0.7:8080", false).unwrap_err();
        assert!(err.to_string().contains("--allow-remote-upstream"), "{err}");
        assert!(Upstream::parse("ws://app.example:8080", false).is_err());
        let up = Upstream::parse("ws://app.example:8080", true).unwrap();
        assert_eq!(up.addr, None);
        assert_eq!(up.authority(), "app.example:8080");
    }

    #[test]
    fn upstreams_with_wrong_scheme_or_a_path_are_refused() {
        assert!(
            Upstream::parse("wss://127.0.0.1:8080", false)
                .unwrap_err()
                .to_string()
                .contains("plain ws://")
        );
        assert!(Upstream::parse("127.0.0.1:8080", false).is_err());
        assert!(
            Upstream::parse("ws://127.0.0.1:8080/chat", false)
                .unwrap_err()
                .to_string()
                .contains("path")
        );
        assert!(Upstream::parse("not a url", false).is_err());
    }

    #[test]
    fn tls_versions_and_log_formats_parse() {
        assert_eq!("1.2".parse::<TlsMinVersion>(), Ok(TlsMinVersion::Tls12));
        assert_eq!("1.3".parse::<TlsMinVersion>(), Ok(TlsMinVersion::Tls13));
        assert!("1.1".parse::<TlsMinVersion>().is_err());
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("xml".parse::<LogFormat>().is_err());
    }
}
