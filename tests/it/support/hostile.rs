//! Tools for hostile-load tests against the real binary: clients from a chosen loopback
//! address, a sampler of a process's resident memory, and a paced good client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite;

use super::WssStream;

/// A TCP connection to `to` from the loopback address `from`.
pub async fn tcp_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse().unwrap())?;
    socket.connect(to).await
}

/// A WebSocket over mTLS with `config` (which presents the client's certificate), from loopback address `from`, with extra request headers;
/// the app's (or the proxy's) refusal comes back as `tungstenite::Error::Http`.
pub async fn wss_from(
    from: &str,
    to: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<WssStream, tungstenite::Error> {
    let tcp = tcp_from(from, to).await?;
    super::wss_over(tcp, config, path, headers).await.map(|(ws, _)| ws)
}

/// A field of /proc/PID/status in KiB (`VmRSS`, `VmHWM`).
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Samples a process's VmRSS every 10 ms on its own thread and keeps the largest value seen
/// since the last [`RssSampler::take_peak`].
pub struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(proc_kib(pid, "VmRSS")));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: stops with the sampler, or after 10 minutes at the latest.
            let t0 = Instant::now();
            while !s.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(600) {
                let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                    return;
                };
                if let Some(kib) = status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// The largest VmRSS sampled since the last call (or the start), in KiB; starts the next
    /// window at `now_kib`.
    pub fn take_peak(&self, now_kib: u64) -> u64 {
        self.peak.swap(now_kib, Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a paced good client saw.
#[derive(Debug, Default, Clone)]
pub struct GoodReport {
    /// Round trips that came back.
    pub round_trips: u64,
    /// Fresh connections opened (each with one round trip).
    pub fresh_connections: u64,
    /// The slowest round trip (a fresh connection's includes its handshake).
    pub slowest: Duration,
    /// Every failure, with when it happened.
    pub failures: Vec<String>,
}

/// The good client's shared report.
pub type GoodLog = Arc<Mutex<GoodReport>>;
