//! Hostile and unqualified clients on the TLS port: each is refused with the right TLS alert,
//! counted under its error.type, and nobody else is disturbed.

use std::time::{Duration, SystemTime};

use rustls::AlertDescription;

use crate::support::raw::{exchange, metric};
use crate::support::{Ca, ClientError, Env, LeafSpec, Pki, connect, roundtrip, spiffe};

/// The TLS alert the server sent, wherever in the client's steps it surfaced (with TLS 1.3 the
/// client learns that its certificate was refused on its first read).
fn alert(err: &ClientError) -> Option<AlertDescription> {
    let io = match err {
        ClientError::Tls(e) => Some(e),
        ClientError::Upgrade(e) => match e.as_ref() {
            tokio_tungstenite::tungstenite::Error::Io(e) => Some(e),
            _ => None,
        },
        _ => None,
    }?;
    match io.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

fn failures(env: &Env, error_type: &str) -> f64 {
    metric(
        &env.metrics(),
        &format!("wsgate_handshakes_total{{result=\"failure\",error_type=\"{error_type}\",direction=\"inbound\"}}"),
    )
    .unwrap_or(0.0)
}

async fn env() -> Env {
    let allow = spiffe("frontend");
    Env::start(&[allow.as_str()]).await
}

/// Connects with a certificate signed by `ca` that the proxy is expected to refuse.
async fn refused(env: &Env, cert: &crate::support::Leaf) -> ClientError {
    let cfg = crate::support::client_config(
        Some((cert.cert_pem.as_str(), cert.key_pem.as_str())),
        std::slice::from_ref(&env.pki.ca.cert_der),
    )
    .unwrap();
    match connect(env.proxy.listen_addr, cfg, "localhost", "/").await {
        Ok(_) => panic!("a client that should be refused got in"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_gets_certificate_required() {
    let env = env().await;
    let err = connect(env.proxy.listen_addr, env.pki.client_config(None), "localhost", "/")
        .await
        .unwrap_err();
    assert_eq!(alert(&err), Some(AlertDescription::CertificateRequired), "{err}");
    crate::support::eventually("counted", Duration::from_secs(5), || {
        failures(&env, "no_client_certificate") == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_gets_unknown_ca() {
    let env = env().await;
    let other = Ca::new("another CA").unwrap();
    let stranger = other.leaf(&LeafSpec::new("frontend").uri(&spiffe("frontend"))).unwrap();
    let err = refused(&env, &stranger).await;
    assert_eq!(alert(&err), Some(AlertDescription::UnknownCA), "{err}");
    crate::support::eventually("counted", Duration::from_secs(5), || {
        failures(&env, "unknown_ca") == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_gets_certificate_expired() {
    let env = env().await;
    let now = SystemTime::now();
    let spec = LeafSpec::new("frontend")
        .uri(&spiffe("frontend"))
        .valid(now - Duration::from_secs(7200), now - Duration::from_secs(3600));
    let expired = env.pki.ca.leaf(&spec).unwrap();
    let err = refused(&env, &expired).await;
    assert_eq!(alert(&err), Some(AlertDescription::CertificateExpired), "{err}");
    crate::support::eventually("counted", Duration::from_secs(5), || {
        failures(&env, "certificate_expired") == 1.0
    })
    .await;
}

/// wsgate remembers the client chains it has verified (`tls::chain_cache`); a remembered chain
/// must still be refused once it has expired, exactly as a chain never seen before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_admitted_before_is_refused_once_it_expires() {
    let env = env().await;
    let now = SystemTime::now();
    let not_after = now + Duration::from_secs(3);
    let spec = LeafSpec::new("frontend")
        .uri(&spiffe("frontend"))
        .valid(now - Duration::from_secs(3600), not_after);
    let leaf = env.pki.ca.leaf(&spec).unwrap();
    let cfg = crate::support::client_config(
        Some((leaf.cert_pem.as_str(), leaf.key_pem.as_str())),
        std::slice::from_ref(&env.pki.ca.cert_der),
    )
    .unwrap();
    for round in 0..2 {
        let (mut ws, _) = connect(env.proxy.listen_addr, cfg.clone(), "localhost", "/")
            .await
            .unwrap_or_else(|e| panic!("round {round}: a valid certificate was refused: {e}"));
        let reply = roundtrip(&mut ws, format!("admitted {round}").into()).await;
        assert_eq!(reply.to_text().unwrap(), format!("admitted {round}"));
        ws.close(None).await.unwrap();
    }
    // notAfter has one-second resolution: wait until it has surely passed.
    let wait = not_after.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_secs(2);
    tokio::time::sleep(wait).await;
    let err = refused(&env, &leaf).await;
    assert_eq!(alert(&err), Some(AlertDescription::CertificateExpired), "{err}");
    crate::support::eventually("counted", Duration::from_secs(5), || {
        failures(&env, "certificate_expired") == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_yet_valid_client_certificate_is_refused() {
    let env = env().await;
    let now = SystemTime::now();
    let spec = LeafSpec::new("frontend")
        .uri(&spiffe("frontend"))
        .valid(now + Duration::from_secs(3600), now + Duration::from_secs(7200));
    let early = env.pki.ca.leaf(&spec).unwrap();
    let err = refused(&env, &early).await;
    // TLS has one alert for both: "certificate_expired: expired or not currently valid".
    assert_eq!(alert(&err), Some(AlertDescription::CertificateExpired), "{err}");
    crate::support::eventually("counted", Duration::from_secs(5), || {
        failures(&env, "certificate_not_yet_valid") == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_without_client_auth_usage_is_refused() {
    let env = env().await;
    let spec = LeafSpec::new("frontend").uri(&spiffe("frontend")).usages(true, false);
    let server_only = env.pki.ca.leaf(&spec).unwrap();
    let err = refused(&env, &server_only).await;
    assert_eq!(alert(&err), Some(AlertDescription::UnsupportedCertificate), "{err}");
    crate::support::eventually("counted", Duration::from_secs(5), || {
        failures(&env, "bad_certificate_usage") == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_the_tls_port_is_refused_as_not_tls() {
    let env = env().await;
    let reply = exchange(env.proxy.listen_addr, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    // Whatever comes back is a TLS alert record (content type 21), never an HTTP answer.
    assert!(reply.is_empty() || reply[0] == 21, "{reply:?}");
    crate::support::eventually("counted", Duration::from_secs(5), || failures(&env, "not_tls") == 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_on_the_tls_port_are_refused_as_not_tls() {
    let env = env().await;
    let mut junk = vec![0u8; 4096];
    aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut junk).unwrap();
    junk[0] = 0x99; // not a TLS content type
    let reply = exchange(env.proxy.listen_addr, &junk).await;
    assert!(reply.is_empty() || reply[0] == 21, "{reply:?}");
    crate::support::eventually("counted", Duration::from_secs(5), || failures(&env, "not_tls") == 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_the_handshake_is_timed_out() {
    let allow = spiffe("frontend");
    let env = Env::start_with(&[allow.as_str()], |cfg| {
        cfg.handshake_timeout = Duration::from_millis(300)
    })
    .await;
    let mut idle = tokio::net::TcpStream::connect(env.proxy.listen_addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut idle, &mut buf),
    )
    .await
    .expect("the proxy closed the idle connection")
    .unwrap_or(0);
    assert_eq!(n, 0, "expected EOF");
    crate::support::eventually("counted", Duration::from_secs(5), || {
        failures(&env, "handshake_timeout") == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_clients_do_not_disturb_an_open_connection_or_new_ones() {
    let env = env().await;
    let mut ws = env.connect_as("frontend", "/").await.unwrap();
    let other = Pki::new();
    let stranger = other.client("frontend");
    for round in 0..10 {
        let _ = exchange(env.proxy.listen_addr, b"\x16\x03\x01\x00\x05hello").await;
        let _ = connect(env.proxy.listen_addr, env.pki.client_config(None), "localhost", "/").await;
        let _ = refused(&env, &stranger).await;
        let reply = roundtrip(&mut ws, format!("still fine {round}").into()).await;
        assert_eq!(reply.to_text().unwrap(), format!("still fine {round}"));
    }
    let mut fresh = env.connect_as("frontend", "/").await.unwrap();
    assert_eq!(roundtrip(&mut fresh, "new".into()).await.to_text().unwrap(), "new");
}

/// A TLS 1.2-only client is refused by default (minimum 1.3) and admitted with 1.2 allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_minimum_tls_version_is_enforced() {
    let allow = spiffe("frontend");
    let tls12_only = |env: &Env| {
        let leaf = env.pki.client("frontend");
        let chain = vec![leaf.cert_der.clone()];
        let key = <rustls::pki_types::PrivateKeyDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
            leaf.key_pem.as_bytes(),
        )
        .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(env.pki.ca.cert_der.clone()).unwrap();
        std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(wsgate::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS12])
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .unwrap(),
        )
    };
    let strict = Env::start(&[allow.as_str()]).await;
    let err = connect(strict.proxy.listen_addr, tls12_only(&strict), "localhost", "/")
        .await
        .unwrap_err();
    assert_eq!(alert(&err), Some(AlertDescription::ProtocolVersion), "{err}");
    crate::support::eventually("counted", Duration::from_secs(5), || {
        failures(&strict, "tls_protocol_error") == 1.0
    })
    .await;

    let lenient = Env::start_with(&[allow.as_str()], |cfg| {
        cfg.tls_min_version = wsgate::tls::TlsMinVersion::Tls12;
    })
    .await;
    let (mut ws, _) = connect(lenient.proxy.listen_addr, tls12_only(&lenient), "localhost", "/")
        .await
        .unwrap();
    assert_eq!(roundtrip(&mut ws, "tls12".into()).await.to_text().unwrap(), "tls12");
}
