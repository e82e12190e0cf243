//! The comparison: starts the echo app and every target, runs each measurement on every target
//! in turn (A B C D in odd rounds, D C B A in even ones), and writes the raw results, the
//! machine description and the table of medians.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use crate::load::{self, Client, Load, Pace, SwapWatch};
use crate::pki::Pki;
use crate::procfs::{self, CpuSnapshot};
use crate::report::{self, Better, Figure, Record};
use crate::targets::{self, Env, Kind, Target};

/// Flags of `wsgate-bench run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Targets, in the order of odd rounds.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "limit,wsgate,wsgate-2w,nginx,haproxy,caddy"
    )]
    pub targets: Vec<Kind>,
    /// Rounds; the table shows each figure's median over them.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Where the results go (default: bench/results/<UTC timestamp>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The wsgate binary (default: `wsgate` next to this binary).
    #[arg(long)]
    pub wsgate: Option<PathBuf>,
    /// The binary of the `wsgate-base` target: another wsgate build (say, the one before a
    /// change, copied aside) measured in the same run, interleaved with the others.
    #[arg(long)]
    pub wsgate_base: Option<PathBuf>,
    /// Measurements to run (default: all); e.g. `--measures small-fixed,large-fixed` for the
    /// CPU per message alone. Certificate swaps are set apart by `--swaps`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "handshakes,small-fixed,large-fixed,small-saturated,large-saturated,latency,idle-memory"
    )]
    pub measures: Vec<Measure>,
    /// `taskset -c` CPU list for each one-worker target (default: not pinned).
    #[arg(long)]
    pub target_cpus: Option<String>,
    /// `taskset -c` CPU list of the load generator and the echo app; the two-worker wsgate gets
    /// these and --target-cpus. The load generator pins itself only through its caller.
    #[arg(long)]
    pub load_cpus: Option<String>,
    /// Seconds each measurement window lasts.
    #[arg(long, default_value_t = 5.0)]
    pub secs: f64,
    /// Seconds of load before each window.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Concurrent clients of the handshake figure.
    #[arg(long, default_value_t = 16)]
    pub handshake_clients: usize,
    /// Connections of the message figures.
    #[arg(long, default_value_t = 4)]
    pub message_conns: usize,
    /// Fixed rate of 64 B messages, per second in all.
    #[arg(long, default_value_t = 200_000.0)]
    pub small_rate: f64,
    /// Fixed rate of 64 KiB messages, per second in all.
    #[arg(long, default_value_t = 2_000.0)]
    pub large_rate: f64,
    /// 64 B messages in flight per connection at saturation.
    #[arg(long, default_value_t = 64)]
    pub small_window: usize,
    /// 64 KiB messages in flight per connection at saturation.
    #[arg(long, default_value_t = 4)]
    pub large_window: usize,
    /// Connections of the latency figure.
    #[arg(long, default_value_t = 32)]
    pub latency_conns: usize,
    /// Fixed rate of the latency figure's 64 B messages, per second in all.
    #[arg(long, default_value_t = 3_200.0)]
    pub latency_rate: f64,
    /// Idle connections of the memory figure.
    #[arg(long, default_value_t = 9_000)]
    pub memory_connections: usize,
    /// Certificate swaps per round (wsgate only).
    #[arg(long, default_value_t = 20)]
    pub swaps: usize,
    /// Measure only the idle-memory figure (no CPU, rate, latency or swap figures): a quick
    /// loop for work on memory, a few minutes instead of twenty.
    #[arg(long)]
    pub memory_only: bool,
}

const SMALL: usize = 64;
const LARGE: usize = 64 * 1024;

