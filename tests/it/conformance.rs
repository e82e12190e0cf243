//! Conformance against outside suites: the Autobahn TestSuite's WebSocket cases (run by kosoku)
//! through the proxy to an echo app, and sslyze's check of the mTLS listener against Mozilla's
//! "modern" TLS profile. Both tools come from `bash scripts/conformance-tools.sh`; without them
//! these tests fail (they never pass without having run).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::net::{TcpListener, TcpStream};
use wsgate::cli::{Cli, Command as WsgateCommand};
use wsgate::proxy::ProxyHandle;

use crate::support::{Leaf, Pki, SecretVolume, TestApp, init_logs, spiffe, wait_serial, write_set};

const MISSING: &str = "needs kosoku and sslyze: bash scripts/conformance-tools.sh";

/// Autobahn cases that do not apply to wsgate, with the reason (see docs/testing.md).
const NOT_APPLICABLE: &[(&str, &str)] = &[
    (
        "12.*",
        "permessage-deflate: wsgate never negotiates extensions (it strips \
         Sec-WebSocket-Extensions and relays frames one by one), so these cases end UNIMPLEMENTED",
    ),
    ("13.*", "permessage-deflate parameters: as 12.*"),
];

/// The conformance tools' venv (`.tools/conformance`, or `$WSGATE_CONFORMANCE_TOOLS_DIR`).
fn tool(name: &str) -> PathBuf {
    let dir = std::env::var_os("WSGATE_CONFORMANCE_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/conformance"));
    let path = dir.join("bin").join(name);
    assert!(path.is_file(), "{name} not found at {}; {MISSING}", path.display());
    path
}

/// Runs `cmd` off the runtime (the proxy under test runs on it), failing after `limit`.
async fn run(mut cmd: Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what} did not start: {e}"));
    let id = child.id();
    let waiting = tokio::task::spawn_blocking(move || child.wait_with_output());
    match tokio::time::timeout(limit, waiting).await {
        Ok(out) => out.unwrap().unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg("-KILL").arg(id.to_string()).status();
            panic!("{what} did not finish within {limit:?}");
        }
    }
}

/// A proxy configured as `wsgate proxy` with default flags plus `extra`, on loopback ports,
/// in front of an echo app, admitting the client `frontend`.
struct Setup {
    tmp: tempfile::TempDir,
    pki: Pki,
    client: Leaf,
    _app: TestApp,
    proxy: ProxyHandle,
}

impl Setup {
    async fn start(extra: &[&str]) -> Self {
        init_logs();
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let vol = SecretVolume::new(tmp.path().join("tls")).unwrap();
        let server = pki.server();
        write_set(&vol, &server, &pki.ca);
        let app = TestApp::start().await;
        let upstream = format!("ws://{}", app.addr);
        let cert_dir = vol.path().to_str().unwrap().to_owned();
        let allow = spiffe("frontend");
        let mut argv = vec![
            "wsgate",
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
            "--cert-dir",
            &cert_dir,
            "--allow",
            &allow,
        ];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(&argv).unwrap();
        let WsgateCommand::Proxy(args) = cli.command else {
            unreachable!("parsed a proxy command line")
        };
        let proxy = wsgate::proxy::start(args.into_config().unwrap()).await.unwrap();
        wait_serial(&proxy, &server.serial).await;
        let client = pki.client("frontend");
        Self {
            tmp,
            pki,
            client,
            _app: app,
            proxy,
        }
    }

    /// Writes `name` into the temporary folder and returns its path.
    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.tmp.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// A plain-TCP port on 127.0.0.1 whose every connection is relayed over mTLS (as the
    /// client `frontend`) to the proxy: kosoku has no TLS of its own. Byte-transparent, and a
    /// close on one side is passed to the other, so Autobahn still sees who closed first.
    async fn plain_bridge(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = tokio_rustls::TlsConnector::from(self.pki.client_config(Some(&self.client)));
        let proxy = self.proxy.listen_addr;
        tokio::spawn(async move {
            while let Ok((mut plain, _)) = listener.accept().await {
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = plain.set_nodelay(true);
                    let Ok(tcp) = TcpStream::connect(proxy).await else {
                        return;
                    };
                    let _ = tcp.set_nodelay(true);
                    let Ok(mut secure) = tls.connect("localhost".try_into().unwrap(), tcp).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut plain, &mut secure).await;
                });
            }
        });
        addr
    }
}

/// One case of kosoku's `index.json`.
#[derive(Debug, serde::Deserialize)]
struct CaseVerdict {
    behavior: String,
    #[serde(rename = "behaviorClose")]
    behavior_close: String,
    #[serde(rename = "remoteCloseCode")]
    remote_close_code: Option<u16>,
    duration: u64,
}

/// Whether Autobahn counts the case as passed: the exchange OK, NON-STRICT (a SHOULD not
/// followed) or INFORMATIONAL, and the close OK or INFORMATIONAL.
fn autobahn_pass(v: &CaseVerdict) -> bool {
    matches!(v.behavior.as_str(), "OK" | "NON-STRICT" | "INFORMATIONAL")
        && matches!(v.behavior_close.as_str(), "OK" | "INFORMATIONAL")
}

