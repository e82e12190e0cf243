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
/// What the plain client's upgrade returns.
type Dialed = Result<(Ws, http::Response<Option<Vec<u8>>>), WsError>;

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
        Self {
            proc,
            local,
            admin,
            vol,
        }
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
async fn dial(local: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Dialed {
    let tcp = TcpStream::connect(local).await?;
    let mut req = format!("ws://{local}{path}").into_client_request()?;
    for (k, v) in headers {
        req.headers_mut()
            .append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    tokio_tungstenite::client_async(req, tcp).await
}

/// The app's WebSocket on `local` once a place is free (a slot freed by a closed connection is
/// released when its task ends): retried every 20 ms, for 10 s at most.
async fn dial_when_free(local: SocketAddr, path: &str) -> Ws {
    let t0 = Instant::now();
    loop {
        match dial(local, path, &[]).await {
            Ok((ws, _)) => return ws,
            Err(e) => assert!(t0.elapsed() < Duration::from_secs(10), "no place freed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The status and body of a refused upgrade.
fn refusal(result: Dialed) -> (u16, String) {
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
    wsgate::x509::hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der).as_ref())
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
    assert!(
        body.contains("TLS handshake") && body.contains("not valid for name"),
        "{body}"
    );
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
    assert!(
        body.contains(&spiffe("client")) && body.contains("not allowed"),
        "{body}"
    );
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
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = Outbound::start(&tmp, &pki, &client, &format!("wss://127.0.0.1:{}", dead.port()), &[]).await;
    let t0 = Instant::now();
    let (status, body) = refusal(dial(out.local, "/", &[]).await);
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("connecting to the remote") && body.contains("refused"),
        "{body}"
    );
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
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_secs(5),
        "took {took:?}"
    );
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
        (
            &["--outbound", "127.0.0.1:9001=ws://chat:8443"],
            &["--outbound", "wss://"],
        ),
        (
            &["--outbound", "127.0.0.1:99999=wss://chat:8443"],
            &["99999", "not a port"],
        ),
        (&["--outbound", "127.0.0.1:9001=wss://chat:0"], &["not a port"]),
        (
            &[
                "--outbound",
                "127.0.0.1:9001=wss://a:1",
                "--outbound",
                "127.0.0.1:9001=wss://b:1",
            ],
            &["127.0.0.1:9001", "twice"],
        ),
        (
            &[
                "--outbound",
                "127.0.0.1:9001=wss://a:1",
                "--outbound-expect",
                "127.0.0.1:9002=spiffe://td/x",
            ],
            &["--outbound-expect", "127.0.0.1:9002"],
        ),
        (
            &[
                "--outbound",
                "127.0.0.1:9001=wss://a:1",
                "--outbound-expect",
                "127.0.0.1:9001=spiffe://td/fr*nt",
            ],
            &["--outbound-expect", "fr*nt"],
        ),
        (
            &["--outbound", "10.1.2.3:9001=wss://a:1"],
            &["--allow-remote-outbound-listen"],
        ),
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

#[allow(clippy::too_many_arguments)]
/// An in-process proxy presenting `leaf` from a fresh volume under `tmp`: inbound in front of
/// `app` when given, with `routes` (`LOCAL=REMOTE`) and `expects` outbound.
async fn in_process(
    tmp: &tempfile::TempDir,
    name: &str,
    pki: &Pki,
    leaf: &Leaf,
    app: Option<SocketAddr>,
    routes: &[String],
    expects: &[String],
    tweak: impl FnOnce(&mut wsgate::proxy::settings::ProxyConfig),
) -> (wsgate::proxy::ProxyHandle, SecretVolume) {
    let vol = SecretVolume::new(tmp.path().join(name)).unwrap();
    write_set(&vol, leaf, &pki.ca);
    let mut cfg = crate::support::proxy_config(
        vol.path(),
        app.unwrap_or_else(|| "127.0.0.1:1".parse().unwrap()),
        &["spiffe://test.wsgate.local/ns/shop/sa/frontend"],
    );
    if app.is_none() {
        cfg.upstream = None;
    }
    cfg.outbound.routes = wsgate::proxy::settings::Outbound::parse_routes(routes, expects, false).unwrap();
    cfg.outbound.dial_timeout = Duration::from_secs(5);
    cfg.outbound.max_per_destination = 100;
    tweak(&mut cfg);
    let proxy = wsgate::proxy::start(cfg).await.unwrap();
    crate::support::wait_serial(&proxy, &leaf.serial).await;
    (proxy, vol)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_span_is_a_client_span_that_continues_the_apps_trace_to_the_remote() {
    use crate::support::otlp::{Val, grpc_receiver};
    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT_ID: &str = "00f067aa0ba902b7";
    let (endpoint, received) = grpc_receiver().await;
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let server = pki.server();
    let client = pki.client("client");
    let app = TestApp::start().await;
    let (inbound, _vin) = in_process(&tmp, "in", &pki, &server, Some(app.addr), &[], &[], |cfg| {
        cfg.policy = wsgate::authz::Policy::new(&[spiffe("client")], false).unwrap();
    })
    .await;
    let route = format!("127.0.0.1:0=wss://localhost:{}", inbound.listen_addr.port());
    let expect = format!("127.0.0.1:0={}", spiffe("app"));
    let lookup = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
    ];
    let (out, _vout) = in_process(&tmp, "out", &pki, &client, None, &[route], &[expect], |cfg| {
        cfg.otel = wsgate::telemetry::OtelSettings::from_lookup(|k| {
            lookup.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        });
    })
    .await;
    let local = out.outbound_addrs[0];
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let (mut ws, _) = dial(local, "/traced", &[("traceparent", &traceparent)]).await.unwrap();
    echo(&mut ws, Message::text("traced")).await;
    let span = received
        .wait_for("the outbound handshake", |s| s.name == "wsgate.handshake")
        .await;
    assert_eq!(span.kind, 3, "CLIENT");
    assert_eq!(span.status_code, 0);
    assert_eq!(span.trace_id, TRACE_ID);
    assert_eq!(span.parent_span_id, PARENT_ID);
    assert_eq!(span.attr("server.address"), &Val::Str("localhost".into()));
    assert_eq!(
        span.attr("server.port"),
        &Val::Int(i64::from(inbound.listen_addr.port()))
    );
    assert_eq!(span.attr("client.address"), &Val::Str("127.0.0.1".into()));
    assert_eq!(span.attr("tls.protocol.version"), &Val::Str("1.3".into()));
    assert_eq!(span.attr("tls.established"), &Val::Bool(true));
    assert_eq!(span.attr("tls.server.subject"), &Val::Str("CN=app".into()));
    assert_eq!(span.attr("tls.server.issuer"), &Val::Str("CN=wsgate test CA".into()));
    assert_eq!(
        span.attr("tls.server.hash.sha256"),
        &Val::Str(sha256_hex(&server.cert_der).to_ascii_uppercase())
    );
    assert_eq!(span.attr("wsgate.server.spiffe_id"), &Val::Str(spiffe("app")));
    assert_eq!(span.attr("wsgate.authz.decision"), &Val::Str("allow".into()));
    assert_eq!(
        span.attr("wsgate.client.certificate.serial"),
        &Val::Str(client.serial.clone())
    );
    assert_eq!(span.attr("http.response.status_code"), &Val::Int(101));
    assert_eq!(span.attr("url.path"), &Val::Str("/traced".into()));
    // The remote got a traceparent whose parent is the outbound span, in the app's trace.
    let seen = app.last_seen();
    assert_eq!(
        seen.header("traceparent"),
        vec![format!("00-{TRACE_ID}-{}-01", span.span_id).as_str()]
    );

    // A refusal is a CLIENT span too, with its error.type.
    app.set_mode(crate::support::Mode::Refuse(503, "maintenance"));
    let (status, _) = refusal(dial(local, "/refused", &[]).await);
    assert_eq!(status, 503);
    let failed = received
        .wait_for("the refused handshake", |s| s.error_type().is_some())
        .await;
    assert_eq!(failed.kind, 3);
    assert_eq!(failed.error_type(), Some("upstream_rejected"));
    assert_eq!(failed.attr("http.response.status_code"), &Val::Int(503));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_serves_inbound_and_outbound_and_a_drain_closes_both_with_1001() {
    use crate::support::{Env, connect, roundtrip};
    let tmp = tempfile::tempdir().unwrap();
    // The remote: another pod's inbound sidecar admitting this pod's identity.
    let remote_env = Env::start(&[spiffe("app").as_str()]).await;
    let pki = &remote_env.pki;
    let own_app = TestApp::start().await;
    let route = format!("127.0.0.1:0=wss://localhost:{}", remote_env.proxy.listen_addr.port());
    // This pod's certificate serves inbound (server auth) and dials out (client auth).
    let leaf = pki.server();
    let (proxy, _vol) = in_process(&tmp, "both", pki, &leaf, Some(own_app.addr), &[route], &[], |_| {}).await;

    // Inbound: a client in another pod reaches this pod's app.
    let frontend = pki.client("frontend");
    let (mut inbound_ws, _) = connect(
        proxy.listen_addr,
        pki.client_config(Some(&frontend)),
        "localhost",
        "/in",
    )
    .await
    .unwrap();
    assert_eq!(roundtrip(&mut inbound_ws, "in".into()).await.to_text().unwrap(), "in");
    // Outbound: this pod's app reaches the remote app, as this pod's identity.
    let (mut outbound_ws, _) = dial(proxy.outbound_addrs[0], "/out", &[]).await.unwrap();
    echo(&mut outbound_ws, Message::text("out")).await;
    let xfcc = remote_env.app.last_seen().header("x-forwarded-client-cert")[0].to_owned();
    assert!(xfcc.contains(&format!("URI={}", spiffe("app"))), "{xfcc}");
    let text = proxy.metrics.encode();
    assert_eq!(
        metric(&text, "wsgate_connections_open{direction=\"inbound\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "wsgate_connections_open{direction=\"outbound\"}"),
        Some(1.0),
        "{text}"
    );

    // Drain: both get Close 1001, and the outbound listener stops accepting.
    let t0 = Instant::now();
    proxy.drain();
    match next_data(&mut outbound_ws).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected Close 1001 on the outbound connection, got {other:?}"),
    }
    loop {
        match tokio::time::timeout(Duration::from_secs(10), inbound_ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1001);
                break;
            }
            Some(Ok(_)) => continue,
            other => panic!("expected Close 1001 on the inbound connection, got {other:?}"),
        }
    }
    // Reading on completes the close handshakes (tungstenite flushes its Close reply).
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), outbound_ws.next()).await {}
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), inbound_ws.next()).await {}
    let local = proxy.outbound_addrs[0];
    tokio::time::timeout(Duration::from_secs(15), proxy.wait())
        .await
        .unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "the drain waited for nothing: {:?}",
        t0.elapsed()
    );
    assert!(
        TcpStream::connect(local).await.is_err(),
        "the outbound listener is closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_limits_apply_per_destination_and_to_the_apps_request_and_metrics_parse_strictly() {
    use crate::support::raw::exchange;
    let pair = Pair::start(|cfg| {
        cfg.outbound.max_per_destination = 2;
    })
    .await;
    let out = &pair.out;
    let local = out.outbound_addrs[0];

    // Two connections to the remote; the third is answered 429 and counted; a freed slot is free.
    let (mut one, _) = dial(local, "/1", &[]).await.unwrap();
    let (mut two, _) = dial(local, "/2", &[]).await.unwrap();
    echo(&mut two, Message::text("two")).await;
    let (status, body) = refusal(dial(local, "/3", &[]).await);
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("--outbound-max-connections-per-destination"), "{body}");
    // The 429 is written before the refusal is counted: poll.
    crate::support::metric_becomes(
        "the per-destination refusal",
        || out.metrics.encode(),
        "wsgate_connections_refused_total{reason=\"max_connections_per_destination\",direction=\"outbound\"}",
        1.0,
    )
    .await;
    one.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), one.next()).await {}
    let mut three = dial_when_free(local, "/3").await;
    echo(&mut three, Message::text("three")).await;

    // The app's request head is bounded like a client's: hyper answers 431 before any dial.
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = String::from_utf8_lossy(&exchange(local, huge.as_bytes()).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // Not an upgrade: 426, nothing dialled.
    let answer = String::from_utf8_lossy(&exchange(local, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    crate::support::metric_becomes(
        "the not-an-upgrade failure",
        || out.metrics.encode(),
        "wsgate_handshakes_total{result=\"failure\",error_type=\"not_websocket\",direction=\"outbound\"}",
        1.0,
    )
    .await;

    // The outbound series pass the strict OpenMetrics parser with the rest (the registered
    // families are checked by admin.rs, with an inbound client connected).
    let families = crate::support::openmetrics::check_admin_metrics(out.admin_addr, &[]).await;
    let open = &families["wsgate_connections_open"];
    assert!(
        open.samples
            .iter()
            .any(|s| s.labels.get("direction").map(String::as_str) == Some("outbound")),
        "{open:?}"
    );
    drop((two, three));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_certificate_the_app_gets_503_and_nothing_is_dialled() {
    let tmp = tempfile::tempdir().unwrap();
    // A remote that would accept anything: nothing may reach it.
    let remote = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let route = format!("127.0.0.1:0=wss://localhost:{}", remote.local_addr().unwrap().port());
    let mut cfg = crate::support::proxy_config(
        &tmp.path().join("not-mounted-yet"),
        "127.0.0.1:1".parse().unwrap(),
        &["cn:x"],
    );
    cfg.upstream = None;
    cfg.outbound.routes = wsgate::proxy::settings::Outbound::parse_routes(&[route], &[], false).unwrap();
    cfg.outbound.dial_timeout = Duration::from_secs(5);
    cfg.outbound.max_per_destination = 10;
    let out = wsgate::proxy::start(cfg).await.unwrap();
    let (status, body) = refusal(dial(out.outbound_addrs[0], "/", &[]).await);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no valid client certificate"), "{body}");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), remote.accept())
            .await
            .is_err(),
        "the remote was dialled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_stops_answering_pings_is_closed_after_the_idle_timeout() {
    let pair = Pair::start(|cfg| {
        cfg.limits.keepalive = Some(wsgate::proxy::pump::Keepalive {
            ping_interval: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(400),
        });
    })
    .await;
    let out = &pair.out;
    let (mut ws, _) = dial(out.outbound_addrs[0], "/idle", &[]).await.unwrap();
    echo(&mut ws, Message::text("hello")).await;
    // The app reads nothing (so answers no ping) for a while; then it finds pings and a Close.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let mut pings = 0;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap() {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Close(frame))) => break frame,
            other => panic!("expected pings then a Close, got {other:?}"),
        }
    };
    assert!(pings >= 1, "no ping was sent to the app");
    let frame = close.expect("a close code");
    assert_eq!(u16::from(frame.code), 1001);
    assert_eq!(frame.reason.as_str(), "idle timeout");
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {}
    crate::support::metric_becomes(
        "the idle close counted",
        || out.metrics.encode(),
        "wsgate_connections_closed_total{code=\"1001\",initiator=\"proxy\",direction=\"outbound\"}",
        1.0,
    )
    .await;
}

/// This pod's outbound sidecar (presenting `client`, one route, `tweak`ed) in front of a
/// remote pod's inbound sidecar (admitting `client`) and its echo app, both in process.
struct Pair {
    out: wsgate::proxy::ProxyHandle,
    remote: wsgate::proxy::ProxyHandle,
    app: TestApp,
    _vols: (SecretVolume, SecretVolume),
    _tmp: tempfile::TempDir,
}

impl Pair {
    async fn start(tweak: impl FnOnce(&mut wsgate::proxy::settings::ProxyConfig)) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let app = TestApp::start().await;
        let (remote, vin) = in_process(&tmp, "in", &pki, &pki.server(), Some(app.addr), &[], &[], |cfg| {
            cfg.policy = wsgate::authz::Policy::new(&[spiffe("client")], false).unwrap();
        })
        .await;
        let route = format!("127.0.0.1:0=wss://localhost:{}", remote.listen_addr.port());
        let (out, vout) = in_process(&tmp, "out", &pki, &pki.client("client"), None, &[route], &[], tweak).await;
        Self {
            out,
            remote,
            app,
            _vols: (vin, vout),
            _tmp: tmp,
        }
    }

    /// The app's local listener.
    fn local(&self) -> SocketAddr {
        self.out.outbound_addrs[0]
    }

    /// Waits until the outbound side's `series` is `want`.
    async fn metric_becomes(&self, what: &str, series: &str, want: f64) {
        crate::support::metric_becomes(what, || self.out.metrics.encode(), series, want).await;
    }
}

