//! The targets under comparison, each started as its own process (pinned with `taskset` when
//! asked) in front of the same echo app: the limit, wsgate with one worker and with two, nginx,
//! HAProxy and Caddy, configured alike (TLS 1.3, client certificates required and verified, no
//! session tickets, no access log, one worker).

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use wsgate::demo::volume::SecretVolume;

use crate::load::Client;
use crate::pki::{self, Pki};
use crate::procfs;

/// One kind of target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Kind {
    /// Direct rustls + tungstenite mTLS echo, no proxy hop: the floor.
    Limit,
    /// wsgate, one runtime worker.
    Wsgate,
    /// wsgate, two runtime workers (on all the CPUs given to the targets and the load).
    #[value(name = "wsgate-2w")]
    Wsgate2w,
    /// wsgate, one runtime worker, from the `--wsgate-base` binary: an A/B of two builds in one
    /// run (a change against the binary before it, copied aside).
    #[value(name = "wsgate-base")]
    WsgateBase,
    /// nginx, one worker process.
    Nginx,
    /// HAProxy, one thread.
    Haproxy,
    /// Caddy, GOMAXPROCS=1.
    Caddy,
}

impl Kind {
    /// The name in tables and files.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Limit => "limit",
            Kind::Wsgate => "wsgate",
            Kind::Wsgate2w => "wsgate-2w",
            Kind::WsgateBase => "wsgate-base",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
            Kind::Caddy => "caddy",
        }
    }

    /// One of the other proxies wsgate is compared with.
    pub fn is_peer(self) -> bool {
        matches!(self, Kind::Nginx | Kind::Haproxy | Kind::Caddy)
    }

    /// The program it needs on the PATH, if any.
    pub fn program(self) -> Option<&'static str> {
        match self {
            Kind::Nginx => Some("nginx"),
            Kind::Haproxy => Some("haproxy"),
            Kind::Caddy => Some("caddy"),
            _ => None,
        }
    }
}

/// What starting a target needs.
pub struct Env<'a> {
    /// This binary (it serves the limit).
    pub bench_exe: PathBuf,
    /// The wsgate binary.
    pub wsgate_exe: PathBuf,
    /// The baseline wsgate binary of the `wsgate-base` target, if one was given.
    pub wsgate_base_exe: Option<PathBuf>,
    /// The certificates.
    pub pki: &'a Pki,
    /// The echo app every proxy forwards to.
    pub echo: SocketAddr,
    /// The load side's processes: this one (the load generator) and the echo app.
    pub load_pids: Vec<u32>,
    /// The load generator's client settings (the target's address is filled in).
    pub client: Client,
    /// CPUs for a one-worker target (`taskset -c` list), or none to not pin.
    pub target_cpus: Option<String>,
    /// CPUs for the two-worker wsgate.
    pub all_cpus: Option<String>,
    /// Where each target's configuration and logs go.
    pub work: PathBuf,
    /// Most client connections a target must hold at once (its connection limits fit this).
    pub capacity: usize,
}

/// A running target; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Target {
    /// Which one.
    pub kind: Kind,
    /// Its mTLS listener.
    pub addr: SocketAddr,
    /// Its processes (nginx: master and worker).
    pub pids: Vec<u32>,
    /// wsgate's Secret volume, for certificate swaps.
    pub volume: Option<SecretVolume>,
    child: Child,
    dir: PathBuf,
}

