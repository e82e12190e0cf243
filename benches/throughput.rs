//! Benchmark: message throughput through the proxy, client → wsgate (mTLS) → echo app → back.
//!
//! One client keeps a window of messages in flight and counts echoes per second, for small and
//! large messages; five runs each, median printed. The same machine runs the client, the echo app
//! and the proxy, so compare numbers from one run only. `cargo bench --bench throughput`.

mod common;

use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{Bytes, Message};
use wsgate::demo::client::connect;

const RUNS: usize = 5;
const WINDOW: usize = 32;

async fn run(bench: &common::Bench, size: usize, count: usize) -> f64 {
    let (ws, _) = connect(bench.listen, bench.client.clone(), "localhost", "/")
        .await
        .unwrap();
    let (mut tx, mut rx) = ws.split();
    let payload = Bytes::from(vec![0x5au8; size]);
    let t0 = Instant::now();
    let sender = {
        let payload = payload.clone();
        let (permits_tx, mut permits_rx) = tokio::sync::mpsc::channel::<()>(WINDOW);
        for _ in 0..WINDOW {
            permits_tx.send(()).await.unwrap();
        }
        let send = tokio::spawn(async move {
            for _ in 0..count {
                permits_rx.recv().await.unwrap();
                tx.send(Message::Binary(payload.clone())).await.unwrap();
            }
            tx
        });
        let mut received = 0;
        while received < count {
            match rx.next().await.unwrap().unwrap() {
                Message::Binary(b) => {
                    assert_eq!(b.len(), size);
                    received += 1;
                    let _ = permits_tx.try_send(());
                }
                _ => continue,
            }
        }
        send
    };
    let elapsed = t0.elapsed().as_secs_f64();
    let mut tx = sender.await.unwrap();
    let _ = tx.close().await;
    count as f64 / elapsed
}

#[tokio::main]
async fn main() {
    let bench = common::start(&[]).await;
    for (size, count) in [(64usize, 40_000usize), (1024, 30_000), (16 * 1024, 8_000)] {
        let mut rates = Vec::new();
        for _ in 0..RUNS {
            rates.push(run(&bench, size, count).await);
        }
        let m = common::median(rates.clone());
        println!(
            "{size:>6} B messages: median {m:>9.0} msg/s ({:.1} MiB/s each way); runs: {}",
            m * size as f64 / (1 << 20) as f64,
            rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")
        );
    }
}
