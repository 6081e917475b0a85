//! `xenft-quorum`: the quorum server hosts ask before taking a VM over.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use xenft_agent::quorum::server::{QuorumServer, ServerConfig};

/// Quorum server for xenft pools: grants per-VM leases to authenticated hosts.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7479")]
    listen: SocketAddr,
    /// File holding the pool secret (same as the agents').
    #[arg(long)]
    secret_file: PathBuf,
    /// Lease length in ms (must equal the agents' timing.lease_ms).
    #[arg(long, default_value_t = 600)]
    lease_ms: u64,
    /// Most protected VMs.
    #[arg(long, default_value_t = 4096)]
    max_vms: usize,
    /// Most simultaneous host connections.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let secret = xenft_agent::config::read_secret(&args.secret_file)
        .with_context(|| format!("reading {}", args.secret_file.display()))?;
    anyhow::ensure!(
        (50..=600_000).contains(&args.lease_ms),
        "--lease-ms must be between 50 and 600000"
    );
    anyhow::ensure!(
        (1..=1_000_000).contains(&args.max_vms),
        "--max-vms must be between 1 and 1000000"
    );
    let cfg = ServerConfig {
        listen: args.listen,
        secret,
        lease_ms: args.lease_ms,
        max_vms: args.max_vms,
        max_connections: args.max_connections.clamp(1, 65_536),
        idle_timeout: Duration::from_secs(30),
    };
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        let server = QuorumServer::start(cfg).await?;
        println!("listening {}", server.addr());
        wait_for_signal().await;
        server.shutdown().await;
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
