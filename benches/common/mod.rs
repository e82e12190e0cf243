//! Shared by the benchmarks: a throwaway PKI, the release `wsgate proxy` binary in front of an
//! echo app, and an mTLS client config.
#![allow(dead_code)] // each benchmark uses part of it

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use wsgate::demo::client::config;
use wsgate::demo::pki::{Ca, Leaf, LeafSpec};
use wsgate::demo::volume::SecretVolume;

/// A running proxy (killed on drop) and what a client needs to reach it.
pub struct Bench {
    pub child: Child,
    pub listen: SocketAddr,
    pub client: Arc<rustls::ClientConfig>,
    _tmp: tempfile::TempDir,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The benchmarks' PKI: a CA, the proxy's leaf (for `localhost`) and a client's leaf.
pub fn pki() -> (Ca, Leaf, Leaf) {
    let ca = Ca::new("bench CA").unwrap();
    let server = ca
        .leaf(&LeafSpec::new("app").uri("spiffe://bench/ns/a/sa/app").dns("localhost"))
        .unwrap();
    let client = ca
        .leaf(&LeafSpec::new("c").uri("spiffe://bench/ns/a/sa/client"))
        .unwrap();
    (ca, server, client)
}

/// Starts the echo app and the release proxy in front of it, waits until it serves.
pub async fn start(extra_env: &[(&str, &str)]) -> Bench {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, server, client) = pki();
    let vol = SecretVolume::new(tmp.path().join("tls")).unwrap();
    vol.write(&[
        ("ca.crt", ca.cert_pem.as_bytes()),
        ("tls.crt", server.cert_pem.as_bytes()),
        ("tls.key", server.key_pem.as_bytes()),
    ])
    .unwrap();
    let app = wsgate::demo::echo::start().await.unwrap();
    let upstream = format!("ws://{app}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args([
            "--upstream",
            &upstream,
            "--allow-any-authenticated",
            "--log-format",
            "json",
        ])
        .arg("--cert-dir")
        .arg(vol.path())
        .env("RUST_LOG", "info,wsgate::handshake=warn")
        .envs(extra_env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut listen = None;
    loop {
        let line = lines.next().unwrap().unwrap();
        if line.contains("wsgate proxy started") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            listen = Some(v["listen"].as_str().unwrap().parse().unwrap());
        }
        if line.contains("certificate installed") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let client = config(
        Some((&client.cert_pem, &client.key_pem)),
        std::slice::from_ref(&ca.cert_der),
    )
    .unwrap();
    Bench {
        child,
        listen: listen.expect("the start-up line comes first"),
        client,
        _tmp: tmp,
    }
}

/// The proxy's resident memory, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The median of a few measurements.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
