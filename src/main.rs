//! The `wsgate` binary: parse the command line, start logging, run the command, map errors to
//! exit codes (64 for bad usage, 1 for runtime failure).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use wsgate::cli::{Cli, Command};

/// Exit code for bad usage (BSD sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

fn usage_error(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("wsgate: {msg}");
    ExitCode::from(EX_USAGE)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's message, without its usage block and hint, on one line.
            let rendered = e.render().to_string();
            let message: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            return usage_error(message.join(" ").trim_start_matches("error: "));
        }
    };
    // Validate everything before any port is bound or any thread is started.
    let command = match cli.command {
        Command::Proxy(args) => match args.into_config() {
            Ok(cfg) => Run::Proxy(Box::new(cfg)),
            Err(e) => return usage_error(e),
        },
        Command::Inject(args) => match args.into_config() {
            Ok(cfg) => Run::Inject(Box::new(cfg)),
            Err(e) => return usage_error(e),
        },
        Command::Drain(args) => Run::Drain(args.admin),
        Command::Demo => Run::Demo,
    };
    // The demo prints its own story; its logs only say when something goes wrong.
    let level = match command {
        Run::Demo => "error",
        Run::Drain(_) => "warn",
        _ => "info",
    };
    wsgate::telemetry::logs::init(cli.log_format, level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match command {
            Run::Proxy(cfg) => run_proxy(*cfg).await,
            Run::Inject(cfg) => run_inject(*cfg).await,
            Run::Drain(admin) => drain(admin).await,
            Run::Demo => wsgate::demo::run().await.map_err(anyhow::Error::from),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

enum Run {
    Proxy(Box<wsgate::proxy::settings::ProxyConfig>),
    Inject(Box<wsgate::inject::InjectConfig>),
    Drain(std::net::SocketAddr),
    Demo,
}

async fn run_inject(cfg: wsgate::inject::InjectConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    use wsgate::inject::settings::NativeSidecar;
    let needs_api = cfg.certificate_controller || cfg.settings.native == NativeSidecar::Auto;
    let client = if needs_api {
        match kube::Client::try_default().await {
            Ok(client) => Some(client),
            Err(e) if cfg.certificate_controller => {
                anyhow::bail!("cannot reach the Kubernetes API (needed by the certificate controller): {e}")
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the Kubernetes API");
                None
            }
        }
    } else {
        None
    };
    let mut term = signal(SignalKind::terminate())?;
    let delay = cfg.shutdown_delay;
    let handle = wsgate::inject::start(cfg, client).await?;
    tokio::select! {
        _ = term.recv() => {
            tracing::info!(delay_s = delay.as_secs_f64(), "SIGTERM: not ready now, stopping after the shutdown delay");
            handle.drain();
        }
        _ = tokio::signal::ctrl_c() => handle.stop(),
        _ = handle.drained() => {}
    }
    handle.wait().await;
    Ok(())
}

/// Asks the local proxy to drain (the sidecar's preStop hook).
async fn drain(admin: std::net::SocketAddr) -> anyhow::Result<()> {
    Ok(wsgate::admin::request_drain(admin).await?)
}

async fn run_proxy(cfg: wsgate::proxy::settings::ProxyConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    for warning in &cfg.otel.warnings {
        tracing::warn!(target: "wsgate::otel", "{warning}");
    }
    let mut term = signal(SignalKind::terminate())?;
    let handle = wsgate::proxy::start(cfg).await?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
        _ = handle.drained() => {}
    }
    handle.drain();
    handle.wait().await;
    Ok(())
}
