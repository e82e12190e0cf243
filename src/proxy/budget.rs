//! The memory budget: a process-wide bound on the bytes the relay holds for messages that have
//! not arrived whole yet.
//!
//! The relay sets each direction's [`Hold`] to what its peer's unfinished message holds: the
//! fragments forwarded so far and the frame being received ([`Hold::set`]). The first
//! [`ALLOWANCE`] bytes a connection holds are free (every ordinary message fits in them, so a
//! client with small messages never touches the budget); beyond that each byte is charged to
//! the shared [`MemoryBudget`], and growth that would exceed it is refused, which the relay turns
//! into Close 1013 (try again later) to that peer. A hold also remembers since when it has been
//! non-empty, so the relay can close a peer that never finishes its message. A leaf of `proxy`:
//! depends on tokio only.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

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

    /// Sets what is held to `n` bytes (what the relay holds of an unfinished message now);
    /// `false` (and nothing changed) when the budget cannot take the growth. The time it started
    /// is kept while something stays held.
    pub fn set(&self, n: usize) -> bool {
        let before = self.held.load(Ordering::Relaxed);
        if n == before {
            return true;
        }
        if n < before {
            self.consume(before - n);
            return true;
        }
        self.add(n - before)
    }

    /// The message ended (or its sender did): what was held is free again.
    pub fn release(&self) {
        let before = self.held.swap(0, Ordering::Relaxed);
        self.since_ms.store(0, Ordering::Relaxed);
        let charged = Self::charged(before);
        if charged > 0 {
            self.budget.refund(charged);
        }
    }

    /// `n` of the bytes held are free again; what stays held stays charged and timed from when
    /// it started.
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
    async fn set_charges_growth_refunds_shrinkage_and_keeps_the_start_while_held() {
        let budget = MemoryBudget::new(1000);
        let hold = Hold::new(budget.clone());
        assert!(hold.set(ALLOWANCE + 500));
        assert_eq!(budget.used(), 500);
        let since = hold.since();
        assert!(since.is_some());
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(!hold.set(ALLOWANCE + 1001), "past the budget");
        assert_eq!(
            (hold.held(), budget.used()),
            (ALLOWANCE + 500, 500),
            "a refusal changes nothing"
        );
        assert!(hold.set(ALLOWANCE + 1000));
        assert!(hold.set(10));
        assert_eq!(budget.used(), 0);
        assert_eq!(hold.since(), since, "still held: timed from its start");
        assert!(hold.set(0));
        assert_eq!((hold.held(), hold.since()), (0, None));
    }
}
