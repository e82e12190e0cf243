//! The run's certificates, minted with rcgen (ECDSA P-256): a CA, a server certificate for
//! `localhost` and 127.0.0.1, a client certificate with a SPIFFE URI SAN; written as the files
//! nginx, HAProxy, Caddy and the limit read, and as a kubelet-style Secret volume for wsgate.
//! Also the load generator's client config. Uses wsgate's demo PKI and volume writer.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::{CipherSuite, ClientConfig, NamedGroup};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use wsgate::demo::pki::{Ca, Leaf, LeafSpec};
use wsgate::demo::volume::SecretVolume;

/// The files every target is configured with, in one directory.
pub const CA: &str = "ca.crt";
/// The server certificate, PEM.
pub const SERVER_CERT: &str = "server.crt";
/// The server key, PKCS#8 PEM.
pub const SERVER_KEY: &str = "server.key";
/// Certificate and key in one PEM file (HAProxy's `crt`).
pub const SERVER_PEM: &str = "server.pem";

/// The CA, the current server leaf and the client's identity.
pub struct Pki {
    ca: Ca,
    dir: PathBuf,
    server: Leaf,
    client: Leaf,
}

impl Pki {
    /// Mints everything and writes the files into `dir`.
    pub fn create(dir: &Path) -> Result<Self> {
        let ca = Ca::new("wsgate-bench CA")?;
        let server = Self::mint_server(&ca)?;
        let client = ca.leaf(&LeafSpec::new("bench-client").uri("spiffe://bench.local/ns/bench/sa/client"))?;
        std::fs::create_dir_all(dir)?;
        let pem = format!("{}{}", server.cert_pem, server.key_pem);
        for (name, bytes) in [
            (CA, ca.cert_pem.as_str()),
            (SERVER_CERT, server.cert_pem.as_str()),
            (SERVER_KEY, server.key_pem.as_str()),
            (SERVER_PEM, pem.as_str()),
        ] {
            std::fs::write(dir.join(name), bytes).with_context(|| format!("writing {name}"))?;
        }
        Ok(Self {
            ca,
            dir: dir.to_owned(),
            server,
            client,
        })
    }

    fn mint_server(ca: &Ca) -> Result<Leaf> {
        let spec = LeafSpec::new("localhost")
            .uri("spiffe://bench.local/ns/bench/sa/app")
            .dns("localhost")
            .ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        Ok(ca.leaf(&spec)?)
    }

    /// The directory holding `ca.crt`, `server.crt`, `server.key` and `server.pem`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new server leaf from the same CA (for certificate swaps).
    pub fn new_server_leaf(&self) -> Result<Leaf> {
        Self::mint_server(&self.ca)
    }

    /// Writes `leaf` (the current server leaf if `None`) into a Secret volume the kubelet way.
    pub fn write_volume(&self, volume: &SecretVolume, leaf: Option<&Leaf>) -> Result<()> {
        let leaf = leaf.unwrap_or(&self.server);
        volume.write(&[
            ("ca.crt", self.ca.cert_pem.as_bytes()),
            ("tls.crt", leaf.cert_pem.as_bytes()),
            ("tls.key", leaf.key_pem.as_bytes()),
        ])?;
        Ok(())
    }

    /// The load generator's client: TLS 1.3 only, AES-128-GCM and X25519 only (so every target
    /// negotiates the same), the client certificate, and no session resumption (every
    /// handshake is a full one). The crypto provider is wsgate's.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let base = wsgate::tls::provider();
        let provider = CryptoProvider {
            cipher_suites: base
                .cipher_suites
                .iter()
                .filter(|s| s.suite() == CipherSuite::TLS13_AES_128_GCM_SHA256)
                .copied()
                .collect(),
            kx_groups: base
                .kx_groups
                .iter()
                .filter(|g| g.name() == NamedGroup::X25519)
                .copied()
                .collect(),
            ..(*base).clone()
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.cert_der.clone())?;
        let chain = CertificateDer::pem_slice_iter(self.client.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(self.client.key_pem.as_bytes())?;
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        config.resumption = Resumption::disabled();
        Ok(Arc::new(config))
    }
}
