//! The frame relay: forwards WebSocket frames both ways until both peers have closed.
//!
//! Frames are forwarded as they came, mask and all (a client's frames go on to a server, a
//! server's to a client), once each is whole and checked: reserved bits, opcodes, masking,
//! control frame rules, the frame and message size limits, fragment order, UTF-8 in text, Close
//! codes ([`wire`]). Nothing is decoded into messages or encoded again; a batch of frames read
//! at once goes out in one write. Both directions are driven by one poll of the connection's
//! task, with no lock and no channel between them.
//!
//! Pings are answered on each leg and not forwarded; a Close is forwarded and answered on its
//! own leg at once. A peer that breaks the protocol is closed with 1002, oversize with 1009,
//! invalid UTF-8 with 1007, and the other peer gets 1001 "peer connection failed". wsgate ends a
//! connection itself through its [`Stopper`]: drain (1001), the client certificate's expiry or a
//! trust change that no longer admits it (1008), no frame from a peer within the idle timeout
//! although each leg is pinged (1001), a message left unfinished past the message timeout
//! (1008), frames waiting for a peer that does not read past the memory budget (1013); a peer
//! whose unfinished message would exceed the budget is closed with 1013.
//!
//! What one connection holds is bounded: one frame being received (up to the frame limit) and
//! the frames read with it, which are not read past while the other peer does not take them
//! (backpressure); both are charged to the budget beyond the allowance. The read buffer is freed
//! whenever it is empty, so an idle connection holds none, and one grown for a large frame is
//! given up once that frame is gone. After a stop every write gets [`STOP_WRITE_TIMEOUT`], and
//! the relay ends within [`CLOSE_GRACE`], then both connections linger. Depends on `budget`.

pub mod wire;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use self::wire::{Opcode, Utf8Check, WireError};
use super::budget::Hold;

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
    /// What waits for a peer that does not read would exceed the memory budget.
    Budget,
}

