//! The load generator: WebSocket-over-mTLS clients that open full handshakes in a loop, send
//! messages at a fixed rate or with a fixed window in flight, or hold connections idle.
//!
//! Every workload runs until `Shared::stop` is set and counts into `Shared`; the measuring side
//! (`measure`) reads the counters and the target's CPU around a window. Each message carries
//! its send time in its first 8 bytes, so the echo gives the round-trip time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A connected WebSocket over mTLS.
pub type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// Where and how the load generator connects.
#[derive(Clone)]
pub struct Client {
    /// The target's mTLS listener.
    pub addr: SocketAddr,
    /// TLS 1.3, the client certificate, no resumption.
    pub tls: Arc<ClientConfig>,
}

impl Client {
    /// TCP connect, full TLS handshake, WebSocket upgrade.
    pub async fn connect(&self) -> Result<Ws> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost")?;
        let tls = TlsConnector::from(self.tls.clone()).connect(name, tcp).await?;
        let request = "wss://localhost/".into_client_request()?;
        let (ws, _) = tokio_tungstenite::client_async(request, tls).await?;
        Ok(ws)
    }

    /// One operation of the handshake figure: connect, one 64 B echo, close (and wait for the
    /// server's close). Returns the server's leaf certificate.
    pub async fn handshake_op(&self, epoch: Instant) -> Result<Option<CertificateDer<'static>>> {
        let mut ws = self.connect().await?;
        let leaf = ws
            .get_ref()
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned());
        echo_once(&mut ws, epoch).await?;
        ws.close(None).await?;
        // Until the server's close (how the TCP connection ends after it is not this figure's).
        while let Some(Ok(_)) = ws.next().await {}
        Ok(leaf)
    }
}

/// Sends one 64 B message and waits for its echo.
pub async fn echo_once(ws: &mut Ws, epoch: Instant) -> Result<()> {
    ws.send(message(64, epoch)).await?;
    loop {
        match ws.next().await.context("closed before the echo")?? {
            Message::Binary(_) => return Ok(()),
            Message::Close(_) => bail!("closed before the echo"),
            _ => continue,
        }
    }
}

/// A binary message of `size` bytes (at least 8) whose first 8 bytes are the send time.
fn message(size: usize, epoch: Instant) -> Message {
    let mut b = BytesMut::with_capacity(size.max(8));
    b.put_u64(epoch.elapsed().as_nanos() as u64);
    b.resize(size.max(8), 0x5a);
    Message::Binary(b.freeze())
}

fn sent_at(payload: &Bytes, epoch: Instant) -> Option<Duration> {
    let ns = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    epoch.elapsed().checked_sub(Duration::from_nanos(ns))
}

/// A certificate swap being watched for: the new leaf, and when a handshake first presented it.
pub struct SwapWatch {
    /// The leaf just written.
    pub leaf: CertificateDer<'static>,
    /// When the first handshake presenting it completed.
    pub seen: Option<Instant>,
}

/// Counters every workload writes and the measuring side reads.
pub struct Shared {
    /// Time origin of the messages' timestamps.
    pub epoch: Instant,
    /// Completed operations: handshakes, or echoed messages.
    pub ops: AtomicU64,
    /// Failed operations.
    pub errors: AtomicU64,
    /// The first error, for the report.
    pub first_error: Mutex<Option<String>>,
    /// Set: every task ends.
    pub stop: AtomicBool,
    /// Set: round-trip times are recorded.
    pub recording: AtomicBool,
    /// Round-trip times recorded, µs.
    pub rtts: Mutex<Vec<u32>>,
    /// The certificate swap being watched for, if any.
    pub swap: Mutex<Option<SwapWatch>>,
}

impl Shared {
    /// Fresh counters.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            ops: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            stop: AtomicBool::new(false),
            recording: AtomicBool::new(false),
            rtts: Mutex::new(Vec::new()),
            swap: Mutex::new(None),
        })
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn error(&self, e: anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert_with(|| format!("{e:#}"));
        }
    }

    fn saw_leaf(&self, leaf: &CertificateDer<'_>) {
        if let Ok(mut swap) = self.swap.lock()
            && let Some(w) = swap.as_mut()
            && w.seen.is_none()
            && w.leaf.as_ref() == leaf.as_ref()
        {
            w.seen = Some(Instant::now());
        }
    }
}

