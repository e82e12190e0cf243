//! Benchmark: memory per idle proxied connection (both legs), against the goal of at most
//! 16 KiB that the performance issue sets (the proxy issue's first goal was 20 KiB).
//!
//! Starts the release `wsgate proxy` binary in front of an echo app, opens WebSockets through it
//! in three steps of N (one message each, then idle, none closed), and reads the proxy's RSS
//! from /proc around each step. Prints each step and the median. Run with
//! `cargo bench --bench idle_memory`.

mod common;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use wsgate::demo::client::connect;

const CONNECTIONS: usize = 1000;
const STEPS: usize = 3;

#[tokio::main]
async fn main() {
    // One client identity holds every connection: room beyond the default per-identity cap
    // (a tenth of --max-connections, 1000).
    let room = (CONNECTIONS * STEPS + 200).to_string();
    let bench = common::start(&[("WSGATE_MAX_CONNECTIONS_PER_IDENTITY", room.as_str())]).await;
    let pid = bench.child.id();
    // Warm up the allocator and the runtime.
    let mut warm = Vec::new();
    for _ in 0..100 {
        let (mut ws, _) = connect(bench.listen, bench.client.clone(), "localhost", "/")
            .await
            .unwrap();
        ws.send(Message::text("warm")).await.unwrap();
        ws.next().await.unwrap().unwrap();
        warm.push(ws);
    }
    drop(warm);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Steps of N more connections, none closed in between: each step's RSS growth is what the
    // new connections hold (freed memory that the allocator keeps cannot flatter a later step).
    let mut per_conn = Vec::new();
    let mut open = Vec::with_capacity(CONNECTIONS * STEPS);
    for step in 0..STEPS {
        let before = common::rss_kib(pid);
        let t0 = Instant::now();
        for _ in 0..CONNECTIONS {
            let (mut ws, _) = connect(bench.listen, bench.client.clone(), "localhost", "/")
                .await
                .unwrap();
            ws.send(Message::text("hello")).await.unwrap();
            ws.next().await.unwrap().unwrap();
            open.push(ws);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = common::rss_kib(pid);
        let kib = (after.saturating_sub(before)) as f64 / CONNECTIONS as f64;
        println!(
            "step {step}: {} -> {} idle connections: RSS {before} KiB -> {after} KiB = {kib:.1} KiB per proxied connection ({:.1} s to open)",
            step * CONNECTIONS,
            (step + 1) * CONNECTIONS,
            t0.elapsed().as_secs_f64()
        );
        per_conn.push(kib);
    }
    println!(
        "median: {:.1} KiB per idle proxied connection (goal: at most 16 KiB)",
        common::median(per_conn)
    );
}
