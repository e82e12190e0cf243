//! Stage 3, dial: connect to the app and perform its WebSocket upgrade.
//!
//! Returns the app's 101 (headers, for the client's 101) and its upgraded stream, or a typed
//! error that says what the client is told: 502 when the app is unreachable or misbehaves, the
//! app's own answer when it refuses. Depends on hyper, tokio, `outcome` and `upgrade`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::outcome::FailureKind;
use super::settings::Upstream;
use super::upgrade;

/// Largest body of an app's refusal relayed to the client.
pub const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// Why the app's upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The TCP connection to the app failed.
    #[error("connecting to the app at {authority}: {source}")]
    Connect {
        /// The app's `host:port`.
        authority: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The app's HTTP connection failed before it answered.
    #[error("the app did not answer the upgrade: {0}")]
    NoAnswer(hyper::Error),
    /// The app answered with something other than 101; it is relayed.
    #[error("the app answered {status}")]
    Refused {
        /// The app's status.
        status: StatusCode,
        /// The app's answer, ready to relay to the client.
        answer: Box<Response<Full<Bytes>>>,
    },
    /// The app's refusal could not be read.
    #[error("reading the app's {status} answer: {source}")]
    RefusalBody {
        /// The app's status.
        status: StatusCode,
        /// What failed.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The app's 101 cannot be relayed to the client.
    #[error(transparent)]
    BadAnswer(#[from] upgrade::BadAnswer),
    /// The app's side of the upgrade failed after its 101.
    #[error("the app's upgrade failed: {0}")]
    Upgrade(hyper::Error),
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

/// The app, upgraded.
pub struct Dialed {
    /// The app's 101 headers.
    pub headers: HeaderMap,
    /// The app's WebSocket byte stream.
    pub io: Upgraded,
    /// How long the TCP connect took.
    pub connect_time: Duration,
}

/// Connects to `upstream` and sends it `request`; returns the upgraded app.
pub async fn dial(upstream: &Upstream, request: Request<Empty<Bytes>>) -> Result<Dialed, DialError> {
    let t0 = Instant::now();
    let tcp = match upstream.addr {
        Some(addr) => TcpStream::connect(addr).await,
        None => TcpStream::connect((upstream.host.as_str(), upstream.port)).await,
    }
    .map_err(|source| DialError::Connect {
        authority: upstream.authority(),
        source,
    })?;
    let connect_time = t0.elapsed();
    crate::net::tune(&tcp);
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .map_err(DialError::NoAnswer)?;
    let mut conn = std::pin::pin!(conn.with_upgrades());
    let mut send = std::pin::pin!(sender.send_request(request));
    // The connection task may finish (handing the socket to the upgrade) in the same poll that
    // delivers the response, so a finished connection is not yet a failure.
    let sent = tokio::select! {
        biased;
        resp = &mut send => resp,
        ended = &mut conn => match ended {
            Ok(()) => send.await,
            Err(e) => return Err(DialError::NoAnswer(e)),
        },
    };
    let mut resp = sent.map_err(DialError::NoAnswer)?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let (parts, body) = resp.into_parts();
        let mut collect = std::pin::pin!(Limited::new(body, MAX_REFUSAL_BODY).collect());
        let body = tokio::select! {
            biased;
            b = &mut collect => b,
            _ = &mut conn => collect.await,
        }
        .map_err(|source| DialError::RefusalBody { status, source })?
        .to_bytes();
        return Err(DialError::Refused {
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
            Err(e) => return Err(DialError::Upgrade(e)),
        },
    }
    .map_err(DialError::Upgrade)?;
    Ok(Dialed {
        headers: resp.headers().clone(),
        io,
        connect_time,
    })
}
