//! The injector within bounds, measured on the real binary: `wsgate inject` (cert dir laid out
//! as a kubelet Secret volume, no API server) answers over real HTTPS a 3 MB review whose pod has
//! a million empty containers, and the largest pod within the caps, each within 15 s and adding
//! at most 64 MiB to the process's peak resident memory (VmHWM in /proc/PID/status).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsgate::inject::review::{
    MAX_ANNOTATION_VALUE, MAX_CONTAINERS, MAX_NAME, MAX_PORTS, MAX_PORTS_IN_POD, MAX_WSGATE_ANNOTATIONS,
};

use crate::support::Pki;
use crate::support::injector::Injector;
use crate::support::raw::http;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/admission/pod-create-kubectl-apply.captured-k8s-1.20.json"
);
/// What the API server sends at most, and what the webhook accepts.
const MAX_BODY: usize = 3 << 20;
/// The issue's bounds.
const ANSWER_WITHIN: Duration = Duration::from_secs(15);
const MAX_GROWTH_KIB: u64 = 64 * 1024;

/// The peak resident memory of process `pid`, in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    crate::support::hostile::proc_kib(pid, "VmHWM")
}

/// The captured review with its pod's `spec.containers` replaced by `containers` (JSON text)
/// and `annotations` added.
fn review(containers: &str, annotations: &[(&str, &str)]) -> Vec<u8> {
    let mut review: Value = serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    let object = &mut review["request"]["object"];
    object["spec"]["containers"] = json!("@CONTAINERS@");
    for (k, v) in annotations {
        object["metadata"]["annotations"][*k] = json!(v);
    }
    let text = serde_json::to_string(&review)
        .unwrap()
        .replace("\"@CONTAINERS@\"", containers);
    assert!(text.len() <= MAX_BODY, "the review is {} bytes", text.len());
    text.into_bytes()
}

/// POSTs `body` over HTTPS; returns (status, body as JSON or text, time to the whole answer).
async fn post(addr: SocketAddr, pki: &Pki, path: &str, body: &[u8]) -> (u16, String, Duration) {
    let t0 = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(pki.client_config(None))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let head = format!(
        "POST {path}?timeout=10s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(body).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(ANSWER_WITHIN, tls.read_to_end(&mut buf))
        .await
        .expect("answered within 15 s")
        .unwrap();
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned(), took)
}

