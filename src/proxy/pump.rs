//! The frame pump: relays WebSocket messages both ways until either side closes.
//!
//! Each direction is a loop that reads one leg and writes the other; both loops run in the
//! connection's one task (no extra spawn, no lock held across an await). Writes are batched:
//! a loop flushes only when its source has nothing more ready. Pings are answered on each leg
//! by tungstenite and not forwarded; Close frames are forwarded with their code and reason; a
//! drain sends Close 1001 "going away" on both legs, and the expiry of the client's certificate
//! Close 1008; an oversized message closes its sender's leg with 1009, invalid UTF-8 with 1007
//! and another protocol violation with 1002. Depends on tokio-tungstenite.
//!
//! Each leg is a small state machine (`LegState`: `dst` open, or done) stepped by `Next`
//! (wait, handle an item already read, done). Every write races the drain/expiry stop and is
//! given up `STOP_WRITE_TIMEOUT` after it, so a peer that reads nothing cannot hold a leg;
//! after a stop the relay ends within [`CLOSE_GRACE`].
//!
//! wsgate ends a connection itself through its [`Stopper`]: drain (1001), the client
//! certificate's expiry or a trust change that no longer admits it (1008), no frame from a peer
//! within the idle timeout although each leg is pinged (1001), a message left unfinished past
//! the message timeout (1008); a peer whose unfinished message would exceed the memory budget
//! is closed with 1013. Depends on tokio-tungstenite and `budget`.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Fuse;
use futures_util::sink::Sink;
use futures_util::stream::Stream;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use super::budget::{BudgetExceeded, Hold};

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
pub enum StopReason {
    /// The proxy drains.
    Drain,
    /// The client's certificate expired.
    Expired,
    /// The trust roots changed and the client's chain no longer verifies.
    Untrusted,
    /// A peer sent no frame (not even a Pong) within the idle timeout.
    Idle,
    /// A peer left a message unfinished past the message timeout.
    Unfinished,
    /// Messages queued for a peer that does not read would exceed the memory budget.
    Budget,
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
            StopReason::Untrusted => (
                CloseCode::Policy,
                "client certificate no longer trusted",
                "client certificate no longer trusted (trust roots changed)",
            ),
            StopReason::Idle => (CloseCode::Away, "idle timeout", "idle timeout: no frame from a peer"),
            StopReason::Unfinished => (
                CloseCode::Policy,
                "message not finished in time",
                "message not finished within the message timeout",
            ),
            StopReason::Budget => (
                CloseCode::Again,
                "memory budget exceeded, try again later",
                "memory budget exceeded by messages queued for a peer that does not read",
            ),
        }
    }
}

/// Ends one connection from outside its relay: the drain ends every connection (the stopper's
/// token is a child of the drain token); expiry, trust changes and timeouts end one.
#[derive(Debug)]
pub struct Stopper {
    token: CancellationToken,
    why: OnceLock<StopReason>,
}

impl Stopper {
    /// A stopper that also fires when `drain` does.
    pub fn new(drain: &CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            token: drain.child_token(),
            why: OnceLock::new(),
        })
    }

    /// Ends the connection for `reason` (the first reason given wins; a drain that came first
    /// stays a drain).
    pub fn stop(&self, reason: StopReason) {
        if !self.token.is_cancelled() {
            let _ = self.why.set(reason);
        }
        self.token.cancel();
    }

    /// Whether the connection is being ended.
    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    fn reason(&self) -> StopReason {
        self.why.get().copied().unwrap_or(StopReason::Drain)
    }
}

/// Keep-alive: each leg is pinged every `ping_interval`; a connection from whose peers no frame
/// at all (a Pong answers a Ping) arrived for `idle_timeout` is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// How often each leg is pinged.
    pub ping_interval: Duration,
    /// Longest silence from either peer.
    pub idle_timeout: Duration,
}

/// How the relay is bounded and ended.
pub struct Control<'m> {
    /// Ends the connection from outside (drain, trust change).
    pub stopper: Arc<Stopper>,
    /// The client certificate's expiry.
    pub expires_at: Option<tokio::time::Instant>,
    /// Pings and the idle timeout; `None`: neither.
    pub keepalive: Option<Keepalive>,
    /// What each direction holds of unfinished messages (client's, app's), and how long a
    /// message may stay unfinished.
    pub holds: Option<(Arc<Hold>, Arc<Hold>, Duration)>,
    /// What is queued for each peer and not yet written (to the client, to the app).
    pub queues: Option<(Arc<Hold>, Arc<Hold>)>,
    /// Counts relayed messages.
    pub meter: &'m dyn RelayMeter,
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

