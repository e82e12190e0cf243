//! `wsgate demo`: the whole product on one machine with throwaway certificates, in seconds.
//!
//! Mints a CA and certificates, lays them out as the kubelet lays out a Secret volume, starts an
//! echo app and the real proxy in front of it, connects a client, rotates the certificates under
//! an open connection, and shows refused clients. Then both directions: a second proxy, the
//! client pod's sidecar in outbound mode, lets an app that speaks plain `ws://` reach the echo app
//! over mTLS, identities checked both ways. Uses only the library's public API.

pub mod client;
pub mod echo;
pub mod pki;
pub mod volume;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::authz::Policy;
use crate::certs::ReloadTiming;
use crate::proxy::settings::{Limits, Outbound, ProxyConfig, Upstream};
use crate::tls::TlsMinVersion;
use client::{WssStream, connect};
use pki::{Ca, Leaf, LeafSpec};
use volume::SecretVolume;

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A step did not go as it should.
    #[error("demo step failed: {0}")]
    Step(String),
}

fn step(e: impl std::fmt::Display) -> DemoError {
    DemoError::Step(e.to_string())
}

const TRUST_DOMAIN: &str = "demo.wsgate.local";

fn spiffe(sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/demo/sa/{sa}")
}

fn server_leaf(ca: &Ca) -> Result<Leaf, DemoError> {
    ca.leaf(
        &LeafSpec::new("app")
            .uri(&spiffe("app"))
            .dns("localhost")
            .ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    )
    .map_err(step)
}

fn write_secret(vol: &SecretVolume, leaf: &Leaf, ca: &Ca) -> Result<(), DemoError> {
    vol.write(&[
        ("ca.crt", ca.cert_pem.as_bytes()),
        ("tls.crt", leaf.cert_pem.as_bytes()),
        ("tls.key", leaf.key_pem.as_bytes()),
    ])
    .map_err(step)
}

fn client_config(leaf: Option<&Leaf>, trust: &Ca) -> Result<Arc<rustls::ClientConfig>, DemoError> {
    client::config(
        leaf.map(|l| (l.cert_pem.as_str(), l.key_pem.as_str())),
        std::slice::from_ref(&trust.cert_der),
    )
    .map_err(step)
}

async fn echo(ws: &mut WssStream, text: &str) -> Result<String, DemoError> {
    ws.send(Message::text(text)).await.map_err(step)?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(step(e)),
            None => return Err(step("connection closed")),
        }
    }
}

