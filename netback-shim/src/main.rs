//! `xenft-netback`: runs the userspace relay for one VM and its control socket.
//!
//! ```text
//! xenft-netback --vif vif7.0 --uplink xenbr0p7 --mac 00:16:3e:00:00:07 \
//!     --mode buffered --control /run/xenft/netback-7.sock
//! ```
//! Stops on SIGTERM or SIGINT.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use nix::sys::signal::{SigSet, Signal};
use xenft_netback::control::ControlServer;
use xenft_netback::frame::MacAddr;
use xenft_netback::{Mode, Shim, ShimConfig};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    Passthrough,
    Buffered,
    Standby,
}

/// Userspace packet relay between a VM's vif and the uplink (xenft).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The VM's interface (vif).
    #[arg(long)]
    vif: String,
    /// The uplink interface.
    #[arg(long)]
    uplink: String,
    /// The VM's MAC (learned from its first frame when absent).
    #[arg(long)]
    mac: Option<MacAddr>,
    /// MTU of the VM's network.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(68..))]
    mtu: u16,
    /// Bound on bytes held for uncommitted epochs.
    #[arg(long, default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range(1..=(1u64 << 34)))]
    buffer_bytes: u64,
    /// Mode at start.
    #[arg(long, value_enum, default_value = "passthrough")]
    mode: ModeArg,
    /// Run the relay threads under SCHED_FIFO at this priority (1-99; needs CAP_SYS_NICE).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=99))]
    realtime_priority: Option<u8>,
    /// Path of the control socket.
    #[arg(long)]
    control: PathBuf,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    // Block the stop signals before any thread starts, so that every thread inherits the mask
    // and the main thread alone receives them in `wait`.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().context("blocking SIGTERM/SIGINT")?;

    let mut cfg = ShimConfig::new(&args.vif, &args.uplink);
    cfg.vm_mac = args.mac;
    cfg.mtu = usize::from(args.mtu);
    cfg.realtime_priority = args.realtime_priority;
    cfg.buffer_limit = usize::try_from(args.buffer_bytes).context("--buffer-bytes too large")?;
    cfg.mode = match args.mode {
        ModeArg::Passthrough => Mode::Passthrough,
        ModeArg::Buffered => Mode::Buffered,
        ModeArg::Standby => Mode::Standby,
    };
    let shim = Arc::new(Shim::start(cfg).context("starting the relay")?);
    let server = ControlServer::start(Arc::clone(&shim), &args.control)
        .with_context(|| format!("control socket {}", args.control.display()))?;
    let sig = signals.wait().context("waiting for a stop signal")?;
    tracing::info!(signal = ?sig, "stopping");
    drop(server);
    Ok(())
}