/// Whether `result` is a connection closed without any HTTP answer (EOF or reset).
fn closed_unanswered(result: &Dialed) -> bool {
    matches!(
        result,
        Err(WsError::Io(_) | WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Protocol(_))
    )
}

/// `--max-connections` caps each outbound listener as it caps the inbound one: past it a
/// connection is closed at accept, unread and unanswered (no 503: reading the request would
/// hold what the cap bounds), and counted; a closed connection frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_listener_at_max_connections_closes_the_next_connection_unanswered() {
    let pair = Pair::start(|cfg| cfg.limits.max_connections = 2).await;
    let (mut one, _) = dial(pair.local(), "/1", &[]).await.unwrap();
    let (mut two, _) = dial(pair.local(), "/2", &[]).await.unwrap();
    echo(&mut two, Message::text("two")).await;
    let third = dial(pair.local(), "/3", &[]).await;
    assert!(closed_unanswered(&third), "{third:?}");
    pair.metric_becomes(
        "the refusal counted",
        "wsgate_connections_refused_total{reason=\"max_connections\",direction=\"outbound\"}",
        1.0,
    )
    .await;
    pair.metric_becomes(
        "the refusal recorded as a failed handshake",
        "wsgate_handshakes_total{result=\"failure\",error_type=\"limit_exceeded\",direction=\"outbound\"}",
        1.0,
    )
    .await;
    // The open ones are untouched; once one closes, the next connection gets in.
    echo(&mut one, Message::text("one")).await;
    one.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), one.next()).await {}
    let mut again = dial_when_free(pair.local(), "/again").await;
    echo(&mut again, Message::text("again")).await;
    drop(two);
}