impl Drop for Target {
    fn drop(&mut self) {
        signal("TERM", &self.pids[..1]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Workers that outlived their master (only ever our own processes, by PID).
        let left: Vec<u32> = self.pids[1..]
            .iter()
            .copied()
            .filter(|p| Path::new(&format!("/proc/{p}")).exists())
            .collect();
        signal("KILL", &left);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn signal(name: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status();
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A unique directory for one target instance.
fn instance_dir(env: &Env<'_>, kind: Kind) -> Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{}-", kind.name()))
        .tempdir_in(&env.work)?
        .keep();
    Ok(dir)
}

fn command(cpus: Option<&str>, program: &Path) -> Command {
    let mut cmd = match cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus]).arg(program);
            c
        }
        None => Command::new(program),
    };
    for (k, _) in std::env::vars() {
        if k.starts_with("WSGATE_") || k.starts_with("OTEL_") || k == "TOKIO_WORKER_THREADS" || k == "GOMAXPROCS" {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Starts `kind` and waits until a full handshake with an echo goes through it.
pub async fn start(env: &Env<'_>, kind: Kind) -> Result<Target> {
    let dir = instance_dir(env, kind)?;
    let cpus = env.target_cpus.as_deref();
    let log = || std::fs::File::create(dir.join("stderr.log"));
    let certs = env.pki.dir();
    let (child, addr, volume) = match kind {
        Kind::Limit => {
            let mut cmd = command(cpus, &env.bench_exe);
            cmd.arg("limit")
                .arg("--cert-dir")
                .arg(certs)
                .env("TOKIO_WORKER_THREADS", "1");
            let (child, addr) = spawn_reading_address(cmd, log()?)?;
            (child, addr, None)
        }
        Kind::Wsgate | Kind::Wsgate2w | Kind::WsgateBase => {
            let volume = SecretVolume::new(dir.join("tls"))?;
            env.pki.write_volume(&volume, None)?;
            let room = (env.capacity + 500).to_string();
            let workers = if kind == Kind::Wsgate2w { "2" } else { "1" };
            let cpus = if kind == Kind::Wsgate2w {
                env.all_cpus.as_deref()
            } else {
                cpus
            };
            let exe = match kind {
                Kind::WsgateBase => env
                    .wsgate_base_exe
                    .as_deref()
                    .context("the wsgate-base target needs --wsgate-base PATH")?,
                _ => env.wsgate_exe.as_path(),
            };
            let mut cmd = command(cpus, exe);
            cmd.args([
                "proxy",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .args(["--upstream", &format!("ws://{}", env.echo), "--allow-any-authenticated"])
            // Room for the idle-memory figure's connections (defaults: 10 000, a tenth per client).
            .args(["--max-connections", &room, "--max-connections-per-identity", &room])
            .arg("--cert-dir")
            .arg(volume.path())
            // No line per connection, as nginx runs with access_log off.
            .env("RUST_LOG", "info,wsgate::handshake=warn")
            .env("TOKIO_WORKER_THREADS", workers);
            let (child, addr) = spawn_wsgate(cmd, &dir)?;
            (child, addr, Some(volume))
        }
        Kind::Nginx | Kind::Haproxy | Kind::Caddy => {
            let port = free_port()?;
            let (program, args, envs) = peer_command(kind, &dir, certs, port, env)?;
            let mut cmd = command(cpus, Path::new(program));
            let log = log()?;
            cmd.args(args)
                .envs(envs)
                .current_dir(&dir)
                .stdout(log.try_clone()?)
                .stderr(log);
            let child = cmd.spawn().with_context(|| format!("starting {program}"))?;
            (child, SocketAddr::from(([127, 0, 0, 1], port)), None)
        }
    };
    let mut target = Target {
        kind,
        addr,
        pids: vec![child.id()],
        volume,
        child,
        dir,
    };
    target.wait_ready(&env.client).await?;
    target.pids = procfs::process_tree(target.child.id());
    Ok(target)
}

impl Target {
    async fn wait_ready(&mut self, client: &Client) -> Result<()> {
        let client = Client {
            addr: self.addr,
            tls: client.tls.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let err = match client.handshake_op(Instant::now()).await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}): {}", self.kind.name(), self.log_tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not serve within 30 s: {err:#}; {}",
                    self.kind.name(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The end of its log (the error log for nginx, HAProxy and Caddy).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
        let start = text.len().saturating_sub(2000);
        text.get(start..).unwrap_or_default().trim().to_owned()
    }

    /// This target's client.
    pub fn client(&self, base: &Client) -> Client {
        Client {
            addr: self.addr,
            tls: base.tls.clone(),
        }
    }
}

/// Spawns a server that prints `listening ADDR` first (the limit).
fn spawn_reading_address(mut cmd: Command, log: std::fs::File) -> Result<(Child, SocketAddr)> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(log).spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("no stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let addr = crate::servers::parse_listening(&line).with_context(|| format!("no address in {line:?}"))?;
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
    });
    Ok((child, addr))
}

/// Spawns wsgate and reads its JSON log until the certificate is installed.
fn spawn_wsgate(mut cmd: Command, dir: &Path) -> Result<(Child, SocketAddr)> {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting wsgate")?;
    let mut lines = BufReader::new(child.stderr.take().context("no stderr")?).lines();
    let mut log = std::fs::File::create(dir.join("stderr.log"))?;
    let mut listen = None;
    for line in lines.by_ref() {
        let line = line?;
        std::io::Write::write_all(&mut log, format!("{line}\n").as_bytes())?;
        if line.contains("wsgate proxy started") {
            let v: serde_json::Value = serde_json::from_str(&line)?;
            listen = v["listen"].as_str().and_then(|s| s.parse().ok());
        }
        if line.contains("certificate installed") {
            break;
        }
    }
    let addr = listen.context("wsgate did not say where it listens")?;
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = std::io::Write::write_all(&mut log, format!("{line}\n").as_bytes());
        }
    });
    Ok((child, addr))
}