/// The table's rows, labelled with this run's settings.
pub fn figures(a: &RunArgs) -> Vec<Figure> {
    let f = |id, label: String, better| Figure { id, label, better };
    use Better::{Higher, Lower};
    vec![
        f(
            "hs_cpu_us",
            "CPU per mTLS handshake + upgrade + echo + close (µs)".into(),
            Lower,
        ),
        f(
            "hs_rate",
            format!("handshakes/s, {} clients", a.handshake_clients),
            Higher,
        ),
        f(
            "small_fixed_cpu_us",
            format!(
                "CPU per 64 B message at {} msg/s, {} connections (µs)",
                a.small_rate, a.message_conns
            ),
            Lower,
        ),
        f("small_fixed_rate", "… rate achieved (msg/s)".into(), Higher),
        f(
            "large_fixed_cpu_us",
            format!("CPU per 64 KiB message at {} msg/s (µs)", a.large_rate),
            Lower,
        ),
        f("large_fixed_rate", "… rate achieved (msg/s)".into(), Higher),
        f(
            "small_sat_cpu_us",
            format!(
                "CPU per 64 B message at saturation, {} in flight per connection (µs)",
                a.small_window
            ),
            Lower,
        ),
        f("small_sat_rate", "64 B messages/s at saturation".into(), Higher),
        f(
            "large_sat_cpu_us",
            format!(
                "CPU per 64 KiB message at saturation, {} in flight per connection (µs)",
                a.large_window
            ),
            Lower,
        ),
        f("large_sat_rate", "64 KiB messages/s at saturation".into(), Higher),
        f(
            "idle_kib",
            format!(
                "idle memory per proxied WebSocket (anonymous PSS, {} connections, KiB)",
                a.memory_connections
            ),
            Lower,
        ),
        f(
            "rtt_p50_ms",
            format!(
                "round-trip p50 at {} connections, {} msg/s (ms)",
                a.latency_conns, a.latency_rate
            ),
            Lower,
        ),
        f(
            "rtt_p99_ms",
            format!(
                "round-trip p99 at {} connections, {} msg/s (ms)",
                a.latency_conns, a.latency_rate
            ),
            Lower,
        ),
        f(
            "swap_idle_p50_ms",
            "certificate swap → new handshakes, idle: p50 (ms)".into(),
            Lower,
        ),
        f("swap_idle_p99_ms", "… p99 (ms)".into(), Lower),
        f(
            "swap_load_p50_ms",
            format!(
                "certificate swap → new handshakes, under {} handshaking clients: p50 (ms)",
                a.handshake_clients
            ),
            Lower,
        ),
        f("swap_load_p99_ms", "… p99 (ms)".into(), Lower),
    ]
}

/// One CPU-measured window of a running workload.
struct Window {
    ops: u64,
    secs: f64,
    cpu: Duration,
    /// The load generator's and the echo app's CPU time in the window: near the window's
    /// length, the load side was saturated and bounded the rate.
    load_cpu: Duration,
    /// How busy each CPU of the machine was in the window, %.
    cpus_busy_pct: Vec<f64>,
    /// How much of each CPU's time the hypervisor gave to another guest in the window, %:
    /// a stall no target can help (the round-trip tail shows it first).
    cpus_steal_pct: Vec<f64>,
    errors: u64,
    rtts: Vec<u32>,
}

impl Window {
    fn cpu_us_per_op(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.ops.max(1) as f64
    }

    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }

    fn detail(&self) -> serde_json::Value {
        json!({
            "ops": self.ops,
            "secs": self.secs,
            "cpu_ms": self.cpu.as_secs_f64() * 1e3,
            "load_cpu_ms": self.load_cpu.as_secs_f64() * 1e3,
            "cpus_busy_pct": self.cpus_busy_pct,
            "cpus_steal_pct": self.cpus_steal_pct,
            "errors": self.errors,
        })
    }
}

/// The measurements, in the order they run each round: all but the idle memory on the
/// long-lived targets, the idle memory on a fresh one each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Measure {
    /// CPU per handshake and handshakes/s.
    Handshakes,
    /// CPU per 64 B message at the fixed rate.
    SmallFixed,
    /// CPU per 64 KiB message at the fixed rate.
    LargeFixed,
    /// 64 B messages at saturation.
    SmallSaturated,
    /// 64 KiB messages at saturation.
    LargeSaturated,
    /// Round-trip percentiles.
    Latency,
    /// Memory per idle connection (a fresh target each).
    IdleMemory,
}

struct Run<'a> {
    args: &'a RunArgs,
    env: Env<'a>,
    records: Vec<Record>,
    /// Measurements that failed (the run goes on without them).
    failures: Vec<String>,
}