impl StopReason {
    /// The Close frame to send, and the note for the close summary.
    fn close(self) -> (u16, &'static str, &'static str) {
        match self {
            StopReason::Drain => (1001, "going away", "going away (drain)"),
            StopReason::Expired => (1008, "client certificate expired", "client certificate expired"),
            StopReason::Untrusted => (
                1008,
                "client certificate no longer trusted",
                "client certificate no longer trusted (trust roots changed)",
            ),
            StopReason::Idle => (1001, "idle timeout", "idle timeout: no frame from a peer"),
            StopReason::Unfinished => (
                1008,
                "message not finished in time",
                "message not finished within the message timeout",
            ),
            StopReason::Budget => (
                1013,
                "memory budget exceeded, try again later",
                "memory budget exceeded by frames waiting for a peer that does not read",
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
    /// What each peer sent that waits for the other to take it (the client's for the app, the
    /// app's for the client), charged to the budget beyond the allowance; past it the connection
    /// is ended with 1013.
    pub queues: Option<(Arc<Hold>, Arc<Hold>)>,
    /// The largest frame and message a peer may send.
    pub limits: FrameLimits,
    /// Counts relayed messages.
    pub meter: &'m dyn RelayMeter,
}

/// The largest frame and message a peer may send (1009 beyond either).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest frame payload, in bytes.
    pub max_frame: usize,
    /// Largest message (the payloads of all its fragments), in bytes.
    pub max_message: usize,
}

/// Receives relay counts, once per poll of the relay that relayed any.
pub trait RelayMeter: Send + Sync {
    /// `messages` data messages carrying `bytes` payload bytes went `dir`.
    fn relayed(&self, dir: Direction, messages: u64, bytes: u64);
}

/// How long the other peer may take to finish its close handshake once one has finished, and
/// how long the relay lasts at most after a stop.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How long a write may still take once stop (drain or expiry) has fired. Before stop a write
/// waits as long as its peer makes it (backpressure: a slow reader slows its sender); after it, a
/// peer that has not taken what is due within this is not reading, and nothing more is written
/// to it.
const STOP_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Room for one read when no frame is being received: a TLS record's worth.
const READ_CHUNK: usize = 16 * 1024;
/// Most room made for one read into a large frame being received.
const MAX_READ: usize = 256 * 1024;
/// Most bytes of wsgate's own Pings and Pongs waiting for one peer; a Pong beyond is dropped
/// (RFC 6455 lets a peer answer only some Pings), so a peer that pings and never reads holds
/// no more than this.
const CTL_CAP: usize = 1024;
/// Reads per poll of the relay before it lets the connection's other work and other tasks run.
const MAX_READS_PER_POLL: usize = 64;

/// Read buffers that connections gave back when they went idle, kept per thread for the next
/// connection that has something to read: an idle connection holds no read buffer, and a busy
/// one does not pay an allocation per wake-up.
mod spare {
    use std::cell::RefCell;

    use bytes::BytesMut;

    use super::READ_CHUNK;

    /// Buffers kept per thread, at most.
    const KEPT: usize = 16;

    thread_local! {
        static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    }

    /// A buffer to read into: a spare one, or a new empty one (allocated by the caller's
    /// `reserve`).
    pub(super) fn take() -> BytesMut {
        SPARE
            .try_with(|s| s.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Gives back an empty buffer: kept if it is of the usual size and there is room, freed
    /// otherwise (a buffer grown for a large frame is not kept).
    pub(super) fn give(mut buf: BytesMut) {
        buf.clear();
        // `try_reclaim` never allocates: it tells whether the allocation holds that much, and
        // makes what was read and consumed room again (no copy: the buffer is empty). Larger
        // than two chunks is not kept, smaller than one is of no use.
        if buf.try_reclaim(2 * READ_CHUNK + 1) || !buf.try_reclaim(READ_CHUNK) {
            return;
        }
        let _ = SPARE.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < KEPT {
                s.push(buf);
            }
        });
    }
}

/// The message a peer is in the middle of sending.
struct Partial {
    /// The UTF-8 check of a text message; `None` for binary.
    text: Option<Utf8Check>,
    /// Payload bytes so far.
    len: u64,
    /// Frame bytes so far (headers included): what the hold counts for it.
    wire: u64,
}

/// One peer: its connection, what was read from it, what wsgate owes it.
struct Side<S> {
    io: S,
    who: Initiator,
    /// Its frames are masked (it is the WebSocket client of this leg); wsgate's own frames to it
    /// are then not, and the other way round.
    masked: bool,
    /// Bytes read from it. `rbuf[..fwd]` are whole, checked frames due to the other peer and
    /// written from here; the rest is the start of a frame not yet whole.
    rbuf: BytesMut,
    fwd: usize,
    /// The frames due to the other peer end with a Close.
    fwd_close: bool,
    /// Bytes still missing of the frame being received (0: not known yet).
    need: usize,
    /// The message it is sending, if unfinished.
    msg: Option<Partial>,
    /// wsgate's own Pings and Pongs for it, written at a frame boundary.
    ctl: Vec<u8>,
    /// wsgate's Close for it, written after everything else due to it.
    close: Option<Vec<u8>>,
    /// A Close is due to it (wsgate's, or the other peer's forwarded): nothing after it.
    close_queued: bool,
    /// That Close was written.
    closed_out: bool,
    /// A write to it stopped inside forwarded frames: its own frames wait for the next boundary.
    mid: bool,
    /// Written and not yet flushed.
    dirty: bool,
    /// Nothing more is read from it: it sent its Close, ended, or broke the protocol.
    read_done: bool,
    /// Nothing more is written to it: a write failed, or was given up after a stop.
    write_dead: bool,
    /// A write to it failed (not given up): the peer is gone.
    write_failed: bool,
    /// Its read buffer grew past the usual size (a large frame): it is not kept once empty,
    /// and a small remainder moves to a usual one.
    grown: bool,
    /// Data messages finished and their payload bytes, not yet metered.
    msgs: u64,
    bytes: u64,
}

impl<S> Side<S> {
    fn new(io: S, who: Initiator, masked: bool) -> Self {
        Self {
            io,
            who,
            masked,
            rbuf: BytesMut::new(),
            fwd: 0,
            fwd_close: false,
            need: 0,
            msg: None,
            ctl: Vec::new(),
            close: None,
            close_queued: false,
            closed_out: false,
            mid: false,
            dirty: false,
            read_done: false,
            write_dead: false,
            write_failed: false,
            grown: false,
            msgs: 0,
            bytes: 0,
        }
    }

    /// It takes more frames: no Close is due to it and writes to it work.
    fn accepts(&self) -> bool {
        !self.close_queued && !self.write_dead
    }

    /// Everything due to it, its Close last, is written and flushed (or it cannot be written).
    fn out_done(&self) -> bool {
        self.write_dead || (self.closed_out && !self.dirty)
    }

    /// Both ways are over with this peer.
    fn done(&self) -> bool {
        self.read_done && self.out_done()
    }

    /// Queues wsgate's Close for it, unless a Close is due to it already.
    fn queue_close(&mut self, code: Option<u16>, reason: &str) {
        if self.accepts() {
            let mut frame = Vec::with_capacity(8 + reason.len().min(123));
            wire::push_close(&mut frame, code, reason, !self.masked);
            self.close = Some(frame);
        }
        self.close_queued = true;
    }

    /// Queues a Ping or Pong for it, within [`CTL_CAP`].
    fn queue_control(&mut self, opcode: Opcode, payload: &[u8]) {
        if self.accepts() && self.ctl.len() < CTL_CAP {
            wire::push_control(&mut self.ctl, opcode, payload, !self.masked);
        }
    }

    /// Cuts `len` bytes out of `rbuf` at the end of the frames due (a control frame consumed,
    /// or a frame for a peer that takes no more).
    fn cut(&mut self, len: usize) {
        let (at, end) = (self.fwd, self.rbuf.len());
        self.rbuf.copy_within(at + len..end, at);
        self.rbuf.truncate(end - len);
    }

    fn direction(&self) -> Direction {
        match self.who {
            Initiator::Client => Direction::ClientToUpstream,
            _ => Direction::UpstreamToClient,
        }
    }
}

/// Why a peer is closed by wsgate for what it sent.
enum Refusal {
    /// Its frames broke the protocol or a limit.
    Wire(WireError),
    /// Its unfinished message would exceed the memory budget.
    Budget,
}

impl Refusal {
    fn close(&self) -> (u16, &'static str) {
        match self {
            Refusal::Wire(e) => (e.code(), e.reason()),
            Refusal::Budget => (1013, "memory budget exceeded, try again later"),
        }
    }

    fn describe(&self) -> String {
        match self {
            Refusal::Wire(e) => e.to_string(),
            Refusal::Budget => "the memory budget for unfinished messages is exhausted".into(),
        }
    }
}

impl From<WireError> for Refusal {
    fn from(e: WireError) -> Self {
        Refusal::Wire(e)
    }
}

/// What the relay keeps besides the two peers.
struct Books<'a> {
    limits: FrameLimits,
    /// What each peer's unfinished message holds (client's, app's).
    holds: [Option<&'a Hold>; 2],
    /// What each peer sent that waits for the other (client's, app's).
    queues: [Option<&'a Hold>; 2],
    /// The budget refused what waits for a peer: the connection is ended with 1013.
    over_budget: bool,
    /// When each peer last sent anything, in milliseconds since `origin`.
    seen: [&'a AtomicU64; 2],
    origin: tokio::time::Instant,
    /// The first close seen.
    first: Option<CloseSummary>,
}

impl Books<'_> {
    fn note(&mut self, initiator: Initiator, code: Option<u16>, reason: impl Into<String>) {
        if self.first.is_none() {
            self.first = Some(CloseSummary {
                initiator,
                code,
                reason: reason.into(),
            });
        }
    }

    fn index(who: Initiator) -> usize {
        match who {
            Initiator::Client => 0,
            _ => 1,
        }
    }
}

/// Writes to `dst` what is due to it: its own Pings and Pongs at a frame boundary, the frames
/// `src` forwards, then its Close. `true` when anything was written.
fn poll_write_out<A, B>(dst: &mut Side<B>, src: &mut Side<A>, cx: &mut Context<'_>) -> bool
where
    B: AsyncWrite + Unpin,
{
    #[derive(Clone, Copy)]
    enum What {
        Forwarded,
        Own,
        Close,
    }
    let mut wrote = false;
    loop {
        if dst.write_dead {
            src.rbuf.advance(src.fwd);
            (src.fwd, src.fwd_close) = (0, false);
            dst.ctl = Vec::new();
            dst.close = None;
            return wrote;
        }
        let what = if dst.mid && src.fwd > 0 {
            What::Forwarded
        } else if !dst.ctl.is_empty() {
            What::Own
        } else if src.fwd > 0 {
            What::Forwarded
        } else if dst.close.is_some() {
            What::Close
        } else {
            return wrote;
        };
        let buf: &[u8] = match what {
            What::Forwarded => &src.rbuf[..src.fwd],
            What::Own => &dst.ctl,
            What::Close => dst.close.as_deref().unwrap_or_default(),
        };
        let n = match Pin::new(&mut dst.io).poll_write(cx, buf) {
            Poll::Pending => return wrote,
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                (dst.write_dead, dst.write_failed) = (true, true);
                continue;
            }
            Poll::Ready(Ok(n)) => n,
        };
        wrote = true;
        dst.dirty = true;
        match what {
            What::Forwarded => {
                src.rbuf.advance(n);
                src.fwd -= n;
                dst.mid = src.fwd > 0;
                if src.fwd == 0 && src.fwd_close {
                    src.fwd_close = false;
                    dst.closed_out = true;
                }
            }
            What::Own => {
                dst.ctl.drain(..n);
            }
            What::Close => match dst.close.as_mut() {
                Some(frame) if n < frame.len() => {
                    frame.drain(..n);
                }
                _ => {
                    dst.close = None;
                    dst.closed_out = true;
                }
            },
        }
    }
}

/// Flushes what was written to `side`.
fn poll_flush_out<S: AsyncWrite + Unpin>(side: &mut Side<S>, cx: &mut Context<'_>) {
    if side.dirty && !side.write_dead {
        match Pin::new(&mut side.io).poll_flush(cx) {
            Poll::Ready(Ok(())) => side.dirty = false,
            Poll::Ready(Err(_)) => side.write_dead = true,
            Poll::Pending => {}
        }
    }
}

/// Reads `src` when all it had is forwarded, and takes the frames out. `true` when anything
/// was read or `src` ended.
fn poll_read_in<A, B>(src: &mut Side<A>, dst: &mut Side<B>, books: &mut Books<'_>, cx: &mut Context<'_>) -> bool
where
    A: AsyncRead + Unpin,
{
    if src.read_done || src.fwd > 0 {
        return false;
    }
    let room = match src.need {
        0 => READ_CHUNK,
        n => n.clamp(READ_CHUNK, MAX_READ),
    };
    if src.grown && src.need <= READ_CHUNK && src.rbuf.len() <= READ_CHUNK {
        // The large frame is gone: what is left of the next one moves to a usual buffer, so a
        // peer cannot keep a large allocation while holding (and being charged for) a few bytes.
        let mut usual = spare::take();
        usual.extend_from_slice(&src.rbuf);
        src.rbuf = usual;
        src.grown = false;
    }
    if src.rbuf.capacity() == 0 {
        src.rbuf = spare::take();
    }
    src.rbuf.reserve(room);
    src.grown |= room > READ_CHUNK || src.rbuf.capacity() > 2 * READ_CHUNK;
    let i = Books::index(src.who);
    match tokio_util::io::poll_read_buf(Pin::new(&mut src.io), cx, &mut src.rbuf) {
        Poll::Pending => {
            // Idle: an idle connection holds no read buffer.
            if src.rbuf.is_empty() {
                let buf = std::mem::take(&mut src.rbuf);
                if !std::mem::take(&mut src.grown) {
                    spare::give(buf);
                }
            }
            false
        }
        Poll::Ready(Ok(0)) => {
            books.note(src.who, None, "connection closed without a Close frame");
            end_source(src, dst, books, "peer went away");
            true
        }
        Poll::Ready(Ok(_)) => {
            books.seen[i].store(books.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
            if let Err(refusal) = take_frames(src, dst, books) {
                let (code, reason) = refusal.close();
                books.note(
                    Initiator::Proxy,
                    Some(code),
                    format!("{}: {}", src.who.as_str(), refusal.describe()),
                );
                src.queue_close(Some(code), reason);
                end_source(src, dst, books, "peer connection failed");
            }
            true
        }
        Poll::Ready(Err(err)) => {
            books.note(src.who, None, format!("read failed: {err}"));
            end_source(src, dst, books, "peer connection failed");
            true
        }
    }
}

/// Nothing more is read from `src`: what it sent whole still goes to `dst`, then 1001 `why`.
fn end_source<A, B>(src: &mut Side<A>, dst: &mut Side<B>, books: &Books<'_>, why: &'static str) {
    src.read_done = true;
    src.rbuf.truncate(src.fwd);
    (src.need, src.msg) = (0, None);
    if !src.close_queued {
        // It ended without a Close (a vanished peer): nothing can be written to it either.
        src.close_queued = true;
        src.write_dead = true;
    }
    dst.queue_close(Some(1001), why);
    if let Some(hold) = books.holds[Books::index(src.who)] {
        hold.release();
    }
}

/// Takes the whole frames out of what `src` sent: data frames become due to `dst` as they
/// are, control frames are handled here. Counts what `src`'s unfinished message holds.
fn take_frames<A, B>(src: &mut Side<A>, dst: &mut Side<B>, books: &mut Books<'_>) -> Result<(), Refusal> {
    // A message ended in this pass: what is held after it is the next one's, timed from now.
    let mut ended = false;
    loop {
        let avail = &src.rbuf[src.fwd..];
        let Some(h) = wire::parse_header(avail, src.masked, books.limits.max_frame)? else {
            src.need = 0;
            break;
        };
        // Order and size are checked from the header, before the frame is waited for.
        if !h.opcode.is_control() {
            let so_far = match (h.opcode, src.msg.as_ref()) {
                (Opcode::Continuation, Some(msg)) => msg.len,
                (Opcode::Continuation, None) => {
                    return Err(WireError::Protocol("continuation frame outside a message").into());
                }
                (_, Some(_)) => return Err(WireError::Protocol("new message before the last one ended").into()),
                (_, None) => 0,
            };
            let size = so_far + h.payload_len;
            if size > books.limits.max_message as u64 {
                return Err(WireError::TooBig {
                    what: "message",
                    size,
                    limit: books.limits.max_message,
                }
                .into());
            }
        }
        // At most the frame limit plus a header: fits.
        let total = h.frame_len() as usize;
        if avail.len() < total {
            src.need = total - avail.len();
            break;
        }
        src.need = 0;
        let payload = src.fwd + h.header_len..src.fwd + total;
        if h.opcode.is_control() {
            let mut body = [0u8; 125];
            let body = &mut body[..payload.len()];
            body.copy_from_slice(&src.rbuf[payload]);
            if let Some(key) = h.mask {
                wire::apply_mask(body, key, 0);
            }
            match h.opcode {
                Opcode::Ping => {
                    src.cut(total);
                    src.queue_control(Opcode::Pong, body);
                }
                Opcode::Close => {
                    let (code, reason) = match wire::parse_close(body)? {
                        Some((code, reason)) => (Some(code), reason),
                        None => (None, ""),
                    };
                    books.note(src.who, code, reason);
                    // Forwarded as it came; answered on its own leg unless this answers ours.
                    if dst.accepts() {
                        src.fwd += total;
                        src.fwd_close = true;
                        dst.close_queued = true;
                    } else {
                        src.cut(total);
                    }
                    let reason = reason.to_owned();
                    src.queue_close(code, &reason);
                    src.read_done = true;
                    src.rbuf.truncate(src.fwd);
                    if let Some(hold) = books.holds[Books::index(src.who)] {
                        hold.release();
                    }
                    return Ok(());
                }
                _ => src.cut(total),
            }
            continue;
        }
        let msg = src.msg.get_or_insert_with(|| Partial {
            text: (h.opcode == Opcode::Text).then(Utf8Check::default),
            len: 0,
            wire: 0,
        });
        msg.len += h.payload_len;
        if let Some(check) = msg.text.as_mut() {
            check.feed(&src.rbuf[payload], h.mask, 0)?;
            if h.fin {
                check.finish()?;
            }
        }
        msg.wire += total as u64;
        let len = msg.len;
        if h.fin {
            src.msg = None;
            ended = true;
        }
        if dst.accepts() {
            src.fwd += total;
            if h.fin {
                src.msgs += 1;
                src.bytes += len;
            }
        } else {
            src.cut(total);
        }
    }
    // What the unfinished message holds: its frames so far and the frame being received.
    let i = Books::index(src.who);
    if let Some(hold) = books.holds[i] {
        if ended {
            hold.release();
        }
        let held = src.msg.as_ref().map_or(0, |m| m.wire) as usize + (src.rbuf.len() - src.fwd);
        if !hold.set(held) {
            return Err(Refusal::Budget);
        }
    }
    // What waits for the other peer: charged too, beyond the allowance; past the budget the
    // frames are dropped and the connection is ended with 1013.
    if let Some(queue) = books.queues[i]
        && !queue.set(src.fwd)
    {
        src.rbuf.advance(src.fwd);
        (src.fwd, src.fwd_close) = (0, false);
        books.over_budget = true;
    }
    Ok(())
}

/// The books of `side` after a poll's reads and writes: what it sent that waits for `other` is
/// charged as it now is (it shrank as it was written), a peer whose writes failed is gone (the
/// other one is told), and what it sent is metered.
fn settle<A, B>(side: &mut Side<A>, other: &mut Side<B>, books: &mut Books<'_>, meter: &dyn RelayMeter) {
    if let Some(queue) = books.queues[Books::index(side.who)] {
        queue.set(side.fwd);
    }
    if side.write_failed && !side.read_done {
        books.note(side.who, None, "connection failed while being written to");
        end_source(side, other, books, "peer connection failed");
    }
    if side.msgs > 0 {
        meter.relayed(side.direction(), side.msgs, side.bytes);
        (side.msgs, side.bytes) = (0, 0);
    }
}

/// What a poll of the relay ended with.
enum Polled {
    /// Both peers are done.
    Finished,
    /// One peer is done: the other gets [`CLOSE_GRACE`].
    OneDone,
    /// The budget refused what waits for a peer: the connection is to be stopped.
    OverBudget,
}

/// The two peers and the books: the relay's state between polls.
struct Relay<'a, C, U> {
    client: &'a mut Side<C>,
    app: &'a mut Side<U>,
    books: Books<'a>,
    meter: &'a dyn RelayMeter,
    one_done: bool,
}

impl<C, U> Relay<'_, C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    /// Relays everything ready both ways. One poll moves every frame that is ready with no
    /// future built per frame: this is the per-message cost of the proxy.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Polled> {
        let Relay {
            client,
            app,
            books,
            meter,
            one_done,
        } = self;
        let mut reads = 0;
        loop {
            let mut moved = poll_write_out(&mut **app, &mut **client, cx);
            moved |= poll_write_out(&mut **client, &mut **app, cx);
            if reads == MAX_READS_PER_POLL {
                cx.waker().wake_by_ref();
                break;
            }
            reads += 1;
            moved |= poll_read_in(&mut **client, &mut **app, books, cx);
            moved |= poll_read_in(&mut **app, &mut **client, books, cx);
            if !moved {
                break;
            }
        }
        poll_flush_out(client, cx);
        poll_flush_out(app, cx);
        settle(&mut **client, &mut **app, books, *meter);
        settle(&mut **app, &mut **client, books, *meter);
        if std::mem::take(&mut books.over_budget) {
            return Poll::Ready(Polled::OverBudget);
        }
        match (client.done(), app.done()) {
            (true, true) => Poll::Ready(Polled::Finished),
            (true, _) | (_, true) if !*one_done => {
                *one_done = true;
                Poll::Ready(Polled::OneDone)
            }
            _ => Poll::Pending,
        }
    }

    /// wsgate ends the connection: a Close to both peers.
    fn stop(&mut self, reason: StopReason) {
        let (code, text, note) = reason.close();
        self.books.note(Initiator::Proxy, Some(code), note);
        self.client.queue_close(Some(code), text);
        self.app.queue_close(Some(code), text);
    }

    /// [`STOP_WRITE_TIMEOUT`] after a stop: a peer that has not taken what was due gets nothing more.
    fn give_up(&mut self) {
        if !self.client.out_done() {
            self.client.write_dead = true;
        }
        if !self.app.out_done() {
            self.app.write_dead = true;
        }
    }

    /// Keep-alive: a Ping to each peer that has none waiting.
    fn ping(&mut self) {
        if self.client.ctl.is_empty() {
            self.client.queue_control(Opcode::Ping, &[]);
        }
        if self.app.ctl.is_empty() {
            self.app.queue_control(Opcode::Ping, &[]);
        }
    }
}

/// Relays frames between the client's and the app's WebSocket connections (after their
/// upgrades) until both have closed (or one has and the other did not finish within
/// [`CLOSE_GRACE`]), then closes the client's connection gracefully. Resolves to the first close
/// seen. `client` is the WebSocket client of its leg (its frames are masked) and `upstream` the
/// server of its.
///
/// A drain or the client certificate's expiry ends the relay within [`CLOSE_GRACE`] (plus the
/// client connection's linger) whatever the peers do.
///
/// Not an `async fn`: its arguments would stay in the future next to the state they move into;
/// `run` keeps the two peers in place.
pub fn relay<'m, C, U>(client: C, upstream: U, control: Control<'m>) -> impl Future<Output = CloseSummary> + 'm
where
    C: AsyncRead + AsyncWrite + Unpin + 'm,
    U: AsyncRead + AsyncWrite + Unpin + 'm,
{
    run(
        Side::new(client, Initiator::Client, true),
        Side::new(upstream, Initiator::Upstream, false),
        control,
    )
}

