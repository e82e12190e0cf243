//! Validated, typed settings of `wsgate proxy`: the app behind it, its limits, and the whole
//! `ProxyConfig` the command line builds.
//!
//! Pure: parsing is unit-tested here; an error is a usage error (exit 64) raised before any port
//! is bound. Depends on `authz` (the allow policy), `certs` (reload timing), `tls` (the minimum
//! version) and `telemetry` (the OTLP settings): the types of the modules that use them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::authz::Policy;
use crate::certs::ReloadTiming;
use crate::telemetry::OtelSettings;
use crate::tls::TlsMinVersion;

/// Why a setting was refused. Every message names the flag and the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    /// A flag's value could not be parsed.
    #[error("{flag}: {reason}")]
    Invalid {
        /// The flag, e.g. `--listen`.
        flag: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
}

impl SettingsError {
    /// Shorthand for an [`SettingsError::Invalid`] naming `flag`.
    pub fn invalid(flag: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            flag,
            reason: reason.into(),
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
    pub fn parse(url: &str, allow_remote: bool) -> Result<Self, SettingsError> {
        let flag = "--upstream";
        let uri: http::Uri = url
            .parse()
            .map_err(|e| SettingsError::invalid(flag, format!("'{url}' is not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("ws") => {}
            Some(other) => {
                return Err(SettingsError::invalid(
                    flag,
                    format!("'{url}': scheme {other} is not supported, the app is dialled over plain ws://"),
                ));
            }
            None => {
                return Err(SettingsError::invalid(
                    flag,
                    format!("'{url}' has no scheme: write ws://HOST:PORT"),
                ));
            }
        }
        let authority = uri
            .authority()
            .ok_or_else(|| SettingsError::invalid(flag, format!("'{url}' has no host")))?;
        if let Some(pq) = uri.path_and_query()
            && (pq.as_str() != "/" && !pq.as_str().is_empty())
        {
            return Err(SettingsError::invalid(
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
            return Err(SettingsError::invalid(
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
    /// Most connections still in their handshake (TLS and upgrade), in all; below
    /// `max_connections`, so unauthenticated peers can never fill every slot.
    pub max_pending: usize,
    /// Most connections still in their handshake from one source address.
    pub max_pending_per_ip: usize,
    /// Most open connections of one client identity; the next gets 429.
    pub max_connections_per_identity: usize,
    /// Keep-alive pings and the idle timeout; `None` turns both off.
    pub keepalive: Option<super::pump::Keepalive>,
    /// Longest time a peer may take to finish a message it started.
    pub message_timeout: Duration,
    /// Bytes all connections together may hold for unfinished messages beyond each one's
    /// allowance (see `proxy::budget`).
    pub memory_budget: usize,
}

/// `max_pending` when not given: half of `max_connections`, at most this.
pub const DEFAULT_MAX_PENDING: usize = 512;
/// `max_pending_per_ip` when not given: half of `max_pending`, at most this.
pub const DEFAULT_MAX_PENDING_PER_IP: usize = 64;
/// `max_connections` without a memory limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// What one open connection is reckoned to cost when the default `max_connections` is fitted to
/// a memory limit: about 20 KiB idle (both legs, measured), with room for buffers in use.
pub const CONNECTION_COST: usize = 32 * 1024;

/// The default `max_connections` for a memory limit (`None`: no limit): as many connections
/// as half of the limit holds at [`CONNECTION_COST`] each (2048 in a 128 MiB sidecar), at most
/// [`DEFAULT_MAX_CONNECTIONS`]; the other half is for the memory budget and the rest of the
/// process. Without a limit, [`DEFAULT_MAX_CONNECTIONS`].
pub fn max_connections_for(limit: Option<usize>) -> usize {
    match limit {
        Some(bytes) => (bytes / 2 / CONNECTION_COST).clamp(64, DEFAULT_MAX_CONNECTIONS),
        None => DEFAULT_MAX_CONNECTIONS,
    }
}

/// The default `max_connections_per_identity`: a tenth of `max_connections`, so one allowed
/// client can never take the room of all the others (1000 of the default 10 000).
pub fn default_max_connections_per_identity(max_connections: usize) -> usize {
    (max_connections / 10).max(1)
}
/// Default keep-alive: a ping every 30 s, closed after 90 s of silence (three missed pongs).
pub const DEFAULT_KEEPALIVE: super::pump::Keepalive = super::pump::Keepalive {
    ping_interval: Duration::from_secs(30),
    idle_timeout: Duration::from_secs(90),
};
/// Default `message_timeout`.
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The default `max_pending_per_ip` for a given `max_pending`: one address never holds more than
/// half of the handshake slots.
pub fn default_max_pending_per_ip(max_pending: usize) -> usize {
    (max_pending / 2).clamp(1, DEFAULT_MAX_PENDING_PER_IP)
}

/// The default `max_pending` for a given `max_connections`.
pub fn default_max_pending(max_connections: usize) -> usize {
    (max_connections / 2).clamp(1, DEFAULT_MAX_PENDING)
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: 1 << 20,
            max_frame_size: 1 << 20,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending: default_max_pending(DEFAULT_MAX_CONNECTIONS),
            max_pending_per_ip: default_max_pending_per_ip(default_max_pending(DEFAULT_MAX_CONNECTIONS)),
            max_connections_per_identity: default_max_connections_per_identity(DEFAULT_MAX_CONNECTIONS),
            keepalive: Some(DEFAULT_KEEPALIVE),
            message_timeout: DEFAULT_MESSAGE_TIMEOUT,
            memory_budget: super::budget::default_budget(),
        }
    }
}

/// Everything `wsgate proxy` needs, validated.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where the mTLS listener binds (not bound when there is no upstream: outbound only).
    pub listen: SocketAddr,
    /// The app behind the proxy; `None` for a client-only pod (outbound only, no inbound
    /// listener).
    pub upstream: Option<Upstream>,
    /// The outbound routes (`--outbound`) and their limits.
    pub outbound: Outbound,
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
    pub otel: OtelSettings,
}

/// Where an outbound route dials: `wss://HOST:PORT`, verified as `HOST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// The URL as given.
    pub url: String,
    /// Host, port, and the address when the host is an IP literal (else resolved at each dial).
    pub target: Upstream,
    /// The name the remote's certificate must carry (a DNS SAN, or an IP SAN for a literal).
    pub server_name: rustls_pki_types::ServerName<'static>,
}

impl Remote {
    /// Parses `wss://HOST[:PORT]` (port 443 by default). The app's own path and query are
    /// forwarded, so the URL takes none; plain `ws://` is refused: the remote is dialled over
    /// mTLS.
    pub fn parse(flag: &'static str, url: &str) -> Result<Self, SettingsError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| SettingsError::invalid(flag, format!("remote '{url}' is not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("wss") => {}
            Some(other) => {
                return Err(SettingsError::invalid(
                    flag,
                    format!(
                        "remote '{url}': scheme {other} is not supported, the remote is dialled over mTLS: write wss://HOST:PORT"
                    ),
                ));
            }
            None => {
                return Err(SettingsError::invalid(
                    flag,
                    format!("remote '{url}' has no scheme: write wss://HOST:PORT"),
                ));
            }
        }
        let authority = uri
            .authority()
            .ok_or_else(|| SettingsError::invalid(flag, format!("remote '{url}' has no host")))?;
        if authority.as_str().contains('@') {
            return Err(SettingsError::invalid(
                flag,
                format!("remote '{url}': user info is not supported"),
            ));
        }
        if let Some(pq) = uri.path_and_query()
            && (pq.as_str() != "/" && !pq.as_str().is_empty())
        {
            return Err(SettingsError::invalid(
                flag,
                format!(
                    "remote '{url}' has a path or query: the app's own path and query are forwarded, write wss://HOST:PORT"
                ),
            ));
        }
        let port = match authority.port() {
            None => 443,
            Some(p) => match p.as_str().parse::<u16>() {
                Ok(0) | Err(_) => {
                    return Err(SettingsError::invalid(
                        flag,
                        format!("remote '{url}': '{}' is not a port (1-65535)", p.as_str()),
                    ));
                }
                Ok(n) => n,
            },
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let server_name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| SettingsError::invalid(flag, format!("remote '{url}': '{host}' is not a host name: {e}")))?;
        let addr = host.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, port));
        Ok(Self {
            url: url.to_owned(),
            target: Upstream { host, port, addr },
            server_name,
        })
    }
}

/// One `--outbound LOCAL=REMOTE` route: a plain `ws://` listener for the app, dialling the
/// remote over mTLS.
#[derive(Debug, Clone)]
pub struct OutboundRoute {
    /// Where the app connects (loopback unless `--allow-remote-outbound-listen`).
    pub local: SocketAddr,
    /// Where it is forwarded.
    pub remote: Remote,
    /// The identities the remote's certificate must carry one of (`--outbound-expect`), with
    /// the patterns as given; `None`: any certificate that chains to the roots and names the host.
    pub expect: Option<(Policy, Vec<String>)>,
}

/// The outbound direction: its routes and the limits that apply to outbound connections only.
/// The default has no route and the flags' default limits (a zero cap or timeout would refuse
/// every connection).
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The routes; empty when the proxy only serves inbound.
    pub routes: Vec<OutboundRoute>,
    /// Longest time to connect to the remote, finish TLS and get its answer to the upgrade
    /// (504 after it).
    pub dial_timeout: Duration,
    /// Most connections open at once to one remote (`host:port`); the next gets 429.
    pub max_per_destination: usize,
}

/// Default `--outbound-dial-timeout`.
pub const DEFAULT_OUTBOUND_DIAL_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for Outbound {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            dial_timeout: DEFAULT_OUTBOUND_DIAL_TIMEOUT,
            max_per_destination: default_max_connections_per_identity(DEFAULT_MAX_CONNECTIONS),
        }
    }
}

