//! `wsgate-bench`: compares wsgate with nginx, HAProxy, Caddy and a direct rustls server (the
//! limit) on CPU per handshake and per message, memory per idle connection, round-trip latency
//! and certificate swaps. `bench/run.sh` is the one command; `run` does the comparison, `limit`
//! and `echo` are the servers it starts. Errors end the run with a message (anyhow throughout:
//! this is tooling, not the product).
#![forbid(unsafe_code)]

mod load;
mod pki;
mod procfs;
mod report;
mod run;
mod servers;
mod targets;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version, about = "wsgate against nginx, HAProxy, Caddy and the direct-TLS limit")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the comparison and writes the results.
    Run(Box<run::RunArgs>),
    /// Serves the limit: direct mTLS WebSocket echo (prints `listening ADDR`).
    Limit {
        /// Directory with ca.crt, server.crt and server.key.
        #[arg(long)]
        cert_dir: PathBuf,
    },
    /// Serves the echo app every proxy forwards to (prints `listening ADDR`).
    Echo,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Run(args) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(run::run(*args))?;
        }
        Cmd::Limit { cert_dir } => {
            // Like wsgate: a multi-threaded runtime whose worker count follows the CPUs it may
            // use (or TOKIO_WORKER_THREADS).
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(servers::serve_limit(&cert_dir))?;
        }
        Cmd::Echo => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(servers::serve_echo())?;
        }
    }
    Ok(())
}
