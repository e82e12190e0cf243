//! Benchmark: memory per idle proxied connection (both legs), against the goal of at most
//! 20 KiB that the proxy issue sets.
//!
//! Starts the release `wsgate proxy` binary in front of an echo app, opens WebSockets through it
//! in three steps of N (one message each, then idle, none closed), and reads the proxy's RSS
//! from /proc around each step. Prints each step and the median. Run with
//! `cargo bench --bench idle_memory`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use wsgate::demo::client::{config, connect};
use wsgate::demo::pki::{Ca, LeafSpec};
use wsgate::demo::volume::SecretVolume;

const CONNECTIONS: usize = 1000;
const ROUNDS: usize = 3;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::main]
async fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("bench CA").unwrap();
    let server = ca
        .leaf(&LeafSpec::new("app").uri("spiffe://bench/ns/a/sa/app").dns("localhost"))
        .unwrap();
    let client = ca
        .leaf(&LeafSpec::new("c").uri("spiffe://bench/ns/a/sa/client"))
        .unwrap();
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
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
        ])
        .args(["--allow-any-authenticated", "--log-format", "json", "--cert-dir"])
        .arg(vol.path())
        .env("RUST_LOG", "info,wsgate::handshake=warn")
        .envs(
            std::env::var("BENCH_CHILD_ENV")
                .ok()
                .and_then(|v| v.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))),
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut listen: Option<std::net::SocketAddr> = None;
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
    let listen = listen.expect("the start-up line comes first");
    std::thread::spawn(move || for _ in lines {});
    let cfg = config(
        Some((&client.cert_pem, &client.key_pem)),
        std::slice::from_ref(&ca.cert_der),
    )
    .unwrap();
    // Warm up the allocator and the runtime.
    let mut warm = Vec::new();
    for _ in 0..100 {
        let (mut ws, _) = connect(listen, cfg.clone(), "localhost", "/").await.unwrap();
        ws.send(Message::text("warm")).await.unwrap();
        ws.next().await.unwrap().unwrap();
        warm.push(ws);
    }
    drop(warm);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Steps of N more connections, none closed in between: each step's RSS growth is what the
    // new connections hold (freed memory that the allocator keeps cannot flatter a later step).
    let mut per_conn = Vec::new();
    let mut open = Vec::with_capacity(CONNECTIONS * ROUNDS);
    for round in 0..ROUNDS {
        let before = rss_kib(pid);
        let t0 = Instant::now();
        for _ in 0..CONNECTIONS {
            let (mut ws, _) = connect(listen, cfg.clone(), "localhost", "/").await.unwrap();
            ws.send(Message::text("hello")).await.unwrap();
            ws.next().await.unwrap().unwrap();
            open.push(ws);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_kib(pid);
        let kib = (after.saturating_sub(before)) as f64 / CONNECTIONS as f64;
        println!(
            "step {round}: {} -> {} idle connections: RSS {before} KiB -> {after} KiB = {kib:.1} KiB per proxied connection ({:.1} s to open)",
            round * CONNECTIONS,
            (round + 1) * CONNECTIONS,
            t0.elapsed().as_secs_f64()
        );
        per_conn.push(kib);
    }
    per_conn.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "median: {:.1} KiB per idle proxied connection (goal: at most 20 KiB)",
        per_conn[ROUNDS / 2]
    );
    let _ = child.kill();
    let _ = child.wait();
}
