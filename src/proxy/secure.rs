//! Outbound stage, secure: a dialled TCP connection and the served client config → a TLS
//! stream to the remote and the remote's verified identity.
//!
//! The mirror of `accept`: the config is taken from the store once per connection by the
//! caller, so a rotation never touches a handshake in progress. webpki has verified the chain
//! against the trust roots and the host name when this returns; the `--outbound-expect` check
//! on the identity is the composition root's. Depends on `outcome`, `tls` and tokio-rustls.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::outcome::FailureKind;
use crate::tls::{PeerIdentity, TlsFacts};
use crate::x509::SummaryError;

/// Why TLS to the remote failed.
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    /// The TLS handshake failed: the remote's certificate was refused (unknown CA, wrong name,
    /// expired), it refused ours, or the connection broke.
    #[error("TLS handshake with the remote {authority}: {reason}")]
    Handshake {
        /// The classification of the rustls error.
        kind: FailureKind,
        /// The remote's `host:port`.
        authority: String,
        /// What rustls said.
        reason: String,
    },
    /// TLS completed without a server certificate (cannot happen with webpki; kept typed).
    #[error("the remote {0} presented no certificate")]
    NoCertificate(String),
    /// The verified certificate could not be read.
    #[error("the remote's certificate: {0}")]
    BadCertificate(#[from] SummaryError),
}

impl SecureError {
    /// The `error.type` of this failure.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Handshake { kind, .. } => *kind,
            Self::NoCertificate(_) | Self::BadCertificate(_) => FailureKind::BadCertificate,
        }
    }
}

/// The remote, authenticated.
pub struct Secured {
    /// The TLS stream, ready for the upgrade request.
    pub stream: TlsStream<TcpStream>,
    /// The negotiated parameters.
    pub tls: TlsFacts,
    /// The remote's verified identity.
    pub identity: Arc<PeerIdentity>,
    /// How long TLS took.
    pub elapsed: Duration,
}

/// Runs the TLS handshake as a client presenting `config`'s certificate, verifying the remote
/// as `name`.
pub async fn secure(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    authority: &str,
) -> Result<Secured, SecureError> {
    let t0 = Instant::now();
    let stream = TlsConnector::from(config).connect(name, tcp).await.map_err(|e| {
        let (kind, reason) = FailureKind::of_tls_error(&e);
        // The remote closing or resetting is the remote's failure, not a client leaving.
        let kind = if kind == FailureKind::ClientClosed {
            FailureKind::UpstreamUnavailable
        } else {
            kind
        };
        SecureError::Handshake {
            kind,
            authority: authority.to_owned(),
            reason,
        }
    })?;
    let elapsed = t0.elapsed();
    let conn = stream.get_ref().1;
    let tls = TlsFacts::of(conn);
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| SecureError::NoCertificate(authority.to_owned()))?;
    let identity = Arc::new(PeerIdentity::from_der(leaf)?);
    if SystemTime::now() > identity.cert.not_after {
        return Err(SecureError::Handshake {
            kind: FailureKind::CertificateExpired,
            authority: authority.to_owned(),
            reason: "the remote's certificate has expired".into(),
        });
    }
    Ok(Secured {
        stream,
        tls,
        identity,
        elapsed,
    })
}
