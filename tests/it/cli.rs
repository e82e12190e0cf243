//! The command line: bad usage exits 64 with one line before any port is bound; flags have
//! environment twins; the binary serves, reports readiness and stops on SIGTERM.

use std::net::TcpListener;
use std::time::Duration;

use crate::support::bin::{Proc, run};
use crate::support::raw::http;
use crate::support::{Pki, SecretVolume, TestApp, connect, roundtrip, spiffe, write_set};

/// Runs `wsgate proxy` with a port we hold as --listen: if the binary tried to bind before
/// validating, it would fail with exit 1 ("address in use") instead of 64.
fn usage_error(extra: &[&str]) -> String {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    let mut args = vec!["proxy", "--listen", &listen, "--admin", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let (code, _out, err) = run(&args, &[]);
    assert_eq!(code, 64, "args {extra:?}: expected exit 64, got {code}; stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "args {extra:?}: expected one line, got:\n{err}");
    lines[0].to_owned()
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let line = usage_error(&["--upstream", "ws://127.0.0.1:1", "--allow-any-authenticated", "--bogus"]);
    assert!(line.contains("--bogus"), "{line}");
}

#[test]
fn bad_address_is_a_usage_error() {
    let (code, _, err) = run(
        &[
            "proxy",
            "--listen",
            "nonsense",
            "--upstream",
            "ws://127.0.0.1:1",
            "--allow-any-authenticated",
        ],
        &[],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("nonsense") && err.lines().count() == 1, "{err}");
}

#[test]
fn non_loopback_upstream_is_refused_unless_allowed() {
    let line = usage_error(&["--upstream", "ws://10.1.2.3:8080", "--allow-any-authenticated"]);
    assert!(line.contains("--allow-remote-upstream"), "{line}");
}

#[test]
fn no_allow_policy_is_refused() {
    let line = usage_error(&["--upstream", "ws://127.0.0.1:8080"]);
    assert!(line.contains("--allow"), "{line}");
}

#[test]
fn malformed_allow_pattern_is_refused_naming_it() {
    let line = usage_error(&["--upstream", "ws://127.0.0.1:8080", "--allow", "spiffe://td/ns/fr*nt"]);
    assert!(line.contains("fr*nt"), "{line}");
}

#[test]
fn bad_duration_and_size_are_refused() {
    let line = usage_error(&[
        "--upstream",
        "ws://127.0.0.1:8080",
        "--allow-any-authenticated",
        "--handshake-timeout",
        "soon",
    ]);
    assert!(line.contains("soon"), "{line}");
    let line = usage_error(&[
        "--upstream",
        "ws://127.0.0.1:8080",
        "--allow-any-authenticated",
        "--max-frame-size",
        "8MiB",
        "--max-message-size",
        "1MiB",
    ]);
    assert!(line.contains("--max-frame-size"), "{line}");
}

#[test]
fn environment_twins_are_read_and_validated() {
    let (code, _, err) = run(
        &["proxy"],
        &[
            ("WSGATE_UPSTREAM", "ws://192.0.2.1:80"),
            ("WSGATE_ALLOW_ANY_AUTHENTICATED", "true"),
        ],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--allow-remote-upstream"), "{err}");
}

#[test]
fn help_and_version_exit_zero() {
    let (code, out, _) = run(&["proxy", "--help"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("--cert-dir") && out.contains("WSGATE_CERT_DIR"), "{out}");
    let (code, out, _) = run(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(out.starts_with("wsgate "), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_waits_for_certificates_then_serves_and_stops_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tls");
    let app = TestApp::start().await;
    let allow = spiffe("frontend");
    let mut proc = Proc::proxy(
        app.addr,
        &["--allow", &allow],
        &[
            ("WSGATE_CERT_DIR", dir.to_str().unwrap()),
            ("WSGATE_RELOAD_INTERVAL", "1s"),
        ],
    );
    let (listen, admin) = proc.addrs().await;

    // The Secret is not mounted yet: alive, not ready, and /readyz says why.
    assert_eq!(http(admin, "GET", "/healthz").await.0, 200);
    // (The first load attempt may not have run yet: poll until /readyz names the reason.)
    let t0 = std::time::Instant::now();
    loop {
        let (status, body) = http(admin, "GET", "/readyz").await;
        assert_eq!(status, 503, "{body}");
        if body.contains("does not exist") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "readyz never said why: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The kubelet mounts it; cert-manager has issued the certificate.
    let pki = Pki::new();
    let vol = SecretVolume::new(&dir).unwrap();
    let server = pki.server();
    write_set(&vol, &server, &pki.ca);
    let t0 = std::time::Instant::now();
    loop {
        let (status, body) = http(admin, "GET", "/readyz").await;
        if status == 200 {
            assert!(body.contains(&server.serial), "{body}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never became ready: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let leaf = pki.client("frontend");
    let (mut ws, _) = connect(listen, pki.client_config(Some(&leaf)), "localhost", "/")
        .await
        .unwrap();
    let reply = roundtrip(&mut ws, "hi".into()).await;
    assert_eq!(reply.to_text().unwrap(), "hi");
    let accepted = proc.line("\"outcome\":\"accepted\"", Duration::from_secs(5)).await;
    assert_eq!(accepted["identity"], spiffe("frontend"));
    assert_eq!(accepted["tls.version"], "1.3");

    // A refused client is logged with its error.type and reason.
    assert!(
        connect(listen, pki.client_config(None), "localhost", "/")
            .await
            .is_err()
    );
    let refused = proc.line("no_client_certificate", Duration::from_secs(5)).await;
    assert_eq!(refused["outcome"], "refused");
    assert!(
        refused["reason"].as_str().unwrap().contains("no certificates"),
        "{refused}"
    );
    assert!(refused["duration_ms"].as_f64().is_some());

    proc.term();
    // Complete the close handshake the drain starts, so the proxy need not wait for us.
    while let Ok(Some(Ok(_))) =
        tokio::time::timeout(Duration::from_secs(10), futures_util::StreamExt::next(&mut ws)).await
    {}
    let status = proc.exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "logs:\n{}", proc.lines().join("\n"));
}

#[test]
fn demo_runs_and_exits_zero() {
    let (code, out, err) = run(&["demo"], &[]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("the open connection kept working"), "{out}");
    assert!(out.contains("a new handshake was served the new serial"), "{out}");
    assert!(
        out.contains("CertificateRequired") && out.contains("UnknownCA") && out.contains("403"),
        "{out}"
    );
    // Both directions: plain ws:// through the client's outbound sidecar, its identity seen by
    // the far app, and a route expecting another server identity refused with 502.
    assert!(
        out.contains("the far app saw the caller as spiffe://demo.wsgate.local/ns/demo/sa/client"),
        "{out}"
    );
    assert!(out.contains("refused with 502"), "{out}");
}

/// `wsgate inject` validates its flags like the proxy does.
#[test]
fn inject_usage_errors_exit_64_naming_the_flag() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    let base = [
        "inject",
        "--listen",
        &listen,
        "--admin",
        "127.0.0.1:0",
        "--certificate-controller",
        "false",
    ];
    let cases: &[(&[&str], &str)] = &[
        (&[], "--sidecar-image"),
        (
            &["--sidecar-image", "img", "--sidecar-memory-limit", "lots"],
            "--sidecar-memory-limit",
        ),
        (&["--sidecar-image", "img", "--issuer-kind", "Vault"], "--issuer-kind"),
        (
            &["--sidecar-image", "img", "--default-allow", "spiffe://x/fr*nt"],
            "--default-allow",
        ),
        (
            &["--sidecar-image", "img", "--cert-duration", "a day"],
            "--cert-duration",
        ),
        (&["--sidecar-image", "img", "--native-sidecar", "maybe"], "maybe"),
        (
            &["--sidecar-image", "img", "--cluster-domain", "cluster local"],
            "--cluster-domain",
        ),
        (&["--sidecar-image", "img", "--cluster-domain", "."], "--cluster-domain"),
        (
            &["--sidecar-image", "img", "--otlp-endpoint", "https://collector:4318"],
            "--otlp-endpoint",
        ),
    ];
    for (extra, needle) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        let (code, _, err) = run(&args, &[]);
        assert_eq!(code, 64, "{extra:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
    }
}

/// `wsgate drain` (the sidecar's preStop hook) asks the local proxy to drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_command_drains_the_local_proxy() {
    let allow = spiffe("frontend");
    let env = crate::support::Env::start(&[allow.as_str()]).await;
    let admin = env.proxy.admin_addr.to_string();
    let (code, _, err) = tokio::task::spawn_blocking(move || run(&["drain", "--admin", &admin], &[]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(matches!(env.proxy.readiness(), Err(wsgate::admin::NotReady::Draining)));
    // Nothing listening: the hook fails visibly.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (code, _, err) = run(&["drain", "--admin", &dead], &[]);
    assert_eq!(code, 1, "{err}");
}