/// `--max-pending` bounds the outbound upgrades in progress in all (every app connects from
/// loopback): apps that open connections and never send their request hold at most that many
/// places; one more is closed at once and counted, and a place is free again when a holder goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_requests_in_progress_past_max_pending_are_closed_at_once() {
    use tokio::io::AsyncWriteExt;
    let pair = Pair::start(|cfg| {
        cfg.limits.max_pending = 2;
        cfg.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    // Three connections that start a request head and never finish it: whichever comes last to
    // its place is refused.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(pair.local()).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        stalled.push(tcp);
    }
    pair.metric_becomes(
        "one stalled request beyond max-pending refused",
        "wsgate_connections_refused_total{reason=\"max_pending\",direction=\"outbound\"}",
        1.0,
    )
    .await;
    // With both places held, a real upgrade is refused too; freed, it is relayed.
    let blocked = dial(pair.local(), "/blocked", &[]).await;
    assert!(closed_unanswered(&blocked), "{blocked:?}");
    drop(stalled);
    let mut ws = dial_when_free(pair.local(), "/after").await;
    echo(&mut ws, Message::text("after")).await;
}

/// `--message-timeout` covers the app's leg: a fragmented message the app starts and never
/// finishes (also when it sends a Ping between the fragments, which RFC 6455 allows) is ended
/// with Close 1008 on both legs, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_fragmented_message_from_the_app_is_closed_with_1008_at_the_message_timeout() {
    use crate::support::frames::{close_of, ping, start_fragmented};
    let pair = Pair::start(|cfg| cfg.limits.message_timeout = Duration::from_millis(300)).await;
    for (n, with_ping) in [(1.0, false), (2.0, true)] {
        let (mut ws, _) = dial(pair.local(), "/fragments", &[]).await.unwrap();
        echo(&mut ws, Message::text("whole")).await;
        start_fragmented(&mut ws, "the first half of a message").await;
        if with_ping {
            ping(&mut ws).await;
        }
        assert_eq!(
            close_of(&mut ws).await,
            (1008, "message not finished in time".to_owned()),
            "ping between the fragments: {with_ping}"
        );
        // Reading on sends tungstenite's Close reply: the close handshake ends the relay.
        while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {}
        pair.metric_becomes(
            "the 1008 close counted",
            "wsgate_connections_closed_total{code=\"1008\",initiator=\"proxy\",direction=\"outbound\"}",
            n,
        )
        .await;
    }
    assert!(
        pair.app.seen.lock().unwrap().len() >= 2,
        "both connections reached the remote's app"
    );
}