/// Running workload tasks; `finish` stops and joins them.
pub struct Load {
    /// The counters.
    pub shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// Stops every task, waits up to 5 s for them, aborts the rest.
    pub async fn finish(self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(5);
        for task in self.tasks {
            let abort = task.abort_handle();
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// `clients` loops of full handshakes (`Client::handshake_op`), as fast as they go.
pub fn handshakes(client: &Client, clients: usize) -> Load {
    let shared = Shared::new();
    let tasks = (0..clients)
        .map(|_| {
            let (client, shared) = (client.clone(), shared.clone());
            tokio::spawn(async move {
                while !shared.stopped() {
                    match client.handshake_op(shared.epoch).await {
                        Ok(leaf) => {
                            shared.ops.fetch_add(1, Ordering::Relaxed);
                            if let Some(leaf) = leaf {
                                shared.saw_leaf(&leaf);
                            }
                        }
                        Err(e) => {
                            shared.error(e);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            })
        })
        .collect();
    Load { shared, tasks }
}

/// How a message workload paces its sends.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// This many messages per second in all, spread evenly over the connections and over time
    /// (sent on 1 ms ticks).
    Rate(f64),
    /// This many messages in flight per connection, as fast as the echoes come back.
    Window(usize),
}

/// Opens `conns` connections and runs messages of `size` bytes over them.
pub async fn messages(client: &Client, conns: usize, size: usize, pace: Pace) -> Result<Load> {
    let shared = Shared::new();
    let mut tasks = Vec::new();
    for i in 0..conns {
        let (sink, mut stream) = client.connect().await?.split();
        let window = match pace {
            Pace::Window(n) => Some(Arc::new(Semaphore::new(n))),
            Pace::Rate(_) => None,
        };
        let (sh, credit) = (shared.clone(), window.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                if let Message::Binary(payload) = msg {
                    sh.ops.fetch_add(1, Ordering::Relaxed);
                    if sh.recording.load(Ordering::Relaxed)
                        && let (Some(rtt), Ok(mut rtts)) = (sent_at(&payload, sh.epoch), sh.rtts.lock())
                    {
                        rtts.push(rtt.as_micros().min(u32::MAX as u128) as u32);
                    }
                    if let Some(credit) = &credit {
                        credit.add_permits(1);
                    }
                }
            }
        }));
        let sh = shared.clone();
        tasks.push(tokio::spawn(async move {
            let result = match (pace, window) {
                (Pace::Rate(rate), _) => {
                    // Connection i starts i/conns of a period later, so sends do not bunch up.
                    let per_conn = rate / conns as f64;
                    let offset =
                        Duration::from_secs_f64(i as f64 / conns as f64 / per_conn).min(Duration::from_millis(100));
                    send_at_rate(sink, size, per_conn, offset, &sh).await
                }
                (Pace::Window(_), Some(credit)) => send_windowed(sink, size, &credit, &sh).await,
                (Pace::Window(_), None) => Ok(()),
            };
            if let Err(e) = result {
                sh.error(e);
            }
        }));
    }
    Ok(Load { shared, tasks })
}

type Sink = futures_util::stream::SplitSink<Ws, Message>;

async fn send_at_rate(mut sink: Sink, size: usize, rate: f64, offset: Duration, sh: &Shared) -> Result<()> {
    tokio::time::sleep(offset).await;
    let start = Instant::now();
    // Falling behind by more than 10 ms of sends is not caught up: the achieved rate says so.
    let max_burst = (rate / 100.0).ceil().max(1.0) as u64;
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !sh.stopped() {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        if due.saturating_sub(sent) > max_burst {
            sent = due - max_burst;
        }
        if due <= sent {
            continue;
        }
        for _ in sent..due {
            sink.feed(message(size, sh.epoch)).await?;
        }
        sink.flush().await?;
        sent = due;
    }
    sink.close().await?;
    Ok(())
}

async fn send_windowed(mut sink: Sink, size: usize, credit: &Semaphore, sh: &Shared) -> Result<()> {
    while !sh.stopped() {
        // Waits at most a moment, so a stalled target cannot keep the task from stopping.
        let Ok(Ok(permit)) = tokio::time::timeout(Duration::from_millis(100), credit.acquire()).await else {
            continue;
        };
        permit.forget();
        sink.feed(message(size, sh.epoch)).await?;
        while let Ok(permit) = credit.try_acquire() {
            permit.forget();
            sink.feed(message(size, sh.epoch)).await?;
        }
        sink.flush().await?;
    }
    sink.close().await?;
    Ok(())
}

/// Opens `n` connections, `parallel` at a time, each with one echo, and returns them open.
pub async fn open_idle(client: &Client, n: usize, parallel: usize) -> Result<Vec<Ws>> {
    let epoch = Instant::now();
    let parallel = parallel.clamp(1, n.max(1));
    let mut openers = Vec::new();
    for k in 0..parallel {
        let client = client.clone();
        let count = n / parallel + usize::from(k < n % parallel);
        openers.push(tokio::spawn(async move {
            let mut open = Vec::with_capacity(count);
            for _ in 0..count {
                let mut ws = client.connect().await?;
                echo_once(&mut ws, epoch).await?;
                open.push(ws);
            }
            anyhow::Ok(open)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for opener in openers {
        all.extend(opener.await??);
    }
    Ok(all)
}