/// How long a write may still take once stop (drain or expiry) has fired. Before stop a write
/// waits as long as its peer makes it (backpressure: a slow reader slows its sender); after it, a
/// peer that has not taken the frame within this is not reading, and the leg gives up on it.
const STOP_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs one write (`feed`, `flush` or `send`) so that stop can always reach it: the write races
/// the stop token, and once stop has fired it gets at most [`STOP_WRITE_TIMEOUT`] more. `false`
/// when the write failed or was given up; dropping it then is safe for the framing, since
/// tungstenite keeps whole frames in its write buffer and never half-queues a message.
async fn guarded_write(stop: &CancellationToken, write: impl Future<Output = Result<(), WsError>>) -> bool {
    let mut write = std::pin::pin!(write);
    tokio::select! {
        biased;
        done = &mut write => done.is_ok(),
        _ = stop.cancelled() => matches!(tokio::time::timeout(STOP_WRITE_TIMEOUT, write).await, Ok(Ok(()))),
    }
}

/// The next tick of a keep-alive interval; never, without one.
async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Where a leg stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LegState {
    /// Relaying: data from `src` is written to `dst`; close requests and stop are watched.
    Open,
    /// `dst` is done: it got a Close (forwarded, asked for by the other leg, or sent on stop), or
    /// a write to it failed or was given up. The leg still reads `src`, so that tungstenite
    /// answers its pings and its Close, and discards its data until it ends.
    DstClosed,
}

/// What a leg does next.
enum Next {
    /// Wait for a close request, stop, a ping tick, or the next item from `src` that is not
    /// data (the pump relays data meanwhile).
    Wait,
    /// Handle an item `src` had that is not a data message (control frame, end, error).
    Handle(Option<Result<Message, WsError>>),
    /// `src` ended: the leg is done.
    Done,
}

/// Why the pump stopped relaying.
enum Pumped {
    /// `src` gave an item that is not a data message: the leg handles it.
    Item(Option<Result<Message, WsError>>),
    /// [`MAX_BATCH`] items in a row: the leg checks close requests and stop before more.
    Yield,
    /// A write to `dst` failed.
    DstFailed,
    /// The budget refused a message queued for `dst`; the connection is being stopped.
    Stopped,
}

/// The messages written to `dst` since the last flush.
#[derive(Default)]
struct Batch {
    /// Data messages fed and not yet metered.
    msgs: u64,
    /// Their payload bytes.
    bytes: u64,
    /// Items relayed since the last yield.
    len: usize,
    /// What was fed must be flushed before `src` is read again.
    flushing: bool,
}

/// The data path of a leg: reads `src`, writes its data messages to `dst`, flushes when `src`
/// has nothing more ready, and keeps the books (liveness, holds, meter).
struct Pipe<'a, S, D> {
    src: &'a mut SplitStream<WebSocketStream<S>>,
    dst: &'a mut SplitSink<WebSocketStream<D>, Message>,
    dir: Direction,
    batch: Batch,
    meter: &'a dyn RelayMeter,
    /// When `src` last sent a frame, in milliseconds since the relay started.
    seen: &'a AtomicU64,
    origin: tokio::time::Instant,
    /// What `src`'s stream holds of an unfinished message.
    hold: Option<&'a Hold>,
    /// What is queued for `dst` and not yet written.
    queue: Option<&'a Hold>,
    /// Ends the connection when the budget refuses a queued message.
    stopper: &'a Stopper,
}