impl Outbound {
    /// Parses the `--outbound LOCAL=REMOTE` and `--outbound-expect LOCAL=PATTERN` flags. Every
    /// message names the flag and the value: a missing `=`, a LOCAL that is not `IP:PORT` or not
    /// on loopback (unless `allow_remote_listen`), a remote that is not `wss://HOST:PORT`, a LOCAL
    /// given twice, an expectation for a LOCAL no route has, or a bad pattern.
    pub fn parse_routes(
        routes: &[String],
        expects: &[String],
        allow_remote_listen: bool,
    ) -> Result<Vec<OutboundRoute>, SettingsError> {
        const FLAG: &str = "--outbound";
        const EXPECT: &str = "--outbound-expect";
        let mut out: Vec<OutboundRoute> = Vec::with_capacity(routes.len());
        for spec in routes.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let (local, remote) = spec.split_once('=').ok_or_else(|| {
                SettingsError::invalid(
                    FLAG,
                    format!("'{spec}' has no '=': write LOCAL=REMOTE, e.g. 127.0.0.1:9001=wss://chat.shop.svc.cluster.local:8443"),
                )
            })?;
            let local = parse_local(FLAG, spec, local.trim())?;
            if !local.ip().is_loopback() && !allow_remote_listen {
                return Err(SettingsError::invalid(
                    FLAG,
                    format!(
                        "'{spec}': LOCAL {local} is not on loopback: the app dials its own sidecar; pass --allow-remote-outbound-listen to listen there anyway"
                    ),
                ));
            }
            if out.iter().any(|r| r.local == local) {
                return Err(SettingsError::invalid(
                    FLAG,
                    format!("'{spec}': LOCAL {local} is given twice"),
                ));
            }
            let remote = Remote::parse(FLAG, remote.trim())?;
            out.push(OutboundRoute {
                local,
                remote,
                expect: None,
            });
        }
        let mut patterns: Vec<Vec<String>> = vec![Vec::new(); out.len()];
        for spec in expects.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let (local, pattern) = spec.split_once('=').ok_or_else(|| {
                SettingsError::invalid(
                    EXPECT,
                    format!("'{spec}' has no '=': write LOCAL=PATTERN, e.g. 127.0.0.1:9001=spiffe://cluster.local/ns/shop/sa/chat"),
                )
            })?;
            let local = parse_local(EXPECT, spec, local.trim())?;
            let Some(i) = out.iter().position(|r| r.local == local) else {
                return Err(SettingsError::invalid(
                    EXPECT,
                    format!("'{spec}': no --outbound route listens on {local}"),
                ));
            };
            let pattern = pattern.trim();
            Policy::check_pattern(pattern).map_err(|e| SettingsError::invalid(EXPECT, format!("'{spec}': {e}")))?;
            patterns[i].push(pattern.to_owned());
        }
        for (route, patterns) in out.iter_mut().zip(patterns) {
            if !patterns.is_empty() {
                let policy =
                    Policy::new(&patterns, false).map_err(|e| SettingsError::invalid(EXPECT, e.to_string()))?;
                route.expect = Some((policy, patterns));
            }
        }
        Ok(out)
    }
}

