//! Certificate loading: every key encoding cert-manager writes, trust bundles, and every bad set
//! refused at load while the previous set keeps serving.

use std::time::{Duration, SystemTime};

use crate::support::raw::{http, metric};
use crate::support::{
    Ca, DEADLINE, Env, Pki, SecretVolume, TestApp, connect, eventually, metric_becomes, proxy_config, roundtrip,
    spiffe, until, wait_serial, write_set,
};

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/data/keys");

fn reload_failures(env: &Env) -> f64 {
    metric(&env.metrics(), "wsgate_certificate_reloads_total{result=\"failure\"}").unwrap_or(0.0)
}

async fn env() -> Env {
    let allow = spiffe("frontend");
    Env::start(&[allow.as_str()]).await
}

/// Writes `files`, waits for the proxy to refuse them, and checks the old set still serves.
async fn assert_refused_and_old_set_kept(env: &Env, files: &[(&str, &[u8])], why: &str) {
    let before = reload_failures(env);
    env.vol.write(files).unwrap();
    eventually(&format!("refusal of {why}"), Duration::from_secs(10), || {
        reload_failures(env) > before
    })
    .await;
    let serving = env.proxy.store.current().expect("still serving");
    assert_eq!(
        serving.leaf.serial, env.server.serial,
        "{why}: the served certificate changed"
    );
    let leaf = env.pki.client("frontend");
    let (mut ws, served) = connect(
        env.proxy.listen_addr,
        env.pki.client_config(Some(&leaf)),
        "localhost",
        "/",
    )
    .await
    .unwrap_or_else(|e| panic!("{why}: new handshake failed: {e}"));
    assert_eq!(served.unwrap().serial, env.server.serial);
    assert_eq!(roundtrip(&mut ws, "ok".into()).await.to_text().unwrap(), "ok");
    let (status, body) = http(env.proxy.admin_addr, "GET", "/readyz").await;
    assert_eq!(status, 200, "{why}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_pem_is_refused_and_the_previous_set_kept() {
    let env = env().await;
    let garbage = b"-----BEGIN CERTIFICATE-----\nnot base64 at all!!\n-----END CERTIFICATE-----\n";
    let key = env.server.key_pem.as_bytes();
    let ca = env.pki.ca.cert_pem.as_bytes();
    assert_refused_and_old_set_kept(
        &env,
        &[("tls.crt", garbage), ("tls.key", key), ("ca.crt", ca)],
        "corrupt PEM",
    )
    .await;
    assert_refused_and_old_set_kept(
        &env,
        &[("tls.crt", b""), ("tls.key", key), ("ca.crt", ca)],
        "empty tls.crt",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_does_not_match_its_certificate_is_refused() {
    let env = env().await;
    let next = env.pki.server();
    let files: [(&str, &[u8]); 3] = [
        ("tls.crt", next.cert_pem.as_bytes()),
        ("tls.key", env.server.key_pem.as_bytes()),
        ("ca.crt", env.pki.ca.cert_pem.as_bytes()),
    ];
    assert_refused_and_old_set_kept(&env, &files, "mismatched key").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_leaf_is_refused() {
    let env = env().await;
    let now = SystemTime::now();
    let expired = env
        .pki
        .ca
        .leaf(&Pki::server_spec().valid(now - Duration::from_secs(7200), now - Duration::from_secs(60)))
        .unwrap();
    let files: [(&str, &[u8]); 3] = [
        ("tls.crt", expired.cert_pem.as_bytes()),
        ("tls.key", expired.key_pem.as_bytes()),
        ("ca.crt", env.pki.ca.cert_pem.as_bytes()),
    ];
    assert_refused_and_old_set_kept(&env, &files, "expired leaf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_from_another_ca_than_the_trust_roots_is_refused() {
    let env = env().await;
    let other = Ca::new("other CA").unwrap();
    let foreign = other.leaf(&Pki::server_spec()).unwrap();
    let files: [(&str, &[u8]); 3] = [
        ("tls.crt", foreign.cert_pem.as_bytes()),
        ("tls.key", foreign.key_pem.as_bytes()),
        ("ca.crt", env.pki.ca.cert_pem.as_bytes()),
    ];
    assert_refused_and_old_set_kept(&env, &files, "foreign leaf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_set_is_refused() {
    let env = env().await;
    let next = env.pki.server();
    let files: [(&str, &[u8]); 2] = [
        ("tls.crt", next.cert_pem.as_bytes()),
        ("ca.crt", env.pki.ca.cert_pem.as_bytes()),
    ];
    assert_refused_and_old_set_kept(&env, &files, "tls.key missing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_without_server_auth_usage_is_refused() {
    let env = env().await;
    let client_only = env.pki.ca.leaf(&Pki::server_spec().usages(false, true)).unwrap();
    let files: [(&str, &[u8]); 3] = [
        ("tls.crt", client_only.cert_pem.as_bytes()),
        ("tls.key", client_only.key_pem.as_bytes()),
        ("ca.crt", env.pki.ca.cert_pem.as_bytes()),
    ];
    assert_refused_and_old_set_kept(&env, &files, "client-only usage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_set_after_bad_ones_is_installed() {
    let env = env().await;
    env.vol
        .write(&[("tls.crt", b"junk"), ("tls.key", b"junk"), ("ca.crt", b"junk")])
        .unwrap();
    eventually("refusal", Duration::from_secs(10), || reload_failures(&env) >= 1.0).await;
    let next = env.pki.server();
    write_set(&env.vol, &next, &env.pki.ca);
    wait_serial(&env.proxy, &next.serial).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_encoding_cert_manager_writes_is_loaded() {
    let env = env().await;
    for file in [
        "rsa2048.pkcs1.pem",
        "ec-p256.sec1.pem",
        "rsa2048.pkcs8.pem",
        "ec-p256.pkcs8.pem",
    ] {
        let on_disk = std::fs::read_to_string(format!("{KEYS}/{file}")).unwrap();
        // rcgen signs with the PKCS#8 form; the volume carries the encoding under test.
        let pkcs8 = std::fs::read_to_string(format!(
            "{KEYS}/{}",
            file.replace("pkcs1", "pkcs8").replace("sec1", "pkcs8")
        ))
        .unwrap();
        let leaf = env.pki.ca.leaf_for_key(&Pki::server_spec(), &pkcs8).unwrap();
        env.vol
            .write(&[
                ("tls.crt", leaf.cert_pem.as_bytes()),
                ("tls.key", on_disk.as_bytes()),
                ("ca.crt", env.pki.ca.cert_pem.as_bytes()),
            ])
            .unwrap();
        wait_serial(&env.proxy, &leaf.serial).await;
        let client = env.pki.client("frontend");
        let (mut ws, served) = connect(
            env.proxy.listen_addr,
            env.pki.client_config(Some(&client)),
            "localhost",
            "/",
        )
        .await
        .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(served.unwrap().serial, leaf.serial, "{file}");
        assert_eq!(roundtrip(&mut ws, file.into()).await.to_text().unwrap(), file);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_directory_is_waited_for_and_nothing_is_served_meanwhile() {
    crate::support::init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("not-yet");
    let app = TestApp::start().await;
    let allow = spiffe("frontend");
    let mut cfg = proxy_config(&dir, app.addr, &[allow.as_str()]);
    cfg.reload.min_backoff = Duration::from_millis(50);
    cfg.reload.max_backoff = Duration::from_millis(200);
    let proxy = wsgate::proxy::start(cfg).await.unwrap();
    eventually("readyz says the directory is missing", Duration::from_secs(10), || {
        proxy
            .readiness()
            .is_err_and(|e| e.to_string().contains("does not exist"))
    })
    .await;
    let (status, body) = http(proxy.admin_addr, "GET", "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("does not exist"), "{body}");
    let pki = Pki::new();
    let client = pki.client("frontend");
    assert!(
        connect(proxy.listen_addr, pki.client_config(Some(&client)), "localhost", "/")
            .await
            .is_err()
    );
    // Recorded once the refused connection is closed: poll.
    metric_becomes(
        "the refusal counted",
        || proxy.metrics.encode(),
        "wsgate_handshakes_total{result=\"failure\",error_type=\"not_ready\",direction=\"inbound\"}",
        1.0,
    )
    .await;
    // The Secret is mounted, but cert-manager has not filled it yet.
    let vol = SecretVolume::new(&dir).unwrap();
    vol.write(&[("ca.crt", pki.ca.cert_pem.as_bytes())]).unwrap();
    eventually("readyz names the missing file", Duration::from_secs(10), || {
        proxy
            .readiness()
            .is_err_and(|e| e.to_string().contains("tls.crt is missing"))
    })
    .await;
    let server = pki.server();
    write_set(&vol, &server, &pki.ca);
    wait_serial(&proxy, &server.serial).await;
    assert_eq!(http(proxy.admin_addr, "GET", "/readyz").await.0, 200);
    let (mut ws, _) = connect(proxy.listen_addr, pki.client_config(Some(&client)), "localhost", "/")
        .await
        .unwrap();
    assert_eq!(roundtrip(&mut ws, "finally".into()).await.to_text().unwrap(), "finally");
}

/// Starts a proxy whose trust roots come from `bundle` (a file or a ConfigMap directory).
async fn with_trust_bundle(
    pki: &Pki,
    bundle: &std::path::Path,
    tmp: &std::path::Path,
) -> (wsgate::proxy::ProxyHandle, SecretVolume) {
    let vol = SecretVolume::new(tmp.join("tls")).unwrap();
    let server = pki.server();
    // A leaf Secret as cert-manager writes it: its ca.crt is only the issuing CA.
    write_set(&vol, &server, &pki.ca);
    let app = TestApp::start().await;
    let mut cfg = proxy_config(vol.path(), app.addr, &["spiffe://test.wsgate.local/**"]);
    cfg.trust_bundle = Some(bundle.to_path_buf());
    let proxy = wsgate::proxy::start(cfg).await.unwrap();
    wait_serial(&proxy, &server.serial).await;
    (proxy, vol)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_bundle_directory_replaces_ca_crt_and_is_hot_swapped() {
    crate::support::init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let ours = Pki::new();
    let next_ca = Pki::new();
    // trust-manager's ConfigMap, mounted the kubelet's way.
    let bundle = SecretVolume::new(tmp.path().join("bundle")).unwrap();
    bundle
        .write(&[("trust-bundle.pem", ours.ca.cert_pem.as_bytes())])
        .unwrap();
    let (proxy, _vol) = with_trust_bundle(&ours, bundle.path(), tmp.path()).await;

    let newcomer = next_ca.client("frontend");
    let cfg = crate::support::client_config(
        Some((newcomer.cert_pem.as_str(), newcomer.key_pem.as_str())),
        std::slice::from_ref(&ours.ca.cert_der),
    )
    .unwrap();
    assert!(
        connect(proxy.listen_addr, cfg.clone(), "localhost", "/").await.is_err(),
        "new CA not trusted yet"
    );

    // CA rotation with overlap: the bundle now carries both roots.
    let both = format!("{}{}", ours.ca.cert_pem, next_ca.ca.cert_pem);
    bundle.write(&[("trust-bundle.pem", both.as_bytes())]).unwrap();
    let t0 = std::time::Instant::now();
    loop {
        match connect(proxy.listen_addr, cfg.clone(), "localhost", "/").await {
            Ok((mut ws, _)) => {
                assert_eq!(roundtrip(&mut ws, "trusted".into()).await.to_text().unwrap(), "trusted");
                break;
            }
            Err(e) => assert!(t0.elapsed() < Duration::from_secs(10), "new root never trusted: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Clients of the old CA are still trusted.
    let old = ours.client("frontend");
    connect(proxy.listen_addr, ours.client_config(Some(&old)), "localhost", "/")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_bundle_that_does_not_cover_the_own_leaf_is_refused() {
    crate::support::init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let ours = Pki::new();
    let file = tmp.path().join("roots.pem");
    std::fs::write(&file, &ours.ca.cert_pem).unwrap();
    let (proxy, _vol) = with_trust_bundle(&ours, &file, tmp.path()).await;
    let before = proxy.store.current().unwrap().leaf.serial.clone();
    let failures = || {
        metric(
            &proxy.metrics.encode(),
            "wsgate_certificate_reloads_total{result=\"failure\"}",
        )
        .unwrap_or(0.0)
    };
    // Replaced atomically (as a ConfigMap update or `mv` would), with an unrelated root only.
    let unrelated = Ca::new("unrelated").unwrap();
    let staged = tmp.path().join("roots.pem.tmp");
    std::fs::write(&staged, &unrelated.cert_pem).unwrap();
    std::fs::rename(&staged, &file).unwrap();
    eventually("bundle refused", Duration::from_secs(10), || failures() >= 1.0).await;
    assert_eq!(proxy.store.current().unwrap().leaf.serial, before);
    let client = ours.client("frontend");
    connect(proxy.listen_addr, ours.client_config(Some(&client)), "localhost", "/")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_yet_valid_leaf_is_refused_and_named() {
    let env = env().await;
    let now = SystemTime::now();
    let early = env
        .pki
        .ca
        .leaf(&Pki::server_spec().valid(now + Duration::from_secs(3600), now + Duration::from_secs(7200)))
        .unwrap();
    let files: [(&str, &[u8]); 3] = [
        ("tls.crt", early.cert_pem.as_bytes()),
        ("tls.key", early.key_pem.as_bytes()),
        ("ca.crt", env.pki.ca.cert_pem.as_bytes()),
    ];
    assert_refused_and_old_set_kept(&env, &files, "not yet valid").await;
}

/// The writer the tests (and the demo) use reproduces the kubelet's layout exactly.
#[test]
fn the_secret_volume_writer_lays_files_out_as_the_kubelet_does() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = SecretVolume::new(tmp.path().join("v")).unwrap();
    vol.write(&[("tls.crt", b"one"), ("tls.key", b"k1")]).unwrap();
    let first = std::fs::read_link(vol.path().join("..data")).unwrap();
    let name = first.to_str().unwrap();
    // ..YYYY_MM_DD_hh_mm_ss.<suffix>, relative, a directory next to ..data.
    assert!(
        name.starts_with("..2") && name.len() > 22 && name.as_bytes()[6] == b'_',
        "{name}"
    );
    assert!(vol.path().join(&first).is_dir());
    for file in ["tls.crt", "tls.key"] {
        let link = std::fs::read_link(vol.path().join(file)).unwrap();
        assert_eq!(
            link,
            std::path::Path::new("..data").join(file),
            "visible names go through ..data"
        );
    }
    vol.write(&[("tls.crt", b"two"), ("ca.crt", b"ca")]).unwrap();
    let second = std::fs::read_link(vol.path().join("..data")).unwrap();
    assert_ne!(first, second);
    assert!(!vol.path().join(&first).exists(), "the previous generation is removed");
    assert!(!vol.path().join("..data_tmp").exists());
    assert!(
        std::fs::symlink_metadata(vol.path().join("tls.key")).is_err(),
        "dropped keys disappear"
    );
    assert_eq!(std::fs::read(vol.path().join("tls.crt")).unwrap(), b"two");
    assert_eq!(std::fs::read(vol.path().join("ca.crt")).unwrap(), b"ca");
}

/// A change inotify cannot see (files rewritten inside the current generation directory, which
/// is not watched) is still picked up by the periodic re-check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_recheck_catches_a_missed_event() {
    let allow = spiffe("frontend");
    let env = Env::start_with(&[allow.as_str()], |cfg| cfg.reload.recheck = Duration::from_millis(300)).await;
    let next = env.pki.server();
    let generation = env
        .vol
        .path()
        .join(std::fs::read_link(env.vol.path().join("..data")).unwrap());
    // Key first, then certificate: for a moment the pair mismatches, which validation refuses.
    std::fs::write(generation.join("tls.key"), &next.key_pem).unwrap();
    std::fs::write(generation.join("tls.crt"), &next.cert_pem).unwrap();
    wait_serial(&env.proxy, &next.serial).await;
}

/// Reading the files is itself a file event (inotify reports opens); the watcher must not
/// take its own reads for changes, or a plain directory would be re-read every debounce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_does_not_wake_itself_up_by_reading_a_plain_directory() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use notify::Watcher as _;
    use wsgate::certs::watch::{CertWatcher, ReloadReport, ReloadSink};
    struct Counting(Arc<AtomicUsize>);
    impl ReloadSink for Counting {
        fn install(&mut self, _: wsgate::certs::CertBundle) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            Ok(())
        }
        fn report(&mut self, _: &ReloadReport) {}
        fn checked(&mut self, _: bool) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let leaf = pki.server();
    std::fs::write(tmp.path().join("tls.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(tmp.path().join("tls.key"), &leaf.key_pem).unwrap();
    std::fs::write(tmp.path().join("ca.crt"), &pki.ca.cert_pem).unwrap();
    // A second inotify watch on the same directory sees the opens the watcher's reads cause: the
    // kernel queues them to every watch at the open, so once this one has them, so has the
    // watcher's own.
    let opens: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = opens.clone();
    let mut observer = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res
            && matches!(
                event.kind,
                notify::EventKind::Access(notify::event::AccessKind::Open(_))
            )
        {
            for path in event.paths {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                sink.lock().unwrap().push(name);
            }
        }
    })
    .unwrap();
    observer.watch(tmp.path(), notify::RecursiveMode::NonRecursive).unwrap();
    // Whether, after the first `from` opens, every file was opened (ca.crt `ca_opens` times).
    let opened_all = |opens: &[String], from: usize, ca_opens: usize| {
        let n = |f: &str| opens.iter().skip(from).filter(|o| *o == f).count();
        n("tls.crt") >= 1 && n("tls.key") >= 1 && n("ca.crt") >= ca_opens
    };
    let checks = Arc::new(AtomicUsize::new(0));
    let debounce = Duration::from_millis(20);
    let timing = wsgate::certs::ReloadTiming {
        debounce,
        ..Default::default()
    };
    let watcher = CertWatcher::new(
        wsgate::certs::SecretSource {
            cert_dir: tmp.path().to_path_buf(),
            trust_bundle: None,
        },
        wsgate::certs::Usage::Server,
        timing,
        wsgate::tls::provider(),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(watcher.run(Counting(checks.clone()), stop.clone()));
    let count = || checks.load(Ordering::Relaxed);
    // Twice: after the first load, and after the load of a real change, the watcher's own reads
    // have reached its inotify queue; then it gets far more than a debounce to (wrongly) react.
    let (mut seen, mut ca_opens) = (0, 1);
    for round in 1..=2 {
        if round == 2 {
            // A real change is still seen (writing ca.crt opens it once more).
            (seen, ca_opens) = (opens.lock().unwrap().len(), 2);
            std::fs::write(tmp.path().join("ca.crt"), &pki.ca.cert_pem).unwrap();
        }
        until(&format!("check {round}"), DEADLINE, count, |n| *n >= round).await;
        let what = format!("the opens of check {round} seen by inotify");
        until(
            &what,
            DEADLINE,
            || opens.lock().unwrap().clone(),
            |o| opened_all(o, seen, ca_opens),
        )
        .await;
        tokio::time::sleep(debounce * 25).await;
        assert_eq!(
            count(),
            round,
            "check {round} woke the watcher up again: its own reads were taken for a change"
        );
    }
    stop.cancel();
    task.await.unwrap();
}

/// The kubelet's rename onto `..data` completes a set, so it is read at once, without waiting
/// for the debounce: with a debounce (and re-check) of an hour, a rotation written the kubelet's
/// way is still installed, and the reload is reported as an event.
#[tokio::test]
async fn a_kubelet_swap_is_read_on_its_rename_without_waiting_for_the_debounce() {
    use std::sync::{Arc, Mutex};
    use wsgate::certs::watch::{CertWatcher, ReloadReport, ReloadSink, Trigger};
    struct Installs(Arc<Mutex<Vec<(String, Trigger)>>>);
    impl ReloadSink for Installs {
        fn install(&mut self, _: wsgate::certs::CertBundle) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            Ok(())
        }
        fn report(&mut self, report: &ReloadReport) {
            if let Ok(installed) = &report.result {
                self.0.lock().unwrap().push((installed.serial.clone(), report.trigger));
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let vol = SecretVolume::new(tmp.path().join("tls")).unwrap();
    let pki = Pki::new();
    let first = pki.server();
    write_set(&vol, &first, &pki.ca);
    let hour = Duration::from_secs(3600);
    let timing = wsgate::certs::ReloadTiming {
        debounce: hour,
        max_debounce: hour,
        recheck: hour,
        ..Default::default()
    };
    let watcher = CertWatcher::new(
        wsgate::certs::SecretSource {
            cert_dir: vol.path().to_path_buf(),
            trust_bundle: None,
        },
        wsgate::certs::Usage::Server,
        timing,
        wsgate::tls::provider(),
    );
    let installs: Arc<Mutex<Vec<(String, Trigger)>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(watcher.run(Installs(installs.clone()), stop.clone()));
    let seen = || installs.lock().unwrap().clone();
    until("the first set", DEADLINE, seen, |i| i.len() == 1).await;
    let second = pki.server();
    write_set(&vol, &second, &pki.ca);
    let all = until("the rotated set", DEADLINE, seen, |i| i.len() == 2).await;
    assert_eq!(
        all,
        [
            (first.serial.clone(), Trigger::Start),
            (second.serial.clone(), Trigger::Event)
        ]
    );
    stop.cancel();
    task.await.unwrap();
}
