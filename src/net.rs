//! Sockets, shared by every listener: the accept loop with its connection cap, the socket
//! options (NODELAY, keepalive, TCP_USER_TIMEOUT), and the one HTTP/1.1 serve loop that the
//! admin server and the webhook use, with its timeouts and caps.
//!
//! A leaf: depends on tokio, socket2 and hyper only.

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

/// Sets the options of [`tune`] on a listening socket. Linux copies a listening socket's options
/// into each connection it accepts (the accepted socket is a clone of the listener's), so the
/// accept loop makes no per-connection calls for them: six system calls fewer per connection,
/// about 2 % of a handshake's CPU.
fn tune_listener(sock: SockRef<'_>) {
    let _ = sock.set_tcp_nodelay(true);
    let _ = sock.set_tcp_keepalive(&keepalive());
    let _ = sock.set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// Binds a listener for [`accept_loop`], with the options of [`tune`] set before it listens,
/// so that even the first connections accepted carry them (a listener tuned after `listen` would
/// hand out untuned connections that arrived in between). SO_REUSEADDR and a backlog of 1024, as
/// `TcpListener::bind`.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    tune_listener(SockRef::from(&socket));
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts connections until `stop` fires, spawning `handle` for each on `tracker`. The
/// listener comes from [`bind`], so the connections carry the options of [`tune`].
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
                    // On Linux a listener from `bind` hands out tuned connections already.
                    #[cfg(not(target_os = "linux"))]
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

/// Connections per source address of one server.
#[derive(Debug, Default)]
struct PerIp(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One address's connection slot; freed on drop.
struct IpSlot {
    owner: Arc<PerIp>,
    ip: std::net::IpAddr,
}

impl PerIp {
    fn take(this: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<IpSlot> {
        let ip = ip.to_canonical();
        let mut counts = this.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            owner: this.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.owner.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// The bounds of an HTTP/1.1 server (admin port, webhook): a peer can hold at most
/// `max_connections × max_head` bytes of unfinished requests, for at most `header_timeout` each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpBounds {
    /// Most connections at once; more are closed at accept.
    pub max_connections: usize,
    /// Most connections at once from one address, so one peer cannot take every slot (and
    /// shut out the kubelet's probes or the API server).
    pub max_per_ip: usize,
    /// Largest request head (hyper's read buffer; at least 8 KiB).
    pub max_head: usize,
    /// Longest wait for a request's head, also between requests on a kept-alive connection.
    pub header_timeout: Duration,
    /// Longest life of one connection (keep-alive included), so none is held for ever.
    pub max_lifetime: Duration,
    /// On stop, requests in flight get this long to finish.
    pub stop_grace: Duration,
}

/// Serves HTTP/1.1 on `listener` until `stop` fires. Each accepted socket is tuned, turned into
/// a stream by `wrap` (identity for plain HTTP, a TLS accept for HTTPS; `None` drops it), and
/// served by `handle`, which gets the peer address with each request.
pub async fn serve_http<W, WF, IO, H, HF, B>(
    listener: TcpListener,
    bounds: HttpBounds,
    stop: CancellationToken,
    wrap: W,
    handle: H,
) where
    W: Fn(TcpStream, SocketAddr) -> WF + Send + Sync + 'static,
    WF: Future<Output = Option<IO>> + Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(http::Request<hyper::body::Incoming>, SocketAddr) -> HF + Clone + Send + Sync + 'static,
    HF: Future<Output = http::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tracker = TaskTracker::new();
    let conn_stop = stop.clone();
    let per_ip = Arc::new(PerIp::default());
    accept_loop(
        listener,
        bounds.max_connections,
        stop,
        tracker.clone(),
        move |tcp, peer, permit| {
            let io = wrap(tcp, peer);
            let handle = handle.clone();
            let stop = conn_stop.clone();
            let share = permit.and_then(|p| PerIp::take(&per_ip, peer.ip(), bounds.max_per_ip).map(|s| (p, s)));
            async move {
                let Some(_held) = share else { return };
                let work = async move {
                    let Some(io) = io.await else { return };
                    let service = hyper::service::service_fn(move |req| {
                        let answer = handle(req, peer);
                        async move { Ok::<_, std::convert::Infallible>(answer.await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(bounds.header_timeout)
                        .max_buf_size(bounds.max_head.max(8192))
                        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
                    let mut conn = std::pin::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = stop.cancelled() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = tokio::time::timeout(bounds.stop_grace, conn).await;
                        }
                    }
                };
                let _ = tokio::time::timeout(bounds.max_lifetime, work).await;
            }
        },
    )
    .await;
    tracker.close();
    let _ = tokio::time::timeout(bounds.stop_grace, tracker.wait()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tuned_sockets_have_nodelay_keepalive_and_a_user_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        // Both ends a proxy tunes: the accepted client socket and the socket dialled to the app.
        for stream in [dialed.unwrap(), accepted.unwrap().0] {
            tune(&stream);
            assert!(stream.nodelay().unwrap());
            let sock = SockRef::from(&stream);
            assert!(sock.keepalive().unwrap());
            assert_eq!(sock.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        }
    }

    /// On Linux the accept loop leaves the options to the listener `bind` tuned: the
    /// connections it hands out must carry every one of them, the first ones too.
    #[tokio::test]
    async fn connections_from_the_accept_loop_carry_every_option() {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let server = tokio::spawn(accept_loop(listener, 4, stop.clone(), tracker, move |stream, _, _| {
            let tx = tx.clone();
            async move {
                let sock = SockRef::from(&stream);
                let _ = tx.send((
                    sock.tcp_nodelay().unwrap(),
                    sock.keepalive().unwrap(),
                    sock.tcp_keepalive_time().unwrap(),
                    sock.tcp_keepalive_interval().unwrap(),
                    sock.tcp_keepalive_retries().unwrap(),
                    sock.tcp_user_timeout().unwrap(),
                ));
            }
        }));
        for _ in 0..2 {
            let _client = TcpStream::connect(addr).await.unwrap();
            let got = rx.recv().await.unwrap();
            assert_eq!(
                got,
                (
                    true,
                    true,
                    Duration::from_secs(30),
                    Duration::from_secs(10),
                    3,
                    Some(USER_TIMEOUT)
                )
            );
        }
        stop.cancel();
        server.await.unwrap();
    }
}
