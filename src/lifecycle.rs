//! The one lifecycle of a running server (`wsgate proxy`, `wsgate inject`): running →
//! draining (not ready, finishing what is in flight) → stopped, and the tasks to wait for.
//!
//! Each command decides what its drain does (the proxy sends Close 1001 and waits for its
//! connections, the injector keeps answering for its shutdown delay); this type only carries
//! the two signals and the tasks. A leaf: depends on tokio and tokio-util.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Drain and stop signals, and the tasks that end with them. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    drain: CancellationToken,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Lifecycle {
    /// A running lifecycle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts draining (idempotent): readiness turns false and no new work is accepted.
    pub fn drain(&self) {
        self.drain.cancel();
    }

    /// Stops now (idempotent); a stop is also a drain.
    pub fn stop(&self) {
        self.drain.cancel();
        self.stop.cancel();
    }

    /// Whether a drain (or a stop) has started.
    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Resolves once a drain has started.
    pub async fn drained(&self) {
        self.drain.cancelled().await;
    }

    /// Resolves once a stop has been requested.
    pub async fn stopped(&self) {
        self.stop.cancelled().await;
    }

    /// The token that fires on drain, for tasks that select on it.
    pub fn drain_token(&self) -> CancellationToken {
        self.drain.clone()
    }

    /// The token that fires on stop, for tasks that select on it.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs `task` as part of this lifecycle: [`Lifecycle::wait`] waits for it.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// Waits until a stop has been requested and every task has ended.
    pub async fn wait(&self) {
        self.stopped().await;
        self.tasks.close();
        self.tasks.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wait_returns_only_after_stop_and_every_task() {
        let life = Lifecycle::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stop = life.stop_token();
        life.spawn(async move {
            stop.cancelled().await;
            let _ = rx.await;
        });
        let waiter = tokio::spawn({
            let life = life.clone();
            async move { life.wait().await }
        });
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        assert!(!waiter.is_finished(), "wait returned before a stop");
        life.stop();
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        assert!(!waiter.is_finished(), "wait returned while a task was still running");
        let _ = tx.send(());
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("wait ends once the last task has")
            .expect("no panic");
    }

    #[test]
    fn stop_is_also_a_drain() {
        let life = Lifecycle::new();
        assert!(!life.is_draining());
        life.stop();
        assert!(life.is_draining());
    }
}
