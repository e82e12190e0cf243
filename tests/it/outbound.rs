//! Outbound mode with two real `wsgate` processes: a plain `ws://` client dials its own
//! sidecar (`--outbound`), which speaks mTLS to an inbound sidecar in front of the echo app.
//! Real rcgen certificates written as kubelet Secret volumes, real sockets.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::support::bin::{Proc, run};
use crate::support::raw::{http, metric};
use crate::support::{Leaf, LeafSpec, Pki, SecretVolume, TestApp, spiffe, write_set};

type Ws = WebSocketStream<TcpStream>;

/// The inbound side: the echo app behind a wsgate serving `server`.
struct Inbound {
    app: TestApp,
    _proc: Proc,
    listen: SocketAddr,
    _vol: SecretVolume,
}

impl Inbound {
    async fn start(tmp: &tempfile::TempDir, pki: &Pki, server: &Leaf, allow: &str) -> Self {
        let vol = SecretVolume::new(tmp.path().join("in-tls")).unwrap();
        write_set(&vol, server, &pki.ca);
        let app = TestApp::start().await;
        let dir = vol.path().to_str().unwrap().to_owned();
        let proc = Proc::proxy(app.addr, &["--allow", allow, "--cert-dir", &dir], &[]);
        let (listen, admin) = proc.addrs().await;
        ready(admin).await;
        Self {
            app,
            _proc: proc,
            listen,
            _vol: vol,
        }
    }
}

/// The outbound side: a wsgate with one `--outbound` route, presenting `client`.
struct Outbound {
    proc: Proc,
    local: SocketAddr,
    admin: SocketAddr,
    vol: SecretVolume,
}

impl Outbound {
    async fn start(tmp: &tempfile::TempDir, pki: &Pki, client: &Leaf, remote: &str, extra: &[&str]) -> Self {
        let vol = SecretVolume::new(tmp.path().join("out-tls")).unwrap();
        write_set(&vol, client, &pki.ca);
        let route = format!("127.0.0.1:0={remote}");
        let dir = vol.path().to_str().unwrap().to_owned();
        let mut args = vec![
            "proxy",
            "--admin",
            "127.0.0.1:0",
            "--outbound",
            &route,
            "--cert-dir",
            &dir,
        ];
        args.extend_from_slice(extra);
        let proc = Proc::spawn(&args, &[]);
        let started = proc.line("wsgate proxy started", Duration::from_secs(20)).await;
        assert_eq!(started["listen"], "none", "outbound only: no mTLS listener");
        let local = started["outbound"]
            .as_str()
            .and_then(|r| r.split_once('='))
            .map(|(local, _)| local.parse().unwrap())
            .unwrap_or_else(|| panic!("no outbound route in {started}"));
        let admin = started["admin"].as_str().unwrap().parse().unwrap();
        ready(admin).await;
        Self { proc, local, admin, vol }
    }

    async fn metrics(&self) -> String {
        let (status, text) = http(self.admin, "GET", "/metrics").await;
        assert_eq!(status, 200);
        text
    }
}

