//! Graceful stop: on drain, both legs of every connection get Close 1001 "going away", no new
//! connection is accepted, readiness drops, and the proxy finishes.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::raw::http;
use crate::support::{Env, eventually, roundtrip, spiffe};

async fn expect_going_away(ws: &mut crate::support::WssStream) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1001);
                assert_eq!(frame.reason.as_str(), "going away");
                // Read once more: tungstenite sends its Close reply and sees the end.
                let _ = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
                return;
            }
            Some(Ok(_)) => continue,
            other => panic!("expected Close 1001, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_drain_closes_both_legs_with_1001_and_stops() {
    let allow = spiffe("frontend");
    let env = Env::start(&[allow.as_str()]).await;
    let mut a = env.connect_as("frontend", "/").await.unwrap();
    let mut b = env.connect_as("frontend", "/").await.unwrap();
    roundtrip(&mut a, "a".into()).await;
    roundtrip(&mut b, "b".into()).await;

    let (status, _) = http(env.proxy.admin_addr, "POST", "/drain").await;
    assert_eq!(status, 202);
    // While the clients have not answered the Close yet, the proxy is draining: not ready, and
    // no new connection gets in.
    let (status, body) = http(env.proxy.admin_addr, "GET", "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("draining"), "{body}");
    assert!(
        env.connect_as("frontend", "/").await.is_err(),
        "a new connection was accepted while draining"
    );
    expect_going_away(&mut a).await;
    expect_going_away(&mut b).await;
    eventually("the app got 1001 on both connections", Duration::from_secs(10), || {
        let closes = env.app.closes.lock().unwrap();
        closes.len() == 2 && closes.iter().all(|c| c.as_ref().map(|(code, _)| *code) == Some(1001))
    })
    .await;
    let Env { proxy, .. } = env;
    tokio::time::timeout(Duration::from_secs(10), proxy.wait())
        .await
        .expect("drain finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_is_refused_from_outside_the_pod() {
    // The admin port listens on every interface in a pod; only loopback (a preStop hook) may drain.
    let allow = spiffe("frontend");
    let env = Env::start(&[allow.as_str()]).await;
    let route = wsgate::admin::route(
        &*Box::new(FixedState) as &dyn wsgate::admin::AdminState,
        &http::Request::post("/drain").body(()).unwrap(),
        "10.0.0.9:5555".parse().unwrap(),
    );
    assert_eq!(route.status(), 403);
    assert_eq!(http(env.proxy.admin_addr, "GET", "/readyz").await.0, 200);
}

struct FixedState;
impl wsgate::admin::AdminState for FixedState {
    fn readiness(&self) -> Result<wsgate::tls::ServingNow, wsgate::admin::NotReady> {
        Ok(wsgate::tls::ServingNow {
            serial: "01".into(),
            not_after: std::time::SystemTime::now(),
        })
    }
    fn metrics(&self) -> String {
        String::new()
    }
    fn drain(&self) {
        panic!("drain must not be called from a remote peer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_connections_with_1001_and_exits_zero() {
    use crate::support::bin::Proc;
    use crate::support::{Pki, SecretVolume, TestApp, connect, write_set};
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let vol = SecretVolume::new(tmp.path().join("tls")).unwrap();
    write_set(&vol, &pki.server(), &pki.ca);
    let app = TestApp::start().await;
    let allow = spiffe("frontend");
    let mut proc = Proc::proxy(
        app.addr,
        &["--allow", &allow, "--cert-dir", vol.path().to_str().unwrap()],
        &[],
    );
    let (listen, _admin) = proc.addrs().await;
    proc.line("certificate installed", Duration::from_secs(10)).await;
    let leaf = pki.client("frontend");
    let (mut ws, _) = connect(listen, pki.client_config(Some(&leaf)), "localhost", "/")
        .await
        .unwrap();
    roundtrip(&mut ws, "hi".into()).await;
    proc.term();
    expect_going_away(&mut ws).await;
    drop(ws);
    let status = proc.exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
    // No key material ever reaches the logs.
    let logs = proc.lines().join("\n");
    assert!(!logs.contains("PRIVATE KEY"), "{logs}");
    let key_body: String = leaf.key_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!logs.contains(&key_body[..40]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_still_open_at_the_drain_timeout_are_dropped() {
    let allow = spiffe("frontend");
    let env = Env::start_with(&[allow.as_str()], |cfg| cfg.drain_timeout = Duration::from_millis(300)).await;
    // This client never reads again, so it never answers the Close.
    let mut silent = env.connect_as("frontend", "/").await.unwrap();
    roundtrip(&mut silent, "hi".into()).await;
    let t0 = std::time::Instant::now();
    let Env { proxy, .. } = env;
    proxy.drain();
    tokio::time::timeout(Duration::from_secs(4), proxy.wait())
        .await
        .expect("the drain ended soon after its timeout, not after the close grace");
    assert!(t0.elapsed() >= Duration::from_millis(300));
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_request_that_arrives_while_draining_gets_503() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let allow = spiffe("frontend");
    let env = Env::start(&[allow.as_str()]).await;
    // TLS done, upgrade request not sent yet, when the drain starts.
    let leaf = env.pki.client("frontend");
    let tcp = tokio::net::TcpStream::connect(env.proxy.listen_addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(env.pki.client_config(Some(&leaf)))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    env.proxy.drain();
    tls.write_all(
        b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(env.app.seen.lock().unwrap().is_empty(), "the app was not dialled");
}

#[test]
fn drain_is_accepted_from_loopback_on_a_dual_stack_admin_socket() {
    struct Count(std::sync::atomic::AtomicUsize);
    impl wsgate::admin::AdminState for Count {
        fn readiness(&self) -> Result<wsgate::tls::ServingNow, wsgate::admin::NotReady> {
            Err(wsgate::admin::NotReady::Draining)
        }
        fn metrics(&self) -> String {
            String::new()
        }
        fn drain(&self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let state = Count(std::sync::atomic::AtomicUsize::new(0));
    let req = http::Request::post("/drain").body(()).unwrap();
    for peer in ["127.0.0.1:5555", "[::1]:5555", "[::ffff:127.0.0.1]:5555"] {
        assert_eq!(
            wsgate::admin::route(&state, &req, peer.parse().unwrap()).status(),
            202,
            "{peer}"
        );
    }
    assert_eq!(state.0.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert_eq!(
        wsgate::admin::route(&state, &req, "[::ffff:10.0.0.1]:5555".parse().unwrap()).status(),
        403
    );
}
