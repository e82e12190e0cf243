//! Shared test support: PKIs (rcgen), Secret volumes written the kubelet's way, a test app,
//! in-process proxies and the real binary.

#![allow(dead_code)]

pub mod app;
pub mod bin;
pub mod frames;
pub mod hostile;
pub mod injector;
pub mod k8s_tools;
pub mod openmetrics;
pub mod otlp;
pub mod raw;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use app::{Mode, TestApp};
use wsgate::authz::Policy;
use wsgate::certs::ReloadTiming;
pub use wsgate::demo::client::{ClientError, WssStream, config as client_config, connect};
pub use wsgate::demo::pki::{Ca, Leaf, LeafSpec};
/// The kubelet-faithful Secret-volume writer (new hidden timestamped directory, `..data_tmp`
/// renamed over `..data`, visible symlinks, old directory removed).
pub use wsgate::demo::volume::SecretVolume;
use wsgate::proxy::ProxyHandle;
use wsgate::proxy::settings::{Limits, ProxyConfig, Upstream};
use wsgate::tls::TlsMinVersion;

pub const TRUST_DOMAIN: &str = "test.wsgate.local";

pub fn spiffe(sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/{sa}")
}

/// Logs to stderr when RUST_LOG is set (`RUST_LOG=debug cargo nextest run …`).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        wsgate::telemetry::logs::init(wsgate::telemetry::LogFormat::Text, "info");
    }
}

/// A CA with helpers to mint the proxy's and clients' certificates.
pub struct Pki {
    pub ca: Ca,
}

impl Pki {
    pub fn new() -> Self {
        Self {
            ca: Ca::new("wsgate test CA").unwrap(),
        }
    }

    /// The proxy's certificate spec: SPIFFE ID of the app, DNS localhost, IP 127.0.0.1.
    pub fn server_spec() -> LeafSpec {
        LeafSpec::new("app")
            .uri(&spiffe("app"))
            .dns("localhost")
            .ip(Ipv4Addr::LOCALHOST.into())
    }

    /// A fresh server leaf (new key, new serial).
    pub fn server(&self) -> Leaf {
        self.ca.leaf(&Self::server_spec()).unwrap()
    }

    /// A client leaf for service account `sa`.
    pub fn client(&self, sa: &str) -> Leaf {
        self.ca.leaf(&LeafSpec::new(sa).uri(&spiffe(sa))).unwrap()
    }

    /// A client config presenting `leaf` (or nothing) and trusting this CA.
    pub fn client_config(&self, leaf: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
        client_config(
            leaf.map(|l| (l.cert_pem.as_str(), l.key_pem.as_str())),
            std::slice::from_ref(&self.ca.cert_der),
        )
        .unwrap()
    }
}

/// A second CA whose client leaves carry any subject (the demo `Ca` only sets a common name), to
/// test what a hostile but trusted subject does to the identity headers.
pub struct SubjectCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub cert_pem: String,
}

impl SubjectCa {
    pub fn new() -> Self {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "wsgate subject CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            cert_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A client leaf with `subject` (attributes in certificate order, most significant first)
    /// and URI SAN `uri`.
    pub fn client(&self, subject: &[(rcgen::DnType, &str)], uri: &str) -> Leaf {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (ty, value) in subject {
            params.distinguished_name.push(ty.clone(), *value);
        }
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x42]));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            serial: "42".into(),
        }
    }
}

impl Env {
    /// Also trusts `extra` for client certificates: serves a fresh server leaf with `ca.crt`
    /// holding both CAs, and waits until it is served.
    pub async fn trust_also(&mut self, extra: &SubjectCa) {
        let server = self.pki.server();
        let bundle = format!("{}{}", self.pki.ca.cert_pem, extra.cert_pem);
        self.vol
            .write(&[
                ("ca.crt", bundle.as_bytes()),
                ("tls.crt", server.cert_pem.as_bytes()),
                ("tls.key", server.key_pem.as_bytes()),
            ])
            .unwrap();
        wait_serial(&self.proxy, &server.serial).await;
        self.server = server;
    }
}

/// Writes tls.crt, tls.key, ca.crt the kubelet's way.
pub fn write_set(vol: &SecretVolume, leaf: &Leaf, ca: &Ca) {
    vol.write(&[
        ("ca.crt", ca.cert_pem.as_bytes()),
        ("tls.crt", leaf.cert_pem.as_bytes()),
        ("tls.key", leaf.key_pem.as_bytes()),
    ])
    .unwrap();
}

/// A proxy config on loopback ports chosen by the OS.
pub fn proxy_config(cert_dir: &std::path::Path, app: SocketAddr, allow: &[&str]) -> ProxyConfig {
    let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
    ProxyConfig {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        upstream: Some(Upstream::parse(&format!("ws://{app}"), false).unwrap()),
        outbound: wsgate::proxy::settings::Outbound::default(),
        cert_dir: cert_dir.to_path_buf(),
        trust_bundle: None,
        policy: Policy::new(&allow, false).unwrap(),
        admin: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        tls_min_version: TlsMinVersion::Tls13,
        handshake_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(10),
        limits: Limits::default(),
        reload: ReloadTiming {
            debounce: Duration::from_millis(50),
            ..ReloadTiming::default()
        },
        otel: wsgate::telemetry::OtelSettings::default(),
    }
}