/// Orders case ids numerically (1.1.2 before 1.1.10).
fn case_key(id: &str) -> Vec<u32> {
    id.split('.').map(|p| p.parse().unwrap_or(u32::MAX)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kosoku and sslyze: bash scripts/conformance-tools.sh"]
async fn autobahn_cases_pass_through_the_proxy_to_an_echo_app() {
    let kosoku = tool("kosoku");
    // 9.* sends messages of up to 16 MiB; the defaults (1 MiB) would close those with 1009.
    let setup = Setup::start(&[
        "--max-message-size",
        "32MiB",
        "--max-frame-size",
        "32MiB",
        "--memory-budget",
        "256MiB",
    ])
    .await;
    let bridge = setup.plain_bridge().await;
    // `WSGATE_AUTOBAHN_REPORTS=DIR` keeps kosoku's JSON and HTML reports.
    let reports = std::env::var_os("WSGATE_AUTOBAHN_REPORTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| setup.tmp.path().join("autobahn"));
    let _ = std::fs::remove_dir_all(&reports);

    let mut cmd = Command::new(&kosoku);
    cmd.arg(format!("ws://{bridge}"))
        .arg("--parallelism")
        .arg("2")
        .arg("--outdir")
        .arg(&reports);
    for (pattern, _) in NOT_APPLICABLE {
        cmd.arg("--exclude").arg(pattern);
    }
    let t0 = Instant::now();
    let out = run(cmd, Duration::from_secs(600)).await;
    let took = t0.elapsed();
    let said = format!(
        "kosoku exited with {} after {took:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let index = std::fs::read_to_string(reports.join("index.json"))
        .unwrap_or_else(|e| panic!("no kosoku report ({e}); {said}"));
    let agents: BTreeMap<String, BTreeMap<String, CaseVerdict>> = serde_json::from_str(&index).unwrap();
    assert_eq!(agents.len(), 1, "one server agent expected in the report: {index}");
    let cases = agents.into_values().next().unwrap();

    let mut ids: Vec<&String> = cases.keys().collect();
    ids.sort_by_key(|id| case_key(id));
    for (pattern, _) in NOT_APPLICABLE {
        let prefix = pattern.trim_end_matches('*');
        assert!(
            !ids.iter().any(|id| id.starts_with(prefix)),
            "excluded cases {pattern} ran anyway"
        );
    }
    // The suite has 517 cases, 216 of them in 12.* and 13.*: every other one must have run.
    assert!(ids.len() >= 300, "only {} cases in the report; {said}", ids.len());
    let failures: Vec<String> = ids
        .iter()
        .filter(|id| !autobahn_pass(&cases[**id]))
        .map(|id| {
            let v = &cases[*id];
            format!(
                "{id}: {} / close {} (remote close code {:?}, {} ms)",
                v.behavior, v.behavior_close, v.remote_close_code, v.duration
            )
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} Autobahn cases failed (reports in {}):\n{}\n{said}",
        failures.len(),
        ids.len(),
        reports.display(),
        failures.join("\n")
    );
    assert!(out.status.success(), "every case passed but {said}");
    let mut by_behavior: BTreeMap<&str, usize> = BTreeMap::new();
    for v in cases.values() {
        *by_behavior.entry(v.behavior.as_str()).or_default() += 1;
    }
    let lenient: Vec<String> = ids
        .iter()
        .filter(|id| cases[**id].behavior != "OK" || cases[**id].behavior_close != "OK")
        .map(|id| format!("{id} {}/{}", cases[*id].behavior, cases[*id].behavior_close))
        .collect();
    let slowest = ids.iter().max_by_key(|id| cases[**id].duration).unwrap();
    eprintln!(
        "autobahn: not strictly OK: {}; slowest case {slowest} ({} ms)",
        lenient.join(", "),
        cases[*slowest].duration
    );
    eprintln!(
        "autobahn: {} cases passed in {took:?} ({by_behavior:?}); not applicable: {}",
        ids.len(),
        NOT_APPLICABLE.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(", ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kosoku and sslyze: bash scripts/conformance-tools.sh"]
async fn default_flags_meet_mozilla_modern_tls_and_require_a_client_certificate() {
    let sslyze = tool("sslyze");
    let setup = Setup::start(&[]).await;
    let cert = setup.file("client.crt", &setup.client.cert_pem);
    let key = setup.file("client.key", &setup.client.key_pem);
    let ca = setup.file("ca.crt", &setup.pki.ca.cert_pem);
    let json = setup.tmp.path().join("sslyze.json");

    let mut cmd = Command::new(&sslyze);
    cmd.arg("--mozilla_config=modern")
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("--certinfo_ca_file")
        .arg(&ca)
        .arg("--json_out")
        .arg(&json)
        .arg(format!("localhost:{}", setup.proxy.listen_addr.port()));
    let t0 = Instant::now();
    let out = run(cmd, Duration::from_secs(300)).await;
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let said = format!(
        "sslyze exited with {} after {took:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "not compliant with Mozilla's modern profile: {said}"
    );
    assert!(stdout.contains("OK - Compliant"), "no compliance verdict: {said}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let result = &report["server_scan_results"][0];
    assert_eq!(result["scan_status"], "COMPLETED", "{said}");
    assert_eq!(
        result["connectivity_status"], "COMPLETED",
        "sslyze could not connect with the client certificate: {said}"
    );

    // Without credentials sslyze finds the client certificate required (with them, it reports
    // DISABLED: the server never had to ask twice).
    let mut anonymous = Command::new(&sslyze);
    anonymous
        .arg("--mozilla_config=disable")
        .arg("--certinfo")
        .arg("--quiet")
        .arg("--json_out")
        .arg(&json)
        .arg(format!("localhost:{}", setup.proxy.listen_addr.port()));
    let out = run(anonymous, Duration::from_secs(120)).await;
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        report["server_scan_results"][0]["connectivity_result"]["client_auth_requirement"], "REQUIRED",
        "sslyze without a client certificate ({}): {report:#}",
        out.status
    );
    eprintln!("sslyze: compliant with Mozilla's modern configuration in {took:?}");
}
