//! The data path: identity reaches the app, forged identity does not, upgrades and refusals are
//! relayed faithfully, frames flow both ways with their close codes, limits hold.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use crate::support::raw::metric;
use crate::support::{DEADLINE, Env, Mode, connect, metric_becomes, roundtrip, spiffe, until};

fn allow() -> [String; 1] {
    [spiffe("frontend")]
}

async fn env() -> Env {
    let a = allow();
    Env::start(&[a[0].as_str()]).await
}

/// Waits until `series` of the proxy's metrics is `want` (a handshake is recorded once its
/// connection is done with, which may be just after the client saw the answer).
async fn counted(env: &Env, series: &str, want: f64) {
    metric_becomes(series, || env.metrics(), series, want).await;
}

/// Nothing refused before reached the app: the next allowed connection's request reaches it (the
/// proxy dials the app, if at all, before it answers), and it is the only one the app has seen.
async fn assert_the_app_saw_nothing_before_the_next_connection(env: &Env) {
    let _ws = env.connect_as("frontend", "/next").await.unwrap();
    let seen: Vec<String> = env
        .app
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.path_and_query.clone())
        .collect();
    assert_eq!(seen, vec!["/next"], "a refused request reached the app");
}

/// Opens a wss connection as `frontend` with extra headers and returns the response too.
async fn connect_with_headers(
    env: &Env,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(crate::support::WssStream, http::Response<Option<Vec<u8>>>), tokio_tungstenite::tungstenite::Error> {
    env.connect_with(&env.pki.client("frontend"), path, headers).await
}

/// Reads until the Close frame, then once more so tungstenite sends its reply and sees the end.
async fn next_close(ws: &mut crate::support::WssStream) -> Option<(u16, String)> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(frame))) => {
                let _ = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
                return frame.map(|f| (u16::from(f.code), f.reason.to_string()));
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a Close frame, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_echoed_through_the_proxy_in_order() {
    let env = env().await;
    let mut ws = env.connect_as("frontend", "/chat").await.unwrap();
    for i in 0..50 {
        let reply = roundtrip(&mut ws, Message::text(format!("m{i}"))).await;
        assert_eq!(reply.to_text().unwrap(), format!("m{i}"));
    }
    let big = Bytes::from(vec![7u8; 300_000]);
    let reply = roundtrip(&mut ws, Message::Binary(big.clone())).await;
    assert_eq!(reply.into_data(), big);
    // Pipelined: many in flight at once, replies in order.
    for i in 0..200 {
        ws.feed(Message::text(format!("p{i}"))).await.unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..200 {
        let m = ws.next().await.unwrap().unwrap();
        assert_eq!(m.to_text().unwrap(), format!("p{i}"));
    }
    // 50 + 1 + 200 each way; the last batch is counted just after it is flushed: poll.
    let counts = |text: &String| {
        [
            "wsgate_messages_relayed_total{direction=\"client_to_upstream\"}",
            "wsgate_messages_relayed_total{direction=\"upstream_to_client\"}",
            "wsgate_connections_open{direction=\"inbound\"}",
        ]
        .map(|series| metric(text, series))
    };
    until(
        "every message counted",
        DEADLINE,
        || env.metrics(),
        |text| counts(text) == [Some(251.0), Some(251.0), Some(1.0)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_receives_the_verified_identity_in_envoy_format() {
    let env = env().await;
    let leaf = env.pki.client("frontend");
    let (_ws, _) = connect(
        env.proxy.listen_addr,
        env.pki.client_config(Some(&leaf)),
        "localhost",
        "/x?y=1",
    )
    .await
    .unwrap();
    let seen = env.app.last_seen();
    assert_eq!(seen.path_and_query, "/x?y=1");
    let xfcc = seen.header("x-forwarded-client-cert");
    assert_eq!(xfcc.len(), 1, "{xfcc:?}");
    let der = &leaf.cert_der;
    let hash: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        xfcc[0],
        format!("Hash={hash};URI={};Subject=\"CN=frontend\"", spiffe("frontend"))
    );
    let not_after = seen.header("x-wsgate-client-not-after");
    assert_eq!(not_after.len(), 1);
    assert!(
        not_after[0].ends_with('Z') && not_after[0].contains('T'),
        "{not_after:?}"
    );
    assert_eq!(seen.header("x-forwarded-proto"), vec!["https"]);
    assert_eq!(seen.header("x-forwarded-for"), vec!["127.0.0.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_identity_header_never_reaches_the_app() {
    let env = env().await;
    let (_ws, _) = connect_with_headers(
        &env,
        "/",
        &[
            (
                "X-Forwarded-Client-Cert",
                "Hash=00;URI=spiffe://test.wsgate.local/ns/kube-system/sa/admin",
            ),
            ("x-forwarded-client-cert", "URI=spiffe://evil"),
            ("X-Wsgate-Client-Not-After", "2999-12-31T00:00:00Z"),
        ],
    )
    .await
    .unwrap();
    let seen = env.app.last_seen();
    let xfcc = seen.header("x-forwarded-client-cert");
    assert_eq!(xfcc.len(), 1);
    assert!(xfcc[0].contains(&spiffe("frontend")), "{xfcc:?}");
    assert!(!xfcc[0].contains("admin") && !xfcc[0].contains("evil"), "{xfcc:?}");
    assert_ne!(seen.header("x-wsgate-client-not-after"), vec!["2999-12-31T00:00:00Z"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_subject_and_forged_headers_in_any_spelling_leave_exactly_the_real_identity() {
    use rcgen::DnType;
    let mut env = env().await;
    let ca = crate::support::SubjectCa::new();
    env.trust_also(&ca).await;
    let admin = "spiffe://test.wsgate.local/ns/kube-system/sa/admin";
    let cn = format!("frontend\r\nX-Forwarded-Client-Cert: URI={admin}");
    let leaf = ca.client(
        &[
            (DnType::CountryName, "DE"),
            (DnType::OrganizationName, "Shop, Inc."),
            (DnType::CommonName, &cn),
        ],
        &spiffe("frontend"),
    );
    let (_ws, _) = env
        .connect_with(
            &leaf,
            "/hostile",
            &[
                ("X_Forwarded_Client_Cert", &format!("URI={admin}")),
                ("x_wsgate_client_not_after", "2999-12-31T00:00:00Z"),
                ("Forwarded", "for=6.6.6.6;proto=https"),
                ("X-Real-IP", "6.6.6.6"),
                ("X-Forwarded-For", "6.6.6.6"),
                ("Connection", "host"),
            ],
        )
        .await
        .expect("the request is forwarded, with the identity");
    let seen = env.app.last_seen();
    assert_eq!(seen.path_and_query, "/hostile");
    // Every header as WSGI, Rack and CGI would name it.
    let cgi = |name: &str| -> Vec<&str> {
        seen.headers
            .iter()
            .filter(|(k, _)| k.replace('_', "-").eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let hash: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &leaf.cert_der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // RFC 2253: CN first, CR/LF as \0D\0A, the comma as \,; then XFCC quoting doubles the '\'.
    assert_eq!(
        cgi("x-forwarded-client-cert"),
        vec![format!(
            "Hash={hash};URI={};Subject=\"CN=frontend\\\\0D\\\\0AX-Forwarded-Client-Cert: URI={admin},O=Shop\\\\, Inc.,C=DE\"",
            spiffe("frontend")
        )]
    );
    let not_after = cgi("x-wsgate-client-not-after");
    assert_eq!(not_after.len(), 1, "{not_after:?}");
    assert_ne!(not_after[0], "2999-12-31T00:00:00Z");
    assert_eq!(cgi("forwarded"), Vec::<&str>::new());
    assert_eq!(cgi("x-real-ip"), Vec::<&str>::new());
    assert_eq!(cgi("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(cgi("host"), vec!["localhost"]);
    counted(
        &env,
        "wsgate_handshakes_total{result=\"success\",error_type=\"\",direction=\"inbound\"}",
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subprotocol_and_ordinary_headers_are_relayed() {
    let env = env().await;
    let (_ws, resp) = connect_with_headers(
        &env,
        "/",
        &[
            ("Sec-WebSocket-Protocol", "chat.v2, chat.v1"),
            ("X-Request-Id", "req-42"),
            ("Cookie", "a=b"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), "chat.v2");
    let seen = env.app.last_seen();
    assert_eq!(seen.header("sec-websocket-protocol"), vec!["chat.v2, chat.v1"]);
    assert_eq!(seen.header("x-request-id"), vec!["req-42"]);
    assert_eq!(seen.header("cookie"), vec!["a=b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_outside_the_allow_list_gets_403_with_a_reason() {
    let env = env().await;
    let err = env.connect_as("intruder", "/").await.unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    let body = match &err {
        crate::support::ClientError::Upgrade(e) => match e.as_ref() {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                String::from_utf8(resp.body().clone().unwrap_or_default()).unwrap()
            }
            other => panic!("{other}"),
        },
        other => panic!("{other}"),
    };
    assert!(body.contains(&spiffe("intruder")), "{body}");
    assert_eq!(body.trim_end().lines().count(), 1, "{body}");
    counted(
        &env,
        "wsgate_handshakes_total{result=\"failure\",error_type=\"identity_not_allowed\",direction=\"inbound\"}",
        1.0,
    )
    .await;
    assert_the_app_saw_nothing_before_the_next_connection(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_refuses_the_tcp_connection_gives_502_without_hanging() {
    let a = allow();
    // Take a free port and close it again: nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let env = Env::start_with(&[a[0].as_str()], |cfg| {
        cfg.upstream = Some(wsgate::proxy::settings::Upstream::parse(&format!("ws://{dead}"), false).unwrap());
    })
    .await;
    let t0 = std::time::Instant::now();
    let err = env.connect_as("frontend", "/").await.unwrap_err();
    assert_eq!(err.status(), Some(502), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    counted(
        &env,
        "wsgate_handshakes_total{result=\"failure\",error_type=\"upstream_unavailable\",direction=\"inbound\"}",
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_error_status_and_body_are_relayed() {
    let env = env().await;
    env.app.set_mode(Mode::Refuse(503, "down for maintenance"));
    let err = connect_with_headers(&env, "/", &[]).await.unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status(), 503);
            assert_eq!(resp.headers().get("x-app-reason").unwrap(), "maintenance");
            assert_eq!(resp.body().as_deref(), Some(&b"down for maintenance"[..]));
        }
        other => panic!("expected the app's 503, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_is_not_an_upgrade_gets_426() {
    let env = env().await;
    let text = env.raw_tls(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 426"), "{text}");
    assert!(text.to_ascii_lowercase().contains("upgrade: websocket"), "{text}");
    counted(
        &env,
        "wsgate_handshakes_total{result=\"failure\",error_type=\"not_websocket\",direction=\"inbound\"}",
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_reaches_the_app_with_code_and_reason() {
    let env = env().await;
    let mut ws = env.connect_as("frontend", "/").await.unwrap();
    roundtrip(&mut ws, "hello".into()).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Library(4001),
        reason: "client is done".into(),
    }))
    .await
    .unwrap();
    // The client's close handshake completes.
    assert_eq!(next_close(&mut ws).await, Some((4001, "client is done".into())));
    crate::support::eventually("app saw the close", Duration::from_secs(5), || {
        env.app.closes.lock().unwrap().first() == Some(&Some((4001, "client is done".into())))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_close_reaches_the_client_with_code_and_reason() {
    let env = env().await;
    let mut ws = env.connect_as("frontend", "/").await.unwrap();
    ws.send(Message::text("close:4002:app says bye")).await.unwrap();
    assert_eq!(next_close(&mut ws).await, Some((4002, "app says bye".into())));
    crate::support::eventually("connection counted as closed", Duration::from_secs(5), || {
        metric(
            &env.metrics(),
            "wsgate_connections_closed_total{code=\"4002\",initiator=\"upstream\",direction=\"inbound\"}",
        ) == Some(1.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_are_answered() {
    let env = env().await;
    let mut ws = env.connect_as("frontend", "/").await.unwrap();
    ws.send(Message::Ping(Bytes::from_static(b"are you there")))
        .await
        .unwrap();
    let pong = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap() {
            Some(Ok(Message::Pong(p))) => break p,
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(&pong[..], b"are you there");
    // The connection is still good afterwards.
    assert_eq!(
        roundtrip(&mut ws, "after ping".into()).await.to_text().unwrap(),
        "after ping"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_closes_with_1009_and_the_app_sees_a_close() {
    let a = allow();
    let env = Env::start_with(&[a[0].as_str()], |cfg| {
        cfg.limits.max_message_size = 64 * 1024;
        cfg.limits.max_frame_size = 16 * 1024;
    })
    .await;
    let mut ws = env.connect_as("frontend", "/").await.unwrap();
    roundtrip(&mut ws, "small".into()).await;
    ws.send(Message::Binary(Bytes::from(vec![0u8; 200_000]))).await.unwrap();
    let (code, _) = next_close(&mut ws).await.expect("a close code");
    assert_eq!(code, 1009);
    crate::support::eventually("app told the client went away", Duration::from_secs(5), || {
        env.app
            .closes
            .lock()
            .unwrap()
            .first()
            .is_some_and(|c| c.as_ref().map(|(code, _)| *code) == Some(1001))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_headers_get_431_and_count_as_limit_exceeded() {
    let env = env().await;
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: localhost\r\nX-Junk: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = env.raw_tls(huge.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    crate::support::eventually("counted", Duration::from_secs(5), || {
        metric(
            &env.metrics(),
            "wsgate_handshakes_total{result=\"failure\",error_type=\"limit_exceeded\",direction=\"inbound\"}",
        ) == Some(1.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_gets_400_and_counts_as_not_websocket() {
    let env = env().await;
    let answer = env.raw_tls(b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    crate::support::eventually("counted", Duration::from_secs(5), || {
        metric(
            &env.metrics(),
            "wsgate_handshakes_total{result=\"failure\",error_type=\"not_websocket\",direction=\"inbound\"}",
        ) == Some(1.0)
    })
    .await;
    assert_the_app_saw_nothing_before_the_next_connection(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_vanishes_is_reported_as_such_and_the_client_gets_1001() {
    let env = env().await;
    let mut ws = env.connect_as("frontend", "/").await.unwrap();
    roundtrip(&mut ws, "hello".into()).await;
    ws.send(Message::text("vanish")).await.unwrap();
    assert_eq!(next_close(&mut ws).await, Some((1001, "peer went away".into())));
    crate::support::eventually(
        "counted as vanished, not as a protocol error",
        Duration::from_secs(5),
        || {
            metric(
                &env.metrics(),
                "wsgate_connections_closed_total{code=\"none\",initiator=\"upstream\",direction=\"inbound\"}",
            ) == Some(1.0)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_ends_with_1008_when_the_client_certificate_expires() {
    let env = env().await;
    let now = std::time::SystemTime::now();
    let spec = crate::support::LeafSpec::new("frontend")
        .uri(&spiffe("frontend"))
        .valid(now - Duration::from_secs(60), now + Duration::from_secs(3));
    let short_lived = env.pki.ca.leaf(&spec).unwrap();
    let (mut ws, _) = connect(
        env.proxy.listen_addr,
        env.pki.client_config(Some(&short_lived)),
        "localhost",
        "/",
    )
    .await
    .unwrap();
    roundtrip(&mut ws, "still valid".into()).await;
    assert_eq!(
        next_close(&mut ws).await,
        Some((1008, "client certificate expired".into()))
    );
    crate::support::eventually("the app was told too", Duration::from_secs(5), || {
        env.app.closes.lock().unwrap().first() == Some(&Some((1008, "client certificate expired".into())))
    })
    .await;
}
