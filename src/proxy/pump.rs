//! The frame pump: relays WebSocket messages both ways until either side closes.
//!
//! Each direction is a loop that reads one leg and writes the other; both loops run in the
//! connection's one task (no extra spawn, no lock held across an await). Writes are batched:
//! a loop flushes only when its source has nothing more ready. Pings are answered on each leg
//! by tungstenite and not forwarded; Close frames are forwarded with their code and reason; a
//! drain sends Close 1001 "going away" on both legs, and the expiry of the client's certificate
//! Close 1008; an oversized message closes its sender's leg with 1009, invalid UTF-8 with 1007
//! and another protocol violation with 1002. Depends on tokio-tungstenite.

use std::sync::OnceLock;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the TLS client to the app.
    ClientToUpstream,
    /// From the app to the TLS client.
    UpstreamToClient,
}

/// Who closed a connection first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    /// The TLS client.
    Client,
    /// The app.
    Upstream,
    /// wsgate itself (drain, limits, protocol errors).
    Proxy,
}

impl Initiator {
    /// Lowercase name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Initiator::Client => "client",
            Initiator::Upstream => "upstream",
            Initiator::Proxy => "proxy",
        }
    }
}

/// How the connection ended: the first close seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseSummary {
    /// Who closed first.
    pub initiator: Initiator,
    /// The close code, `None` when a side vanished without a Close frame.
    pub code: Option<u16>,
    /// The close reason or what happened.
    pub reason: String,
}

/// Why wsgate ends a connection that both peers would keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// The proxy drains.
    Drain,
    /// The client's certificate expired.
    Expired,
}

impl StopReason {
    /// The Close frame to send, and the note for the close summary.
    fn close(self) -> (CloseCode, &'static str, &'static str) {
        match self {
            StopReason::Drain => (CloseCode::Away, "going away", "going away (drain)"),
            StopReason::Expired => (
                CloseCode::Policy,
                "client certificate expired",
                "client certificate expired",
            ),
        }
    }
}

/// Receives relay counts, once per flushed batch.
pub trait RelayMeter: Send + Sync {
    /// `messages` data messages carrying `bytes` payload bytes went `dir`.
    fn relayed(&self, dir: Direction, messages: u64, bytes: u64);
}

/// How long the other direction may take to finish its close handshake once one has ended.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Most messages relayed back to back before checking drain and close requests again.
const MAX_BATCH: usize = 64;

fn close(code: CloseCode, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

struct Leg<'a, S, D> {
    src: &'a mut SplitStream<WebSocketStream<S>>,
    dst: &'a mut SplitSink<WebSocketStream<D>, Message>,
    dir: Direction,
    /// Requests from the other loop to close `dst` with a given frame.
    close_dst: oneshot::Receiver<Message>,
    /// Asks the other loop to close `src`.
    close_src: Option<oneshot::Sender<Message>>,
    first: &'a OnceLock<CloseSummary>,
    meter: &'a dyn RelayMeter,
}

impl<S, D> Leg<'_, S, D>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
{
    fn source(&self) -> Initiator {
        match self.dir {
            Direction::ClientToUpstream => Initiator::Client,
            Direction::UpstreamToClient => Initiator::Upstream,
        }
    }

    fn note(&self, initiator: Initiator, code: Option<u16>, reason: String) {
        let _ = self.first.set(CloseSummary {
            initiator,
            code,
            reason,
        });
    }

    fn account(&self, msgs: &mut u64, bytes: &mut u64) {
        if *msgs > 0 {
            self.meter.relayed(self.dir, *msgs, *bytes);
            (*msgs, *bytes) = (0, 0);
        }
    }