impl Run<'_> {
    fn record(&mut self, round: usize, kind: Kind, figure: &'static str, value: f64, detail: serde_json::Value) {
        self.records.push(Record {
            round,
            target: kind.name(),
            figure,
            value,
            detail,
        });
    }

    async fn window(&self, target: &Target, load: Load) -> Window {
        let a = self.args;
        tokio::time::sleep(Duration::from_secs_f64(a.warmup)).await;
        let sh = load.shared.clone();
        let (ops0, err0) = (sh.ops.load(Ordering::Relaxed), sh.errors.load(Ordering::Relaxed));
        let cpu0 = CpuSnapshot::take(&target.pids);
        let load0 = CpuSnapshot::take(&self.env.load_pids);
        let each0 = procfs::MachineCpu::read_each();
        let t0 = Instant::now();
        sh.recording.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs_f64(a.secs)).await;
        sh.recording.store(false, Ordering::Relaxed);
        let cpu = CpuSnapshot::take(&target.pids).since(&cpu0);
        let load_cpu = CpuSnapshot::take(&self.env.load_pids).since(&load0);
        let (cpus_busy_pct, cpus_steal_pct) = procfs::MachineCpu::read_each()
            .iter()
            .zip(&each0)
            .map(|(now, then)| now.since(then))
            .unzip();
        let secs = t0.elapsed().as_secs_f64();
        let ops = sh.ops.load(Ordering::Relaxed) - ops0;
        let errors = sh.errors.load(Ordering::Relaxed) - err0;
        load.finish().await;
        let mut rtts = sh.rtts.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
        rtts.sort_unstable();
        if let Ok(first) = sh.first_error.lock()
            && let Some(e) = first.as_ref()
        {
            eprintln!(
                "  {}: {errors} errors in the window, the first: {e}",
                target.kind.name()
            );
        }
        Window {
            ops,
            secs,
            cpu,
            load_cpu,
            cpus_busy_pct,
            cpus_steal_pct,
            errors,
            rtts,
        }
    }

    async fn measure(&mut self, round: usize, m: Measure, target: &Target) -> Result<()> {
        let a = self.args;
        let client = target.client(&self.env.client);
        // Connections, message size, pace, and the ids of the CPU and rate figures.
        let (conns, size, pace, cpu_id, rate_id) = match m {
            Measure::Handshakes => (a.handshake_clients, 0, None, "hs_cpu_us", "hs_rate"),
            Measure::SmallFixed => (
                a.message_conns,
                SMALL,
                Some(Pace::Rate(a.small_rate)),
                "small_fixed_cpu_us",
                "small_fixed_rate",
            ),
            Measure::LargeFixed => (
                a.message_conns,
                LARGE,
                Some(Pace::Rate(a.large_rate)),
                "large_fixed_cpu_us",
                "large_fixed_rate",
            ),
            Measure::SmallSaturated => (
                a.message_conns,
                SMALL,
                Some(Pace::Window(a.small_window)),
                "small_sat_cpu_us",
                "small_sat_rate",
            ),
            Measure::LargeSaturated => (
                a.message_conns,
                LARGE,
                Some(Pace::Window(a.large_window)),
                "large_sat_cpu_us",
                "large_sat_rate",
            ),
            Measure::Latency => (a.latency_conns, SMALL, Some(Pace::Rate(a.latency_rate)), "", ""),
            Measure::IdleMemory => return self.idle_memory(round, target.kind).await,
        };
        let load = match pace {
            None => load::handshakes(&client, conns),
            Some(pace) => load::messages(&client, conns, size, pace).await?,
        };
        let w = self.window(target, load).await;
        if w.ops == 0 {
            bail!("no operation completed in the window");
        }
        if let Measure::Latency = m {
            // The CPUs' busy and stolen shares too: a tail the hypervisor made shows there.
            let detail = json!({
                "samples": w.rtts.len(),
                "rate": w.rate(),
                "errors": w.errors,
                "max_ms": w.rtts.last().map(|v| f64::from(*v) / 1e3),
                "cpus_busy_pct": w.cpus_busy_pct,
                "cpus_steal_pct": w.cpus_steal_pct,
            });
            for (id, q) in [("rtt_p50_ms", 0.5), ("rtt_p99_ms", 0.99)] {
                let v = report::quantile(&w.rtts, q).context("no round trip measured")?;
                self.record(round, target.kind, id, f64::from(v) / 1e3, detail.clone());
            }
            return Ok(());
        }
        self.record(round, target.kind, cpu_id, w.cpu_us_per_op(), w.detail());
        self.record(round, target.kind, rate_id, w.rate(), w.detail());
        Ok(())
    }

    /// A fresh target: warm up with 100 connections, then PSS growth over N idle connections.
    async fn idle_memory(&mut self, round: usize, kind: Kind) -> Result<()> {
        let target = targets::start(&self.env, kind).await?;
        let client = target.client(&self.env.client);
        let n = self.args.memory_connections;
        let log = |e: anyhow::Error| e.context(format!("its log: {}", target.log_tail()));
        drop(load::open_idle(&client, n.min(100), 16).await.map_err(log)?);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = procfs::pss_kib(&target.pids)?;
        let t0 = Instant::now();
        let open = load::open_idle(&client, n, 16).await.map_err(log)?;
        let opening = t0.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = procfs::pss_kib(&target.pids)?;
        let per = after.saturating_sub(before) as f64 / n.max(1) as f64;
        let detail =
            json!({ "connections": n, "pss_before_kib": before, "pss_after_kib": after, "opening_secs": opening });
        self.record(round, kind, "idle_kib", per, detail);
        drop(open);
        Ok(())
    }

    /// A fresh wsgate: `swaps` new server certificates written the kubelet way, each timed to
    /// the first handshake that presents it, with 1 client (idle) and under the handshake load.
    async fn cert_swaps(&mut self, round: usize, kind: Kind) -> Result<()> {
        let target = targets::start(&self.env, kind).await?;
        let volume = target.volume.as_ref().context("not a wsgate")?;
        let client = target.client(&self.env.client);
        for (clients, p50, p99) in [
            (1, "swap_idle_p50_ms", "swap_idle_p99_ms"),
            (self.args.handshake_clients, "swap_load_p50_ms", "swap_load_p99_ms"),
        ] {
            let load = load::handshakes(&client, clients);
            let mut times = Vec::new();
            for _ in 0..self.args.swaps {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let leaf = self.env.pki.new_server_leaf()?;
                if let Ok(mut w) = load.shared.swap.lock() {
                    *w = Some(SwapWatch {
                        leaf: leaf.cert_der.clone(),
                        seen: None,
                    });
                }
                let t0 = Instant::now();
                self.env.pki.write_volume(volume, Some(&leaf))?;
                let seen = loop {
                    let seen = load.shared.swap.lock().ok().and_then(|w| w.as_ref()?.seen);
                    if let Some(seen) = seen {
                        break seen;
                    }
                    if t0.elapsed() > Duration::from_secs(10) {
                        bail!("no handshake presented the new certificate within 10 s");
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                };
                times.push((seen.saturating_duration_since(t0).as_micros() as u32).max(1));
            }
            load.finish().await;
            times.sort_unstable();
            let detail = json!({ "swaps": times.len(), "clients": clients, "ms": times.iter().map(|t| f64::from(*t) / 1e3).collect::<Vec<_>>() });
            for (id, q) in [(p50, 0.5), (p99, 0.99)] {
                if let Some(v) = report::quantile(&times, q) {
                    self.record(round, kind, id, f64::from(v) / 1e3, detail.clone());
                }
            }
        }
        Ok(())
    }
}

