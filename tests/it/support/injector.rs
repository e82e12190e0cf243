//! The real `wsgate inject` binary, ready to answer reviews over HTTPS on 127.0.0.1, with its
//! serving certificate in a kubelet-style Secret volume, no API server and no controller.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use wsgate::demo::pki::Leaf;

use super::bin::Proc;
use super::raw::http;
use super::{Pki, SecretVolume, write_set};

/// A running injector.
pub struct Injector {
    _tmp: tempfile::TempDir,
    /// The process.
    pub proc: Proc,
    /// The CA of its serving certificate.
    pub pki: Pki,
    /// The webhook's address.
    pub listen: SocketAddr,
    /// The admin address.
    pub admin: SocketAddr,
}

impl Injector {
    /// An injector serving the PKI's usual server certificate.
    pub async fn start() -> Self {
        Self::start_serving(|pki| pki.server()).await
    }

    /// An injector serving the certificate `leaf` makes from a fresh PKI; returns once ready.
    pub async fn start_serving(leaf: impl FnOnce(&Pki) -> Leaf) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let vol = SecretVolume::new(tmp.path().join("webhook-tls")).unwrap();
        write_set(&vol, &leaf(&pki), &pki.ca);
        let cert_dir = vol.path().to_str().unwrap().to_owned();
        let proc = Proc::spawn(
            &[
                "inject",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--cert-dir",
                &cert_dir,
                "--sidecar-image",
                "ghcr.io/wsgate/wsgate:0.1.0",
                "--certificate-controller",
                "false",
                "--native-sidecar",
                "off",
            ],
            &[],
        );
        let started = proc.line("wsgate injector started", Duration::from_secs(20)).await;
        let listen: SocketAddr = started["listen"].as_str().unwrap().parse().unwrap();
        let admin: SocketAddr = started["admin"].as_str().unwrap().parse().unwrap();
        let t0 = Instant::now();
        while http(admin, "GET", "/readyz").await.0 != 200 {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the injector never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            _tmp: tmp,
            proc,
            pki,
            listen,
            admin,
        }
    }
}
