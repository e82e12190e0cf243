//! Rotation under load: open connections never notice, new handshakes see the new serial at
//! once, and a reader never pairs a certificate with the wrong key.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Env, SecretVolume, connect, spiffe, wait_serial, write_set};
use wsgate::certs::SecretSource;

const CONNECTIONS: usize = 100;
const ROTATIONS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_busy_connections_survive_twenty_rotations() {
    let allow = spiffe("frontend");
    let env = Arc::new(Env::start(&[allow.as_str()]).await);
    let stop = Arc::new(AtomicBool::new(false));
    let exchanged = Arc::new(AtomicU64::new(0));

    // 100 connections, each sending numbered messages and checking every echo, in order.
    let client_leaf = env.pki.client("frontend");
    let client_cfg = env.pki.client_config(Some(&client_leaf));
    let mut workers = Vec::new();
    for c in 0..CONNECTIONS {
        let (mut ws, _) = connect(env.proxy.listen_addr, client_cfg.clone(), "localhost", "/load")
            .await
            .unwrap_or_else(|e| panic!("connection {c}: {e}"));
        let (stop, exchanged) = (stop.clone(), exchanged.clone());
        workers.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let text = format!("{c}:{seq}");
                ws.send(Message::text(text.clone()))
                    .await
                    .map_err(|e| format!("conn {c} send {seq}: {e}"))?;
                match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                    Ok(Some(Ok(Message::Text(reply)))) if reply.as_str() == text => {}
                    other => return Err(format!("conn {c} seq {seq}: expected {text:?}, got {other:?}")),
                }
                seq += 1;
                exchanged.fetch_add(1, Ordering::Relaxed);
            }
            ws.close(None).await.map_err(|e| format!("conn {c} close: {e}"))?;
            Ok::<u64, String>(seq)
        }));
    }

    // A prober making new handshakes all the time, recording when each started and its serial.
    type Probes = Arc<std::sync::Mutex<Vec<(SystemTime, Result<String, String>)>>>;
    let probes: Probes = Arc::default();
    let prober = {
        let (env, stop, probes, cfg) = (env.clone(), stop.clone(), probes.clone(), client_cfg.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = SystemTime::now();
                let result = match connect(env.proxy.listen_addr, cfg.clone(), "localhost", "/probe").await {
                    Ok((mut ws, served)) => {
                        let _ = ws.close(None).await;
                        Ok(served.map(|s| s.serial).unwrap_or_default())
                    }
                    Err(e) => Err(e.to_string()),
                };
                probes.lock().unwrap().push((started, result));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // Twenty rotations, each with a new key, written the kubelet's way.
    let mut swaps: Vec<(SystemTime, String)> = Vec::new();
    for _ in 0..ROTATIONS {
        let before = exchanged.load(Ordering::Relaxed);
        let next = env.pki.server();
        write_set(&env.vol, &next, &env.pki.ca);
        wait_serial(&env.proxy, &next.serial).await;
        let installed_at = env.proxy.store.current().unwrap().installed_at;
        swaps.push((installed_at, next.serial.clone()));
        // Let traffic and probes run on the new certificate for a while.
        let t0 = Instant::now();
        while exchanged.load(Ordering::Relaxed) < before + 500 || t0.elapsed() < Duration::from_millis(150) {
            assert!(t0.elapsed() < Duration::from_secs(30), "traffic stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    prober.await.unwrap();
    let mut total = 0;
    for (c, w) in workers.into_iter().enumerate() {
        let sent = w.await.unwrap().unwrap_or_else(|e| panic!("connection {c} broke: {e}"));
        assert!(sent > 0, "connection {c} exchanged nothing");
        total += sent;
    }
    assert!(total as usize >= ROTATIONS * 500);

    // Every probe succeeded; every probe started at least 1 s after a swap (and before the
    // next one) saw that swap's serial.
    let probes = probes.lock().unwrap();
    let failed: Vec<_> = probes.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(failed.is_empty(), "{} failed handshakes: {failed:?}", failed.len());
    let mut checked = 0;
    for (i, (at, serial)) in swaps.iter().enumerate() {
        let until = swaps.get(i + 1).map(|(t, _)| *t).unwrap_or(SystemTime::now());
        for (started, result) in probes.iter() {
            if *started >= *at + Duration::from_secs(1) && *started < until {
                assert_eq!(result.as_ref().unwrap(), serial, "probe at {started:?} after swap {i}");
                checked += 1;
            }
        }
        // The first handshake that began after the swap already saw the new serial.
        if let Some((_, first)) = probes
            .iter()
            .filter(|(s, _)| *s > *at && *s < until)
            .min_by_key(|(s, _)| *s)
        {
            assert_eq!(first.as_ref().unwrap(), serial, "first handshake after swap {i}");
        }
    }
    assert!(
        checked > 0 || probes.len() > ROTATIONS,
        "the prober made too few handshakes"
    );
    assert_eq!(
        crate::support::raw::metric(&env.metrics(), "wsgate_certificate_reloads_total{result=\"failure\"}"),
        None,
        "a kubelet-style rotation was refused"
    );
}

/// The reader resolves `..data` once and re-checks it, so while the kubelet swaps generations as
/// fast as it can, every read returns a certificate and a key of the same generation.
#[test]
fn reading_while_the_kubelet_swaps_never_mixes_generations() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = Arc::new(SecretVolume::new(tmp.path().join("tls")).unwrap());
    vol.write(&[("tls.crt", b"cert-0"), ("tls.key", b"key-0"), ("ca.crt", b"ca")])
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (vol, stop) = (vol.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let cert = format!("cert-{n}");
                let key = format!("key-{n}");
                vol.write(&[
                    ("tls.crt", cert.as_bytes()),
                    ("tls.key", key.as_bytes()),
                    ("ca.crt", b"ca"),
                ])
                .unwrap();
                n += 1;
            }
            n
        })
    };
    let source = SecretSource {
        cert_dir: vol.path().to_path_buf(),
        trust_bundle: None,
    };
    let (mut ok, mut unstable) = (0, 0);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        match source.read() {
            Ok(raw) => {
                let cert = String::from_utf8(raw.cert).unwrap();
                let key = String::from_utf8(raw.key).unwrap();
                assert_eq!(
                    cert.trim_start_matches("cert-"),
                    key.trim_start_matches("key-"),
                    "mixed generations"
                );
                ok += 1;
            }
            Err(wsgate::certs::SourceError::Unstable(_)) => unstable += 1,
            Err(e) => panic!("unexpected error while the volume is swapped: {e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let generations = writer.join().unwrap();
    assert!(generations > 100, "the writer only managed {generations} swaps");
    assert!(ok > 100, "only {ok} consistent reads ({unstable} unstable)");
}

/// With certificates rewritten non-atomically in a plain directory (no kubelet), a reader can see
/// a new certificate with the old key; validation refuses that pair, so every handshake
/// succeeds with a matching pair throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_changing_while_read_never_make_the_proxy_serve_a_mismatched_pair() {
    crate::support::init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("plain");
    std::fs::create_dir(&dir).unwrap();
    let pki = crate::support::Pki::new();
    let first = pki.server();
    std::fs::write(dir.join("ca.crt"), &pki.ca.cert_pem).unwrap();
    std::fs::write(dir.join("tls.crt"), &first.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &first.key_pem).unwrap();
    let app = crate::support::TestApp::start().await;
    let allow = spiffe("frontend");
    let mut cfg = crate::support::proxy_config(&dir, app.addr, &[allow.as_str()]);
    cfg.reload.debounce = Duration::from_millis(1);
    cfg.reload.min_backoff = Duration::from_millis(1);
    cfg.reload.max_backoff = Duration::from_millis(5);
    let proxy = wsgate::proxy::start(cfg).await.unwrap();
    wait_serial(&proxy, &first.serial).await;

    // Pre-mint leaves, then rewrite the files in place as fast as possible, cert first.
    let leaves: Vec<_> = (0..30).map(|_| pki.server()).collect();
    let serials: std::collections::HashSet<String> = leaves
        .iter()
        .map(|l| l.serial.clone())
        .chain([first.serial.clone()])
        .collect();
    let writer = {
        let dir = dir.clone();
        std::thread::spawn(move || {
            for _ in 0..5 {
                for leaf in &leaves {
                    std::fs::write(dir.join("tls.crt"), &leaf.cert_pem).unwrap();
                    std::thread::sleep(Duration::from_millis(2));
                    std::fs::write(dir.join("tls.key"), &leaf.key_pem).unwrap();
                    std::thread::sleep(Duration::from_millis(3));
                }
            }
        })
    };
    let client = pki.client("frontend");
    let cfg = pki.client_config(Some(&client));
    let mut handshakes = 0;
    while !writer.is_finished() {
        let (mut ws, served) = connect(proxy.listen_addr, cfg.clone(), "localhost", "/")
            .await
            .unwrap_or_else(|e| panic!("handshake {handshakes} failed while files changed: {e}"));
        assert!(serials.contains(&served.unwrap().serial));
        let _ = ws.close(None).await;
        handshakes += 1;
    }
    writer.join().unwrap();
    assert!(handshakes > 10, "only {handshakes} handshakes during the storm");
    let refused = crate::support::raw::metric(
        &proxy.metrics.encode(),
        "wsgate_certificate_reloads_total{result=\"failure\"}",
    );
    assert!(
        refused.unwrap_or(0.0) > 0.0,
        "no mismatched pair was ever read: the test did not exercise the guard"
    );
}
