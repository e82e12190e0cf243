//! The limits around the gate, each against the real proxy on 127.0.0.1 with real certificates:
//! handshake slots per address, connections per identity, keep-alive and the idle timeout, the
//! memory budget for unfinished messages and the message timeout.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::support::frames::{close_of, count_closed_with, ping, start_fragmented, start_frame};
use crate::support::raw::metric;
use crate::support::{DEADLINE, Env, metric_becomes, roundtrip, spiffe};

/// A TCP connection to `to` from the loopback address `from` (127.0.0.2 is another client).
async fn tcp_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_handshakes_from_one_address_do_not_keep_another_address_out() {
    let env = Env::start_with(&[&spiffe("frontend")], |cfg| {
        cfg.limits.max_connections = 100;
        cfg.limits.max_pending = wsgate::proxy::settings::default_max_pending(100);
        cfg.limits.max_pending_per_ip = wsgate::proxy::settings::default_max_pending_per_ip(cfg.limits.max_pending);
        cfg.handshake_timeout = Duration::from_secs(30);
    })
    .await;
    // 150 connections from 127.0.0.1 that start a ClientHello and never finish it.
    let mut flood = Vec::new();
    for _ in 0..150 {
        let mut tcp = tcp_from("127.0.0.1", env.proxy.listen_addr).await;
        let _ = tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await;
        flood.push(tcp);
    }
    let per_ip = wsgate::proxy::settings::default_max_pending_per_ip(50) as f64;
    metric_becomes(
        "the flood beyond one address's share refused",
        || env.metrics(),
        "wsgate_connections_refused_total{reason=\"max_pending_per_ip\",direction=\"inbound\"}",
        150.0 - per_ip,
    )
    .await;
    // A client on another address still gets in and exchanges messages, at once.
    let leaf = env.pki.client("frontend");
    let tcp = tcp_from("127.0.0.2", env.proxy.listen_addr).await;
    let tls = tokio_rustls::TlsConnector::from(env.pki.client_config(Some(&leaf)))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS from 127.0.0.2 while 127.0.0.1 floods");
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/other", tls)
        .await
        .expect("upgrade from 127.0.0.2 while 127.0.0.1 floods");
    for i in 0..10 {
        let m = roundtrip(&mut ws, Message::text(format!("m{i}"))).await;
        assert_eq!(m.into_text().unwrap().as_str(), format!("m{i}"));
    }
    drop(flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_over_its_connection_limit_gets_429_and_others_are_served() {
    let env = Env::start_with(&[&spiffe("frontend"), &spiffe("other")], |cfg| {
        cfg.limits.max_connections_per_identity = 2;
    })
    .await;
    let first = env.connect_as("frontend", "/").await.unwrap();
    let _second = env.connect_as("frontend", "/").await.unwrap();
    let third = env.connect_with(&env.pki.client("frontend"), "/", &[]).await;
    match third {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 429);
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned();
            assert!(body.contains("--max-connections-per-identity"), "{body}");
        }
        other => panic!("expected 429, got {other:?}"),
    }
    metric_becomes(
        "the refusal counted",
        || env.metrics(),
        "wsgate_connections_refused_total{reason=\"max_connections_per_identity\",direction=\"inbound\"}",
        1.0,
    )
    .await;
    assert!(
        !env.metrics().contains(&spiffe("frontend")),
        "identities never become metric labels"
    );
    // Another identity is not affected; and a closed connection frees its slot.
    let mut other = env.connect_as("other", "/").await.unwrap();
    assert!(roundtrip(&mut other, Message::text("hi")).await.is_text());
    drop(first);
    let mut again = None;
    for _ in 0..100 {
        if let Ok(ws) = env.connect_as("frontend", "/").await {
            again = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut again = again.expect("a slot freed by a closed connection is usable again");
    assert!(roundtrip(&mut again, Message::text("back")).await.is_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_live_client_is_kept_and_a_dead_one_is_closed_at_the_idle_timeout() {
    let env = Env::start_with(&[&spiffe("frontend")], |cfg| {
        cfg.limits.keepalive = Some(wsgate::proxy::pump::Keepalive {
            ping_interval: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(500),
        });
    })
    .await;
    // The live client says nothing but reads, so tungstenite answers every ping.
    let mut live = env.connect_as("frontend", "/live").await.unwrap();
    // The dead one never reads again: no Pong ever comes back.
    let mut dead = env.connect_as("frontend", "/dead").await.unwrap();
    let live_reader = tokio::spawn(async move {
        let mut pings = 0;
        let until = tokio::time::Instant::now() + Duration::from_millis(1500);
        while let Ok(item) = tokio::time::timeout_at(until, live.next()).await {
            match item {
                Some(Ok(Message::Ping(_))) => pings += 1,
                other => panic!("the live client was closed: {other:?}"),
            }
        }
        (live, pings)
    });
    let (mut live, pings) = live_reader.await.unwrap();
    assert!(pings >= 5, "pinged {pings} times in 1.5 s at a 100 ms interval");
    assert!(roundtrip(&mut live, Message::text("still here")).await.is_text());
    // The dead client was closed with 1001 "idle timeout" long ago; it reads it now.
    assert_eq!(close_of(&mut dead).await, (1001, "idle timeout".to_owned()));
    // Counted when the relay ends: after the close handshake the dead client never finishes.
    metric_becomes(
        "the idle close counted",
        || env.metrics(),
        "wsgate_connections_closed_total{code=\"1001\",initiator=\"proxy\",direction=\"inbound\"}",
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_large_frames_hit_the_memory_budget_while_small_messages_flow() {
    const BUDGET: usize = 512 * 1024;
    let env = Env::start_with(&[&spiffe("frontend")], |cfg| {
        cfg.limits.memory_budget = BUDGET;
        cfg.limits.message_timeout = Duration::from_secs(60);
    })
    .await;
    let mut good = env.connect_as("frontend", "/good").await.unwrap();
    // Each staller announces 1 MiB and sends 300 KiB of it: 236 KiB over its allowance, so
    // the third cannot be held.
    let mut stallers = Vec::new();
    for _ in 0..4 {
        let mut ws = env.connect_as("frontend", "/stall").await.unwrap();
        start_frame(&mut ws, 1 << 20, 300 * 1024).await;
        stallers.push(ws);
        assert!(roundtrip(&mut good, Message::text("between")).await.is_text());
    }
    let refused = count_closed_with(&mut stallers, 1013).await;
    assert!(
        refused >= 2,
        "{refused} of 4 stallers refused with 1013; the budget holds two"
    );
    for i in 0..20 {
        let m = roundtrip(&mut good, Message::binary(vec![i as u8; 1000])).await;
        assert_eq!(m.len(), 1000);
    }
    metric_becomes(
        "the 1013 closes counted",
        || env.metrics(),
        "wsgate_connections_closed_total{code=\"1013\",initiator=\"proxy\",direction=\"inbound\"}",
        refused as f64,
    )
    .await;
    // What /metrics reports of the budget: its limit, and never more used than that.
    let (status, text) = crate::support::raw::http(env.proxy.admin_addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        metric(&text, "wsgate_memory_budget_limit_bytes"),
        Some(BUDGET as f64),
        "{text}"
    );
    let used = metric(&text, "wsgate_memory_budget_used_bytes").expect("the budget gauge");
    assert!(used <= BUDGET as f64, "{used} bytes charged to a {BUDGET}-byte budget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_left_unfinished_is_closed_with_1008_at_the_message_timeout() {
    let env = Env::start_with(&[&spiffe("frontend")], |cfg| {
        cfg.limits.message_timeout = Duration::from_millis(300);
    })
    .await;
    let mut ws = env.connect_as("frontend", "/").await.unwrap();
    assert!(roundtrip(&mut ws, Message::text("whole")).await.is_text());
    start_frame(&mut ws, 10_000, 100).await;
    let t0 = std::time::Instant::now();
    assert_eq!(
        close_of(&mut ws).await,
        (1008, "message not finished in time".to_owned())
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "closed after {:?}", t0.elapsed());
}

/// A Ping between the fragments of a message (RFC 6455 allows it) does not restart the message
/// timeout: a client cannot keep a fragmented message unfinished by pinging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragmented_message_kept_open_with_pings_is_closed_with_1008_at_the_message_timeout() {
    let env = Env::start_with(&[&spiffe("frontend")], |cfg| {
        cfg.limits.message_timeout = Duration::from_millis(300);
    })
    .await;
    let mut ws = env.connect_as("frontend", "/").await.unwrap();
    start_fragmented(&mut ws, "the first half").await;
    ping(&mut ws).await;
    assert_eq!(
        close_of(&mut ws).await,
        (1008, "message not finished in time".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_drops_a_header_that_never_ends() {
    let env = Env::start(&[&spiffe("frontend")]).await;
    let mut tcp = TcpStream::connect(env.proxy.admin_addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").await.unwrap();
    // More header than the admin port accepts: the connection is closed, not grown.
    let big = vec![b'a'; 64 * 1024];
    let mut closed = false;
    for _ in 0..32 {
        if tcp.write_all(&big).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if !closed {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(DEADLINE, tcp.read(&mut buf))
            .await
            .expect("closed in time");
        let text = String::from_utf8_lossy(&buf[..*n.as_ref().unwrap_or(&0)]).into_owned();
        assert!(
            n.is_err() || text.is_empty() || text.starts_with("HTTP/1.1 431"),
            "{text}"
        );
    }
    let (status, _) = crate::support::raw::http(env.proxy.admin_addr, "GET", "/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_big_messages_but_never_reads_is_closed_with_1013_within_the_budget() {
    use futures_util::SinkExt;
    const BUDGET: usize = 512 * 1024;
    let env = Env::start_with(&[&spiffe("frontend")], |cfg| {
        cfg.limits.memory_budget = BUDGET;
    })
    .await;
    let mut good = env.connect_as("frontend", "/good").await.unwrap();
    // The app echoes; this client sends 1 MiB messages and never reads the echoes. The echoes
    // are not queued for it (the relay stops reading the app, proxy::pump's unit tests prove
    // it); the 1 MiB frames it sends are held while being received, charged to the budget
    // beyond the allowance, and the budget refuses them: the connection ends with 1013.
    let deaf = env.connect_as("frontend", "/deaf").await.unwrap();
    let sender = tokio::spawn(async move {
        let mut deaf = deaf;
        for _ in 0..64 {
            let sent =
                tokio::time::timeout(Duration::from_secs(2), deaf.send(Message::binary(vec![7u8; 1 << 20]))).await;
            if !matches!(sent, Ok(Ok(()))) {
                break;
            }
        }
        deaf
    });
    metric_becomes(
        "the deaf client's connection closed with 1013",
        || env.metrics(),
        "wsgate_connections_closed_total{code=\"1013\",initiator=\"proxy\",direction=\"inbound\"}",
        1.0,
    )
    .await;
    let _ = sender.await;
    for i in 0..20 {
        let m = roundtrip(&mut good, Message::text(format!("still {i}"))).await;
        assert_eq!(m.into_text().unwrap().as_str(), format!("still {i}"));
    }
    let (_, text) = crate::support::raw::http(env.proxy.admin_addr, "GET", "/metrics").await;
    let used = metric(&text, "wsgate_memory_budget_used_bytes").expect("the budget gauge");
    assert!(used <= BUDGET as f64, "{used} bytes charged to a {BUDGET}-byte budget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_from_one_address_cannot_shut_the_kubelets_probes_out_of_the_admin_port() {
    use tokio::io::AsyncReadExt;
    let env = Env::start(&[&spiffe("frontend")]).await;
    // Every admin slot asked for by one address, each with a header that never ends.
    let mut slow = Vec::new();
    for _ in 0..wsgate::admin::BOUNDS.max_connections {
        let mut tcp = tcp_from("127.0.0.1", env.proxy.admin_addr).await;
        let _ = tcp.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: aaaa").await;
        slow.push(tcp);
    }
    // The probe from another address is answered at once.
    let mut probe = tcp_from("127.0.0.2", env.proxy.admin_addr).await;
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), probe.read_to_end(&mut answer))
        .await
        .expect("the probe answered within 2 s while one address floods")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The flooding address was held to its share: the rest of its connections were closed.
    let mut closed = 0;
    for tcp in &mut slow {
        let mut buf = [0u8; 1];
        // Closed at accept with the request unread: a FIN, or a reset.
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(200), tcp.read(&mut buf)).await {
            closed += 1;
        }
    }
    let share = wsgate::admin::BOUNDS.max_per_ip;
    assert_eq!(
        closed,
        slow.len() - share,
        "one address keeps {share} admin connections"
    );
}
