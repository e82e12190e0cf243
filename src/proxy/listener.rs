//! The accept loop: socket options, the global connection limit, stop on drain.
//!
//! Depends on tokio and socket2.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Keepalive on accepted connections: a peer that vanished (node died, network partition) is
/// noticed after about a minute even when neither side sends anything.
fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3)
}

/// A peer that stops acknowledging what is sent to it (gone, or a zero window) is dropped after
/// this long; keepalive only covers idle connections.
const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Sets TCP_NODELAY (small frames must not wait for Nagle), keepalive and TCP_USER_TIMEOUT on a
/// stream.
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let sock = SockRef::from(stream);
    let _ = sock.set_tcp_keepalive(&keepalive());
    let _ = sock.set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// Accepts connections until `stop` fires, spawning `handle` for each on `tracker`.
/// `handle` gets a permit, or `None` when `max_connections` are already open (it should
/// refuse the connection at once).
pub async fn accept_loop<H, F>(
    listener: TcpListener,
    max_connections: usize,
    stop: CancellationToken,
    tracker: TaskTracker,
    handle: H,
) where
    H: Fn(TcpStream, SocketAddr, Option<OwnedSemaphorePermit>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tune(&stream);
                    let permit = slots.clone().try_acquire_owned().ok();
                    tracker.spawn(handle(stream, peer, permit));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