fn response(body: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v["response"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_empty_containers_are_refused_fast_and_within_64_mib() {
    let Injector { proc, pki, listen, .. } = Injector::start().await;

    // Warm up (TLS, hyper, a blocking thread) with an ordinary review, then take the baseline.
    let ordinary = review(
        r#"[{"name":"web","ports":[{"containerPort":8080}]}]"#,
        &[("wsgate.dev/inject", "true")],
    );
    let (status, body, _) = post(listen, &pki, "/mutate", &ordinary).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(response(&body)["allowed"], true);
    assert!(!response(&body)["patch"].is_null(), "injected: {body}");
    let base = vm_hwm_kib(proc.pid());

    // A million empty containers, in an opted-in namespace: denied, naming the cap.
    let million = format!("[{}]", vec!["{}"; 1_000_000].join(","));
    let flood = review(&million, &[]);
    let (status, body, took) = post(listen, &pki, "/mutate/namespace-enabled", &flood).await;
    let grew = vm_hwm_kib(proc.pid()).saturating_sub(base);
    println!(
        "1,000,000 containers ({} bytes): answered in {took:?}, peak memory +{grew} KiB",
        flood.len()
    );
    assert_eq!(status, 200, "{body}");
    let answer = response(&body);
    assert_eq!(answer["allowed"], false, "{body}");
    let message = answer["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("1000000 containers") && message.contains(&format!("at most {MAX_CONTAINERS}")),
        "{message}"
    );
    assert!(took < ANSWER_WITHIN);
    assert!(grew <= MAX_GROWTH_KIB, "peak memory grew by {grew} KiB");

    // The same pod in an ordinary namespace without the annotation is none of wsgate's business.
    let (status, body, _) = post(listen, &pki, "/mutate", &flood).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(response(&body)["allowed"], true, "{body}");
    assert!(response(&body)["patch"].is_null(), "{body}");

    // The largest pod within every cap, injected: the most containers and init containers, each
    // name as long as read, the most ports, the most wsgate.dev/* annotations each as long as
    // read (one of them the allow list, as many patterns as fit), the rest of the 3 MiB in
    // fields wsgate skips.
    let name = |i: usize| format!("c{i:0>width$}", width = MAX_NAME - 1);
    let port = r#"{"containerPort":1}"#;
    let ports = vec![port; MAX_PORTS].join(",");
    let with_ports = MAX_PORTS_IN_POD / MAX_PORTS;
    let containers: Vec<String> = (0..MAX_CONTAINERS)
        .map(|i| match i < with_ports {
            true => format!(r#"{{"name":"{}","ports":[{ports}]}}"#, name(i)),
            false => format!(r#"{{"name":"{}"}}"#, name(i)),
        })
        .collect();
    let init: Vec<String> = (0..MAX_CONTAINERS)
        .map(|i| format!(r#"{{"name":"{}"}}"#, name(i)))
        .collect();
    let mut allow = String::new();
    for i in 0.. {
        let pattern = format!("spiffe://cluster.local/ns/demo/sa/a{i}");
        if allow.len() + pattern.len() + 1 > MAX_ANNOTATION_VALUE {
            break;
        }
        allow += &pattern;
        allow += ",";
    }
    let filler: Vec<(String, String)> = (0..MAX_WSGATE_ANNOTATIONS - 2)
        .map(|i| (format!("wsgate.dev/x{i}"), "x".repeat(MAX_ANNOTATION_VALUE)))
        .collect();
    let mut annotations = vec![
        ("wsgate.dev/upstream-port", "8080"),
        ("wsgate.dev/allow", allow.as_str()),
    ];
    annotations.extend(filler.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut heavy = review(&format!("[{}]", containers.join(",")), &annotations);
    let init = format!(r#""initContainers":[{}],"#, init.join(","));
    let at = heavy.windows(8).position(|w| w == b"\"spec\":{").unwrap() + 8;
    heavy.splice(at..at, init.bytes());
    let room = MAX_BODY - heavy.len() - 64;
    let skipped = format!(r#""skipped":"{}","#, "s".repeat(room));
    heavy.splice(at..at, skipped.bytes());
    assert!(heavy.len() <= MAX_BODY && heavy.len() > MAX_BODY - 100);
    let (status, body, took) = post(listen, &pki, "/mutate/namespace-enabled", &heavy).await;
    let grew = vm_hwm_kib(proc.pid()).saturating_sub(base);
    println!(
        "the largest pod within the caps ({} bytes): answered in {took:?}, peak memory +{grew} KiB",
        heavy.len()
    );
    assert_eq!(status, 200, "{body}");
    assert!(!response(&body)["patch"].is_null(), "injected: {body}");
    assert!(took < ANSWER_WITHIN);
    assert!(grew <= MAX_GROWTH_KIB, "peak memory grew by {grew} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_cannot_hold_more_than_the_body_budget() {
    use wsgate::inject::webhook::BODY_BUDGET;
    let Injector {
        proc: _proc,
        pki,
        listen,
        admin,
        ..
    } = Injector::start().await;
    // Enough senders announcing 3 MiB bodies and sending none of it to take the whole budget.
    let holders = BODY_BUDGET / MAX_BODY;
    let rest = BODY_BUDGET - holders * MAX_BODY;
    let sizes: Vec<usize> = std::iter::repeat_n(MAX_BODY, holders).chain([rest]).collect();
    let mut slow = Vec::new();
    for size in sizes {
        let tcp = tokio::net::TcpStream::connect(listen).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(pki.client_config(None))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let head = format!(
            "POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n{{"
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        slow.push(tls);
    }
    // The slow senders' bodies are taken from the budget once their heads are read: wait for
    // that by seeing a further review refused. It waits for its share, then gets 503 with
    // Retry-After, not an OOM.
    let ordinary = review(r#"[{"name":"web"}]"#, &[]);
    let mut refused = None;
    for _ in 0..50 {
        let (status, body, took) = post(listen, &pki, "/mutate", &ordinary).await;
        if status == 503 {
            refused = Some((body, took));
            break;
        }
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (body, took) = refused.expect("with the whole body budget held, a review is refused");
    assert!(body.contains("body budget"), "{body}");
    assert!(
        took >= Duration::from_secs(1),
        "refused after {took:?}: it should wait first"
    );
    let (_, metrics) = http(admin, "GET", "/metrics").await;
    assert!(
        metrics.contains("wsgate_inject_reviews_total{result=\"busy\"}"),
        "{metrics}"
    );
    // Once they are gone, reviews are answered again.
    drop(slow);
    let mut answered = false;
    for _ in 0..100 {
        let (status, _, _) = post(listen, &pki, "/mutate", &ordinary).await;
        if status == 200 {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(answered, "reviews are answered again once the slow bodies are gone");
}