fn ping_interval(keepalive: Option<Keepalive>) -> Option<tokio::time::Interval> {
    keepalive.map(|k| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + k.ping_interval, k.ping_interval);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    })
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

/// Sleeps until `at`; never, without it.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn run<C, U>(mut client: Side<C>, mut app: Side<U>, control: Control<'_>) -> CloseSummary
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    use futures_util::FutureExt;
    let Control {
        stopper,
        expires_at,
        keepalive,
        holds,
        queues,
        limits,
        meter,
    } = control;
    let stop = stopper.token.clone();
    let origin = tokio::time::Instant::now();
    let seen = [AtomicU64::new(0), AtomicU64::new(0)];
    let first = {
        let mut relay = Relay {
            client: &mut client,
            app: &mut app,
            books: Books {
                limits,
                holds: [
                    holds.as_ref().map(|h| h.0.as_ref()),
                    holds.as_ref().map(|h| h.1.as_ref()),
                ],
                queues: [
                    queues.as_ref().map(|q| q.0.as_ref()),
                    queues.as_ref().map(|q| q.1.as_ref()),
                ],
                over_budget: false,
                seen: [&seen[0], &seen[1]],
                origin,
                first: None,
            },
            meter,
            one_done: false,
        };
        let mut ping = ping_interval(keepalive);
        let timeouts = std::pin::pin!(watch_timeouts(keepalive, holds.as_ref(), origin, [&seen[0], &seen[1]]).fuse());
        let expiry = std::pin::pin!(until(expires_at).fuse());
        let (mut timeouts, mut expiry) = (timeouts, expiry);
        let (mut stopping, mut give_up, mut end_by) = (false, None, None::<tokio::time::Instant>);
        let grace = |end_by: Option<tokio::time::Instant>| {
            let at = tokio::time::Instant::now() + CLOSE_GRACE;
            Some(end_by.map_or(at, |t| t.min(at)))
        };
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled(), if !stopping => {
                    stopping = true;
                    relay.stop(stopper.reason());
                    give_up = Some(tokio::time::Instant::now() + STOP_WRITE_TIMEOUT);
                    end_by = grace(end_by);
                }
                _ = &mut expiry, if !stopping => stopper.stop(StopReason::Expired),
                reason = &mut timeouts, if !stopping => stopper.stop(reason),
                _ = until(give_up), if give_up.is_some() => {
                    give_up = None;
                    relay.give_up();
                }
                _ = until(end_by), if end_by.is_some() => break,
                _ = tick(&mut ping), if !stopping => relay.ping(),
                polled = std::future::poll_fn(|cx| relay.poll_io(cx)) => match polled {
                    Polled::Finished => break,
                    Polled::OneDone => end_by = grace(end_by),
                    Polled::OverBudget => stopper.stop(StopReason::Budget),
                },
            }
        }
        relay.books.first
    };
    // Both connections end the careful way (close_notify on a TLS one, FIN, unread input
    // drained for a moment), so a Close just sent is not destroyed by a reset.
    tokio::join!(linger(client.io), linger(app.io));
    first.unwrap_or(CloseSummary {
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

    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncWriteExt, DuplexStream};
    use tokio::task::JoinHandle;
    use tokio::time::Instant;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};

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

    /// Limits no test message reaches.
    const LIMITS: FrameLimits = FrameLimits {
        max_frame: 1 << 20,
        max_message: 1 << 20,
    };

    /// How a test's relay is set up; `spawn` starts it over the proxy's raw ends.
    #[derive(Default)]
    struct Setup {
        expires_at: Option<Instant>,
        keepalive: Option<Keepalive>,
        holds: Option<(Arc<Hold>, Arc<Hold>, Duration)>,
        queues: Option<(Arc<Hold>, Arc<Hold>)>,
        limits: Option<FrameLimits>,
    }

    impl Setup {
        /// Holds on `budget` for both legs' unfinished messages, with this message timeout.
        fn holding(budget: &Arc<crate::proxy::budget::MemoryBudget>, message_timeout: Duration) -> Self {
            Setup {
                holds: Some((Hold::new(budget.clone()), Hold::new(budget.clone()), message_timeout)),
                ..Setup::default()
            }
        }

        /// The relay's task, the drain that stops it and what it metered.
        fn spawn(
            self,
            client: DuplexStream,
            app: DuplexStream,
        ) -> (JoinHandle<CloseSummary>, CancellationToken, &'static Counter) {
            let drain = CancellationToken::new();
            let meter: &'static Counter = Box::leak(Box::default());
            let control = Control {
                stopper: Stopper::new(&drain),
                expires_at: self.expires_at,
                keepalive: self.keepalive,
                holds: self.holds,
                queues: self.queues,
                limits: self.limits.unwrap_or(LIMITS),
                meter,
            };
            (tokio::spawn(relay(client, app, control)), drain, meter)
        }
    }

    /// One leg: the proxy's raw end and the peer's WebSocket end in `peer_role`.
    async fn pipe(peer_role: Role) -> (DuplexStream, Ws) {
        let (proxy, peer) = tokio::io::duplex(PIPE);
        (proxy, WebSocketStream::from_raw_socket(peer, peer_role, None).await)
    }

    fn close(code: CloseCode, reason: &'static str) -> Message {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
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

    async fn start(limits: FrameLimits, expires_at: Option<Instant>) -> Relay {
        let (proxy_client, client) = pipe(Role::Client).await;
        let (proxy_app, app) = pipe(Role::Server).await;
        let setup = Setup {
            expires_at,
            limits: Some(limits),
            ..Setup::default()
        };
        let (task, drain, meter) = setup.spawn(proxy_client, proxy_app);
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
        let mut r = start(LIMITS, None).await;
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
        let mut r = start(LIMITS, None).await;
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
        let mut r = start(LIMITS, None).await;
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
        let mut r = start(LIMITS, None).await;
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
        let mut r = start(LIMITS, Some(t0 + Duration::from_secs(60))).await;
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
        let limits = FrameLimits {
            max_frame: 1 << 20,
            max_message: 1024,
        };
        let mut r = start(limits, None).await;
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
        let mut r = start(LIMITS, None).await;
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
        // Cut at the grace; then both connections linger (the app, which neither reads nor
        // closes, for the whole linger).
        assert!(
            waited >= CLOSE_GRACE && waited <= CLOSE_GRACE + LINGER + Duration::from_millis(100),
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
        } = start(LIMITS, None).await;
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
    async fn a_client_that_does_not_read_holds_back_its_sender_and_nothing_is_charged() {
        use crate::proxy::budget::MemoryBudget;
        // The client's pipe holds almost nothing and the client never reads.
        let (proxy_client, _client_io) = tokio::io::duplex(1024);
        let (proxy_app, mut app) = pipe(Role::Server).await;
        let budget = MemoryBudget::new(8 * 1024);
        let setup = Setup::holding(&budget, Duration::from_secs(600));
        let (task, drain, meter) = setup.spawn(proxy_client, proxy_app);
        const SENT: usize = 100;
        let sender = tokio::spawn(async move {
            for _ in 0..SENT {
                app.send(Message::binary(vec![1u8; 16 * 1024])).await.unwrap();
            }
            app
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        // The relay stopped reading the app: the app's writes wait (backpressure), nothing
        // was refused, and whole frames held for the client are not charged.
        assert!(
            !sender.is_finished(),
            "the app wrote everything to a client that reads nothing"
        );
        let (relayed, _) = meter.get(Direction::UpstreamToClient);
        assert!(relayed < 10, "{relayed} messages read for a client that reads nothing");
        assert_eq!(budget.used(), 0);
        assert!(!task.is_finished());
        drain.cancel();
        let s = summary(task).await;
        assert_eq!((s.initiator, s.code), (Initiator::Proxy, Some(1001)));
    }

    #[test]
    fn idle_read_buffers_are_kept_for_reuse_up_to_a_bound_and_grown_ones_are_freed() {
        std::thread::spawn(|| {
            let mut used = BytesMut::with_capacity(READ_CHUNK);
            used.extend_from_slice(&[1u8; 5000]);
            used.advance(5000);
            let at = used.as_ptr();
            spare::give(used);
            let again = spare::take();
            assert!(again.capacity() >= READ_CHUNK && again.is_empty());
            assert_eq!(again.as_ptr(), at.wrapping_sub(5000), "the same allocation, reclaimed");
            // A buffer grown for a large frame is not kept, even when little of it is left
            // after what was read.
            spare::give(BytesMut::with_capacity(8 * READ_CHUNK));
            assert_eq!(spare::take().capacity(), 0);
            let mut big = BytesMut::with_capacity(2 << 20);
            big.extend_from_slice(&vec![0u8; (2 << 20) - 20 * 1024]);
            big.advance(big.len());
            assert!(big.capacity() >= 20 * 1024 && big.capacity() <= 2 * READ_CHUNK);
            spare::give(big);
            assert_eq!(spare::take().capacity(), 0);
            // At most KEPT are.
            for _ in 0..100 {
                spare::give(BytesMut::with_capacity(READ_CHUNK));
            }
            let kept = std::iter::from_fn(|| Some(spare::take()))
                .take_while(|b| b.capacity() > 0)
                .count();
            assert_eq!(kept, 16);
        })
        .join()
        .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_ping_flood_from_a_client_that_never_reads_holds_at_most_the_pong_cap() {
        // Directly: what wsgate owes one peer of its own frames stops at the cap.
        let (io, _peer) = tokio::io::duplex(64);
        let mut side = Side::new(io, Initiator::Client, true);
        for _ in 0..1000 {
            side.queue_control(Opcode::Pong, &[7; 125]);
        }
        assert!(
            side.ctl.len() <= CTL_CAP + 127,
            "{} bytes of pongs queued",
            side.ctl.len()
        );
        // Through the relay: 2000 pings from a client whose pipe holds 1 KiB and who never
        // reads are all taken (the pongs that do not fit are dropped, not queued), and data
        // after them still reaches the app.
        let ping = client_frame(true, 0x9, &[1; 125]);
        let mut frames = vec![ping; 2000];
        frames.push(client_frame(true, 0x2, b"after"));
        let (proxy_client, mut client_io) = tokio::io::duplex(1024);
        let (proxy_app, mut app) = pipe(Role::Server).await;
        let (task, drain, _) = Setup::default().spawn(proxy_client, proxy_app);
        let writer = tokio::spawn(async move {
            for f in frames {
                client_io.write_all(&f).await.unwrap();
            }
            client_io
        });
        assert_eq!(recv(&mut app).await, Message::binary(b"after".to_vec()));
        let _client_io = tokio::time::timeout(PATIENCE, writer).await.unwrap().unwrap();
        drain.cancel();
        let s = summary(task).await;
        assert_eq!((s.initiator, s.code), (Initiator::Proxy, Some(1001)));
    }

    /// A client frame of any size (masked with a fixed key).
    fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x11, 0x22, 0x33, 0x44];
        let mut f = vec![0x80 | opcode, 0x80 | 127];
        f.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        f.extend_from_slice(&key);
        let start = f.len();
        f.extend_from_slice(payload);
        wire::apply_mask(&mut f[start..], key, 0);
        f
    }

    #[tokio::test(start_paused = true)]
    async fn finished_messages_never_reach_the_message_timeout_when_reads_end_inside_frames() {
        use crate::proxy::budget::MemoryBudget;
        let budget = MemoryBudget::new(1 << 20);
        let (proxy_client, mut client_io) = tokio::io::duplex(PIPE);
        let (proxy_app, mut app) = pipe(Role::Server).await;
        let setup = Setup::holding(&budget, Duration::from_secs(2));
        let (task, _drain, _) = setup.spawn(proxy_client, proxy_app);
        // Each write ends 3 bytes into the next message; every message is finished 0.5 s after
        // it started, 20 of them over 10 s against a 2 s message timeout.
        let frames: Vec<Vec<u8>> = (0..21u8).map(|i| client_frame(true, 0x2, &[i; 100])).collect();
        let mut pending = Vec::new();
        for (i, frame) in frames.iter().enumerate() {
            let (head, tail) = frame.split_at(3);
            pending.extend_from_slice(head);
            if i > 0 {
                client_io.write_all(&pending).await.unwrap();
                pending.clear();
                assert_eq!(recv(&mut app).await, Message::binary(vec![i as u8 - 1; 100]));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            pending.extend_from_slice(tail);
        }
        assert!(!task.is_finished(), "the relay was stopped: {:?}", task.await);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_large_frame_a_small_remainder_moves_to_a_usual_buffer() {
        let (proxy_client, mut client_io) = tokio::io::duplex(4 << 20);
        let (proxy_app, mut app) = pipe(Role::Server).await;
        let payload = vec![5u8; 1 << 20];
        let mut bytes = masked_frame(0x2, &payload);
        bytes.push(0x82);
        client_io.write_all(&bytes).await.unwrap();
        let reader = tokio::spawn(async move { recv(&mut app).await });
        let mut client = Side::new(proxy_client, Initiator::Client, true);
        let mut app_side = Side::new(proxy_app, Initiator::Upstream, false);
        let seen = [AtomicU64::new(0), AtomicU64::new(0)];
        let meter = Counter::default();
        let mut relay = super::Relay {
            client: &mut client,
            app: &mut app_side,
            books: Books {
                limits: LIMITS,
                holds: [None, None],
                queues: [None, None],
                over_budget: false,
                seen: [&seen[0], &seen[1]],
                origin: Instant::now(),
                first: None,
            },
            meter: &meter,
            one_done: false,
        };
        for _ in 0..10_000 {
            if reader.is_finished() {
                break;
            }
            let _ = std::future::poll_fn(|cx| Poll::Ready(relay.poll_io(cx))).await;
            tokio::task::yield_now().await;
        }
        assert_eq!(reader.await.unwrap(), Message::binary(payload));
        let _ = std::future::poll_fn(|cx| Poll::Ready(relay.poll_io(cx))).await;
        assert_eq!(&client.rbuf[..], &[0x82]);
        assert!(client.rbuf.capacity() <= 2 * READ_CHUNK, "{}", client.rbuf.capacity());
    }

    #[tokio::test(start_paused = true)]
    async fn frames_waiting_for_a_client_that_does_not_read_are_charged_and_bounded_by_the_budget() {
        use crate::proxy::budget::{ALLOWANCE, Hold, MemoryBudget};
        for (budget_size, refused) in [(1 << 20, false), (100 * 1024, true)] {
            let budget = MemoryBudget::new(budget_size);
            // The client's pipe holds almost nothing and the client never reads.
            let (proxy_client, _client_io) = tokio::io::duplex(1024);
            let (proxy_app, mut app) = pipe(Role::Server).await;
            let setup = Setup {
                queues: Some((Hold::new(budget.clone()), Hold::new(budget.clone()))),
                ..Setup::default()
            };
            let (task, drain, meter) = setup.spawn(proxy_client, proxy_app);
            app.send(Message::binary(vec![1u8; 300 * 1024])).await.unwrap();
            if refused {
                assert_eq!(
                    recv_close(&mut app).await,
                    (1013, "memory budget exceeded, try again later".into())
                );
                let s = summary(task).await;
                assert_eq!((s.initiator, s.code), (Initiator::Proxy, Some(1013)));
                assert_eq!(
                    meter.get(Direction::UpstreamToClient),
                    (1, 300 * 1024),
                    "read, never sent"
                );
            } else {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let waiting = 300 * 1024 + 10 - ALLOWANCE;
                let used = budget.used();
                assert!(
                    used + 1024 >= waiting && used <= waiting,
                    "{used} charged, {waiting} waiting"
                );
                drain.cancel();
                summary(task).await;
            }
            assert_eq!(budget.used(), 0, "all refunded at the end");
        }
    }

    /// Writes `frames` (raw bytes) on `io`, then makes it the WebSocket client end.
    async fn raw_client(mut io: DuplexStream, frames: &[Vec<u8>]) -> Ws {
        for f in frames {
            io.write_all(f).await.unwrap();
        }
        WebSocketStream::from_raw_socket(io, Role::Client, None).await
    }

    /// A client frame (masked with a fixed key).
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        assert!(payload.len() < 126);
        let mut f = vec![u8::from(fin) << 7 | opcode, 0x80 | payload.len() as u8];
        f.extend_from_slice(&key);
        let start = f.len();
        f.extend_from_slice(payload);
        wire::apply_mask(&mut f[start..], key, 0);
        f
    }

    /// Starts a relay whose client sends `frames` raw; returns the client and app ends.
    async fn start_raw(frames: &[Vec<u8>]) -> (Ws, Ws, JoinHandle<CloseSummary>) {
        let (proxy_client, client_io) = tokio::io::duplex(PIPE);
        let (proxy_app, app) = pipe(Role::Server).await;
        let (task, _drain, _) = Setup::default().spawn(proxy_client, proxy_app);
        (raw_client(client_io, frames).await, app, task)
    }

    #[tokio::test(start_paused = true)]
    async fn frames_that_break_the_protocol_close_the_client_with_1002_1007_or_1009() {
        let unmasked = vec![0x82, 0x02, 1, 2];
        let bad_utf8 = client_frame(true, 0x1, b"ok \xff no");
        let orphan = client_frame(true, 0x0, b"more");
        let interleaved = [client_frame(false, 0x2, b"a"), client_frame(true, 0x1, b"b")].concat();
        let bad_close = client_frame(true, 0x8, &1005u16.to_be_bytes());
        let too_big = [vec![0x82, 0xFF], (2u64 << 20).to_be_bytes().to_vec(), vec![0; 4]].concat();
        for (frame, code) in [
            (unmasked, 1002),
            (bad_utf8, 1007),
            (orphan, 1002),
            (interleaved, 1002),
            (bad_close, 1002),
            (too_big, 1009),
        ] {
            let (mut client, mut app, task) = start_raw(std::slice::from_ref(&frame)).await;
            assert_eq!(recv_close(&mut client).await.0, code, "{frame:x?}");
            assert_eq!(recv_close(&mut app).await, (1001, "peer connection failed".into()));
            tokio::join!(finish(client), finish(app));
            let s = summary(task).await;
            assert_eq!((s.initiator, s.code), (Initiator::Proxy, Some(code)), "{s:?}");
            assert!(s.reason.starts_with("client: "), "{}", s.reason);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_fragmented_text_split_inside_a_character_with_a_ping_between_arrives_whole() {
        let frames = [
            client_frame(false, 0x1, "h\u{e9}".as_bytes().split_at(2).0),
            client_frame(true, 0x9, b"hi"),
            client_frame(false, 0x0, &"h\u{e9}".as_bytes()[2..]),
            client_frame(true, 0x0, "llo \u{1D11E}".as_bytes()),
            client_frame(true, 0x2, &[9; 100]),
        ];
        let (mut client, mut app, task) = start_raw(&frames).await;
        assert_eq!(recv(&mut app).await, Message::text("h\u{e9}llo \u{1D11E}"));
        assert_eq!(recv(&mut app).await, Message::binary(vec![9u8; 100]));
        assert_eq!(recv(&mut client).await, Message::Pong(b"hi".to_vec().into()));
        client.close(None).await.unwrap();
        tokio::join!(finish(client), finish(app));
        assert_eq!(summary(task).await.initiator, Initiator::Client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_message_in_many_small_writes_is_forwarded_intact() {
        let mut r = start(LIMITS, None).await;
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        r.client.send(Message::binary(big.clone())).await.unwrap();
        r.app.send(Message::text("x".repeat(70_000))).await.unwrap();
        assert_eq!(recv(&mut r.app).await, Message::binary(big));
        assert_eq!(recv(&mut r.client).await, Message::text("x".repeat(70_000)));
        r.app.close(None).await.unwrap();
        tokio::join!(finish(r.client), finish(r.app));
        assert_eq!(summary(r.task).await.initiator, Initiator::Upstream);
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_pings_both_peers_and_a_silent_peer_is_closed_at_the_idle_timeout() {
        let (proxy_client, mut client) = pipe(Role::Client).await;
        let (proxy_app, mut app) = pipe(Role::Server).await;
        let setup = Setup {
            keepalive: Some(Keepalive {
                ping_interval: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(25),
            }),
            ..Setup::default()
        };
        let (task, _drain, _) = setup.spawn(proxy_client, proxy_app);
        // Both read (so tungstenite answers the Pings) until the first Ping each.
        let t0 = Instant::now();
        assert!(matches!(recv(&mut client).await, Message::Ping(_)));
        assert!(matches!(recv(&mut app).await, Message::Ping(_)));
        assert!(t0.elapsed() >= Duration::from_secs(10));
        // From now on the app answers (its reader runs) and the client does not.
        let app_reader = tokio::spawn(async move { recv_close(&mut app).await });
        let (code, reason) = tokio::time::timeout(PATIENCE, app_reader).await.unwrap().unwrap();
        assert_eq!((code, reason.as_str()), (1001, "idle timeout"));
        assert!(t0.elapsed() >= Duration::from_secs(25), "{:?}", t0.elapsed());
        drop(client);
        let s = summary(task).await;
        assert_eq!((s.initiator, s.code), (Initiator::Proxy, Some(1001)));
    }
}