async fn ready(admin: SocketAddr) {
    let t0 = Instant::now();
    loop {
        let (status, body) = http(admin, "GET", "/readyz").await;
        if status == 200 {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The remote URL of an inbound wsgate, dialled by the name its certificate carries.
fn remote(listen: SocketAddr) -> String {
    format!("wss://localhost:{}", listen.port())
}

/// The plain app's WebSocket to its sidecar, with extra request headers.
async fn dial(
    local: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, http::Response<Option<Vec<u8>>>), WsError> {
    let tcp = TcpStream::connect(local).await?;
    let mut req = format!("ws://{local}{path}").into_client_request()?;
    for (k, v) in headers {
        req.headers_mut()
            .append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    tokio_tungstenite::client_async(req, tcp).await
}

/// The status and body of a refused upgrade.
fn refusal(result: Result<(Ws, http::Response<Option<Vec<u8>>>), WsError>) -> (u16, String) {
    match result {
        Err(WsError::Http(resp)) => (
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok((_, resp)) => panic!("expected a refusal, got {}", resp.status()),
    }
}

async fn next_data(ws: &mut Ws) -> Message {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message in time")
        {
            Some(Ok(m)) if m.is_text() || m.is_binary() || m.is_close() => return m,
            Some(Ok(_)) => continue,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

async fn echo(ws: &mut Ws, msg: Message) {
    ws.send(msg.clone()).await.unwrap();
    assert_eq!(next_data(ws).await, msg);
}

fn sha256_hex(der: &[u8]) -> String {
    wsgate::x509::hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// The `Hash=` of the XFCC the app saw last.
fn xfcc_hash(app: &TestApp) -> Option<String> {
    let seen = app.seen.lock().unwrap().last().cloned()?;
    let xfcc = seen.header("x-forwarded-client-cert").first()?.to_string();
    xfcc.strip_prefix("Hash=")
        .map(|rest| rest.split(';').next().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_flow_both_ways_and_the_inbound_side_sees_the_outbound_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let client = pki.client("client");
    let inbound = Inbound::start(&tmp, &pki, &pki.server(), &spiffe("client")).await;
    let out = Outbound::start(
        &tmp,
        &pki,
        &client,
        &remote(inbound.listen),
        &["--outbound-expect", &format!("127.0.0.1:0={}", spiffe("app"))],
    )
    .await;

    // The app forges an identity header and offers subprotocols.
    let (mut ws, resp) = dial(
        out.local,
        "/chat?room=7",
        &[
            ("sec-websocket-protocol", "chat.v2, chat.v1"),
            ("x-forwarded-client-cert", "Hash=forged;URI=spiffe://evil/sa/admin"),
            ("x-wsgate-client-not-after", "never"),
            ("x-app-header", "kept"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), "chat.v2");

    echo(&mut ws, Message::text("hello through two sidecars")).await;
    echo(&mut ws, Message::binary(vec![0u8, 1, 2, 255, 254])).await;
    echo(&mut ws, Message::binary(vec![7u8; 200_000])).await;

    // The app behind the inbound side: path, query, subprotocols, ordinary headers, and the
    // identity the inbound proxy derived from the outbound side's client certificate only.
    let seen = inbound.app.last_seen();
    assert_eq!(seen.path_and_query, "/chat?room=7");
    assert_eq!(seen.header("sec-websocket-protocol"), ["chat.v2, chat.v1"]);
    assert_eq!(seen.header("x-app-header"), ["kept"]);
    let xfcc = seen.header("x-forwarded-client-cert");
    assert_eq!(xfcc.len(), 1, "{xfcc:?}");
    assert!(xfcc[0].contains(&format!("URI={}", spiffe("client"))), "{xfcc:?}");
    assert!(!xfcc[0].contains("forged") && !xfcc[0].contains("evil"), "{xfcc:?}");
    assert_eq!(xfcc_hash(&inbound.app), Some(sha256_hex(&client.cert_der)));
    assert_ne!(seen.header("x-wsgate-client-not-after"), ["never"]);

    // The app (behind inbound) closes with a code: it reaches the plain client.
    ws.send(Message::text("close:4001:bye")).await.unwrap();
    match next_data(&mut ws).await {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 4001);
            assert_eq!(frame.reason.as_str(), "bye");
        }
        other => panic!("expected Close 4001, got {other:?}"),
    }
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {}

    // The plain client closes with a code: it reaches the app.
    let (mut ws, _) = dial(out.local, "/second", &[]).await.unwrap();
    echo(&mut ws, Message::text("again")).await;
    ws.send(Message::Close(Some(CloseFrame {
        code: 4002.into(),
        reason: "done".into(),
    })))
    .await
    .unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {}
    let t0 = Instant::now();
    while !inbound
        .app
        .closes
        .lock()
        .unwrap()
        .contains(&Some((4002, "done".to_owned())))
    {
        assert!(t0.elapsed() < Duration::from_secs(10), "the app never saw Close 4002");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Counted as outbound on the outbound side.
    let t0 = Instant::now();
    loop {
        let text = out.metrics().await;
        let ok = metric(
            &text,
            "wsgate_handshakes_total{result=\"success\",error_type=\"\",direction=\"outbound\"}",
        );
        let open = metric(&text, "wsgate_connections_open{direction=\"outbound\"}");
        if ok == Some(2.0) && open == Some(0.0) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let accepted = out.proc.line("\"outcome\":\"accepted\"", Duration::from_secs(5)).await;
    assert_eq!(accepted["direction"], "outbound");
    assert_eq!(accepted["identity"], spiffe("app"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unexpected_remote_identity_is_refused_with_502_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let inbound = Inbound::start(&tmp, &pki, &pki.server(), &spiffe("client")).await;
    let chat = format!("spiffe://{}/ns/shop/sa/chat", crate::support::TRUST_DOMAIN);
    let out = Outbound::start(
        &tmp,
        &pki,
        &pki.client("client"),
        &remote(inbound.listen),
        &["--outbound-expect", &format!("127.0.0.1:0={chat}")],
    )
    .await;
    let (status, body) = refusal(dial(out.local, "/", &[]).await);
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains(&spiffe("app")) && body.contains("--outbound-expect") && body.contains(&chat),
        "{body}"
    );
    assert!(inbound.app.seen.lock().unwrap().is_empty(), "nothing reached the app");
    let text = out.metrics().await;
    assert_eq!(
        metric(
            &text,
            "wsgate_handshakes_total{result=\"failure\",error_type=\"identity_not_allowed\",direction=\"outbound\"}"
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_whose_certificate_lacks_the_dialled_name_is_refused_with_502() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    // Chains to the same CA, but names another service.
    let elsewhere = pki
        .ca
        .leaf(&LeafSpec::new("app").uri(&spiffe("app")).dns("other.shop.svc"))
        .unwrap();
    let inbound = Inbound::start(&tmp, &pki, &elsewhere, &spiffe("client")).await;
    let out = Outbound::start(&tmp, &pki, &pki.client("client"), &remote(inbound.listen), &[]).await;
    let (status, body) = refusal(dial(out.local, "/", &[]).await);
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("TLS handshake") && body.contains("not valid for name"), "{body}");
    let text = out.metrics().await;
    assert_eq!(
        metric(
            &text,
            "wsgate_handshakes_total{result=\"failure\",error_type=\"bad_certificate\",direction=\"outbound\"}"
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remotes_own_refusal_reaches_the_app() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    // The inbound side admits someone else.
    let inbound = Inbound::start(&tmp, &pki, &pki.server(), &spiffe("frontend")).await;
    let out = Outbound::start(&tmp, &pki, &pki.client("client"), &remote(inbound.listen), &[]).await;
    let (status, body) = refusal(dial(out.local, "/", &[]).await);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains(&spiffe("client")) && body.contains("not allowed"), "{body}");
    let text = out.metrics().await;
    assert_eq!(
        metric(
            &text,
            "wsgate_handshakes_total{result=\"failure\",error_type=\"upstream_rejected\",direction=\"outbound\"}"
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_that_is_down_gives_502_quickly_and_one_that_never_answers_504() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let client = pki.client("client");
    // Refused: a port with nobody listening.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = Outbound::start(&tmp, &pki, &client, &format!("wss://127.0.0.1:{}", dead.port()), &[]).await;
    let t0 = Instant::now();
    let (status, body) = refusal(dial(out.local, "/", &[]).await);
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("connecting to the remote") && body.contains("refused"), "{body}");
    assert!(t0.elapsed() < Duration::from_secs(3), "took {:?}", t0.elapsed());
    drop(out);

    // A black hole: the kernel completes the TCP handshake, nobody ever answers.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tmp2 = tempfile::tempdir().unwrap();
    let out = Outbound::start(
        &tmp2,
        &pki,
        &client,
        &format!("wss://localhost:{}", hole.local_addr().unwrap().port()),
        &["--outbound-dial-timeout", "700ms"],
    )
    .await;
    let t0 = Instant::now();
    let (status, body) = refusal(dial(out.local, "/", &[]).await);
    let took = t0.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("did not answer within 0.7s"), "{body}");
    assert!(took >= Duration::from_millis(650) && took < Duration::from_secs(5), "took {took:?}");
    let text = out.metrics().await;
    assert_eq!(
        metric(
            &text,
            "wsgate_handshakes_total{result=\"failure\",error_type=\"handshake_timeout\",direction=\"outbound\"}"
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_client_certificate_keeps_open_connections_and_new_ones_present_the_new_one() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let first = pki.client("client");
    let inbound = Inbound::start(&tmp, &pki, &pki.server(), &spiffe("client")).await;
    let out = Outbound::start(&tmp, &pki, &first, &remote(inbound.listen), &[]).await;
    let (mut open, _) = dial(out.local, "/kept", &[]).await.unwrap();
    echo(&mut open, Message::text("before")).await;
    assert_eq!(xfcc_hash(&inbound.app), Some(sha256_hex(&first.cert_der)));

    // cert-manager renews with a new key; the kubelet swaps the volume.
    let second = pki.client("client");
    write_set(&out.vol, &second, &pki.ca);
    let want = sha256_hex(&second.cert_der);
    let t0 = Instant::now();
    let mut probes = 0;
    loop {
        let (mut ws, _) = dial(out.local, "/probe", &[]).await.unwrap();
        probes += 1;
        echo(&mut ws, Message::text("probe")).await;
        let _ = ws.close(None).await;
        // The open connection keeps working meanwhile.
        echo(&mut open, Message::text(format!("during {probes}"))).await;
        if xfcc_hash(&inbound.app).as_deref() == Some(want.as_str()) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "new connections never presented the new certificate; logs:\n{}",
            out.proc.lines().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..20 {
        echo(&mut open, Message::binary(vec![i as u8; 1000])).await;
    }
    echo(&mut open, Message::text("after")).await;
    open.close(None).await.unwrap();
}

/// Runs `wsgate proxy` with `args`, expecting a usage error; returns its one line.
fn usage_error(args: &[&str]) -> String {
    let mut argv = vec!["proxy", "--admin", "127.0.0.1:0"];
    argv.extend_from_slice(args);
    let (code, _out, err) = run(&argv, &[]);
    assert_eq!(code, 64, "args {args:?}: expected exit 64, got {code}; stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "args {args:?}: expected one line, got:\n{err}");
    lines[0].to_owned()
}

#[test]
fn bad_outbound_flags_exit_64_naming_the_problem() {
    let cases: [(&[&str], &[&str]); 9] = [
        (&["--outbound", "127.0.0.1:9001"], &["--outbound", "no '='"]),
        (&["--outbound", "127.0.0.1:9001=ws://chat:8443"], &["--outbound", "wss://"]),
        (&["--outbound", "127.0.0.1:99999=wss://chat:8443"], &["99999", "not a port"]),
        (&["--outbound", "127.0.0.1:9001=wss://chat:0"], &["not a port"]),
        (
            &["--outbound", "127.0.0.1:9001=wss://a:1", "--outbound", "127.0.0.1:9001=wss://b:1"],
            &["127.0.0.1:9001", "twice"],
        ),
        (
            &["--outbound", "127.0.0.1:9001=wss://a:1", "--outbound-expect", "127.0.0.1:9002=spiffe://td/x"],
            &["--outbound-expect", "127.0.0.1:9002"],
        ),
        (
            &["--outbound", "127.0.0.1:9001=wss://a:1", "--outbound-expect", "127.0.0.1:9001=spiffe://td/fr*nt"],
            &["--outbound-expect", "fr*nt"],
        ),
        (&["--outbound", "10.1.2.3:9001=wss://a:1"], &["--allow-remote-outbound-listen"]),
        (&[], &["--upstream", "--outbound"]),
    ];
    for (args, words) in cases {
        let line = usage_error(args);
        for w in words {
            assert!(line.contains(w), "{args:?}: {w:?} not in {line}");
        }
    }
    // The environment twins are read and validated too.
    let (code, _, err) = run(
        &["proxy", "--admin", "127.0.0.1:0"],
        &[("WSGATE_OUTBOUND", "127.0.0.1:9001=wss://a:1,127.0.0.1:9001=wss://b:1")],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("twice"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_local_listens_only_when_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let vol = SecretVolume::new(tmp.path().join("tls")).unwrap();
    write_set(&vol, &pki.client("client"), &pki.ca);
    let dir = vol.path().to_str().unwrap().to_owned();
    let proc = Proc::spawn(
        &[
            "proxy",
            "--admin",
            "127.0.0.1:0",
            "--outbound",
            "0.0.0.0:0=wss://localhost:1",
            "--allow-remote-outbound-listen",
            "--cert-dir",
            &dir,
        ],
        &[],
    );
    let started = proc.line("wsgate proxy started", Duration::from_secs(20)).await;
    assert!(
        started["outbound"].as_str().unwrap().starts_with("0.0.0.0:"),
        "{started}"
    );
}
