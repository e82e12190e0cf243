//! Runs the real `wsgate` binary and reads its JSON log lines.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("WSGATE_") || k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs the binary to completion (at most 20 s) and returns (exit code, stdout, stderr).
pub fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut child = command(args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("wsgate {args:?} did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A long-running wsgate process, killed on drop if still alive.
pub struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = command(args, env)
            .arg("--log-format")
            .arg("json")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, lines }
    }

    /// `wsgate proxy` on loopback ports chosen by the OS, in front of `upstream`, plus `extra`.
    pub fn proxy(upstream: std::net::SocketAddr, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let upstream = format!("ws://{upstream}");
        let mut args = vec![
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
        ];
        args.extend_from_slice(extra);
        Self::spawn(&args, env)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first log line containing `needle`, waiting up to `timeout`.
    pub async fn line(&self, needle: &str, timeout: Duration) -> serde_json::Value {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"));
            }
            assert!(
                t0.elapsed() < timeout,
                "no log line with {needle:?} within {timeout:?}; got:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// All log lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The listener and admin addresses from the start-up line.
    pub async fn addrs(&self) -> (SocketAddr, SocketAddr) {
        let started = self.line("wsgate proxy started", Duration::from_secs(20)).await;
        let listen = started["listen"].as_str().unwrap().parse().unwrap();
        let admin = started["admin"].as_str().unwrap().parse().unwrap();
        (listen, admin)
    }

    /// Sends SIGTERM.
    pub fn term(&self) {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the process to exit.
    pub async fn exit(&mut self, timeout: Duration) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(t0.elapsed() < timeout, "wsgate did not exit within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
