//! The admin port: health, readiness with a reason, Prometheus metrics.

use crate::support::raw::{http, metric};
use crate::support::{Env, spiffe};

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
    // The record is finished just after the 101 is written: poll for it.
    crate::support::eventually("handshake counted", std::time::Duration::from_secs(5), || {
        metric(
            &env.metrics(),
            "wsgate_handshakes_total{result=\"success\",error_type=\"\"}",
        ) == Some(1.0)
    })
    .await;
    let (status, text) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains("# HELP wsgate_handshakes TLS + WebSocket handshakes"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "OpenMetrics exposition ends with # EOF");
    assert_eq!(
        metric(&text, "wsgate_handshakes_total{result=\"success\",error_type=\"\"}"),
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
