//! Benchmark: the server's CPU per full mTLS TLS 1.3 handshake, by crypto provider and by what
//! the client offers.
//!
//! In process, no sockets: a rustls `ClientConnection` and wsgate's own `ServerConnection`
//! (built by `tls::server::server_config_with`, client certificate required and verified) pass
//! their bytes through memory. Only the server's calls (`ServerConnection::new`, `read_tls`,
//! `process_new_packets`, `write_tls`) are timed, with the thread's CPU clock, so neither the
//! client's work nor another process on the machine is counted. Setting: TLS 1.3,
//! AES-128-GCM, ECDSA P-256 certificates on both sides, no resumption.
//!
//! Clients: "classic" offers X25519 only; "hybrid" offers X25519MLKEM768 then X25519 and sends
//! both key shares (as rustls, Chrome and Go do). Arms run in interleaved rounds (forward,
//! then backward), and each arm's result is the median over rounds of its mean per handshake.
//!
//! `cargo bench --bench handshake` measures aws-lc-rs (wsgate's provider) only;
//! `cargo bench --bench handshake --features bench-ring` adds ring's provider for comparison.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::time::{ClockId, clock_gettime};
use rustls::crypto::aws_lc_rs::{cipher_suite, kx_group};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, HandshakeKind, ServerConfig, ServerConnection};
use wsgate::certs::{CertBundle, RawSet, Usage};
use wsgate::demo::pki::{Ca, Leaf};
use wsgate::tls::TlsMinVersion;

use common::median;

const ROUNDS: usize = 31;
const PER_ROUND: usize = 200;

/// One measured combination: a server config (one provider) and a client config.
struct Arm {
    name: String,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    per_round_us: Vec<f64>,
}

fn thread_cpu() -> Duration {
    let ts = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
    Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32)
}

/// One full handshake; returns the server's CPU time, its negotiated group and handshake kind.
fn handshake(server_cfg: &Arc<ServerConfig>, client_cfg: &Arc<ClientConfig>) -> (Duration, String, HandshakeKind) {
    let name = ServerName::try_from("localhost").unwrap();
    let mut client = ClientConnection::new(client_cfg.clone(), name).unwrap();
    let mut spent = Duration::ZERO;
    let t = thread_cpu();
    let mut server = ServerConnection::new(server_cfg.clone()).unwrap();
    spent += thread_cpu() - t;
    let mut to_server = Vec::with_capacity(8192);
    let mut to_client = Vec::with_capacity(8192);
    while client.is_handshaking() || server.is_handshaking() || client.wants_write() || server.wants_write() {
        while client.wants_write() {
            client.write_tls(&mut to_server).unwrap();
        }
        let t = thread_cpu();
        let mut input = &to_server[..];
        while !input.is_empty() {
            server.read_tls(&mut input).unwrap();
            server.process_new_packets().unwrap();
        }
        let mut output = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut output).unwrap();
        }
        spent += thread_cpu() - t;
        to_server.clear();
        to_client.extend_from_slice(&output);
        let mut input = &to_client[..];
        while !input.is_empty() {
            client.read_tls(&mut input).unwrap();
            client.process_new_packets().unwrap();
        }
        to_client.clear();
    }
    let group = server
        .negotiated_key_exchange_group()
        .map(|g| format!("{:?}", g.name()))
        .unwrap_or_default();
    let kind = server.handshake_kind().unwrap();
    (spent, group, kind)
}

/// wsgate's test client (presenting `leaf`), limited to AES-128-GCM and to `groups`, without
/// resumption: every handshake is a full one.
fn client_config(groups: &[&'static dyn SupportedKxGroup], ca: &Ca, leaf: &Leaf) -> Arc<ClientConfig> {
    let provider = CryptoProvider {
        cipher_suites: vec![cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: groups.to_vec(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    let config = wsgate::demo::client::config_with_provider(
        Some((&leaf.cert_pem, &leaf.key_pem)),
        std::slice::from_ref(&ca.cert_der),
        Arc::new(provider),
    )
    .unwrap();
    let mut config = Arc::unwrap_or_clone(config);
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

fn main() {
    let (ca, server_leaf, client_leaf) = common::pki();
    let raw = RawSet {
        cert: server_leaf.cert_pem.clone().into_bytes(),
        key: server_leaf.key_pem.clone().into_bytes(),
        ca: Some(ca.cert_pem.clone().into_bytes()),
        trust: None,
    };
    let server_for = |provider: Arc<CryptoProvider>| {
        let bundle = CertBundle::from_raw(&raw, Usage::Server, SystemTime::now(), &provider).unwrap();
        wsgate::tls::server::server_config_with(&bundle, TlsMinVersion::Tls13, provider).unwrap()
    };
    let servers = [
        ("aws-lc-rs", server_for(wsgate::tls::provider())),
        #[cfg(feature = "bench-ring")]
        ("ring", server_for(Arc::new(rustls::crypto::ring::default_provider()))),
    ];
    let clients = [
        ("classic", client_config(&[kx_group::X25519], &ca, &client_leaf)),
        (
            "hybrid",
            client_config(&[kx_group::X25519MLKEM768, kx_group::X25519], &ca, &client_leaf),
        ),
    ];

    let mut arms = Vec::new();
    for (client_name, client) in &clients {
        for (server_name, server) in &servers {
            let (_, group, kind) = handshake(server, client);
            assert_eq!(kind, HandshakeKind::Full, "{server_name} with a {client_name} client");
            arms.push(Arm {
                name: format!("{server_name:<9} {client_name:<7} client → {group}"),
                server: server.clone(),
                client: client.clone(),
                per_round_us: Vec::new(),
            });
        }
    }
    // Warm-up: caches, allocator, CPU frequency.
    for arm in &arms {
        for _ in 0..PER_ROUND / 2 {
            handshake(&arm.server, &arm.client);
        }
    }
    for round in 0..ROUNDS {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..arms.len()).collect()
        } else {
            (0..arms.len()).rev().collect()
        };
        for i in order {
            let arm = &mut arms[i];
            let total: Duration = (0..PER_ROUND).map(|_| handshake(&arm.server, &arm.client).0).sum();
            arm.per_round_us.push(total.as_secs_f64() * 1e6 / PER_ROUND as f64);
        }
    }

    println!("server CPU per full mTLS TLS 1.3 handshake (µs), median of {ROUNDS} rounds × {PER_ROUND} handshakes");
    for arm in &arms {
        let min = arm.per_round_us.iter().copied().fold(f64::INFINITY, f64::min);
        let max = arm.per_round_us.iter().copied().fold(0.0, f64::max);
        println!(
            "  {:<48} {:>7.1}  (rounds {min:.1}..{max:.1})",
            arm.name,
            median(arm.per_round_us.clone())
        );
    }
    // Ratios within each round, then their median: robust to a slower or busier round.
    let ratio = |a: usize, b: usize| {
        let per_round: Vec<f64> = arms[a]
            .per_round_us
            .iter()
            .zip(&arms[b].per_round_us)
            .map(|(x, y)| x / y)
            .collect();
        median(per_round)
    };
    let n = servers.len();
    for (c, (client_name, _)) in clients.iter().enumerate() {
        for s in 1..n {
            println!(
                "  {client_name} client: {} / {} = {:.2}",
                servers[s].0,
                servers[0].0,
                ratio(c * n + s, c * n)
            );
        }
    }
    println!("  aws-lc-rs: hybrid / classic client = {:.2}", ratio(n, 0));
}