impl<S, D> Pipe<'_, S, D>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
{
    /// `src` sent a frame now: the peer is alive.
    fn saw(&self) {
        self.seen
            .store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn account(&mut self) {
        if self.batch.msgs > 0 {
            self.meter.relayed(self.dir, self.batch.msgs, self.batch.bytes);
            (self.batch.msgs, self.batch.bytes) = (0, 0);
        }
    }

    /// Flushes what the batch fed, if it must be (`dst` not `open`: only meters it). `Err` when
    /// the flush failed; pending with `batch.flushing` still set.
    fn poll_flushed(&mut self, open: bool, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        if !self.batch.flushing {
            return Poll::Ready(Ok(()));
        }
        let flushed = match open {
            true => match Pin::new(&mut *self.dst).poll_flush(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(result) => result.map_err(drop),
            },
            false => Ok(()),
        };
        if flushed.is_ok()
            && open
            && let Some(queue) = self.queue
        {
            queue.release();
        }
        self.batch.flushing = false;
        self.account();
        Poll::Ready(flushed)
    }

    /// Relays data messages from `src` to `dst` (discards them when `dst` is not `open`) until
    /// `src` gives something else, the batch is full, or a write fails. Pending while `src` has
    /// nothing ready (after flushing what was fed) or `dst` takes no more (backpressure).
    ///
    /// One poll relays every message ready, with no future built or moved per message: this is
    /// the per-message cost of the proxy. Dropping it between polls is safe: a message is taken
    /// from `src` only once `dst` is ready for it, and what was fed stays queued in `dst`.
    fn poll_pump(&mut self, open: bool, cx: &mut Context<'_>) -> Poll<Pumped> {
        // The liveness clock is read once per wake-up, not once per frame.
        let mut stamped = false;
        loop {
            match self.poll_flushed(open, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(())) => return Poll::Ready(Pumped::DstFailed),
                Poll::Ready(Ok(())) => {}
            }
            if open {
                match Pin::new(&mut *self.dst).poll_ready(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(Pumped::DstFailed),
                }
            }
            let msg = match Pin::new(&mut *self.src).poll_next(cx) {
                Poll::Pending => {
                    // Nothing more ready: flush the batch. `src`'s waker is set, so once the
                    // flush is done there is nothing to do until a wake-up.
                    self.batch.len = 0;
                    self.batch.flushing = self.batch.msgs > 0;
                    return match self.poll_flushed(open, cx) {
                        Poll::Ready(Err(())) => Poll::Ready(Pumped::DstFailed),
                        _ => Poll::Pending,
                    };
                }
                Poll::Ready(Some(Ok(msg @ (Message::Text(_) | Message::Binary(_))))) => msg,
                Poll::Ready(item) => {
                    // Flushed before anything else is read (the leg may write a Close first,
                    // which flushes too).
                    self.batch.flushing = self.batch.msgs > 0;
                    self.batch.len = 0;
                    return Poll::Ready(Pumped::Item(item));
                }
            };
            if !stamped {
                self.saw();
                stamped = true;
            }
            // A message's end frees what `src`'s stream held for it.
            if let Some(hold) = self.hold {
                hold.release();
            }
            if open {
                let len = msg.len();
                if let Some(queue) = self.queue
                    && !queue.charge(len)
                {
                    // `dst` does not read and the budget is spent: end the connection (1013
                    // both ways); the message is not relayed.
                    self.batch.flushing = self.batch.msgs > 0;
                    self.stopper.stop(StopReason::Budget);
                    return Poll::Ready(Pumped::Stopped);
                }
                if Pin::new(&mut *self.dst).start_send(msg).is_err() {
                    return Poll::Ready(Pumped::DstFailed);
                }
                self.batch.msgs += 1;
                self.batch.bytes += len as u64;
            }
            self.batch.len += 1;
            if self.batch.len >= MAX_BATCH {
                self.batch.len = 0;
                self.batch.flushing = self.batch.msgs > 0;
                return Poll::Ready(Pumped::Yield);
            }
        }
    }
}

struct Leg<'a, S, D> {
    pipe: Pipe<'a, S, D>,
    state: LegState,
    /// Requests from the other loop to close `dst` with a given frame (fused: pending once used).
    close_dst: Fuse<oneshot::Receiver<Message>>,
    /// Asks the other loop to close `src`.
    close_src: Option<oneshot::Sender<Message>>,
    /// Fires when wsgate ends the connection; its reason says why.
    stopper: &'a Stopper,
    stop: &'a CancellationToken,
    first: &'a OnceLock<CloseSummary>,
    /// Pings `dst` on each tick (keep-alive).
    ping: Option<tokio::time::Interval>,
}

