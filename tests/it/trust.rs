//! A change of trust roots reaches the open connections: those whose client chain the new roots
//! no longer admit get Close 1008 within a second and are counted; the others never notice.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{DEADLINE, Env, Leaf, Pki, SecretVolume, WssStream, client_config, connect, roundtrip, spiffe};

const REASON: &str = "client certificate no longer trusted";
const UNTRUSTED: &str = "wsgate_connections_untrusted_total";
const RECHECKS: &str = "wsgate_trust_rechecks_total";

/// Connects presenting `leaf`, trusting a proxy leaf issued by any of `cas`.
async fn open(addr: SocketAddr, leaf: &Leaf, cas: &[&Pki]) -> WssStream {
    let roots: Vec<_> = cas.iter().map(|p| p.ca.cert_der.clone()).collect();
    let cfg = client_config(Some((leaf.cert_pem.as_str(), leaf.key_pem.as_str())), &roots).unwrap();
    let (mut ws, _) = connect(addr, cfg, "localhost", "/").await.unwrap();
    assert_eq!(
        roundtrip(&mut ws, Message::text("hello")).await.to_text().unwrap(),
        "hello"
    );
    ws
}

/// Writes the proxy's Secret: `leaf` and its key, `ca.crt` holding `cas`.
fn write_secret(vol: &SecretVolume, leaf: &Leaf, cas: &[&Pki]) {
    let ca: String = cas.iter().map(|p| p.ca.cert_pem.as_str()).collect();
    vol.write(&[
        ("ca.crt", ca.as_bytes()),
        ("tls.crt", leaf.cert_pem.as_bytes()),
        ("tls.key", leaf.key_pem.as_bytes()),
    ])
    .unwrap();
}

fn metric(env: &Env, series: &str) -> Option<f64> {
    crate::support::raw::metric(&env.metrics(), series)
}

/// Close frames the clients received: when, and (code, reason).
type Closes = Arc<Mutex<Vec<(SystemTime, Option<(u16, String)>)>>>;

