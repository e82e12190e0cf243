//! Key exchange on both TLS listeners (the proxy's and the injector's webhook): the
//! post-quantum hybrid X25519MLKEM768 is offered, and a classic client gets the group it sent a
//! key share for at once, without a HelloRetryRequest.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::crypto::aws_lc_rs::kx_group;
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::{HandshakeKind, NamedGroup};
use tokio_rustls::client::TlsStream;

use crate::support::injector::Injector;
use crate::support::{Env, Leaf, Pki, roundtrip, spiffe, wss_over};

/// A client config of the tests' usual kind, presenting `leaf` (if any) and offering only
/// `groups`, in that order (rustls sends a key share for the first, and for the classic half of
/// a hybrid).
fn offering(pki: &Pki, leaf: Option<&Leaf>, groups: &[&'static dyn SupportedKxGroup]) -> Arc<rustls::ClientConfig> {
    let provider = CryptoProvider {
        kx_groups: groups.to_vec(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    wsgate::demo::client::config_with_provider(
        leaf.map(|l| (l.cert_pem.as_str(), l.key_pem.as_str())),
        std::slice::from_ref(&pki.ca.cert_der),
        Arc::new(provider),
    )
    .unwrap()
}

/// The group and handshake kind of an established client connection.
fn negotiated(tls: &TlsStream<tokio::net::TcpStream>) -> (NamedGroup, HandshakeKind) {
    let conn = tls.get_ref().1;
    (
        conn.negotiated_key_exchange_group().unwrap().name(),
        conn.handshake_kind().unwrap(),
    )
}

/// What each kind of client gets: (what it offers, the group it must get).
fn cases() -> Vec<(&'static str, Vec<&'static dyn SupportedKxGroup>, NamedGroup)> {
    vec![
        (
            "post-quantum only",
            vec![kx_group::X25519MLKEM768],
            NamedGroup::X25519MLKEM768,
        ),
        ("X25519 only", vec![kx_group::X25519], NamedGroup::X25519),
        ("P-256 only", vec![kx_group::SECP256R1], NamedGroup::secp256r1),
        (
            "hybrid first, X25519 next",
            vec![kx_group::X25519MLKEM768, kx_group::X25519],
            NamedGroup::X25519MLKEM768,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_negotiates_what_each_client_offers_without_a_hello_retry() {
    let env = Env::start(&[spiffe("frontend").as_str()]).await;
    let leaf = env.pki.client("frontend");
    for (what, groups, want) in cases() {
        let tcp = tokio::net::TcpStream::connect(env.proxy.listen_addr).await.unwrap();
        let (mut ws, _) = wss_over(tcp, offering(&env.pki, Some(&leaf), &groups), "/", &[])
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(negotiated(ws.get_ref()), (want, HandshakeKind::Full), "{what}");
        // The whole path works over it, not just the handshake.
        let text = tokio_tungstenite::tungstenite::Message::text(what);
        assert_eq!(roundtrip(&mut ws, text.clone()).await, text, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wsgates_own_client_and_the_proxy_agree_on_the_post_quantum_hybrid() {
    let env = Env::start(&[spiffe("frontend").as_str()]).await;
    let leaf = env.pki.client("frontend");
    let tcp = tokio::net::TcpStream::connect(env.proxy.listen_addr).await.unwrap();
    let (ws, _) = wss_over(tcp, env.pki.client_config(Some(&leaf)), "/", &[])
        .await
        .unwrap();
    assert_eq!(
        negotiated(ws.get_ref()),
        (NamedGroup::X25519MLKEM768, HandshakeKind::Full)
    );
}

/// A TLS handshake (no client certificate) with the webhook at `addr`.
async fn webhook_handshake(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_negotiates_what_each_client_offers_without_a_hello_retry() {
    let injector = Injector::start().await;
    for (what, groups, want) in cases() {
        let tls = webhook_handshake(injector.listen, offering(&injector.pki, None, &groups)).await;
        assert_eq!(negotiated(&tls), (want, HandshakeKind::Full), "{what}");
    }
}

/// No session resumption on the mTLS listener: a client that keeps its session store and comes
/// back gets a full handshake (its chain verified again against the roots served now), and no
/// ticket is sent to it in the first place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_client_gets_a_full_handshake_never_a_resumed_session() {
    let env = Env::start(&[spiffe("frontend").as_str()]).await;
    let leaf = env.pki.client("frontend");
    // One config, so one session store: rustls' client resumes whenever the server lets it.
    let config = env.pki.client_config(Some(&leaf));
    for attempt in 1..=3 {
        let tcp = tokio::net::TcpStream::connect(env.proxy.listen_addr).await.unwrap();
        let (mut ws, _) = wss_over(tcp, config.clone(), "/", &[]).await.unwrap();
        // A round trip makes the client read whatever the server sent after the handshake
        // (tickets included), so the next connection could use them.
        let text = tokio_tungstenite::tungstenite::Message::text("again");
        assert_eq!(roundtrip(&mut ws, text.clone()).await, text);
        assert_eq!(
            ws.get_ref().get_ref().1.handshake_kind(),
            Some(HandshakeKind::Full),
            "connection {attempt}"
        );
    }
}