fn parse_local(flag: &'static str, spec: &str, local: &str) -> Result<SocketAddr, SettingsError> {
    local.parse::<SocketAddr>().map_err(|_| {
        let why = match local.rsplit_once(':') {
            Some((host, port)) if host.parse::<IpAddr>().is_ok() || host.starts_with('[') => {
                format!("'{port}' is not a port (0-65535)")
            }
            Some(_) | None => "write an IP address and a port, e.g. 127.0.0.1:9001".to_owned(),
        };
        SettingsError::invalid(flag, format!("'{spec}': LOCAL '{local}' is not IP:PORT: {why}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_connection_limits_fit_the_containers_memory() {
        assert_eq!(max_connections_for(None), 10_000);
        assert_eq!(max_connections_for(Some(128 << 20)), 2048);
        assert_eq!(max_connections_for(Some(64 << 30)), 10_000);
        assert_eq!(max_connections_for(Some(1 << 20)), 64);
        assert_eq!(default_max_connections_per_identity(10_000), 1000);
        assert_eq!(default_max_connections_per_identity(2048), 204);
        assert_eq!(default_max_connections_per_identity(5), 1);
        // In a 128 MiB sidecar, the connections at their idle cost and the budget fit.
        let limit = 128 << 20;
        let worst = max_connections_for(Some(limit)) * 20 * 1024 + crate::proxy::budget::budget_for(Some(limit));
        assert!(worst < limit, "{worst} bytes in a {limit}-byte container");
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

    fn routes(r: &[&str], e: &[&str]) -> Result<Vec<OutboundRoute>, SettingsError> {
        let r: Vec<String> = r.iter().map(|s| s.to_string()).collect();
        let e: Vec<String> = e.iter().map(|s| s.to_string()).collect();
        Outbound::parse_routes(&r, &e, false)
    }

    #[test]
    fn outbound_routes_parse_with_their_expectations() {
        let r = routes(
            &[
                "127.0.0.1:9001=wss://chat.shop.svc.cluster.local:8443",
                "[::1]:9002=wss://10.0.0.7",
            ],
            &["127.0.0.1:9001=spiffe://cluster.local/ns/shop/sa/chat"],
        )
        .unwrap();
        assert_eq!(r[0].local, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(r[0].remote.target.authority(), "chat.shop.svc.cluster.local:8443");
        assert_eq!(r[0].remote.target.addr, None);
        assert_eq!(
            r[0].expect.as_ref().unwrap().1,
            ["spiffe://cluster.local/ns/shop/sa/chat"]
        );
        assert_eq!(r[1].remote.target.addr, Some("10.0.0.7:443".parse().unwrap()));
        assert!(r[1].expect.is_none());
    }

    #[test]
    fn bad_outbound_routes_are_refused_naming_the_problem() {
        let err = |r: &[&str], e: &[&str]| routes(r, e).unwrap_err().to_string();
        assert!(err(&["127.0.0.1:9001"], &[]).contains("no '='"));
        assert!(err(&["127.0.0.1:9001=ws://a:1"], &[]).contains("wss://"));
        assert!(err(&["127.0.0.1:99999=wss://a:1"], &[]).contains("not a port"));
        assert!(err(&["127.0.0.1:9001=wss://a:0"], &[]).contains("not a port"));
        assert!(err(&["127.0.0.1:9001=wss://a:1/chat"], &[]).contains("path"));
        assert!(err(&["10.0.0.1:9001=wss://a:1"], &[]).contains("--allow-remote-outbound-listen"));
        assert!(err(&["127.0.0.1:9001=wss://a:1", "127.0.0.1:9001=wss://b:1"], &[]).contains("twice"));
        assert!(err(&["127.0.0.1:9001=wss://a:1"], &["127.0.0.1:9002=spiffe://td/x"]).contains("no --outbound route"));
        assert!(err(&["127.0.0.1:9001=wss://a:1"], &["127.0.0.1:9001=spiffe://td/fr*nt"]).contains("fr*nt"));
        let ok = Outbound::parse_routes(&["0.0.0.0:9001=wss://a:1".into()], &[], true).unwrap();
        assert_eq!(ok[0].local.port(), 9001);
    }
}
