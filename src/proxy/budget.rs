//! The memory budget: a process-wide bound on the bytes the relay holds for messages that have
//! not arrived whole yet.
//!
//! Each leg's byte stream is wrapped in [`Budgeted`], which counts what it reads into the
//! WebSocket codec until the relay takes a complete frame out ([`Hold::release`]). The first
//! [`ALLOWANCE`] bytes a connection holds are free (every ordinary message fits in them, so a
//! client with small messages never touches the budget); beyond that each byte is charged to
//! the shared [`MemoryBudget`], and a read that would exceed it fails, which the relay turns
//! into Close 1013 (try again later) to that peer. A hold also remembers since when it has been
//! non-empty, so the relay can close a peer that never finishes its message. A leaf of `proxy`:
//! depends on tokio only.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Bytes a connection may hold for one unfinished message before the budget is charged.
pub const ALLOWANCE: usize = 64 * 1024;

/// Budget used when the container has no memory limit: what a 128 MiB sidecar can spare.
pub const DEFAULT_BUDGET: usize = 32 << 20;

/// The share of the container's memory limit given to the budget (1/4: the codec's buffers can
/// grow to twice what they hold, and the rest of the process needs room too).
pub const LIMIT_SHARE: usize = 4;

/// The container's memory limit: the cgroup v2 `memory.max`, when it is a number.
pub fn cgroup_memory_limit() -> Option<usize> {
    std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
}

/// The default budget: a quarter of the cgroup's `memory.max` when there is one, else
/// [`DEFAULT_BUDGET`].
pub fn default_budget() -> usize {
    budget_for(cgroup_memory_limit())
}

/// The budget for a memory limit (`None`: no limit).
pub fn budget_for(limit: Option<usize>) -> usize {
    match limit {
        Some(bytes) => (bytes / LIMIT_SHARE).max(ALLOWANCE),
        None => DEFAULT_BUDGET,
    }
}

/// The shared budget.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn charge(&self, n: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = used.checked_add(n).filter(|&u| u <= self.limit) else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    fn refund(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// The error a read returns when the budget is exhausted.
#[derive(Debug, thiserror::Error)]
#[error("the memory budget for unfinished messages ({limit} bytes) is exhausted")]
pub struct BudgetExceeded {
    /// The budget's limit.
    pub limit: usize,
}

impl BudgetExceeded {
    /// Whether `err` is this error (as the codec hands it back).
    pub fn is(err: &io::Error) -> bool {
        err.get_ref().is_some_and(|e| e.is::<BudgetExceeded>())
    }
}

/// What one direction of one connection holds.
#[derive(Debug)]
pub struct Hold {
    budget: Arc<MemoryBudget>,
    held: AtomicUsize,
    /// When `held` became non-zero, in milliseconds since `origin`; 0 when empty.
    since_ms: AtomicU64,
    origin: tokio::time::Instant,
    started: Notify,
}

impl Hold {
    /// An empty hold charged to `budget`.
    pub fn new(budget: Arc<MemoryBudget>) -> Arc<Self> {
        Arc::new(Self {
            budget,
            held: AtomicUsize::new(0),
            since_ms: AtomicU64::new(0),
            origin: tokio::time::Instant::now(),
            started: Notify::new(),
        })
    }

    fn charged(held: usize) -> usize {
        held.saturating_sub(ALLOWANCE)
    }

    /// Counts `n` bytes read; `false` (and nothing counted) when the budget cannot take them.
    fn add(&self, n: usize) -> bool {
        let before = self.held.load(Ordering::Relaxed);
        let after = before.saturating_add(n);
        let extra = Self::charged(after) - Self::charged(before);
        if extra > 0 && !self.budget.charge(extra) {
            return false;
        }
        self.held.store(after, Ordering::Relaxed);
        if before == 0 && after > 0 {
            let ms = (self.origin.elapsed().as_millis() as u64).max(1);
            self.since_ms.store(ms, Ordering::Relaxed);
            self.started.notify_one();
        }
        true
    }

    /// Counts `n` bytes queued for a peer (a message fed to its writer); `false` (and nothing
    /// counted) when the budget cannot take them.
    pub fn charge(&self, n: usize) -> bool {
        self.add(n)
    }

