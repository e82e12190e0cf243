//! Telemetry: one span per handshake attempt over real OTLP (gRPC and HTTP/protobuf receivers in
//! this process), trace context in and out, every error.type, sampling that never hides
//! failures, a dead collector that costs nothing, and metrics that move.

use std::time::{Duration, SystemTime};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use wsgate::telemetry::OtelSettings;

use crate::support::otlp::{Received, Span, Val, grpc_receiver, http_receiver};
use crate::support::raw::{exchange, http, metric};
use crate::support::{
    Ca, DEADLINE, Env, LeafSpec, Mode, Pki, connect, eventually, metric_becomes, roundtrip, spiffe, until, wait_serial,
    write_set,
};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

fn otel(vars: &[(&str, &str)]) -> OtelSettings {
    let mut all: Vec<(String, String)> = vec![
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "20".into()),
        ("OTEL_SERVICE_NAME".into(), "wsgate-test".into()),
        (
            "OTEL_RESOURCE_ATTRIBUTES".into(),
            "k8s.pod.name=web-0,k8s.namespace.name=shop".into(),
        ),
    ];
    all.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    OtelSettings::from_lookup(|k| all.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
}

async fn traced_env(settings: OtelSettings) -> Env {
    let allow = spiffe("frontend");
    Env::start_with(&[allow.as_str()], move |cfg| {
        cfg.otel = settings;
        cfg.handshake_timeout = Duration::from_millis(800);
    })
    .await
}

/// Opens a bare TCP connection to `addr` and drops it; returns (server port, client port), which
/// name the span it leaves (`client_closed`, or whatever the proxy refuses it with). Each proxy
/// exports its spans in the order they end, so once this span has been received, every span
/// that ended before the marker was made has been received too.
async fn marker(addr: std::net::SocketAddr) -> (i64, i64) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    drop(tcp);
    (i64::from(addr.port()), i64::from(port))
}

fn is_marker(span: &Span, (server_port, peer_port): (i64, i64)) -> bool {
    span.attributes.get("server.port") == Some(&Val::Int(server_port))
        && span.attributes.get("network.peer.port") == Some(&Val::Int(peer_port))
}

/// Waits until the spans of all `markers` have been received; returns the handshake spans
/// received, markers left out.
async fn handshakes_up_to(received: &Received, markers: &[(i64, i64)]) -> Vec<Span> {
    let spans = until(
        "the marker spans",
        DEADLINE,
        || received.handshakes(),
        |spans| markers.iter().all(|m| spans.iter().any(|s| is_marker(s, *m))),
    )
    .await;
    spans
        .into_iter()
        .filter(|s| !markers.iter().any(|m| is_marker(s, *m)))
        .collect()
}

/// `error.type` of each span, `success` for none.
fn kinds(spans: &[Span]) -> Vec<String> {
    spans
        .iter()
        .map(|s| s.error_type().unwrap_or("success").to_owned())
        .collect()
}

