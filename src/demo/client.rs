//! A WebSocket-over-mTLS client, as a workload in another pod would dial the sidecar.
//!
//! Used by the demo and the tests. Returns the server's certificate with the stream, so
//! callers can see which serial a handshake was served with.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::x509::CertSummary;

/// A connected WebSocket over mTLS.
pub type WssStream = WebSocketStream<TlsStream<TcpStream>>;

/// Why a connection failed, at the stage it failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The client config could not be built.
    #[error("client configuration: {0}")]
    Config(String),
    /// TCP connect failed.
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    /// The TLS handshake failed (the server's alert is in the message).
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    /// The WebSocket upgrade failed (an HTTP status other than 101, or a broken answer).
    #[error("WebSocket upgrade: {0}")]
    Upgrade(Box<tokio_tungstenite::tungstenite::Error>),
}

impl ClientError {
    /// The HTTP status the server answered the upgrade with, if it was refused that way.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Upgrade(e) => match e.as_ref() {
                tokio_tungstenite::tungstenite::Error::Http(resp) => Some(resp.status().as_u16()),
                _ => None,
            },
            _ => None,
        }
    }

    /// The rustls error behind a TLS failure (e.g. the alert the server sent).
    pub fn tls_error(&self) -> Option<&rustls::Error> {
        match self {
            ClientError::Tls(e) => e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
            _ => None,
        }
    }
}

/// A client config trusting `roots` and presenting `identity` (certificate PEM, key PEM) if
/// given. Nothing is validated: a test client may well present a bad certificate on purpose.
pub fn config(
    identity: Option<(&str, &str)>,
    roots: &[CertificateDer<'static>],
) -> Result<Arc<ClientConfig>, ClientError> {
    config_with_provider(identity, roots, crate::tls::provider())
}

/// [`config`] with another crypto provider, e.g. one offering other key-exchange groups (as a
/// classic or a post-quantum-only client would).
pub fn config_with_provider(
    identity: Option<(&str, &str)>,
    roots: &[CertificateDer<'static>],
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ClientConfig>, ClientError> {
    let bad = |e: String| ClientError::Config(e);
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).map_err(|e| bad(e.to_string()))?;
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(store);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?;
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad(e.to_string()))?
        }
    };
    Ok(Arc::new(config))
}

/// Dials `wss://{server_name}{path}` at `addr` with `config` and returns the WebSocket and the
/// server's leaf certificate.
pub async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    server_name: &str,
    path: &str,
) -> Result<(WssStream, Option<CertSummary>), ClientError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| ClientError::Connect(addr, e))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| ClientError::Tls(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(ClientError::Tls)?;
    let server_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|der| CertSummary::from_der(der).ok());
    let request = format!("wss://{server_name}{path}")
        .into_client_request()
        .map_err(|e| ClientError::Upgrade(Box::new(e)))?;
    let (ws, _resp) = tokio_tungstenite::client_async(request, tls)
        .await
        .map_err(|e| ClientError::Upgrade(Box::new(e)))?;
    Ok((ws, server_cert))
}
