//! The two servers of the comparison: the echo app every proxy forwards to (plain `ws://`),
//! and the limit, a direct rustls + tungstenite `wss://` mTLS echo server with no proxy hop.
//! Both echo with the same loop, which writes whatever replies are ready in one flush.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use futures_util::{FutureExt, SinkExt, StreamExt};
use rustls::ServerConfig;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::pki;

/// Echoes every text and binary message until the peer closes. Control frames are answered
/// by tungstenite itself; replies that are ready together go out in one write.
pub async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut ws: WebSocketStream<S>) {
    while let Some(Ok(msg)) = ws.next().await {
        let mut open = feed_reply(&mut ws, msg).await;
        while open {
            match ws.next().now_or_never() {
                Some(Some(Ok(msg))) => open = feed_reply(&mut ws, msg).await,
                Some(_) => open = false,
                None => break,
            }
        }
        if ws.flush().await.is_err() || !open {
            break;
        }
    }
    // TLS close_notify (the limit) or FIN (the echo app), as a server that closes cleanly sends.
    let _ = ws.into_inner().shutdown().await;
}

async fn feed_reply<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, msg: Message) -> bool {
    match msg {
        Message::Text(_) | Message::Binary(_) => ws.feed(msg).await.is_ok(),
        _ => true,
    }
}

/// The buffers of wsgate's client leg (2 KiB read, 16 KiB write): tungstenite's defaults
/// (128 KiB each) would make the limit's idle connections cost several times wsgate's.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(2 * 1024)
        .write_buffer_size(16 * 1024)
}

async fn bind() -> Result<TcpListener> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    // The parent reads this line to learn the address.
    println!("listening {}", listener.local_addr()?);
    Ok(listener)
}

/// The echo app behind every proxy: plain WebSocket on 127.0.0.1, an ephemeral port.
pub async fn serve_echo() -> Result<()> {
    let listener = bind().await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            if let Ok(ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(ws_config())).await {
                echo(ws).await;
            }
        });
    }
}

/// The limit's TLS settings: TLS 1.3 only, client certificates required and verified against
/// `ca.crt`, no session tickets or cache (clients never resume). wsgate's crypto provider.
pub fn limit_config(dir: &Path) -> Result<Arc<ServerConfig>> {
    let read = |name: &str| std::fs::read(dir.join(name)).with_context(|| format!("reading {name}"));
    let provider = wsgate::tls::provider();
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read(pki::CA)?) {
        roots.add(ca?)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let chain = CertificateDer::pem_slice_iter(&read(pki::SERVER_CERT)?).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(&read(pki::SERVER_KEY)?)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The limit: mTLS WebSocket echo on 127.0.0.1, an ephemeral port, certificates from `dir`.
pub async fn serve_limit(dir: &Path) -> Result<()> {
    let acceptor = TlsAcceptor::from(limit_config(dir)?);
    let listener = bind().await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            if let Ok(ws) = tokio_tungstenite::accept_async_with_config(tls, Some(ws_config())).await {
                echo(ws).await;
            }
        });
    }
}

/// The address a server printed as its first line of output.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    line.strip_prefix("listening ")?.trim().parse().ok()
}