/// Reads `ws` until a Close arrives; records its code, reason and when it arrived.
fn watch_close(mut ws: WssStream, closes: Closes) {
    tokio::spawn(async move {
        while let Some(item) = ws.next().await {
            match item {
                Ok(Message::Close(frame)) => {
                    let frame = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    closes.lock().unwrap().push((SystemTime::now(), frame));
                    // Let tungstenite answer the Close.
                    let _ = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
                    return;
                }
                Ok(_) => continue,
                Err(e) => {
                    closes
                        .lock()
                        .unwrap()
                        .push((SystemTime::now(), Some((0, e.to_string()))));
                    return;
                }
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_to_a_new_ca_closes_the_removed_cas_clients_within_a_second_and_spares_the_others() {
    let allow = spiffe("frontend");
    let env = Env::start(&[allow.as_str()]).await;
    assert_eq!(metric(&env, UNTRUSTED), Some(0.0), "registered before any event");
    let b = Pki::new();
    // Trust A and B, serve a leaf of A.
    let leaf_a = env.pki.server();
    write_secret(&env.vol, &leaf_a, &[&env.pki, &b]);
    crate::support::wait_serial(&env.proxy, &leaf_a.serial).await;

    let closes: Closes = Arc::default();
    for _ in 0..5 {
        let ws = open(env.proxy.listen_addr, &env.pki.client("frontend"), &[&env.pki, &b]).await;
        watch_close(ws, closes.clone());
    }
    let mut of_b = Vec::new();
    let client_b = b.client("frontend");
    for _ in 0..2 {
        of_b.push(open(env.proxy.listen_addr, &client_b, &[&env.pki, &b]).await);
    }

    // The CA rotation: ca.crt holds only B, and the proxy's new leaf is B's.
    let leaf_b = b.server();
    write_secret(&env.vol, &leaf_b, &[&b]);
    crate::support::wait_serial(&env.proxy, &leaf_b.serial).await;
    let installed_at = env.proxy.store.current().unwrap().installed_at;

    // Within a second of the install, the five clients of A got Close 1008 with the reason.
    let left = (installed_at + Duration::from_secs(1))
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    crate::support::until(
        "five Close frames",
        left + Duration::from_millis(50),
        || closes.lock().unwrap().clone(),
        |c| c.len() >= 5,
    )
    .await;
    for (at, frame) in closes.lock().unwrap().iter() {
        assert_eq!(frame.as_ref(), Some(&(1008, REASON.to_owned())));
        let after = at.duration_since(installed_at).unwrap_or_default();
        assert!(after <= Duration::from_secs(1), "closed {after:?} after the install");
    }
    crate::support::metric_becomes("the five closures counted", || env.metrics(), UNTRUSTED, 5.0).await;
    crate::support::eventually("the app was told too", DEADLINE, || {
        let app = env.app.closes.lock().unwrap();
        app.iter()
            .filter(|c| c.as_ref() == Some(&(1008, REASON.to_owned())))
            .count()
            == 5
    })
    .await;

    // The clients of B keep exchanging messages; nobody else was closed.
    for (i, ws) in of_b.iter_mut().enumerate() {
        for n in 0..20 {
            let text = format!("b{i}:{n}");
            assert_eq!(
                roundtrip(ws, Message::text(text.clone())).await.to_text().unwrap(),
                text
            );
        }
    }
    assert_eq!(metric(&env, UNTRUSTED), Some(5.0));
    assert_eq!(env.app.closes.lock().unwrap().len(), 5);
    assert_eq!(
        metric(&env, "wsgate_connections_open{direction=\"inbound\"}"),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_bundle_that_adds_a_ca_closes_nobody() {
    crate::support::init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (Pki::new(), Pki::new());
    // The Secret holds a leaf of A; the trust bundle (mounted from a ConfigMap, written the
    // kubelet's way too) replaces its ca.crt and holds A only.
    let vol = SecretVolume::new(tmp.path().join("tls")).unwrap();
    let leaf = a.server();
    write_secret(&vol, &leaf, &[&b]);
    let bundle = SecretVolume::new(tmp.path().join("bundle")).unwrap();
    bundle.write(&[("ca-bundle.crt", a.ca.cert_pem.as_bytes())]).unwrap();
    let app = crate::support::TestApp::start().await;
    let allow = spiffe("frontend");
    let mut cfg = crate::support::proxy_config(vol.path(), app.addr, &[allow.as_str()]);
    cfg.trust_bundle = Some(bundle.path().to_path_buf());
    let proxy = wsgate::proxy::start(cfg).await.unwrap();
    crate::support::wait_serial(&proxy, &leaf.serial).await;
    let metric = |series: &str| crate::support::raw::metric(&proxy.metrics.encode(), series);
    assert_eq!(metric(RECHECKS), Some(0.0), "the first roots are no change");

    let mut of_a = Vec::new();
    for _ in 0..5 {
        of_a.push(open(proxy.listen_addr, &a.client("frontend"), &[&a]).await);
    }
    // A bundle holding both CAs (the first half of a CA rotation).
    let both = format!("{}{}", a.ca.cert_pem, b.ca.cert_pem);
    bundle.write(&[("ca-bundle.crt", both.as_bytes())]).unwrap();
    // The positive event: the open connections were verified again against the new roots.
    crate::support::metric_becomes("the re-check ran", || proxy.metrics.encode(), RECHECKS, 1.0).await;

    assert_eq!(metric(UNTRUSTED), Some(0.0));
    for (i, ws) in of_a.iter_mut().enumerate() {
        let text = format!("a{i}");
        assert_eq!(
            roundtrip(ws, Message::text(text.clone())).await.to_text().unwrap(),
            text
        );
    }
    assert!(app.closes.lock().unwrap().is_empty(), "nobody was closed");
    // And the new roots are in use: a client of B is admitted now.
    let mut ws = open(proxy.listen_addr, &b.client("frontend"), &[&a]).await;
    assert_eq!(roundtrip(&mut ws, Message::text("b")).await.to_text().unwrap(), "b");
    assert_eq!(metric("wsgate_connections_open{direction=\"inbound\"}"), Some(6.0));
}