type PeerCommand = (&'static str, Vec<String>, Vec<(&'static str, String)>);

/// Writes the configuration of nginx, HAProxy or Caddy into `dir` and says how to run it.
fn peer_command(kind: Kind, dir: &Path, certs: &Path, port: u16, env: &Env<'_>) -> Result<PeerCommand> {
    let echo = env.echo;
    // Both legs of every connection, and room: nginx ran out at twice the connections.
    let (conns, files) = (env.capacity + 500, 4 * env.capacity + 1000);
    let path = |name: &str| certs.join(name).display().to_string();
    let (ca, crt, key, pem) = (
        path(pki::CA),
        path(pki::SERVER_CERT),
        path(pki::SERVER_KEY),
        path(pki::SERVER_PEM),
    );
    let d = dir.display();
    Ok(match kind {
        Kind::Nginx => {
            let conf = format!(
                r#"worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/stderr.log warn;
worker_rlimit_nofile {files};
events {{ worker_connections {files}; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {crt};
    ssl_certificate_key {key};
    ssl_client_certificate {ca};
    ssl_verify_client on;
    ssl_protocols TLSv1.3;
    ssl_ecdh_curve X25519;
    ssl_session_tickets off;
    location / {{
      proxy_pass http://{echo};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_set_header X-Client-Subject $ssl_client_s_dn;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }}
  }}
}}
"#
            );
            std::fs::write(dir.join("nginx.conf"), conf)?;
            let args = vec![
                "-p".into(),
                format!("{d}/"),
                "-c".into(),
                format!("{d}/nginx.conf"),
                "-e".into(),
                format!("{d}/stderr.log"),
            ];
            ("nginx", args, vec![])
        }
        Kind::Haproxy => {
            let conf = format!(
                r#"global
  nbthread 1
  maxconn {conns}
  tune.ssl.cachesize 0
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend wss
  bind 127.0.0.1:{port} ssl crt {pem} ca-file {ca} verify required ssl-min-ver TLSv1.3 curves X25519 no-tls-tickets
  maxconn {conns}
  http-request set-header X-Client-Subject %[ssl_c_s_dn]
  default_backend app
backend app
  server echo {echo}
"#
            );
            std::fs::write(dir.join("haproxy.cfg"), conf)?;
            (
                "haproxy",
                vec!["-db".into(), "-f".into(), format!("{d}/haproxy.cfg")],
                vec![],
            )
        }
        Kind::Caddy => {
            let conf = format!(
                r#"{{
  admin off
  auto_https off
  servers {{
    protocols h1
  }}
}}
https://localhost:{port} {{
  bind 127.0.0.1
  tls {crt} {key} {{
    protocols tls1.3
    curves x25519
    client_auth {{
      mode require_and_verify
      trusted_ca_cert_file {ca}
    }}
  }}
  reverse_proxy {echo} {{
    header_up X-Client-Subject {{tls_client_subject}}
  }}
}}
"#
            );
            std::fs::write(dir.join("Caddyfile"), conf)?;
            let args = ["run", "--adapter", "caddyfile", "--config"]
                .map(String::from)
                .into_iter()
                .chain([format!("{d}/Caddyfile")])
                .collect();
            let envs = vec![
                ("GOMAXPROCS", "1".to_owned()),
                ("HOME", d.to_string()),
                ("XDG_DATA_HOME", format!("{d}/data")),
                ("XDG_CONFIG_HOME", format!("{d}/config")),
            ];
            ("caddy", args, envs)
        }
        _ => bail!("{} is not a peer proxy", kind.name()),
    })
}

/// Starts the echo app (this binary's `echo` command) on `cpus`.
pub fn start_echo(bench_exe: &Path, cpus: Option<&str>, log: &Path) -> Result<(Child, SocketAddr)> {
    let mut cmd = command(cpus, bench_exe);
    cmd.arg("echo");
    spawn_reading_address(cmd, std::fs::File::create(log)?)
}