    /// A frame came out whole, or what was queued was written: what was held is free again.
    pub fn release(&self) {
        let before = self.held.swap(0, Ordering::Relaxed);
        self.since_ms.store(0, Ordering::Relaxed);
        let charged = Self::charged(before);
        if charged > 0 {
            self.budget.refund(charged);
        }
    }

    /// A control frame of `n` bytes came out, which may have come between the fragments of a
    /// message: only its own bytes are free again; what the unfinished message holds stays held,
    /// charged and timed from when it started.
    pub fn consume(&self, n: usize) {
        let before = self.held.load(Ordering::Relaxed);
        let after = before.saturating_sub(n);
        self.held.store(after, Ordering::Relaxed);
        if after == 0 {
            self.since_ms.store(0, Ordering::Relaxed);
        }
        let refund = Self::charged(before) - Self::charged(after);
        if refund > 0 {
            self.budget.refund(refund);
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// When the unfinished message started, if one is held.
    pub fn since(&self) -> Option<tokio::time::Instant> {
        match self.since_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.origin + Duration::from_millis(ms)),
        }
    }

    /// Resolves when a new unfinished message starts being held.
    pub async fn started(&self) {
        self.started.notified().await;
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let charged = Self::charged(*self.held.get_mut());
        if charged > 0 {
            self.budget.refund(charged);
        }
    }
}

/// A byte stream whose reads are counted in a [`Hold`].
#[derive(Debug)]
pub struct Budgeted<S> {
    inner: S,
    hold: Arc<Hold>,
}

impl<S> Budgeted<S> {
    /// Wraps `inner`, counting its reads in `hold`.
    pub fn new(inner: S, hold: Arc<Hold>) -> Self {
        Self { inner, hold }
    }

    /// The wrapped stream.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Budgeted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 && !this.hold.add(n) {
                    return Poll::Ready(Err(io::Error::other(BudgetExceeded {
                        limit: this.hold.budget.limit,
                    })));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Budgeted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_allowance_is_free_and_the_rest_is_charged_until_released() {
        let budget = MemoryBudget::new(100_000);
        let hold = Hold::new(budget.clone());
        assert!(hold.add(ALLOWANCE));
        assert_eq!(budget.used(), 0, "the allowance is not charged");
        assert!(hold.since().is_some());
        assert!(hold.add(60_000));
        assert_eq!(budget.used(), 60_000);
        assert!(!hold.add(50_000), "the budget cannot take it");
        assert_eq!(budget.used(), 60_000, "a refused read charges nothing");
        hold.release();
        assert_eq!(budget.used(), 0);
        assert_eq!(hold.held(), 0);
        assert!(hold.since().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_control_frame_frees_only_its_own_bytes_and_keeps_the_messages_start() {
        let budget = MemoryBudget::new(100_000);
        let hold = Hold::new(budget.clone());
        assert!(hold.add(ALLOWANCE + 1000));
        let since = hold.since();
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(hold.add(6), "a Ping after the fragment");
        hold.consume(6);
        assert_eq!(hold.held(), ALLOWANCE + 1000);
        assert_eq!(budget.used(), 1000, "the fragment stays charged");
        assert_eq!(hold.since(), since, "and timed from its start");
        hold.consume(2000);
        assert_eq!(budget.used(), 0, "what is no longer held is refunded");
        hold.consume(usize::MAX);
        assert_eq!((hold.held(), hold.since()), (0, None), "empty: no message started");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_hold_gives_back_what_it_was_charged() {
        let budget = MemoryBudget::new(1 << 20);
        let hold = Hold::new(budget.clone());
        assert!(hold.add(ALLOWANCE + 1000));
        assert_eq!(budget.used(), 1000);
        drop(hold);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_past_the_budget_fails_with_budget_exceeded() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let budget = MemoryBudget::new(1000);
        let (mut peer, io) = tokio::io::duplex(1 << 20);
        let mut io = Budgeted::new(io, Hold::new(budget.clone()));
        peer.write_all(&vec![0u8; ALLOWANCE + 4000]).await.unwrap();
        let mut buf = vec![0u8; ALLOWANCE + 4000];
        let mut got = 0;
        let err = loop {
            match io.read(&mut buf[got..]).await {
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        assert!(BudgetExceeded::is(&err), "{err}");
        assert!(got <= ALLOWANCE + 1000, "read {got} bytes past a 1000-byte budget");
        assert!(budget.used() <= 1000);
    }
}