fn command_output(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(o) => {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        }
        Err(_) => "not installed".into(),
    }
}

fn proc_value(path: &str, key: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .map(|v| v.trim_start_matches([' ', '\t', ':', '=']).trim_matches('"').to_owned())
        })
        .unwrap_or_default()
}

/// Above this share of the machine's CPU busy before a run, the run warns (and its summary says).
const BUSY_WARNING_PCT: f64 = 5.0;

/// How busy the machine is with nothing of the run started yet: per cent of all its CPU time
/// over one second that was busy, and that the hypervisor took.
async fn quietness() -> Option<(f64, f64)> {
    let before = procfs::MachineCpu::read()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    Some(procfs::MachineCpu::read()?.since(&before))
}

/// What the run ran on and with.
fn machine(a: &RunArgs, wsgate: &Path) -> serde_json::Value {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| command_output("git", &[&["-C", &repo.display().to_string()], args].concat());
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    json!({
        "date": time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "cpu": proc_value("/proc/cpuinfo", "model name"),
        "cpus": cpus,
        "memory": proc_value("/proc/meminfo", "MemTotal"),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "os": proc_value("/etc/os-release", "PRETTY_NAME"),
        "target_cpus": a.target_cpus,
        "load_cpus": a.load_cpus,
        "versions": {
            "wsgate": format!("{} ({}{})", command_output(&wsgate.display().to_string(), &["--version"]), git(&["rev-parse", "--short", "HEAD"]), if dirty { ", uncommitted changes" } else { "" }),
            "rustc": command_output("rustc", &["--version"]),
            "nginx": command_output("nginx", &["-v"]),
            "haproxy": command_output("haproxy", &["-v"]),
            "caddy": command_output("caddy", &["version"]),
            "openssl": command_output("openssl", &["version"]),
        },
    })
}