/// `--memory-budget` is shared by outbound connections: apps that stall inside large frames
/// hold at most the budget beyond their allowance, those past it are closed with 1013, and
/// another app connection's small messages keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_large_frames_from_apps_hit_the_memory_budget_while_small_messages_flow() {
    use crate::support::frames::{count_closed_with, start_frame};
    const BUDGET: usize = 512 * 1024;
    let pair = Pair::start(|cfg| {
        cfg.limits.memory_budget = BUDGET;
        cfg.limits.message_timeout = Duration::from_secs(60);
    })
    .await;
    let (mut good, _) = dial(pair.local(), "/good", &[]).await.unwrap();
    // Each staller announces 1 MiB and sends 300 KiB of it: 236 KiB over its allowance, so the
    // third cannot be held.
    let mut stallers = Vec::new();
    for _ in 0..4 {
        let (mut ws, _) = dial(pair.local(), "/stall", &[]).await.unwrap();
        start_frame(&mut ws, 1 << 20, 300 * 1024).await;
        stallers.push(ws);
        echo(&mut good, Message::text("between")).await;
    }
    let refused = count_closed_with(&mut stallers, 1013).await;
    assert!(
        refused >= 2,
        "{refused} of 4 stallers refused with 1013; the budget holds two"
    );
    for i in 0..20 {
        echo(&mut good, Message::binary(vec![i as u8; 1000])).await;
    }
    pair.metric_becomes(
        "the 1013 closes counted",
        "wsgate_connections_closed_total{code=\"1013\",initiator=\"proxy\",direction=\"outbound\"}",
        refused as f64,
    )
    .await;
    let text = pair.out.metrics.encode();
    let used = metric(&text, "wsgate_memory_budget_used_bytes").expect("the budget gauge");
    assert!(used <= BUDGET as f64, "{used} bytes charged to a {BUDGET}-byte budget");
    // The remote's wsgate never saw the stalled frames: nothing of them was relayed.
    let remote = pair.remote.metrics.encode();
    assert_eq!(
        metric(&remote, "wsgate_memory_budget_used_bytes"),
        Some(0.0),
        "{remote}"
    );
}