    /// Relays until the source ends. `stop` fires on drain and on the client certificate's
    /// expiry; `why` then says which (unset: drain).
    async fn run(mut self, stop: &CancellationToken, why: &OnceLock<StopReason>) {
        let mut dst_open = true;
        let mut stopping = false;
        let mut close_dst_done = false;
        let mut pending: Option<Option<Result<Message, WsError>>> = None;
        let (mut msgs, mut bytes, mut batch) = (0u64, 0u64, 0usize);
        loop {
            let item = match pending.take() {
                Some(item) => item,
                None => {
                    if msgs > 0 && dst_open && self.dst.flush().await.is_err() {
                        dst_open = false;
                    }
                    self.account(&mut msgs, &mut bytes);
                    batch = 0;
                    tokio::select! {
                        biased;
                        frame = &mut self.close_dst, if !close_dst_done => {
                            close_dst_done = true;
                            if let Ok(frame) = frame && dst_open {
                                dst_open = false;
                                let _ = self.dst.send(frame).await;
                            }
                            continue;
                        }
                        _ = stop.cancelled(), if !stopping => {
                            stopping = true;
                            let reason = why.get().copied().unwrap_or(StopReason::Drain);
                            let (code, text, note) = reason.close();
                            self.note(Initiator::Proxy, Some(u16::from(code)), note.into());
                            if dst_open {
                                dst_open = false;
                                let _ = self.dst.send(close(code, text)).await;
                            }
                            continue;
                        }
                        item = self.src.next() => item,
                    }
                }
            };
            match item {
                Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                    if dst_open {
                        let len = msg.len() as u64;
                        if self.dst.feed(msg).await.is_err() {
                            dst_open = false;
                        } else {
                            msgs += 1;
                            bytes += len;
                        }
                    }
                    batch += 1;
                    if batch < MAX_BATCH {
                        pending = self.src.next().now_or_never();
                    }
                }
                // Answered on this leg by tungstenite; each leg keeps its own liveness.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .as_ref()
                        .map(|f| (Some(u16::from(f.code)), f.reason.to_string()))
                        .unwrap_or((None, String::new()));
                    self.note(self.source(), code, reason);
                    if dst_open {
                        dst_open = false;
                        // A Close without a code is forwarded as such; tungstenite replies on `src`.
                        let _ = self.dst.send(Message::Close(frame)).await;
                    }
                }
                // A peer that closed TCP without a Close frame (a crash, a restart, close_notify
                // and FIN) is a vanished peer, not a protocol violation.
                None
                | Some(Err(
                    WsError::ConnectionClosed
                    | WsError::AlreadyClosed
                    | WsError::Protocol(
                        tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    ),
                )) => {
                    tracing::trace!(dir = ?self.dir, "source ended");
                    self.account(&mut msgs, &mut bytes);
                    self.note(self.source(), None, "connection closed without a Close frame".into());
                    if dst_open {
                        let _ = self.dst.send(close(CloseCode::Away, "peer went away")).await;
                    }
                    return;
                }
                Some(Err(err)) => {
                    tracing::trace!(dir = ?self.dir, error = %err, "source failed");
                    self.account(&mut msgs, &mut bytes);
                    let to_src = match &err {
                        WsError::Capacity(_) => Some((CloseCode::Size, "message too big", 1009)),
                        WsError::Utf8(_) => Some((CloseCode::Invalid, "invalid UTF-8 in a text message", 1007)),
                        WsError::Protocol(_) => Some((CloseCode::Protocol, "protocol error", 1002)),
                        _ => None,
                    };
                    match to_src {
                        Some((code, reason, num)) => {
                            self.note(
                                Initiator::Proxy,
                                Some(num),
                                format!("{}: {err}", self.source().as_str()),
                            );
                            if let Some(tx) = self.close_src.take() {
                                let _ = tx.send(close(code, reason));
                            }
                        }
                        None => self.note(self.source(), None, format!("read failed: {err}")),
                    }
                    if dst_open {
                        let _ = self.dst.send(close(CloseCode::Away, "peer connection failed")).await;
                    }
                    return;
                }
            }
        }
    }
}