fn machine_markdown(m: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
    let mut out = format!(
        "- date: {}\n- machine: {} × {}, {} memory, {} (kernel {})\n- pinning: targets on CPUs {}, load generator and echo app on CPUs {}\n",
        s(&m["date"]),
        m["cpus"],
        s(&m["cpu"]),
        s(&m["memory"]),
        s(&m["os"]),
        s(&m["kernel"]),
        m["target_cpus"].as_str().unwrap_or("any (not pinned)"),
        m["load_cpus"].as_str().unwrap_or("any (not pinned)"),
    );
    if let Some(busy) = m["busy_before_run_pct"].as_f64() {
        let warn = if busy > BUSY_WARNING_PCT {
            ": **something else was running; these figures are suspect**"
        } else {
            ""
        };
        out.push_str(&format!(
            "- machine busy in the second before the run: {busy:.1} % of all CPU time{warn}\n"
        ));
    }
    if let Some(steal) = m["steal_during_run_pct"].as_f64() {
        out.push_str(&format!(
            "- CPU time taken by the hypervisor (steal) during the run: {steal:.1} %\n"
        ));
    }
    if let Some(versions) = m["versions"].as_object() {
        for (k, v) in versions {
            out.push_str(&format!("- {k}: {}\n", s(v)));
        }
    }
    out
}