impl<S, D> Leg<'_, S, D>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
{
    fn source(&self) -> Initiator {
        match self.pipe.dir {
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

    /// Sends `frame` (a Close) to `dst` unless it is done already; `dst` is done after.
    async fn close_dst(&mut self, frame: Message) {
        if self.state == LegState::Open {
            self.state = LegState::DstClosed;
            let _ = guarded_write(self.stop, self.pipe.dst.send(frame)).await;
        }
    }

    /// Relays until the source ends.
    async fn run(mut self) {
        let mut next = Next::Wait;
        loop {
            next = match next {
                Next::Wait => self.wait().await,
                Next::Handle(item) => self.handle(item).await,
                Next::Done => return,
            };
        }
    }

    /// Relays data until something else needs doing: a close request, stop, a ping tick, or an
    /// item from `src` that is not data.
    async fn wait(&mut self) -> Next {
        let open = self.state == LegState::Open;
        let pipe = &mut self.pipe;
        tokio::select! {
            biased;
            frame = &mut self.close_dst, if open => {
                if let Ok(frame) = frame {
                    self.close_dst(frame).await;
                }
                Next::Wait
            }
            _ = self.stop.cancelled(), if open => {
                let reason = self.stopper.reason();
                let (code, text, note) = reason.close();
                self.note(Initiator::Proxy, Some(u16::from(code)), note.into());
                self.close_dst(close(code, text)).await;
                Next::Wait
            }
            pumped = std::future::poll_fn(|cx| pipe.poll_pump(open, cx)) => match pumped {
                Pumped::Item(item) => Next::Handle(item),
                Pumped::Yield | Pumped::Stopped => Next::Wait,
                Pumped::DstFailed => {
                    self.state = LegState::DstClosed;
                    Next::Wait
                }
            },
            _ = tick(&mut self.ping), if open => {
                if !guarded_write(self.stop, self.pipe.dst.send(Message::Ping(Default::default()))).await {
                    self.state = LegState::DstClosed;
                }
                Next::Wait
            }
        }
    }

    /// Handles one item read from `src` that is not a data message.
    async fn handle(&mut self, item: Option<Result<Message, WsError>>) -> Next {
        if let Some(Ok(msg)) = &item {
            // A whole frame came out: the peer is alive. A Ping or Pong, which may come between
            // the fragments of a message, frees only its own bytes, or a peer could keep a
            // fragmented message unfinished (and uncharged) for ever by pinging between its
            // fragments; any other frame ends what was held.
            self.pipe.saw();
            if let Some(hold) = self.pipe.hold {
                match msg {
                    Message::Ping(payload) | Message::Pong(payload) => {
                        hold.consume(control_frame_len(
                            payload.len(),
                            self.pipe.dir == Direction::ClientToUpstream,
                        ));
                    }
                    _ => hold.release(),
                }
            }
        }
        match item {
            // Data is relayed by the pump; Pings are answered on this leg by tungstenite; each leg
            // keeps its own liveness.
            Some(Ok(
                Message::Text(_) | Message::Binary(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_),
            )) => Next::Wait,
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame
                    .as_ref()
                    .map(|f| (Some(u16::from(f.code)), f.reason.to_string()))
                    .unwrap_or((None, String::new()));
                self.note(self.source(), code, reason);
                // A Close without a code is forwarded as such; tungstenite replies on `src`.
                self.close_dst(Message::Close(frame)).await;
                Next::Wait
            }
            // A peer that closed TCP without a Close frame (a crash, a restart, close_notify
            // and FIN) is a vanished peer, not a protocol violation.
            None
            | Some(Err(
                WsError::ConnectionClosed
                | WsError::AlreadyClosed
                | WsError::Protocol(tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake),
            )) => {
                tracing::trace!(dir = ?self.pipe.dir, "source ended");
                self.pipe.account();
                self.note(self.source(), None, "connection closed without a Close frame".into());
                self.close_dst(close(CloseCode::Away, "peer went away")).await;
                Next::Done
            }
            Some(Err(err)) => {
                tracing::trace!(dir = ?self.pipe.dir, error = %err, "source failed");
                self.pipe.account();
                let to_src = match &err {
                    WsError::Io(e) if BudgetExceeded::is(e) => {
                        Some((CloseCode::Again, "memory budget exceeded, try again later", 1013))
                    }
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
                self.close_dst(close(CloseCode::Away, "peer connection failed")).await;
                Next::Done
            }
        }
    }
}

/// Relays messages between the client's and the app's WebSocket until both have closed (or one
/// has and the other did not finish within [`CLOSE_GRACE`]), then closes the client's
/// connection gracefully. Resolves to the first close seen.
///
/// A drain or the client certificate's expiry ends the relay within [`CLOSE_GRACE`] (plus the
/// client connection's linger) whatever the peers do: every write races the stop (see
/// `guarded_write`), and after the stop the legs get [`CLOSE_GRACE`] to finish their close
/// handshakes.
///
/// Not an `async fn`: its arguments would stay in the future for its whole life (an async fn
/// keeps its parameters' storage), and an idle connection should hold only what it uses.
pub fn relay<'m, C, U>(
    client: WebSocketStream<C>,
    upstream: WebSocketStream<U>,
    control: Control<'m>,
) -> impl std::future::Future<Output = CloseSummary> + 'm
where
    C: AsyncRead + AsyncWrite + Unpin + 'm,
    U: AsyncRead + AsyncWrite + Unpin + 'm,
{
    let (client_tx, client_rx) = client.split();
    let (up_tx, up_rx) = upstream.split();
    relay_halves(client_tx, client_rx, up_tx, up_rx, control)
}

/// The bytes of a control frame on the wire: two of header (a control payload is at most 125
/// bytes, no extended length), the masking key when a client sent it, the payload.
fn control_frame_len(payload: usize, masked: bool) -> usize {
    2 + if masked { 4 } else { 0 } + payload
}

fn ping_interval(keepalive: Option<Keepalive>) -> Option<tokio::time::Interval> {
    keepalive.map(|k| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + k.ping_interval, k.ping_interval);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    })
}