async fn wait_for_serial(handle: &crate::proxy::ProxyHandle, serial: &str) -> Result<Duration, DemoError> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if handle.store.current().is_some_and(|s| s.leaf.serial == serial) {
            return Ok(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(step(format!("the proxy did not pick up serial {serial} within 10s")))
}

fn short(serial: &str) -> &str {
    &serial[..serial.len().min(12)]
}

/// Runs the demo and prints what happens.
pub async fn run() -> Result<(), DemoError> {
    let t_start = Instant::now();
    println!("wsgate demo: the mTLS WebSocket sidecar, on this machine, with throwaway certificates\n");
    let tmp = tempfile::tempdir().map_err(step)?;
    let ca = Ca::new("wsgate demo CA").map_err(step)?;
    let first = server_leaf(&ca)?;
    let vol = SecretVolume::new(tmp.path().join("tls")).map_err(step)?;
    write_secret(&vol, &first, &ca)?;
    println!(
        "1. Minted a CA and a certificate for {} (serial {}…)",
        spiffe("app"),
        short(&first.serial)
    );
    println!(
        "   written as the kubelet writes a Secret volume: {}/{{..data → ..<timestamp>/, tls.crt, tls.key, ca.crt}}",
        vol.path().display()
    );

    let app = echo::start().await.map_err(step)?;
    let upstream = Upstream::parse(&format!("ws://{app}"), false).map_err(step)?;
    let cfg = proxy_config(&vol, Some(upstream), Outbound::default())?;
    let handle = crate::proxy::start(cfg).await.map_err(step)?;
    wait_for_serial(&handle, &first.serial).await?;
    println!(
        "2. Echo app on ws://{app}; wsgate proxy on wss://{} (admin http://{})",
        handle.listen_addr, handle.admin_addr
    );
    println!("   allow-list: {}", spiffe("client"));

    let client_leaf = ca.leaf(&LeafSpec::new("client").uri(&spiffe("client"))).map_err(step)?;
    let client_cfg = client_config(Some(&client_leaf), &ca)?;
    let (mut ws, served) = connect(handle.listen_addr, client_cfg.clone(), "localhost", "/chat")
        .await
        .map_err(step)?;
    let served_serial = served.map(|s| s.serial).unwrap_or_default();
    let reply = echo(&mut ws, "hello through mTLS").await?;
    let who = echo(&mut ws, "whoami").await?;
    println!(
        "3. Client {} connected (server serial {}…)",
        spiffe("client"),
        short(&served_serial)
    );
    println!("   sent \"hello through mTLS\", app echoed \"{reply}\"");
    println!(
        "   the app saw X-Forwarded-Client-Cert: {}…",
        &who[..who.len().min(100)]
    );

    let second = server_leaf(&ca)?;
    write_secret(&vol, &second, &ca)?;
    let took = wait_for_serial(&handle, &second.serial).await?;
    println!(
        "4. Rotated the certificate the kubelet way (new key, serial {}…); swapped in {} ms",
        short(&second.serial),
        took.as_millis()
    );
    let reply = echo(&mut ws, "still here after rotation").await?;
    println!("   the open connection kept working: app echoed \"{reply}\"");
    let (mut ws2, served2) = connect(handle.listen_addr, client_cfg.clone(), "localhost", "/chat")
        .await
        .map_err(step)?;
    let new_serial = served2.map(|s| s.serial).unwrap_or_default();
    if new_serial != second.serial {
        return Err(step(format!(
            "a new handshake saw serial {new_serial}, expected {}",
            second.serial
        )));
    }
    echo(&mut ws2, "new connection").await?;
    println!("   a new handshake was served the new serial {}…", short(&new_serial));

    let refused_anon = connect(handle.listen_addr, client_config(None, &ca)?, "localhost", "/chat").await;
    // The stranger trusts our CA (so it accepts the server), but its own certificate is foreign.
    let other_ca = Ca::new("some other CA").map_err(step)?;
    let stranger = other_ca
        .leaf(&LeafSpec::new("stranger").uri(&spiffe("client")))
        .map_err(step)?;
    let refused_stranger = connect(
        handle.listen_addr,
        client_config(Some(&stranger), &ca)?,
        "localhost",
        "/chat",
    )
    .await;
    let wrong_sa = ca
        .leaf(&LeafSpec::new("intruder").uri(&spiffe("intruder")))
        .map_err(step)?;
    let refused_sa = connect(
        handle.listen_addr,
        client_config(Some(&wrong_sa), &ca)?,
        "localhost",
        "/chat",
    )
    .await;
    let describe = |r: Result<(WssStream, _), client::ClientError>| match r {
        Ok(_) => Err(step("a client that should have been refused got in")),
        Err(e) => Ok(e.to_string()),
    };
    println!("5. Refused, as they should be:");
    println!("   no client certificate       → {}", describe(refused_anon)?);
    println!("   certificate from another CA → {}", describe(refused_stranger)?);
    println!("   {} → {}", spiffe("intruder"), describe(refused_sa)?);

    for mut conn in [ws, ws2] {
        // Close, then read until the proxy closes the connection too.
        let _ = conn.close(None).await;
        while let Some(Ok(_)) = conn.next().await {}
    }
    both_directions(&ca, tmp.path(), handle.listen_addr).await?;
    handle.drain();
    handle.wait().await;
    println!(
        "\nDone in {:.1} s: one rotation, no dropped connection, four refusals, both directions.",
        t_start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The proxy's configuration for the demo: `vol`'s certificate, only `client` allowed in.
fn proxy_config(vol: &SecretVolume, upstream: Option<Upstream>, outbound: Outbound) -> Result<ProxyConfig, DemoError> {
    Ok(ProxyConfig {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        upstream,
        outbound,
        cert_dir: vol.path().to_path_buf(),
        trust_bundle: None,
        policy: Policy::new(&[spiffe("client")], false).map_err(step)?,
        admin: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        tls_min_version: TlsMinVersion::Tls13,
        handshake_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(5),
        limits: Limits::default(),
        reload: ReloadTiming::default(),
        // OTEL_EXPORTER_OTLP_ENDPOINT=… wsgate demo sends the demo's spans to a collector.
        otel: crate::telemetry::OtelSettings::from_env(),
    })
}

/// Plain `ws://` from an app that has no TLS code, to `local` (its own sidecar's outbound
/// listener): the echo of `text` and what the far app saw as the caller, or the status of the
/// refusal.
async fn plain_ws(local: SocketAddr, text: &str) -> Result<Result<(String, String), u16>, DemoError> {
    use tokio_tungstenite::tungstenite::Error;
    let tcp = tokio::net::TcpStream::connect(local).await.map_err(step)?;
    let mut ws = match tokio_tungstenite::client_async(format!("ws://{local}/chat"), tcp).await {
        Ok((ws, _)) => ws,
        Err(Error::Http(answer)) => return Ok(Err(answer.status().as_u16())),
        Err(e) => return Err(step(e)),
    };
    let mut ask = async |what: &str| -> Result<String, DemoError> {
        ws.send(Message::text(what)).await.map_err(step)?;
        while let Some(msg) = ws.next().await {
            if let Message::Text(t) = msg.map_err(step)? {
                return Ok(t.to_string());
            }
        }
        Err(step("connection closed"))
    };
    let reply = ask(text).await?;
    let who = ask("whoami").await?;
    let _ = ws.close(None).await;
    while let Some(Ok(_)) = ws.next().await {}
    Ok(Ok((reply, who)))
}

/// Step 6: the client pod gets its own sidecar in outbound mode, with its own certificate
/// (`spiffe(client)`), dialing the first proxy (`remote`): its app speaks plain `ws://` on
/// loopback, and each side checks the other's identity.
async fn both_directions(ca: &Ca, dir: &std::path::Path, remote: SocketAddr) -> Result<(), DemoError> {
    let vol = SecretVolume::new(dir.join("client-tls")).map_err(step)?;
    let leaf = ca.leaf(&LeafSpec::new("client").uri(&spiffe("client"))).map_err(step)?;
    write_secret(&vol, &leaf, ca)?;
    let target = format!("wss://localhost:{}", remote.port());
    let routes = [format!("127.0.0.1:0={target}"), format!("127.0.0.2:0={target}")];
    let expects = [
        format!("127.0.0.1:0={}", spiffe("app")),
        format!("127.0.0.2:0={}", spiffe("payments")),
    ];
    let outbound = Outbound {
        routes: Outbound::parse_routes(&routes, &expects, false).map_err(step)?,
        ..Outbound::default()
    };
    let handle = crate::proxy::start(proxy_config(&vol, None, outbound)?)
        .await
        .map_err(step)?;
    wait_for_serial(&handle, &leaf.serial).await?;
    let [good, wrong] = handle.outbound_addrs[..] else {
        return Err(step("the outbound proxy did not bind both routes"));
    };
    println!(
        "6. Both directions: the client's pod gets its own sidecar, outbound only, as {}",
        spiffe("client")
    );
    println!(
        "   its app dials plain ws://{good}; the sidecar dials {target} with mTLS, expecting {}",
        spiffe("app")
    );
    let (reply, who) = plain_ws(good, "hello without TLS code")
        .await?
        .map_err(|status| step(format!("the outbound route answered {status}")))?;
    if !who.contains(&spiffe("client")) {
        return Err(step(format!("the far app did not see the client's identity: {who}")));
    }
    println!(
        "   app echoed \"{reply}\"; the far app saw the caller as {}",
        spiffe("client")
    );
    match plain_ws(wrong, "hello").await? {
        Ok(_) => return Err(step("a route expecting another identity got through")),
        Err(status) => println!(
            "   a route expecting {} → refused with {status}: the server is {}",
            spiffe("payments"),
            spiffe("app")
        ),
    }
    handle.drain();
    handle.wait().await;
    Ok(())
}
