//! `xenft-blkback`: parses arguments into a [`xenft_blkback::daemon::Config`] and runs it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use xenft_alink::cli::AlinkArgs;
use xenft_blkback::daemon::{Config, PeerTransport, Role};
use xenft_blkback::mirror::primary::MirrorConfig;
use xenft_blkback::nbd::server::ExportConfig;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    Local,
    Primary,
    Secondary,
}

/// Userspace block backend: NBD server with synchronous mirroring to a peer shim.
#[derive(Debug, Parser)]
#[command(name = "xenft-blkback", version)]
struct Args {
    /// local (no peer), primary (serve + mirror) or secondary (hold the copy).
    #[arg(long, value_enum)]
    role: RoleArg,
    /// Backing raw file or block device.
    #[arg(long)]
    disk: PathBuf,
    /// Create/extend the disk file to this many bytes (suffixes K, M, G allowed).
    #[arg(long)]
    size: Option<String>,
    /// NBD Unix socket path (secondary: served once `promote`d).
    #[arg(long)]
    nbd_unix: Option<PathBuf>,
    /// NBD TCP listen address (e.g. 127.0.0.1:10809).
    #[arg(long)]
    nbd_tcp: Option<SocketAddr>,
    /// Export name.
    #[arg(long, default_value = "xenft")]
    export: String,
    /// Oldstyle NBD handshake on the NBD sockets (tapdisk's NBD client speaks only this).
    #[arg(long)]
    nbd_oldstyle: bool,
    /// Every write is durable (on both copies when mirrored) before its reply, as if it
    /// carried FUA: for clients that never flush (tapdisk).
    #[arg(long)]
    write_through: bool,
    /// Primary, plain TCP transport (unauthenticated: loopback and tests only; use an A-link
    /// between hosts): the secondary's replication address.
    #[arg(long)]
    peer: Option<SocketAddr>,
    /// Secondary, plain TCP transport (unauthenticated: loopback and tests only): replication
    /// listen address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    #[command(flatten)]
    alink: AlinkArgs,
    /// Primary, or secondary once promoted: dirty bitmap file (default: DISK.xenft-bitmap).
    #[arg(long)]
    bitmap: Option<PathBuf>,
    /// Secondary: consistency state file (default: DISK.xenft-state).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Control socket for the agent (JSON status and commands).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Resync rate limit in bytes/s (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    resync_rate: u64,
    /// Drop the peer session when an acknowledgement is this late (milliseconds).
    #[arg(long, default_value_t = 5000)]
    ack_timeout_ms: u64,
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().with_context(|| format!("bad size {s:?}"))?;
    n.checked_mul(mult).context("size overflows")
}

fn config(a: Args) -> anyhow::Result<Config> {
    let with_ext = |ext: &str| {
        let mut p = a.disk.clone().into_os_string();
        p.push(ext);
        PathBuf::from(p)
    };
    let alink = a
        .alink
        .link_config()
        .context("a-link configuration")?
        .map(PeerTransport::Alink);
    let role = match a.role {
        RoleArg::Local => Role::Local,
        RoleArg::Primary => Role::Primary {
            peer: match (alink.clone(), a.peer) {
                (Some(l), None) => l,
                (None, Some(p)) => PeerTransport::Tcp(p),
                _ => bail!("--role primary needs exactly one of --peer or --alink-path"),
            },
            bitmap: a
                .bitmap
                .clone()
                .unwrap_or_else(|| with_ext(".xenft-bitmap")),
        },
        RoleArg::Secondary => Role::Secondary {
            peer: match (alink, a.listen) {
                (Some(l), None) => l,
                (None, Some(p)) => PeerTransport::Tcp(p),
                _ => bail!("--role secondary needs exactly one of --listen or --alink-path"),
            },
            state: a.state.clone().unwrap_or_else(|| with_ext(".xenft-state")),
            bitmap: a
                .bitmap
                .clone()
                .unwrap_or_else(|| with_ext(".xenft-bitmap")),
        },
    };
    if !matches!(role, Role::Secondary { .. }) && a.nbd_unix.is_none() && a.nbd_tcp.is_none() {
        bail!("--nbd-unix or --nbd-tcp is required for role {:?}", a.role);
    }
    Ok(Config {
        role,
        create_size: a.size.as_deref().map(parse_size).transpose()?,
        disk: a.disk,
        nbd_unix: a.nbd_unix,
        nbd_tcp: a.nbd_tcp,
        export: ExportConfig {
            name: a.export,
            oldstyle: a.nbd_oldstyle,
            write_through: a.write_through,
            ..ExportConfig::default()
        },
        control: a.control,
        mirror: MirrorConfig {
            resync_rate: a.resync_rate,
            ack_timeout: Duration::from_millis(a.ack_timeout_ms.max(100)),
            ..MirrorConfig::default()
        },
    })
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cfg = config(Args::parse())?;
    let rt = tokio::runtime::Runtime::new().context("tokio runtime")?;
    rt.block_on(xenft_blkback::daemon::run(cfg))?;
    Ok(())
}
