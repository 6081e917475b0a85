//! `xenft-agent`: the per-host xenft daemon.
//!
//! Reads a JSON config file, validates it, and runs the agent with its status API until
//! SIGTERM or Ctrl-C. Until the shim and checkpoint crates are wired in, the components are
//! the recording stand-ins: every command is logged (`--print-commands` prints them too).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use xenft_agent::config::ConfigFile;
use xenft_agent::runtime::Agent;
use xenft_agent::seams::{Recorder, Seams};
use xenft_agent::status::StatusServer;

/// Per-host xenft agent: membership, failure detection, quorum, fencing, failover.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Configuration file (JSON).
    #[arg(long, short)]
    config: PathBuf,
    /// Only validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let cfg = ConfigFile::load(&args.config)
        .and_then(ConfigFile::validate)
        .with_context(|| format!("configuration {}", args.config.display()))?;
    if args.check {
        println!("configuration ok: host {}", cfg.core.me);
        return Ok(());
    }
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        let recorder = Recorder::new();
        let listen = cfg.status_listen;
        let token = cfg.status_token.clone();
        let agent = Agent::start(cfg, Seams::recording(&recorder)).await?;
        let status = StatusServer::start(listen, token, agent.hub())
            .await
            .with_context(|| format!("status API on {listen}"))?;
        println!("status {}", status.addr());
        wait_for_signal().await;
        status.shutdown().await;
        agent.shutdown().await;
        anyhow::Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
