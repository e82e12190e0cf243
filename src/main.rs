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
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid command line");
            return usage_error(first.trim_start_matches("error: "));
        }
    };
    // Validate everything before any port is bound or any thread is started.
    let command = match cli.command {
        Command::Proxy(args) => match args.into_config() {
            Ok(cfg) => Run::Proxy(Box::new(cfg)),
            Err(e) => return usage_error(e),
        },
        Command::Demo => Run::Demo,
    };
    // The demo prints its own story; its logs only say when something goes wrong.
    let level = if matches!(command, Run::Demo) { "error" } else { "info" };
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
    Proxy(Box<wsgate::config::ProxyConfig>),
    Demo,
}

async fn run_proxy(cfg: wsgate::config::ProxyConfig) -> anyhow::Result<()> {
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
