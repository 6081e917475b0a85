//! `xenft-netback`: runs the userspace relay for one VM and its control socket.
//!
//! ```text
//! xenft-netback --vif vif7.0 --uplink xenbr0p7 --mac 00:16:3e:00:00:07 \
//!     --mode buffered --control /run/xenft/netback-7.sock
//! ```
//! With `--alink-host/--alink-peer/--alink-secret-file/--alink-path LOCAL=PEER` the relay gets
//! an A-link of its own to the peer host's shim and redirects the VM's frames over it when the
//! uplink fails. The vif need not exist at start: it is bound when it appears and again after
//! each domain restart (use `vifname=` in the xl config for a fixed name). Stops on SIGTERM or
//! SIGINT.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use nix::sys::signal::{SigSet, Signal};
use xenft_alink::{Link, LinkConfig, PathConfig};
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
    /// The VM's interface (vif). It may not exist yet and may come and go (the domain is
    /// started later or restarted): the relay binds it whenever an interface of this name
    /// exists. `vifname=` in the xl config gives the vif a fixed name.
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
    /// This host's name on the A-link (enables the uplink redirect).
    #[arg(long, requires_all = ["alink_peer", "alink_secret_file", "alink_path"])]
    alink_host: Option<String>,
    /// The peer host's name on the A-link.
    #[arg(long, requires = "alink_host")]
    alink_peer: Option<String>,
    /// File holding the pool secret (at least 16 bytes).
    #[arg(long, requires = "alink_host")]
    alink_secret_file: Option<PathBuf>,
    /// One A-link path, `LOCAL_ADDR:PORT=PEER_ADDR:PORT`; repeat for each path.
    #[arg(long, requires = "alink_host", value_parser = parse_path)]
    alink_path: Vec<PathConfig>,
}

fn parse_path(s: &str) -> Result<PathConfig, String> {
    let (local, peer) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: want LOCAL_ADDR:PORT=PEER_ADDR:PORT"))?;
    Ok(PathConfig {
        local: local.parse().map_err(|e| format!("{local:?}: {e}"))?,
        peer: peer.parse().map_err(|e| format!("{peer:?}: {e}"))?,
    })
}

/// The A-link part of the arguments, when given.
fn link_config(args: &Args) -> anyhow::Result<Option<LinkConfig>> {
    let (Some(host), Some(peer), Some(secret)) =
        (&args.alink_host, &args.alink_peer, &args.alink_secret_file)
    else {
        return Ok(None);
    };
    let meta =
        std::fs::metadata(secret).with_context(|| format!("secret file {}", secret.display()))?;
    anyhow::ensure!(
        meta.len() <= 4096,
        "secret file {} is larger than 4 KiB",
        secret.display()
    );
    let bytes =
        std::fs::read(secret).with_context(|| format!("secret file {}", secret.display()))?;
    let cfg = LinkConfig::new(host.as_str(), peer.as_str(), bytes, args.alink_path.clone());
    cfg.validate().context("A-link configuration")?;
    Ok(Some(cfg))
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
    let link_cfg = link_config(&args)?;
    let shim = Arc::new(Shim::start(cfg).context("starting the relay")?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut link_parts = None;
    if let Some(lc) = link_cfg {
        let link = rt
            .block_on(Link::start(lc))
            .context("starting the A-link")?;
        let att = xenft_netback::alink_tunnel::attach(Arc::clone(&shim), &link, rt.handle())
            .context("attaching the relay to the A-link")?;
        link_parts = Some((link, att));
    }
    let server = ControlServer::start(Arc::clone(&shim), &args.control)
        .with_context(|| format!("control socket {}", args.control.display()))?;
    let sig = signals.wait().context("waiting for a stop signal")?;
    tracing::info!(signal = ?sig, "stopping");
    drop(server);
    if let Some((link, att)) = link_parts {
        drop(att);
        link.shutdown();
    }
    Ok(())
}