/// Relays messages between the client's and the app's WebSocket until both have closed (or one
/// has and the other did not finish within [`CLOSE_GRACE`]), then closes the client's
/// connection gracefully. Resolves to the first close seen.
///
/// Not an `async fn`: its arguments would stay in the future for its whole life (an async fn
/// keeps its parameters' storage), and an idle connection should hold only what it uses.
pub fn relay<'m, C, U>(
    client: WebSocketStream<C>,
    upstream: WebSocketStream<U>,
    drain: CancellationToken,
    expires_at: Option<tokio::time::Instant>,
    meter: &'m dyn RelayMeter,
) -> impl std::future::Future<Output = CloseSummary> + 'm
where
    C: AsyncRead + AsyncWrite + Unpin + 'm,
    U: AsyncRead + AsyncWrite + Unpin + 'm,
{
    let (client_tx, client_rx) = client.split();
    let (up_tx, up_rx) = upstream.split();
    relay_halves(client_tx, client_rx, up_tx, up_rx, drain, expires_at, meter)
}

async fn relay_halves<C, U>(
    mut client_tx: SplitSink<WebSocketStream<C>, Message>,
    mut client_rx: SplitStream<WebSocketStream<C>>,
    mut up_tx: SplitSink<WebSocketStream<U>, Message>,
    mut up_rx: SplitStream<WebSocketStream<U>>,
    drain: CancellationToken,
    expires_at: Option<tokio::time::Instant>,
    meter: &dyn RelayMeter,
) -> CloseSummary
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let first = OnceLock::new();
    // One timer for the connection: at the client certificate's expiry it stops both legs, as a
    // drain does (the per-connection token is a child of the drain token).
    let stop = drain.child_token();
    let why = OnceLock::new();
    {
        let (close_client_tx, close_client_rx) = oneshot::channel();
        let (close_up_tx, close_up_rx) = oneshot::channel();
        let inbound = Leg {
            src: &mut client_rx,
            dst: &mut up_tx,
            dir: Direction::ClientToUpstream,
            close_dst: close_up_rx,
            close_src: Some(close_client_tx),
            first: &first,
            meter,
        }
        .run(&stop, &why);
        let outbound = Leg {
            src: &mut up_rx,
            dst: &mut client_tx,
            dir: Direction::UpstreamToClient,
            close_dst: close_client_rx,
            close_src: Some(close_up_tx),
            first: &first,
            meter,
        }
        .run(&stop, &why);
        let mut inbound = std::pin::pin!(inbound);
        let mut outbound = std::pin::pin!(outbound);
        let far = tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400);
        let mut expiry = std::pin::pin!(tokio::time::sleep_until(expires_at.unwrap_or(far)));
        loop {
            tokio::select! {
                _ = &mut inbound => { let _ = tokio::time::timeout(CLOSE_GRACE, outbound).await; break; }
                _ = &mut outbound => { let _ = tokio::time::timeout(CLOSE_GRACE, inbound).await; break; }
                _ = &mut expiry, if expires_at.is_some() && !stop.is_cancelled() => {
                    let _ = why.set(StopReason::Expired);
                    stop.cancel();
                }
            }
        }
    }
    drop((up_tx, up_rx));
    if let Ok(client) = client_rx.reunite(client_tx) {
        linger(client.into_inner()).await;
    }
    first.into_inner().unwrap_or(CloseSummary {
        initiator: Initiator::Proxy,
        code: None,
        reason: "closed".into(),
    })
}

/// How long a closed client connection is read from (and discarded) before it is dropped.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes discarded while lingering.
const LINGER_BYTES: usize = 1 << 20;

/// Closes the client's connection the way a careful server does: send TLS close_notify and FIN,
/// then read and discard what the client still sends for a moment. Dropping a socket with
/// unread input makes the kernel send a reset, which can destroy the Close frame the client has
/// not read yet (after a 1009, for instance, the rest of the oversized message is still coming).
async fn linger<C: AsyncRead + AsyncWrite + Unpin>(mut io: C) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(LINGER, async {
        let _ = io.shutdown().await;
        let mut buf = vec![0u8; 8192];
        let mut discarded = 0;
        while discarded < LINGER_BYTES {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    })
    .await;
}