/// An injector config on loopback ports chosen by the OS, serving the certificate in `cert_dir`.
pub fn inject_config(
    cert_dir: &std::path::Path,
    native: wsgate::inject::settings::NativeSidecar,
) -> wsgate::inject::InjectConfig {
    let mut settings = wsgate::inject::settings::InjectSettings::example();
    settings.native = native;
    wsgate::inject::InjectConfig {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        admin: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        cert_dir: cert_dir.to_path_buf(),
        settings,
        certificate_controller: true,
        reload: ReloadTiming {
            debounce: Duration::from_millis(50),
            ..ReloadTiming::default()
        },
        shutdown_delay: Duration::from_millis(300),
    }
}

/// A generous deadline for something that normally takes milliseconds.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `cond` every 5 ms until it holds, failing the test after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls `observe` every 5 ms until `done` accepts what it returns, and returns that value;
/// fails the test after `timeout`, showing the last value observed.
pub async fn until<T: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    mut observe: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let t0 = Instant::now();
    loop {
        let value = observe();
        if done(&value) {
            return value;
        }
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}; last observed: {value:#?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls the metrics text `metrics()` until `series` has the value `want`; fails after
/// [`DEADLINE`] showing the last value and the whole text.
pub async fn metric_becomes(what: &str, mut metrics: impl FnMut() -> String, series: &str, want: f64) {
    let t0 = Instant::now();
    loop {
        let text = metrics();
        let got = raw::metric(&text, series);
        if got == Some(want) {
            return;
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}: {series} is {got:?}, want {want}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the proxy serves `serial`.
pub async fn wait_serial(proxy: &ProxyHandle, serial: &str) {
    wait_serial_of(&proxy.store, serial).await;
}

/// Waits until `store` serves `serial`.
pub async fn wait_serial_of(store: &wsgate::tls::TlsStore, serial: &str) {
    eventually(&format!("serial {serial} served"), Duration::from_secs(10), || {
        store.current().is_some_and(|s| s.leaf.serial == serial)
    })
    .await;
}

/// The usual set-up: a CA, a Secret volume, the test app and a ready proxy in front of it.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub pki: Pki,
    pub vol: SecretVolume,
    pub server: Leaf,
    pub app: TestApp,
    pub proxy: ProxyHandle,
}

impl Env {
    pub async fn start(allow: &[&str]) -> Self {
        Self::start_with(allow, |_| {}).await
    }

    pub async fn start_with(allow: &[&str], tweak: impl FnOnce(&mut ProxyConfig)) -> Self {
        init_logs();
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let vol = SecretVolume::new(tmp.path().join("tls")).unwrap();
        let server = pki.server();
        write_set(&vol, &server, &pki.ca);
        let app = TestApp::start().await;
        let mut cfg = proxy_config(vol.path(), app.addr, allow);
        tweak(&mut cfg);
        let proxy = wsgate::proxy::start(cfg).await.unwrap();
        wait_serial(&proxy, &server.serial).await;
        Self {
            tmp,
            pki,
            vol,
            server,
            app,
            proxy,
        }
    }

    /// Connects as service account `sa` to `path`.
    pub async fn connect_as(&self, sa: &str, path: &str) -> Result<WssStream, ClientError> {
        let leaf = self.pki.client(sa);
        connect(
            self.proxy.listen_addr,
            self.pki.client_config(Some(&leaf)),
            "localhost",
            path,
        )
        .await
        .map(|(ws, _)| ws)
    }

    /// Connects as `leaf` to `path` with extra request headers; returns the app's answer too.
    pub async fn connect_with(
        &self,
        leaf: &Leaf,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(WssStream, http::Response<Option<Vec<u8>>>), tokio_tungstenite::tungstenite::Error> {
        let tcp = tokio::net::TcpStream::connect(self.proxy.listen_addr).await?;
        wss_over(tcp, self.pki.client_config(Some(leaf)), path, headers).await
    }

    /// Sends raw bytes over a TLS connection authenticated as `frontend`; returns the answer.
    pub async fn raw_tls(&self, request: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let leaf = self.pki.client("frontend");
        let tcp = tokio::net::TcpStream::connect(self.proxy.listen_addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(self.pki.client_config(Some(&leaf)))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let _ = tls.write_all(request).await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// The proxy's metrics text.
    pub fn metrics(&self) -> String {
        self.proxy.metrics.encode()
    }
}

/// A WebSocket over mTLS on `tcp` with `config` (which presents the client's certificate), to
/// `path` with extra request headers; returns the answer too. A refusal comes back as
/// `tungstenite::Error::Http`.
pub async fn wss_over(
    tcp: tokio::net::TcpStream,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(WssStream, http::Response<Option<Vec<u8>>>), tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect("localhost".try_into().unwrap(), tcp)
        .await?;
    let mut req = format!("wss://localhost{path}").into_client_request()?;
    for (k, v) in headers {
        req.headers_mut()
            .append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    tokio_tungstenite::client_async(req, tls).await
}

/// Sends `msg` and returns the next data message.
pub async fn roundtrip(
    ws: &mut WssStream,
    msg: tokio_tungstenite::tungstenite::Message,
) -> tokio_tungstenite::tungstenite::Message {
    use futures_util::{SinkExt, StreamExt};
    ws.send(msg).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("reply in time")
        {
            Some(Ok(m)) if m.is_text() || m.is_binary() => return m,
            Some(Ok(_)) => continue,
            other => panic!("expected a reply, got {other:?}"),
        }
    }
}
