//! Stage 3, dial: connect to the peer behind the proxy and perform its WebSocket upgrade.
//!
//! Inbound, the peer is the app (plain TCP); outbound, it is the remote, and the composition
//! root puts TLS between [`connect`] and [`upgrade`] (`proxy/secure`). Returns the peer's 101
//! (headers, for the client's 101) and its upgraded stream, or a typed error that says what the
//! client is told: 502 when the peer is unreachable or misbehaves, the peer's own answer when
//! it refuses. Depends on hyper, tokio, `outcome`, `settings` and `upgrade`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::outcome::FailureKind;
use super::settings::Upstream;
use super::upgrade;

/// Largest body of a peer's refusal relayed to the client.
pub const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// Who is dialled, as error messages name it.
pub const APP: &str = "the app";
/// The remote of an outbound route, as error messages name it.
pub const REMOTE: &str = "the remote";

/// Why the peer's upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The TCP connection failed.
    #[error("connecting to {peer} at {authority}: {source}")]
    Connect {
        /// [`APP`] or [`REMOTE`].
        peer: &'static str,
        /// The peer's `host:port`.
        authority: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The peer's HTTP connection failed before it answered.
    #[error("{peer} did not answer the upgrade: {source}")]
    NoAnswer {
        /// [`APP`] or [`REMOTE`].
        peer: &'static str,
        /// hyper's error.
        source: hyper::Error,
    },
    /// The peer answered with something other than 101; it is relayed.
    #[error("{peer} answered {status}")]
    Refused {
        /// [`APP`] or [`REMOTE`].
        peer: &'static str,
        /// The peer's status.
        status: StatusCode,
        /// The peer's answer, ready to relay to the client.
        answer: Box<Response<Full<Bytes>>>,
    },
    /// The peer's refusal could not be read.
    #[error("reading {peer}'s {status} answer: {source}")]
    RefusalBody {
        /// [`APP`] or [`REMOTE`].
        peer: &'static str,
        /// The peer's status.
        status: StatusCode,
        /// What failed.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The peer's 101 cannot be relayed to the client.
    #[error(transparent)]
    BadAnswer(#[from] upgrade::BadAnswer),
    /// The peer's side of the upgrade failed after its 101.
    #[error("{peer}'s upgrade failed: {source}")]
    Upgrade {
        /// [`APP`] or [`REMOTE`].
        peer: &'static str,
        /// hyper's error.
        source: hyper::Error,
    },
}
impl DialError {
    /// The `error.type` of this failure.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Refused { .. } => FailureKind::UpstreamRejected,
            _ => FailureKind::UpstreamUnavailable,
        }
    }

    /// The status the client is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Refused { status, .. } => *status,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// The answer for the client: the app's own refusal (moved out; the error keeps its
    /// status), or a 502 that says why.
    pub fn take_answer(&mut self) -> Response<Full<Bytes>> {
        match self {
            Self::Refused { answer, .. } => std::mem::take(answer.as_mut()),
            other => upgrade::text_response(StatusCode::BAD_GATEWAY, &format!("502 bad gateway: {other}")),
        }
    }
}

/// The peer, upgraded.
pub struct Dialed {
    /// The peer's 101 headers.
    pub headers: HeaderMap,
    /// The peer's WebSocket byte stream.
    pub io: Upgraded,
    /// How long the TCP connect took.
    pub connect_time: Duration,
}

/// Connects to the app at `upstream` and sends it `request`; returns the upgraded app.
pub async fn dial(upstream: &Upstream, request: Request<Empty<Bytes>>) -> Result<Dialed, DialError> {
    let (tcp, connect_time) = connect(upstream, APP).await?;
    let mut dialed = upgrade(tcp, request, APP).await?;
    dialed.connect_time = connect_time;
    Ok(dialed)
}

/// Opens a tuned TCP connection to `target` (resolving its name when it has no address);
/// returns it and how long the connect took.
pub async fn connect(target: &Upstream, peer: &'static str) -> Result<(TcpStream, Duration), DialError> {
    let t0 = Instant::now();
    let tcp = match target.addr {
        Some(addr) => TcpStream::connect(addr).await,
        None => TcpStream::connect((target.host.as_str(), target.port)).await,
    }
    .map_err(|source| DialError::Connect {
        peer,
        authority: target.authority(),
        source,
    })?;
    let connect_time = t0.elapsed();
    match target.addr {
        // The pod's own app over loopback: the kernel acknowledges at once and reports a dead
        // peer at once, so keepalive and TCP_USER_TIMEOUT would never fire; only Nagle matters
        // (five system calls fewer per connection).
        Some(addr) if addr.ip().is_loopback() => {
            let _ = tcp.set_nodelay(true);
        }
        _ => crate::net::tune(&tcp),
    }
    Ok((tcp, connect_time))
}

/// Sends `request` over `io` (plain TCP to the app, TLS to a remote) and waits for the 101;
/// returns the upgraded peer (`connect_time` zero: the caller knows it).
pub async fn upgrade<I>(io: I, request: Request<Empty<Bytes>>, peer: &'static str) -> Result<Dialed, DialError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let no_answer = |source| DialError::NoAnswer { peer, source };
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(io))
        .await
        .map_err(no_answer)?;
    let mut conn = std::pin::pin!(conn.with_upgrades());
    let mut send = std::pin::pin!(sender.send_request(request));
    // The connection task may finish (handing the socket to the upgrade) in the same poll that
    // delivers the response, so a finished connection is not yet a failure.
    let sent = tokio::select! {
        biased;
        resp = &mut send => resp,
        ended = &mut conn => match ended {
            Ok(()) => send.await,
            Err(e) => return Err(no_answer(e)),
        },
    };
    let mut resp = sent.map_err(no_answer)?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let (parts, body) = resp.into_parts();
        let mut collect = std::pin::pin!(Limited::new(body, MAX_REFUSAL_BODY).collect());
        let body = tokio::select! {
            biased;
            b = &mut collect => b,
            _ = &mut conn => collect.await,
        }
        .map_err(|source| DialError::RefusalBody { peer, status, source })?
        .to_bytes();
        return Err(DialError::Refused {
            peer,
            status,
            answer: Box::new(upgrade::relay_refusal(parts, body)),
        });
    }
    let mut app_upgrade = hyper::upgrade::on(&mut resp);
    let io = tokio::select! {
        biased;
        up = &mut app_upgrade => up,
        ended = &mut conn => match ended {
            Ok(()) => app_upgrade.await,
            Err(source) => return Err(DialError::Upgrade { peer, source }),
        },
    }
    .map_err(|source| DialError::Upgrade { peer, source })?;
    Ok(Dialed {
        headers: resp.headers().clone(),
        io,
        connect_time: Duration::ZERO,
    })
}
