//! Stage 2, the client's HTTP exchange: read the one upgrade request from an authenticated
//! stream, then answer it (a refusal, or the 101 that hands over the upgraded stream).
//!
//! hyper parses the request (header limits, malformed input); the request and its answer pass
//! through channels, so the composition root decides with plain values and no shared state.
//! Depends on hyper and `outcome`.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use super::outcome::FailureKind;

/// Largest request head accepted from a client.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most request headers accepted from a client.
pub const MAX_HEADERS: usize = 100;

/// Why the client's HTTP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The request head was larger than [`MAX_HEAD`] or had too many headers.
    #[error("HTTP: {0}")]
    TooLarge(hyper::Error),
    /// The bytes were not an HTTP/1.1 request.
    #[error("HTTP: {0}")]
    Malformed(hyper::Error),
    /// The connection failed or closed mid-request.
    #[error("HTTP: {0}")]
    Failed(hyper::Error),
    /// The client closed without sending a request.
    #[error("closed before sending an upgrade request")]
    NoRequest,
    /// The client's side of the upgrade did not complete after the 101.
    #[error("client upgrade failed: {0}")]
    Upgrade(hyper::Error),
}

impl ExchangeError {
    /// The `error.type` of this failure.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::TooLarge(_) => FailureKind::LimitExceeded,
            Self::Malformed(_) => FailureKind::NotWebsocket,
            Self::Failed(_) | Self::NoRequest | Self::Upgrade(_) => FailureKind::ClientClosed,
        }
    }

    fn of(e: hyper::Error) -> Self {
        if e.is_parse_too_large() {
            Self::TooLarge(e)
        } else if e.is_parse() {
            Self::Malformed(e)
        } else {
            Self::Failed(e)
        }
    }
}

type Answer = Response<Full<Bytes>>;
type Connection = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// A request read from the client, waiting for its answer.
pub struct Pending {
    /// The request (its body is empty: an upgrade GET).
    pub request: Request<Incoming>,
    upgrade: OnUpgrade,
    answer: oneshot::Sender<Answer>,
    conn: Connection,
}

/// Reads the first request from `io`.
pub async fn read_request<I>(io: I) -> Result<Pending, ExchangeError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (requests, mut received) = mpsc::channel::<(Request<Incoming>, oneshot::Sender<Answer>)>(1);
    let service = hyper::service::service_fn(move |req| {
        let requests = requests.clone();
        async move {
            let (tx, rx) = oneshot::channel();
            // The composition root always answers; a dropped sender means it gave up (timeout),
            // and the connection is being dropped anyway.
            let _ = requests.send((req, tx)).await;
            Ok::<_, std::convert::Infallible>(rx.await.unwrap_or_else(|_| Response::new(Full::default())))
        }
    });
    let mut conn: Connection = Box::pin(
        hyper::server::conn::http1::Builder::new()
            .max_buf_size(MAX_HEAD)
            .max_headers(MAX_HEADERS)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades(),
    );
    let (mut request, answer) = tokio::select! {
        got = received.recv() => got.ok_or(ExchangeError::NoRequest)?,
        ended = &mut conn => {
            return Err(match ended {
                Ok(()) => ExchangeError::NoRequest,
                Err(e) => ExchangeError::of(e),
            });
        }
    };
    let upgrade = hyper::upgrade::on(&mut request);
    Ok(Pending {
        request,
        upgrade,
        answer,
        conn,
    })
}

impl Pending {
    /// Sends a refusal and lets hyper finish writing it.
    pub async fn refuse(self, answer: Answer) {
        let _ = self.answer.send(answer);
        let _ = self.conn.await;
    }

    /// Sends the 101 and returns the client's upgraded stream.
    pub async fn switch(self, answer: Answer) -> Result<Upgraded, ExchangeError> {
        let _ = self.answer.send(answer);
        let mut conn = self.conn;
        let mut upgrade = self.upgrade;
        // The connection future ends by handing its socket to the upgrade.
        tokio::select! {
            biased;
            up = &mut upgrade => return up.map_err(ExchangeError::Upgrade),
            ended = &mut conn => if let Err(e) = ended {
                return Err(ExchangeError::of(e));
            },
        }
        upgrade.await.map_err(ExchangeError::Upgrade)
    }
}