fn assert_handshake_attributes(span: &Span, env: &Env) {
    assert_eq!(span.kind, 2, "SERVER");
    assert_eq!(span.status_code, 0, "unset on success");
    assert!(span.end_unix_nano > span.start_unix_nano);
    assert_eq!(span.attr("network.peer.address"), &Val::Str("127.0.0.1".into()));
    assert!(matches!(span.attr("network.peer.port"), Val::Int(p) if *p > 0));
    assert_eq!(
        span.attr("server.port"),
        &Val::Int(i64::from(env.proxy.listen_addr.port()))
    );
    assert_eq!(span.attr("tls.protocol.name"), &Val::Str("tls".into()));
    assert_eq!(span.attr("tls.protocol.version"), &Val::Str("1.3".into()));
    assert!(span.attr("tls.cipher").str().starts_with("TLS13_"));
    // wsgate's own client offers the post-quantum hybrid first, as the proxy does.
    assert_eq!(span.attr("tls.curve"), &Val::Str("X25519MLKEM768".into()));
    assert_eq!(span.attr("tls.established"), &Val::Bool(true));
    assert_eq!(span.attr("tls.resumed"), &Val::Bool(false));
    assert_eq!(span.attr("tls.client.subject"), &Val::Str("CN=frontend".into()));
    assert_eq!(span.attr("tls.client.issuer"), &Val::Str("CN=wsgate test CA".into()));
    assert!(span.attr("tls.client.not_after").str().ends_with('Z'));
    let hash = span.attr("tls.client.hash.sha256").str();
    assert!(hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase()));
    assert_eq!(span.attr("url.path"), &Val::Str("/chat".into()));
    assert_eq!(span.attr("http.response.status_code"), &Val::Int(101));
    assert_eq!(span.attr("wsgate.client.spiffe_id"), &Val::Str(spiffe("frontend")));
    assert_eq!(
        span.attr("wsgate.client.uri_sans"),
        &Val::List(vec![Val::Str(spiffe("frontend"))])
    );
    assert_eq!(span.attr("wsgate.authz.decision"), &Val::Str("allow".into()));
    assert_eq!(span.attr("wsgate.authz.rule"), &Val::Str(spiffe("frontend")));
    assert_eq!(span.attr("wsgate.websocket.subprotocol"), &Val::Str("chat.v1".into()));
    assert_eq!(
        span.attr("wsgate.upstream.address"),
        &Val::Str(env.app.addr.to_string())
    );
    assert_eq!(
        span.attr("wsgate.server.certificate.serial"),
        &Val::Str(env.server.serial.clone())
    );
    for phase in [
        "wsgate.phase.tls_ms",
        "wsgate.phase.upgrade_read_ms",
        "wsgate.phase.upstream_connect_ms",
    ] {
        assert!(matches!(span.attr(phase), Val::Double(ms) if *ms >= 0.0), "{phase}");
    }
    assert_eq!(span.resource.get("service.name"), Some(&Val::Str("wsgate-test".into())));
    assert_eq!(span.resource.get("k8s.pod.name"), Some(&Val::Str("web-0".into())));
    assert!(span.resource.contains_key("telemetry.sdk.name"));
}

/// Connects with a sampled W3C parent, checks the span and the traceparent the app received.
async fn traced_handshake_joins_the_callers_trace(env: &Env, received: &Received, transport: &str) {
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let (mut ws, _) = env
        .connect_with(
            &env.pki.client("frontend"),
            "/chat",
            &[
                ("traceparent", &traceparent),
                ("Sec-WebSocket-Protocol", "chat.v1"),
                ("baggage", "tenant=blue"),
            ],
        )
        .await
        .unwrap();
    roundtrip(&mut ws, "traced".into()).await;
    let span = received
        .wait_for("the handshake", |s| s.name == "wsgate.handshake")
        .await;
    assert_eq!(span.transport, transport);
    assert_eq!(span.trace_id, TRACE_ID);
    assert_eq!(span.parent_span_id, PARENT_ID);
    assert_handshake_attributes(&span, env);
    // The app's request carries the proxy's own span as parent, in the same trace.
    let seen = env.app.last_seen();
    let sent = seen.header("traceparent");
    assert_eq!(sent, vec![format!("00-{TRACE_ID}-{}-01", span.span_id).as_str()]);
    assert_eq!(seen.header("baggage"), vec!["tenant=blue"]);
    // One span per handshake: a later connection's span has arrived, so a second span of this
    // handshake would have too.
    let later = marker(env.proxy.listen_addr).await;
    let spans = handshakes_up_to(received, &[later]).await;
    assert_eq!(kinds(&spans), vec!["success"], "one span per handshake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_spans_arrive_over_grpc_with_their_parent_and_attributes() {
    let (endpoint, received) = grpc_receiver().await;
    let env = traced_env(otel(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ]))
    .await;
    traced_handshake_joins_the_callers_trace(&env, &received, "grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_spans_arrive_over_http_protobuf_with_their_parent_and_attributes() {
    let (endpoint, received) = http_receiver().await;
    let env = traced_env(otel(&[
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=s3cr%3Dt"),
    ]))
    .await;
    traced_handshake_joins_the_callers_trace(&env, &received, "http/protobuf").await;
    assert_eq!(received.last_headers().get("x-api-key").unwrap(), "s3cr=t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_without_a_parent_starts_a_trace_and_a_returning_client_is_not_resumed() {
    let (endpoint, received) = http_receiver().await;
    let env = traced_env(otel(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.as_str())])).await;
    let leaf = env.pki.client("frontend");
    let cfg = env.pki.client_config(Some(&leaf));
    for _ in 0..2 {
        let (mut ws, _) = connect(env.proxy.listen_addr, cfg.clone(), "localhost", "/")
            .await
            .unwrap();
        roundtrip(&mut ws, "x".into()).await;
        let _ = ws.close(None).await;
    }
    let spans = until("two spans", DEADLINE, || received.handshakes(), |s| s.len() >= 2).await;
    assert_eq!(spans.len(), 2, "{:#?}", kinds(&spans));
    assert!(
        spans
            .iter()
            .all(|s| s.parent_span_id.is_empty() || s.parent_span_id == "0000000000000000")
    );
    assert_ne!(spans[0].trace_id, spans[1].trace_id);
    assert_eq!(spans[0].attr("tls.resumed"), &Val::Bool(false));
    assert_eq!(
        spans[1].attr("tls.resumed"),
        &Val::Bool(false),
        "the second connection got a full handshake: no session is resumed"
    );
}