async fn relay_halves<C, U>(
    mut client_tx: SplitSink<WebSocketStream<C>, Message>,
    mut client_rx: SplitStream<WebSocketStream<C>>,
    mut up_tx: SplitSink<WebSocketStream<U>, Message>,
    mut up_rx: SplitStream<WebSocketStream<U>>,
    control: Control<'_>,
) -> CloseSummary
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let first = OnceLock::new();
    let Control {
        stopper,
        expires_at,
        keepalive,
        holds,
        queues,
        meter,
    } = control;
    let stop = stopper.token.clone();
    let origin = tokio::time::Instant::now();
    let (client_seen, app_seen) = (AtomicU64::new(0), AtomicU64::new(0));
    {
        let (close_client_tx, close_client_rx) = oneshot::channel();
        let (close_up_tx, close_up_rx) = oneshot::channel();
        let inbound = Leg {
            pipe: Pipe {
                src: &mut client_rx,
                dst: &mut up_tx,
                dir: Direction::ClientToUpstream,
                batch: Batch::default(),
                meter,
                seen: &client_seen,
                origin,
                hold: holds.as_ref().map(|h| h.0.as_ref()),
                queue: queues.as_ref().map(|q| q.1.as_ref()),
                stopper: &stopper,
            },
            state: LegState::Open,
            close_dst: close_up_rx.fuse(),
            close_src: Some(close_client_tx),
            stopper: &stopper,
            stop: &stop,
            first: &first,
            ping: ping_interval(keepalive),
        }
        .run();
        let outbound = Leg {
            pipe: Pipe {
                src: &mut up_rx,
                dst: &mut client_tx,
                dir: Direction::UpstreamToClient,
                batch: Batch::default(),
                meter,
                seen: &app_seen,
                origin,
                hold: holds.as_ref().map(|h| h.1.as_ref()),
                queue: queues.as_ref().map(|q| q.0.as_ref()),
                stopper: &stopper,
            },
            state: LegState::Open,
            close_dst: close_client_rx.fuse(),
            close_src: Some(close_up_tx),
            stopper: &stopper,
            stop: &stop,
            first: &first,
            ping: ping_interval(keepalive),
        }
        .run();
        // Pinned here, not inside the `legs` block: a block that captured them by value would
        // hold each loop twice in the relay's future (its capture and its pinned copy), about
        // 2 KiB more per idle connection.
        let (mut inbound, mut outbound) = (std::pin::pin!(inbound), std::pin::pin!(outbound));
        let legs = async {
            tokio::select! {
                _ = &mut inbound => { let _ = tokio::time::timeout(CLOSE_GRACE, outbound).await; }
                _ = &mut outbound => { let _ = tokio::time::timeout(CLOSE_GRACE, inbound).await; }
            }
        };
        // Stops both legs on drain, expiry, trust change or a timeout, then gives them
        // CLOSE_GRACE to finish.
        let stopper_task = async {
            let expiry = async {
                match expires_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let timeouts = watch_timeouts(keepalive, holds.as_ref(), origin, [&client_seen, &app_seen]);
            tokio::select! {
                biased;
                _ = stop.cancelled() => {}
                _ = expiry => stopper.stop(StopReason::Expired),
                reason = timeouts => stopper.stop(reason),
            }
            tokio::time::sleep(CLOSE_GRACE).await;
        };
        tokio::select! {
            _ = legs => {}
            _ = stopper_task => {}
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

/// Resolves when a peer has been silent past the idle timeout, or has left a message
/// unfinished past the message timeout. Sleeps until the earliest deadline; a new unfinished
/// message wakes it to take that one into account.
async fn watch_timeouts(
    keepalive: Option<Keepalive>,
    holds: Option<&(Arc<Hold>, Arc<Hold>, Duration)>,
    origin: tokio::time::Instant,
    seen: [&AtomicU64; 2],
) -> StopReason {
    if keepalive.is_none() && holds.is_none() {
        return std::future::pending().await;
    }
    loop {
        let now = tokio::time::Instant::now();
        let mut next: Option<(tokio::time::Instant, StopReason)> = None;
        let mut earliest = |at: tokio::time::Instant, why: StopReason| {
            if next.is_none_or(|(n, _)| at < n) {
                next = Some((at, why));
            }
        };
        if let Some(k) = keepalive {
            let last = seen.iter().map(|s| s.load(Ordering::Relaxed)).min().unwrap_or(0);
            earliest(origin + Duration::from_millis(last) + k.idle_timeout, StopReason::Idle);
        }
        if let Some((client, app, limit)) = holds {
            for hold in [client, app] {
                if let Some(since) = hold.since() {
                    earliest(since + *limit, StopReason::Unfinished);
                }
            }
        }
        match next {
            Some((at, why)) if at <= now => return why,
            Some((at, _)) => {
                let started = async {
                    match holds {
                        Some((client, app, _)) => tokio::select! {
                            _ = client.started() => {}
                            _ = app.started() => {}
                        },
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = started => {}
                }
            }
            None => match holds {
                Some((client, app, _)) => tokio::select! {
                    _ = client.started() => {}
                    _ = app.started() => {}
                },
                None => return std::future::pending().await,
            },
        }
    }
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::DuplexStream;
    use tokio::task::JoinHandle;
    use tokio::time::Instant;
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

    use super::*;

    type Ws = WebSocketStream<DuplexStream>;

    /// Capacity of each in-memory connection, per direction.
    const PIPE: usize = 64 * 1024;
    /// Longest a test waits for one event; paused time only reaches it when everything is stuck.
    const PATIENCE: Duration = Duration::from_secs(600);

    /// Sums what the relay meters, per direction: (calls, messages, bytes).
    #[derive(Default)]
    struct Counter(Mutex<[(u64, u64, u64); 2]>);

    impl Counter {
        fn get(&self, dir: Direction) -> (u64, u64) {
            let (_, msgs, bytes) = self.0.lock().unwrap()[dir as usize];
            (msgs, bytes)
        }
    }

    impl RelayMeter for Counter {
        fn relayed(&self, dir: Direction, messages: u64, bytes: u64) {
            let mut counts = self.0.lock().unwrap();
            let c = &mut counts[dir as usize];
            (c.0, c.1, c.2) = (c.0 + 1, c.1 + messages, c.2 + bytes);
        }
    }

    /// One leg: the proxy's end in `proxy_role` (with `cfg`) and the peer's end in the other.
    async fn pipe(proxy_role: Role, cfg: Option<WebSocketConfig>) -> (Ws, Ws) {
        let (proxy, peer) = tokio::io::duplex(PIPE);
        let peer_role = match proxy_role {
            Role::Server => Role::Client,
            Role::Client => Role::Server,
        };
        (
            WebSocketStream::from_raw_socket(proxy, proxy_role, cfg).await,
            WebSocketStream::from_raw_socket(peer, peer_role, None).await,
        )
    }

    struct Relay {
        /// The TLS client's end (WebSocket client role).
        client: Ws,
        /// The app's end (WebSocket server role).
        app: Ws,
        drain: CancellationToken,
        meter: &'static Counter,
        task: JoinHandle<CloseSummary>,
    }

    async fn start(client_cfg: Option<WebSocketConfig>, expires_at: Option<Instant>) -> Relay {
        let (proxy_client, client) = pipe(Role::Server, client_cfg).await;
        let (proxy_app, app) = pipe(Role::Client, None).await;
        let drain = CancellationToken::new();
        let meter: &'static Counter = Box::leak(Box::default());
        let control = Control {
            stopper: Stopper::new(&drain),
            expires_at,
            keepalive: None,
            holds: None,
            queues: None,
            meter,
        };
        let task = tokio::spawn(relay(proxy_client, proxy_app, control));
        Relay {
            client,
            app,
            drain,
            meter,
            task,
        }
    }

    fn text_close(code: u16, reason: &'static str) -> Message {
        close(CloseCode::from(code), reason)
    }

    /// Reads until a Close frame (skipping data) and returns its code and reason.
    async fn recv_close(ws: &mut Ws) -> (u16, String) {
        loop {
            match tokio::time::timeout(PATIENCE, ws.next())
                .await
                .expect("a Close in time")
            {
                Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
                Some(Ok(Message::Close(None))) => panic!("Close without a code"),
                Some(Ok(_)) => continue,
                other => panic!("expected a Close, got {other:?}"),
            }
        }
    }

    /// Reads to the end (which sends tungstenite's Close reply), then drops the connection.
    async fn finish(mut ws: Ws) {
        let _ = tokio::time::timeout(PATIENCE, async { while let Some(Ok(_)) = ws.next().await {} }).await;
    }

    async fn recv(ws: &mut Ws) -> Message {
        tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a message in time")
            .expect("a message")
            .expect("no error")
    }

    async fn summary(task: JoinHandle<CloseSummary>) -> CloseSummary {
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("the relay ended")
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn relays_both_ways_in_order_answers_pings_and_meters() {
        let mut r = start(None, None).await;
        r.client.send(Message::text("one")).await.unwrap();
        r.client.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
        r.client.send(Message::text("two")).await.unwrap();
        r.client.send(Message::binary(vec![7u8; 10])).await.unwrap();
        assert_eq!(recv(&mut r.app).await, Message::text("one"));
        // The ping is answered on the client's leg, not forwarded.
        assert_eq!(recv(&mut r.app).await, Message::text("two"));
        assert_eq!(recv(&mut r.app).await, Message::binary(vec![7u8; 10]));

        r.app.send(Message::text("back")).await.unwrap();
        r.app.send(Message::binary(vec![1u8; 5])).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(recv(&mut r.client).await);
        }
        assert_eq!(
            got,
            [
                Message::Pong(b"p".to_vec().into()),
                Message::text("back"),
                Message::binary(vec![1u8; 5])
            ]
        );

        r.client.close(None).await.unwrap();
        let app_saw = tokio::time::timeout(PATIENCE, r.app.next()).await.unwrap();
        assert!(matches!(app_saw, Some(Ok(Message::Close(None)))), "{app_saw:?}");
        tokio::join!(finish(r.client), finish(r.app));
        let s = summary(r.task).await;
        assert_eq!((s.initiator, s.code), (Initiator::Client, None));
        assert_eq!(r.meter.get(Direction::ClientToUpstream), (3, 3 + 3 + 10));
        assert_eq!(r.meter.get(Direction::UpstreamToClient), (2, 4 + 5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_close_reaches_the_app_with_its_code_and_reason() {
        let mut r = start(None, None).await;
        r.client.send(text_close(4000, "done here")).await.unwrap();
        assert_eq!(recv_close(&mut r.app).await, (4000, "done here".into()));
        tokio::join!(finish(r.client), finish(r.app));
        let s = summary(r.task).await;
        assert_eq!(
            s,
            CloseSummary {
                initiator: Initiator::Client,
                code: Some(4000),
                reason: "done here".into()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_app_that_vanishes_gives_the_client_1001() {
        let mut r = start(None, None).await;
        drop(r.app);
        assert_eq!(recv_close(&mut r.client).await, (1001, "peer went away".into()));
        finish(r.client).await;
        let s = summary(r.task).await;
        assert_eq!(s.initiator, Initiator::Upstream);
        assert_eq!(s.code, None);
        assert_eq!(s.reason, "connection closed without a Close frame");
    }

    #[tokio::test(start_paused = true)]
    async fn drain_sends_1001_to_both_legs() {
        let mut r = start(None, None).await;
        let t0 = Instant::now();
        r.drain.cancel();
        assert_eq!(recv_close(&mut r.client).await, (1001, "going away".into()));
        assert_eq!(recv_close(&mut r.app).await, (1001, "going away".into()));
        tokio::join!(finish(r.client), finish(r.app));
        let s = summary(r.task).await;
        assert_eq!((s.initiator, s.code), (Initiator::Proxy, Some(1001)));
        assert_eq!(s.reason, "going away (drain)");
        // Both peers answered: no grace period was waited out.
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_sends_1008_to_the_client_and_ends_the_relay() {
        let t0 = Instant::now();
        let mut r = start(None, Some(t0 + Duration::from_secs(60))).await;
        r.client.send(Message::text("before")).await.unwrap();
        assert_eq!(recv(&mut r.app).await, Message::text("before"));
        assert_eq!(
            recv_close(&mut r.client).await,
            (1008, "client certificate expired".into())
        );
        assert!(t0.elapsed() >= Duration::from_secs(60));
        assert_eq!(
            recv_close(&mut r.app).await,
            (1008, "client certificate expired".into())
        );
        tokio::join!(finish(r.client), finish(r.app));
        let s = summary(r.task).await;
        assert_eq!((s.initiator, s.code), (Initiator::Proxy, Some(1008)));
        assert_eq!(s.reason, "client certificate expired");
        assert!(t0.elapsed() < Duration::from_secs(61), "{:?}", t0.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn an_oversized_message_closes_its_sender_with_1009() {
        let cfg = WebSocketConfig::default().max_message_size(Some(1024));
        let mut r = start(Some(cfg), None).await;
        r.client.send(Message::binary(vec![0u8; 4096])).await.unwrap();
        assert_eq!(recv_close(&mut r.client).await, (1009, "message too big".into()));
        assert_eq!(recv_close(&mut r.app).await, (1001, "peer connection failed".into()));
        tokio::join!(finish(r.client), finish(r.app));
        let s = summary(r.task).await;
        assert_eq!((s.initiator, s.code), (Initiator::Proxy, Some(1009)));
        assert!(s.reason.starts_with("client: "), "{}", s.reason);
        assert_eq!(r.meter.get(Direction::ClientToUpstream), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_handshake_left_unfinished_is_cut_after_the_grace() {
        let mut r = start(None, None).await;
        let t0 = Instant::now();
        r.client.send(text_close(1000, "bye")).await.unwrap();
        // The client's leg finishes its handshake (tungstenite echoes the Close) ...
        assert_eq!(recv_close(&mut r.client).await, (1000, "bye".into()));
        drop(r.client);
        // ... the app never reads, so it never answers the forwarded Close.
        tokio::time::sleep(CLOSE_GRACE - Duration::from_millis(100)).await;
        assert!(!r.task.is_finished(), "the relay did not wait for the app");
        let s = summary(r.task).await;
        let waited = t0.elapsed();
        assert!(
            waited >= CLOSE_GRACE && waited < CLOSE_GRACE + Duration::from_secs(1),
            "{waited:?}"
        );
        assert_eq!(
            (s.initiator, s.code, s.reason.as_str()),
            (Initiator::Client, Some(1000), "bye")
        );
        // The Close did reach the app.
        assert_eq!(recv_close(&mut r.app).await, (1000, "bye".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn drain_ends_a_connection_whose_client_stopped_reading() {
        let Relay {
            client,
            mut app,
            drain,
            meter,
            task,
        } = start(None, None).await;
        // The app sends far more than the pipes and buffers hold; the client reads nothing.
        const SENT: usize = 1000;
        let app_task = tokio::spawn(async move {
            for _ in 0..SENT {
                app.send(Message::binary(vec![0u8; 4096])).await.unwrap();
            }
            let close = recv_close(&mut app).await;
            finish(app).await;
            close
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!app_task.is_finished(), "the client's pipe never filled up");
        let (relayed, _) = meter.get(Direction::UpstreamToClient);
        assert!(relayed < SENT as u64, "{relayed}");

        let t0 = Instant::now();
        drain.cancel();
        // The app still reads: it gets its 1001 once the stuck write to the client is given up.
        let app_close = tokio::time::timeout(PATIENCE, app_task).await.unwrap().unwrap();
        assert_eq!(app_close, (1001, "going away".into()));
        assert!(t0.elapsed() >= STOP_WRITE_TIMEOUT, "{:?}", t0.elapsed());
        let s = summary(task).await;
        // The client never answers: the relay ends at the grace after the stop, plus the linger.
        let took = t0.elapsed();
        assert!(took >= CLOSE_GRACE && took <= CLOSE_GRACE + LINGER, "{took:?}");
        assert_eq!((s.initiator, s.code), (Initiator::Proxy, Some(1001)));
        assert_eq!(s.reason, "going away (drain)");
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn messages_queued_for_a_client_that_does_not_read_are_bounded_by_the_budget() {
        use crate::proxy::budget::{ALLOWANCE, Hold, MemoryBudget};
        // The client's pipe holds almost nothing and the client never reads.
        let (proxy_client_io, _client_io) = tokio::io::duplex(1024);
        let proxy_client = WebSocketStream::from_raw_socket(proxy_client_io, Role::Server, None).await;
        let (proxy_app_io, app_io) = tokio::io::duplex(1 << 20);
        let proxy_app = WebSocketStream::from_raw_socket(proxy_app_io, Role::Client, None).await;
        let mut app = WebSocketStream::from_raw_socket(app_io, Role::Server, None).await;
        // A burst from the app, already there when the relay starts: one batch.
        let size = ALLOWANCE / 2 + 8 * 1024;
        for _ in 0..3 {
            app.send(Message::binary(vec![1u8; size])).await.unwrap();
        }
        let budget = MemoryBudget::new(8 * 1024);
        let drain = CancellationToken::new();
        let meter: &'static Counter = Box::leak(Box::default());
        let control = Control {
            stopper: Stopper::new(&drain),
            expires_at: None,
            keepalive: None,
            holds: None,
            queues: Some((Hold::new(budget.clone()), Hold::new(budget.clone()))),
            meter,
        };
        let task = tokio::spawn(relay(proxy_client, proxy_app, control));
        let (code, reason) = recv_close(&mut app).await;
        assert_eq!(
            (code, reason.as_str()),
            (1013, "memory budget exceeded, try again later")
        );
        let summary = tokio::time::timeout(CLOSE_GRACE + Duration::from_secs(5), task)
            .await
            .expect("the relay ends although the client never reads")
            .unwrap();
        assert_eq!(summary.initiator, Initiator::Proxy);
        assert_eq!(summary.code, Some(1013));
        assert!(budget.used() <= 8 * 1024, "charged {} of 8 KiB", budget.used());
    }
}
