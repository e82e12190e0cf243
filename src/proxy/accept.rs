//! Stage 1, accept: a TCP connection and the served TLS config → an authenticated TLS stream
//! and the client's verified identity.
//!
//! The config is taken from the store once per connection by the caller, so a rotation never
//! touches a handshake in progress. Depends on `outcome`, `tls` and tokio-rustls.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use super::outcome::FailureKind;
use crate::tls::{PeerIdentity, Serving, TlsFacts};
use crate::x509::SummaryError;

/// Why the TLS stage refused a connection.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The first bytes were not a TLS ClientHello (or the peer left before sending one).
    #[error("{reason}")]
    NotTls {
        /// `not_tls`, or `client_closed` when the peer left.
        kind: FailureKind,
        /// What rustls or the socket said.
        reason: String,
    },
    /// The TLS handshake failed after the ClientHello (certificate refused, protocol error).
    #[error("{reason}")]
    Handshake {
        /// The classification of the rustls error.
        kind: FailureKind,
        /// What rustls said.
        reason: String,
    },
    /// TLS completed without a client certificate.
    #[error("no client certificate")]
    NoClientCertificate,
    /// The verified certificate could not be read.
    #[error("{0}")]
    BadCertificate(#[from] SummaryError),
    /// A resumed session whose certificate has expired since it was verified.
    #[error("client certificate expired (resumed session)")]
    ExpiredSession,
}

impl AcceptError {
    /// The `error.type` of this refusal.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::NotTls { kind, .. } | Self::Handshake { kind, .. } => *kind,
            Self::NoClientCertificate => FailureKind::NoClientCertificate,
            Self::BadCertificate(_) => FailureKind::BadCertificate,
            Self::ExpiredSession => FailureKind::CertificateExpired,
        }
    }
}

/// An authenticated client: its TLS stream and what TLS proved about it.
pub struct Accepted {
    /// The TLS stream, ready for the upgrade request.
    pub stream: TlsStream<TcpStream>,
    /// The negotiated parameters.
    pub tls: TlsFacts,
    /// The verified identity of the client.
    pub identity: Arc<PeerIdentity>,
    /// The chain the client presented (leaf first), kept so it can be verified again when the
    /// trust roots change.
    pub chain: Vec<CertificateDer<'static>>,
    /// How long TLS took.
    pub elapsed: Duration,
}

/// Runs the TLS handshake with `serving`'s config and reads the client's identity.
pub async fn accept(tcp: TcpStream, serving: &Serving) -> Result<Accepted, AcceptError> {
    let t0 = Instant::now();
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
        .await
        .map_err(|e| {
            let (kind, reason) = FailureKind::of_tls_error(&e);
            let kind = if kind == FailureKind::ClientClosed {
                kind
            } else {
                FailureKind::NotTls
            };
            AcceptError::NotTls { kind, reason }
        })?;
    let stream = start.into_stream(serving.server.clone()).await.map_err(|e| {
        let (kind, reason) = FailureKind::of_tls_error(&e);
        AcceptError::Handshake { kind, reason }
    })?;
    let elapsed = t0.elapsed();
    let conn = stream.get_ref().1;
    let tls = TlsFacts::of(conn);
    let chain: Vec<CertificateDer<'static>> = conn
        .peer_certificates()
        .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
        .unwrap_or_default();
    let leaf = chain.first().ok_or(AcceptError::NoClientCertificate)?;
    let identity = Arc::new(PeerIdentity::from_der(leaf)?);
    // A resumed session skips verification: its certificate may have expired since.
    if SystemTime::now() > identity.cert.not_after {
        return Err(AcceptError::ExpiredSession);
    }
    Ok(Accepted {
        stream,
        tls,
        identity,
        chain,
        elapsed,
    })
}