/// A client certificate whose signature is not its issuer's: the issuer name is our CA's, the
/// key is not.
fn forged() -> crate::support::Leaf {
    let impostor = Ca::new("wsgate test CA").unwrap();
    impostor
        .leaf(&LeafSpec::new("frontend").uri(&spiffe("frontend")))
        .unwrap()
}

async fn attempt_with(env: &Env, leaf: Option<&crate::support::Leaf>) {
    let cfg = crate::support::client_config(
        leaf.map(|l| (l.cert_pem.as_str(), l.key_pem.as_str())),
        std::slice::from_ref(&env.pki.ca.cert_der),
    )
    .unwrap();
    if let Ok((mut ws, _)) = connect(env.proxy.listen_addr, cfg, "localhost", "/").await {
        let _ = ws.close(None).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_that_can_happen_on_one_machine_has_its_exact_error_type() {
    let (endpoint, received) = http_receiver().await;
    let settings = otel(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.as_str())]);
    let env = traced_env(settings.clone()).await;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let mut attempts = 0;
    let mut expect = Vec::new();

    let mut check = |kind: &'static str| {
        attempts += 1;
        expect.push(kind);
    };
    attempt_with(&env, None).await;
    check("no_client_certificate");
    let stranger = Ca::new("another CA")
        .unwrap()
        .leaf(&LeafSpec::new("frontend").uri(&spiffe("frontend")))
        .unwrap();
    attempt_with(&env, Some(&stranger)).await;
    check("unknown_ca");
    let spec = LeafSpec::new("frontend").uri(&spiffe("frontend"));
    attempt_with(
        &env,
        Some(
            &env.pki
                .ca
                .leaf(&spec.clone().valid(now - 2 * hour, now - hour))
                .unwrap(),
        ),
    )
    .await;
    check("certificate_expired");
    attempt_with(
        &env,
        Some(
            &env.pki
                .ca
                .leaf(&spec.clone().valid(now + hour, now + 2 * hour))
                .unwrap(),
        ),
    )
    .await;
    check("certificate_not_yet_valid");
    attempt_with(&env, Some(&env.pki.ca.leaf(&spec.clone().usages(true, false)).unwrap())).await;
    check("bad_certificate_usage");
    attempt_with(&env, Some(&forged())).await;
    check("bad_certificate");
    attempt_with(&env, Some(&env.pki.client("intruder"))).await;
    check("identity_not_allowed");
    exchange(env.proxy.listen_addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    check("not_tls");
    drop(tokio::net::TcpStream::connect(env.proxy.listen_addr).await.unwrap());
    check("client_closed");
    {
        // Connected, silent: the handshake timeout (800 ms here) ends it.
        let mut idle = tokio::net::TcpStream::connect(env.proxy.listen_addr).await.unwrap();
        let mut buf = [0u8; 1];
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut idle, &mut buf),
        )
        .await;
    }
    check("handshake_timeout");
    env.raw_tls(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    check("not_websocket");
    env.app.set_mode(Mode::Refuse(503, "maintenance"));
    attempt_with(&env, Some(&env.pki.client("frontend"))).await;
    env.app.set_mode(Mode::Echo);
    check("upstream_rejected");
    {
        // TLS 1.2 only, against the default minimum of 1.3.
        let leaf = env.pki.client("frontend");
        let key = <rustls::pki_types::PrivateKeyDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
            leaf.key_pem.as_bytes(),
        )
        .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(env.pki.ca.cert_der.clone()).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(wsgate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![leaf.cert_der.clone()], key)
            .unwrap();
        let _ = connect(env.proxy.listen_addr, std::sync::Arc::new(cfg), "localhost", "/").await;
    }
    check("tls_protocol_error");

    // The app refuses TCP connections.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let allow = spiffe("frontend");
    let s = settings.clone();
    let unreachable = Env::start_with(&[allow.as_str()], move |cfg| {
        cfg.otel = s;
        cfg.upstream = Some(wsgate::proxy::settings::Upstream::parse(&format!("ws://{dead}"), false).unwrap());
    })
    .await;
    attempt_with(&unreachable, Some(&unreachable.pki.client("frontend"))).await;
    check("upstream_unavailable");

    // One connection allowed; the second is refused at accept.
    let s = settings.clone();
    let tiny = Env::start_with(&[allow.as_str()], move |cfg| {
        cfg.otel = s;
        cfg.limits.max_connections = 1;
    })
    .await;
    let held = tiny.connect_as("frontend", "/").await.unwrap();
    attempt_with(&tiny, Some(&tiny.pki.client("frontend"))).await;
    drop(held);
    check("limit_exceeded");
    check("__success_of_the_held_connection");

    // No certificate has been issued yet.
    let tmp = tempfile::tempdir().unwrap();
    let app = crate::support::TestApp::start().await;
    let mut cfg = crate::support::proxy_config(&tmp.path().join("empty"), app.addr, &[allow.as_str()]);
    cfg.otel = settings.clone();
    let waiting = wsgate::proxy::start(cfg).await.unwrap();
    eventually("not ready", Duration::from_secs(5), || {
        waiting
            .readiness()
            .is_err_and(|e| e.to_string().contains("does not exist"))
    })
    .await;
    drop(tokio::net::TcpStream::connect(waiting.listen_addr).await.unwrap());
    check("not_ready");

    until(
        "a span for every attempt",
        DEADLINE,
        || kinds(&received.handshakes()),
        |k| k.len() >= attempts,
    )
    .await;
    // Exactly one per attempt: a connection made to each proxy after all of them has its span
    // received, so any further span of an earlier attempt would have been received as well.
    let mut markers = Vec::new();
    for proxy in [&env.proxy, &unreachable.proxy, &tiny.proxy, &waiting] {
        markers.push(marker(proxy.listen_addr).await);
    }
    let spans = handshakes_up_to(&received, &markers).await;
    assert_eq!(
        spans.len(),
        attempts,
        "exactly one span per attempt: {:#?}",
        kinds(&spans)
    );
    let mut got: Vec<&str> = spans.iter().filter_map(|s| s.error_type()).collect();
    let mut want: Vec<&str> = expect.iter().copied().filter(|k| !k.starts_with("__")).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    for span in spans.iter().filter(|s| s.error_type().is_some()) {
        assert_eq!(span.status_code, 2, "{:?} has status Error", span.error_type());
        assert!(!span.status_message.is_empty(), "{:?} says why", span.error_type());
        assert_eq!(span.kind, 2);
    }
    let forbidden = spans
        .iter()
        .find(|s| s.error_type() == Some("identity_not_allowed"))
        .unwrap();
    assert_eq!(forbidden.attr("http.response.status_code"), &Val::Int(403));
    assert_eq!(forbidden.attr("wsgate.authz.decision"), &Val::Str("deny".into()));
    assert_eq!(forbidden.attr("wsgate.client.spiffe_id"), &Val::Str(spiffe("intruder")));
    let rejected = spans
        .iter()
        .find(|s| s.error_type() == Some("upstream_rejected"))
        .unwrap();
    assert_eq!(rejected.attr("http.response.status_code"), &Val::Int(503));
    let not_tls = spans.iter().find(|s| s.error_type() == Some("not_tls")).unwrap();
    assert_eq!(not_tls.attr("tls.established"), &Val::Bool(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_ratio_sampler_drops_successes_but_never_failures() {
    let (endpoint, received) = http_receiver().await;
    let env = traced_env(otel(&[
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint.as_str()),
        ("OTEL_TRACES_SAMPLER", "traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0"),
    ]))
    .await;
    for _ in 0..5 {
        let mut ws = env.connect_as("frontend", "/").await.unwrap();
        roundtrip(&mut ws, "unsampled".into()).await;
    }
    // The app is told the trace is not sampled.
    let sent = env.app.last_seen().header("traceparent")[0].to_owned();
    assert!(sent.ends_with("-00"), "{sent}");
    attempt_with(&env, None).await;
    let _ = env.connect_as("intruder", "/").await;
    // The successes ended before the failures began (each echo came through a relay that starts
    // after its handshake is recorded), and spans are exported in the order they end: once both
    // failures and then a later marker's span are here, a recorded success would be here too.
    until(
        "both failures",
        DEADLINE,
        || kinds(&received.handshakes()),
        |k| k.iter().any(|k| k == "no_client_certificate") && k.iter().any(|k| k == "identity_not_allowed"),
    )
    .await;
    let later = marker(env.proxy.listen_addr).await;
    let mut recorded = kinds(&handshakes_up_to(&received, &[later]).await);
    recorded.sort();
    assert_eq!(
        recorded,
        vec!["identity_not_allowed", "no_client_certificate"],
        "only the failures are recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_reload_is_a_span_too() {
    let (endpoint, received) = grpc_receiver().await;
    let env = traced_env(otel(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ]))
    .await;
    let first = received
        .wait_for("the first load", |s| s.name == "wsgate.certificate.reload")
        .await;
    assert_eq!(
        first.attr("wsgate.certificate.serial"),
        &Val::Str(env.server.serial.clone())
    );
    assert_eq!(first.attr("wsgate.reload.result"), &Val::Str("success".into()));
    assert_eq!(first.attr("wsgate.reload.trigger"), &Val::Str("start".into()));
    assert!(first.attr("wsgate.certificate.not_after").str().ends_with('Z'));
    env.vol
        .write(&[("tls.crt", b"garbage"), ("tls.key", b"garbage"), ("ca.crt", b"garbage")])
        .unwrap();
    let failed = received
        .wait_for("the refused load", |s| {
            s.name == "wsgate.certificate.reload"
                && s.attributes.get("wsgate.reload.result") == Some(&Val::Str("failure".into()))
        })
        .await;
    assert_eq!(failed.status_code, 2);
    assert!(failed.status_message.contains("tls.crt"), "{}", failed.status_message);
    assert_eq!(
        failed.attr("wsgate.certificate.serial"),
        &Val::Str(env.server.serial.clone()),
        "still serving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_nothing_but_counted_drops() {
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let env = traced_env(otel(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{dead}")),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "16"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8"),
    ]))
    .await;
    let leaf = env.pki.client("frontend");
    let cfg = env.pki.client_config(Some(&leaf));
    for i in 0..60 {
        let (mut ws, _) = connect(env.proxy.listen_addr, cfg.clone(), "localhost", "/")
            .await
            .unwrap_or_else(|e| panic!("handshake {i} failed with the collector down: {e}"));
        roundtrip(&mut ws, "still serving".into()).await;
    }
    eventually("drops counted", Duration::from_secs(15), || {
        metric(&env.metrics(), "wsgate_otel_spans_dropped_total").unwrap_or(0.0) > 0.0
    })
    .await;
    assert_eq!(metric(&env.metrics(), "wsgate_otel_spans_exported_total"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_handshakes_rotations_and_closes() {
    let allow = spiffe("frontend");
    let env = Env::start(&[allow.as_str()]).await;
    let m = |series: &str| metric(&env.metrics(), series);
    assert_eq!(m("wsgate_connections_open{direction=\"inbound\"}"), Some(0.0));
    assert_eq!(
        m("wsgate_client_certificate_earliest_not_after_seconds"),
        None,
        "absent while nobody is connected"
    );
    assert_eq!(
        m(&format!(
            "wsgate_certificate_info{{serial=\"{}\",not_after=\"{}\"}}",
            env.server.serial,
            env.proxy
                .store
                .current()
                .map(|s| wsgate::x509::rfc3339(s.leaf.not_after))
                .unwrap()
        )),
        Some(1.0)
    );

    let leaf = env.pki.client("frontend");
    let client_not_after = wsgate::x509::CertSummary::from_der(&leaf.cert_der)
        .unwrap()
        .not_after_unix();
    let (mut ws, _) = connect(
        env.proxy.listen_addr,
        env.pki.client_config(Some(&leaf)),
        "localhost",
        "/",
    )
    .await
    .unwrap();
    for _ in 0..3 {
        roundtrip(&mut ws, Message::text("12345")).await;
    }
    eventually("open and counted", Duration::from_secs(5), || {
        m("wsgate_connections_open{direction=\"inbound\"}") == Some(1.0)
            && m("wsgate_handshakes_total{result=\"success\",error_type=\"\",direction=\"inbound\"}") == Some(1.0)
            && m("wsgate_messages_relayed_total{direction=\"client_to_upstream\"}") == Some(3.0)
            && m("wsgate_messages_relayed_total{direction=\"upstream_to_client\"}") == Some(3.0)
            && m("wsgate_payload_relayed_bytes_total{direction=\"client_to_upstream\"}") == Some(15.0)
    })
    .await;
    assert_eq!(
        m("wsgate_client_certificate_earliest_not_after_seconds"),
        Some(client_not_after as f64)
    );
    assert_eq!(
        m("wsgate_handshake_duration_seconds_count{result=\"success\",error_type=\"\",direction=\"inbound\"}"),
        Some(1.0)
    );

    // Rotation: reload counted, info and not-after follow.
    let next = env.pki.server();
    write_set(&env.vol, &next, &env.pki.ca);
    wait_serial(&env.proxy, &next.serial).await;
    // Counted just after the install: poll.
    metric_becomes(
        "the rotation counted",
        || env.metrics(),
        "wsgate_certificate_reloads_total{result=\"success\"}",
        2.0,
    )
    .await;
    let text = env.metrics();
    assert!(text.contains(&format!("serial=\"{}\"", next.serial)));
    assert!(
        !text.contains(&format!("serial=\"{}\"", env.server.serial)),
        "the old serial's info is gone"
    );

    // A bad set on disk: the served certificate is now stale, and the gauge says for how long.
    env.vol
        .write(&[("tls.crt", b"x"), ("tls.key", b"x"), ("ca.crt", b"x")])
        .unwrap();
    eventually("reload failure counted", Duration::from_secs(5), || {
        m("wsgate_certificate_reloads_total{result=\"failure\"}").unwrap_or(0.0) >= 1.0
    })
    .await;
    // The gauge grows with time: poll until a second has passed by its account.
    until(
        "stale for a second",
        DEADLINE,
        || m("wsgate_certificate_stale_seconds"),
        |stale| stale.is_some_and(|s| s >= 1.0),
    )
    .await;
    write_set(&env.vol, &next, &env.pki.ca);
    eventually("stale back to 0", Duration::from_secs(10), || {
        m("wsgate_certificate_stale_seconds") == Some(0.0)
    })
    .await;

    // Close: counted by code and initiator; the client's expiry leaves the gauge.
    ws.send(Message::Close(None)).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    eventually("closed", Duration::from_secs(5), || {
        m("wsgate_connections_open{direction=\"inbound\"}") == Some(0.0)
            && m("wsgate_connections_closed_total{code=\"none\",initiator=\"client\",direction=\"inbound\"}")
                == Some(1.0)
    })
    .await;
    assert_eq!(
        m("wsgate_client_certificate_earliest_not_after_seconds"),
        None,
        "absent while nobody is connected"
    );
    let (status, text) = http(env.proxy.admin_addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "wsgate_handshakes",
        "wsgate_handshake_duration_seconds",
        "wsgate_connections_open",
        "wsgate_connections_closed",
        "wsgate_messages_relayed",
        "wsgate_payload_relayed_bytes",
        "wsgate_certificate_reloads",
        "wsgate_certificate_not_after_seconds",
        "wsgate_certificate_info",
        "wsgate_certificate_stale_seconds",
        "wsgate_otel_spans_dropped",
        "wsgate_build_info",
    ] {
        assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name}");
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The real binary, its collector a black hole (accepts, never answers): every handshake still
/// succeeds, memory stays flat (the span queue is bounded), drops are counted and the export
/// errors are logged at most once per 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_keeps_serving_with_flat_memory_while_the_collector_is_a_black_hole() {
    use crate::support::bin::Proc;
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let vol = crate::support::SecretVolume::new(tmp.path().join("tls")).unwrap();
    write_set(&vol, &pki.server(), &pki.ca);
    let app = crate::support::TestApp::start().await;
    let allow = spiffe("frontend");
    let endpoint = format!("http://{hole_addr}");
    let proc = Proc::proxy(
        app.addr,
        &["--allow", &allow, "--cert-dir", vol.path().to_str().unwrap()],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "300"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "64"),
        ],
    );
    let (listen, admin) = proc.addrs().await;
    proc.line("certificate installed", Duration::from_secs(10)).await;
    let leaf = pki.client("frontend");
    let cfg = pki.client_config(Some(&leaf));
    let run = |n: usize| {
        let cfg = cfg.clone();
        async move {
            let mut tasks = Vec::new();
            for w in 0..4 {
                let cfg = cfg.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..n / 4 {
                        let (mut ws, _) = connect(listen, cfg.clone(), "localhost", "/")
                            .await
                            .unwrap_or_else(|e| panic!("worker {w} handshake {i}: {e}"));
                        let _ = ws.close(None).await;
                        while let Some(Ok(_)) = ws.next().await {}
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    run(400).await;
    let warm = rss_kib(proc.pid());
    run(4000).await;
    let after = rss_kib(proc.pid());
    let (_, text) = http(admin, "GET", "/metrics").await;
    let dropped = metric(&text, "wsgate_otel_spans_dropped_total").unwrap();
    assert!(dropped >= 1000.0, "only {dropped} spans counted as dropped");
    assert_eq!(
        metric(
            &text,
            "wsgate_handshakes_total{result=\"success\",error_type=\"\",direction=\"inbound\"}"
        ),
        Some(4400.0)
    );
    // 4000 unexported spans would take about 4.5 MiB; a bounded queue keeps the growth noise-sized.
    assert!(
        after <= warm + 1536,
        "memory grew from {warm} KiB to {after} KiB while the collector was down"
    );
    let export_errors = proc.lines().iter().filter(|l| l.contains("span export failed")).count();
    assert!(
        export_errors <= 2,
        "{export_errors} export-failure lines: not rate-limited"
    );
}
