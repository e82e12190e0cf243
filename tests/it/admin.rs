//! The admin port: health, readiness with a reason, Prometheus metrics.

use futures_util::StreamExt;

use crate::support::openmetrics::check_admin_metrics;
use crate::support::raw::{http, metric};
use crate::support::{DEADLINE, Env, roundtrip, spiffe, until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_readyz_and_metrics_answer() {
    let allow = spiffe("frontend");
    let env = Env::start(&[allow.as_str()]).await;
    let admin = env.proxy.admin_addr;
    assert_eq!(http(admin, "GET", "/healthz").await, (200, "ok\n".to_owned()));
    let (status, body) = http(admin, "GET", "/readyz").await;
    assert_eq!(status, 200);
    assert!(body.contains(&env.server.serial), "{body}");
    let _ws = env.connect_as("frontend", "/").await.unwrap();
    // The handshake is recorded just after the 101 is written, the first load just after the
    // certificate is installed: poll for both.
    until(
        "the handshake and the first load counted",
        DEADLINE,
        || env.metrics(),
        |text| {
            metric(
                text,
                "wsgate_handshakes_total{result=\"success\",error_type=\"\",direction=\"inbound\"}",
            ) == Some(1.0)
                && metric(text, "wsgate_certificate_reloads_total{result=\"success\"}") == Some(1.0)
        },
    )
    .await;
    let (status, text) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains("# HELP wsgate_handshakes TLS + WebSocket handshakes"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "OpenMetrics exposition ends with # EOF");
    assert_eq!(
        metric(
            &text,
            "wsgate_handshakes_total{result=\"success\",error_type=\"\",direction=\"inbound\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "wsgate_certificate_reloads_total{result=\"success\"}"),
        Some(1.0)
    );
    let not_after = metric(&text, "wsgate_certificate_not_after_seconds").unwrap();
    assert!(not_after > 1.7e9, "{not_after}");
    assert_eq!(http(admin, "GET", "/nope").await.0, 404);
    assert_eq!(http(admin, "DELETE", "/metrics").await.0, 405);
}

/// `/metrics` is OpenMetrics 1.0 as the reference parser reads it, strictly: its Content-Type
/// says so, every family has help text, and every family src/telemetry/metrics.rs registers is
/// there (prometheus-client leaves out a labelled family without samples, so the traffic puts a
/// sample in each): a real handshake with relayed messages and a close, a refusal, and a
/// connection still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_strict_openmetrics_with_every_registered_family() {
    let allow = spiffe("frontend");
    let env = Env::start(&[allow.as_str()]).await;
    let mut ws = env.connect_as("frontend", "/").await.unwrap();
    roundtrip(&mut ws, "counted".into()).await;
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    assert!(env.connect_as("intruder", "/").await.is_err());
    let mut open = env.connect_as("frontend", "/").await.unwrap();
    roundtrip(&mut open, "open".into()).await;
    let ok = "{result=\"success\",error_type=\"\",direction=\"inbound\"}";
    let expected = [
        (format!("wsgate_handshakes_total{ok}"), 2.0),
        (
            "wsgate_handshakes_total{result=\"failure\",error_type=\"identity_not_allowed\",direction=\"inbound\"}"
                .into(),
            1.0,
        ),
        (format!("wsgate_handshake_duration_seconds_count{ok}"), 2.0),
        (
            "wsgate_messages_relayed_total{direction=\"upstream_to_client\"}".into(),
            2.0,
        ),
        (
            "wsgate_payload_relayed_bytes_total{direction=\"upstream_to_client\"}".into(),
            11.0,
        ),
        (
            "wsgate_connections_closed_total{code=\"none\",initiator=\"client\",direction=\"inbound\"}".into(),
            1.0,
        ),
        ("wsgate_connections_open{direction=\"inbound\"}".into(), 1.0),
        ("wsgate_certificate_reloads_total{result=\"success\"}".into(), 1.0),
    ];
    // Some of these are counted just after the client saw the answer: poll.
    until(
        "the handshakes, the messages and the close counted",
        DEADLINE,
        || {
            let text = env.metrics();
            expected
                .iter()
                .map(|(series, _)| metric(&text, series))
                .collect::<Vec<_>>()
        },
        |got| got.iter().zip(&expected).all(|(got, (_, want))| *got == Some(*want)),
    )
    .await;
    let families = check_admin_metrics(env.proxy.admin_addr, &["src/telemetry/metrics.rs"]).await;
    // The strict parser read the same values, with the types they are declared with.
    let parsed = |series: &str| {
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let labels: std::collections::BTreeMap<String, String> = labels
            .trim_end_matches('}')
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_owned(), v.trim_matches('"').to_owned())
            })
            .collect();
        families
            .values()
            .flat_map(|f| &f.samples)
            .find(|s| s.name == name && s.labels == labels)
            .and_then(|s| s.value.as_f64())
    };
    for (series, want) in &expected {
        assert_eq!(parsed(series), Some(*want), "{series}");
    }
    let client_not_after = parsed("wsgate_client_certificate_earliest_not_after_seconds");
    assert!(client_not_after.is_some_and(|t| t > 1.7e9), "{client_not_after:?}");
    let info = families["wsgate_certificate_info"]
        .samples
        .first()
        .expect("a certificate_info sample");
    assert_eq!(info.labels["serial"], env.server.serial);
    let version = format!("wsgate_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(parsed(&version), Some(1.0));
    for (family, kind) in [
        ("wsgate_handshakes", "counter"),
        ("wsgate_handshake_duration_seconds", "histogram"),
        ("wsgate_connections_open", "gauge"),
        ("wsgate_connections_closed", "counter"),
        ("wsgate_messages_relayed", "counter"),
        ("wsgate_payload_relayed_bytes", "counter"),
        ("wsgate_certificate_reloads", "counter"),
        ("wsgate_certificate_not_after_seconds", "gauge"),
        ("wsgate_certificate_info", "gauge"),
        ("wsgate_client_certificate_earliest_not_after_seconds", "gauge"),
        ("wsgate_certificate_stale_seconds", "gauge"),
        ("wsgate_otel_spans_dropped", "counter"),
        ("wsgate_build_info", "gauge"),
    ] {
        assert_eq!(families[family].kind, kind, "{family}");
    }
}