/// Runs the whole comparison and returns the results directory.
pub async fn run(a: RunArgs) -> Result<PathBuf> {
    let bench_exe = std::env::current_exe()?;
    let wsgate_exe = match &a.wsgate {
        Some(p) => p.clone(),
        None => bench_exe.with_file_name("wsgate"),
    };
    for kind in &a.targets {
        if let Some(program) = kind.program()
            && command_output("sh", &["-c", &format!("command -v {program}")]).is_empty()
        {
            bail!("{program} is not installed (bench/run.sh installs it)");
        }
    }
    if let Some(limit) = procfs::open_files_limit()
        && (a.memory_only || a.measures.contains(&Measure::IdleMemory))
        && limit < a.memory_connections as u64 + 1000
    {
        bail!(
            "{} idle connections need more open files than the limit of {limit} (ulimit -n; bench/run.sh raises it)",
            a.memory_connections
        );
    }
    let out = match &a.out {
        Some(p) => p.clone(),
        None => {
            let stamp = time::OffsetDateTime::now_utc().format(&time::macros::format_description!(
                "[year][month][day]T[hour][minute][second]Z"
            ))?;
            Path::new(env!("CARGO_MANIFEST_DIR")).join("results").join(stamp)
        }
    };
    std::fs::create_dir_all(&out)?;
    // Before the run, so the commit named is the one measured.
    let mut machine = machine(&a, &wsgate_exe);
    let quiet = quietness().await;
    machine["busy_before_run_pct"] = json!(quiet.map(|(busy, _)| busy));
    if let Some((busy, _)) = quiet
        && busy > BUSY_WARNING_PCT
    {
        eprintln!(
            "wsgate-bench: warning: the machine was {busy:.0} % busy in the second before the run: something else is running, and its CPU will show in the figures"
        );
    }
    let cpu_at_start = procfs::MachineCpu::read();
    let work = tempfile::Builder::new().prefix("wsgate-bench-").tempdir()?;
    let pki = Pki::create(&work.path().join("pki"))?;
    let (mut echo, echo_addr) = targets::start_echo(&bench_exe, a.load_cpus.as_deref(), &work.path().join("echo.log"))?;
    let all_cpus = match (&a.target_cpus, &a.load_cpus) {
        (Some(t), Some(l)) => Some(format!("{t},{l}")),
        _ => None,
    };
    let mut run = Run {
        args: &a,
        env: Env {
            bench_exe,
            wsgate_exe: wsgate_exe.clone(),
            wsgate_base_exe: a.wsgate_base.clone(),
            pki: &pki,
            echo: echo_addr,
            load_pids: vec![std::process::id(), echo.id()],
            client: Client {
                addr: echo_addr,
                tls: pki.client_config()?,
            },
            target_cpus: a.target_cpus.clone(),
            all_cpus,
            work: work.path().to_owned(),
            capacity: a.memory_connections.max(a.latency_conns).max(1000),
        },
        records: Vec::new(),
        failures: Vec::new(),
    };
    let result = run.rounds().await;
    let _ = echo.kill();
    let _ = echo.wait();
    result?;

    machine["steal_during_run_pct"] = json!(
        cpu_at_start
            .zip(procfs::MachineCpu::read())
            .map(|(start, end)| end.since(&start).1)
    );
    let settings = json!({ "args": format!("{a:?}"), "machine": machine, "failures": run.failures });
    report::write_raw(&out, &run.records, &settings)?;
    std::fs::write(out.join("machine.json"), serde_json::to_string_pretty(&machine)?)?;
    let table = report::table(&figures(&a), &a.targets, &run.records);
    let by_round = report::round_ratios(&figures(&a), &a.targets, &run.records);
    let busy = report::busy_table(&figures(&a), &a.targets, &run.records);
    let failures: String = run.failures.iter().map(|f| format!("- failed: {f}\n")).collect();
    let summary = format!(
        "# wsgate-bench: medians of {} round(s)\n\n{table}\nThe same ratios within each round:\n\n{by_round}\nHow busy each side was in the window, % of one CPU (the target; the load generator and the echo app together); the side near 100 bounds the rate:\n\n{busy}\n{}{failures}\nRaw results: raw.csv, raw.json. Settings: {a:?}\n",
        a.rounds,
        machine_markdown(&machine)
    );
    std::fs::write(out.join("summary.md"), &summary)?;
    println!("{summary}");
    println!("results in {}", out.display());
    Ok(out)
}

impl Run<'_> {
    /// Notes a failed measurement; the run goes on (the table shows what was measured).
    fn failed(&mut self, round: usize, what: &str, result: Result<()>) {
        if let Err(e) = result {
            eprintln!("round {round}: {what} FAILED: {e:#}");
            self.failures.push(format!("round {round}: {what}: {e:#}"));
        }
    }

    async fn rounds(&mut self) -> Result<()> {
        let a = self.args;
        let mut long_lived = Vec::new();
        for kind in a.targets.iter().filter(|_| !a.memory_only) {
            long_lived.push(
                targets::start(&self.env, *kind)
                    .await
                    .with_context(|| format!("starting {}", kind.name()))?,
            );
        }
        for round in 1..=a.rounds {
            let mut order: Vec<usize> = (0..a.targets.len()).collect();
            if round % 2 == 0 {
                order.reverse();
            }
            let relayed = a.measures.iter().filter(|m| **m != Measure::IdleMemory);
            for &m in relayed.filter(|_| !a.memory_only) {
                for &i in &order {
                    let target = &long_lived[i];
                    eprintln!("round {round}: {m:?} on {}", target.kind.name());
                    let result = self.measure(round, m, target).await;
                    self.failed(round, &format!("{m:?} on {}", target.kind.name()), result);
                }
            }
            let memory = a.memory_only || a.measures.contains(&Measure::IdleMemory);
            for &i in order.iter().filter(|_| memory) {
                let kind = a.targets[i];
                eprintln!("round {round}: idle memory of a fresh {}", kind.name());
                let result = self.idle_memory(round, kind).await;
                self.failed(round, &format!("idle memory of {}", kind.name()), result);
            }
            if a.swaps > 0 && !a.memory_only && a.targets.contains(&Kind::Wsgate) {
                eprintln!("round {round}: certificate swaps on a fresh wsgate");
                let result = self.cert_swaps(round, Kind::Wsgate).await;
                self.failed(round, "certificate swaps", result);
            }
        }
        Ok(())
    }
}
