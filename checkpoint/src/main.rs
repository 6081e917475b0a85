//! `xenft-checkpoint`: parses arguments into a [`xenft_checkpoint::daemon`] configuration and
//! runs it: one side of level-3 protection: of a synthetic guest (default) or
//! of a real Xen domain (`--xen-domid D`; on the secondary the paused replica the toolstack
//! built with `xl create -p`), over a Unix socket (`--connect` / `--listen`) or an A-link
//! between two hosts (`--alink-path LOCAL=PEER` (repeat), `--host`, `--peer-host`,
//! `--secret-file`, `--alink-path-timeout-ms`: the options of `xenft-blkback`).
//!
//! Without `--control` the secondary fails over by itself: over a Unix socket when the
//! stream ends, over an A-link when no path has been up for the path timeout after a
//! checkpoint was committed. It prints the outcome as JSON; a synthetic guest then runs for
//! `--run-ms` and the process exits, a Xen domain lives on and the process keeps running.
//! The primary over an A-link ends protection (the guest runs on, unprotected) when the link
//! has had no live path for the path timeout, and prints its outcome with
//! `"secondary_lost":true`.
//!
//! `primary --control C` makes the primary the agent's component: the same control socket
//! and state machine as the controlled secondary after its take-over (`status`: `running` /
//! `protecting`, `protect`, `unprotect`, the event `protection_ended`). A lost secondary ends
//! protection, not the process: the guest runs on, and `protect` protects it again toward a
//! fresh secondary (over the A-link: started with the mirrored A-link options).
//!
//! `--crash-at K --crash-point P` kills this process with SIGKILL at point P of the K-th
//! checkpoint, to test what the secondary keeps.
//!
//! With the shims: `primary --blkback-control S --netback-control T` stamps and commits the
//! VM's disk epochs on its blkback primary and output epochs on its relay (the engine's
//! `CommitSink`); `secondary --control C` leaves the take-over to the agent (`status`, `stop`
//! = freeze at the last committed checkpoint, `failover` = resume from it). After `failover`,
//! `protect <socket>` (Unix socket) or `protect` / `protect alink` (over this process's own
//! A-link, toward a fresh `secondary` the returning host started with the mirrored A-link
//! options) protects the resumed guest as `primary` does — level-3 re-protection — and
//! `unprotect` ends it; the guest keeps running whatever happens to the protection.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use xenft_alink::cli::AlinkArgs;
use xenft_checkpoint::daemon::{
    self, ControlledRun, CrashAt, CrashPoint, GuestKind, PrimaryRun, PrimaryTransport, Reprotect,
    SecondaryRun, SecondaryTransport,
};
use xenft_checkpoint::workload::{Pattern, WorkloadSpec};

#[derive(Parser)]
#[command(about = "Level-3 checkpoint replication of a synthetic guest or a Xen domain")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum PatternArg {
    Sequential,
    Random,
    Hot,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum CrashPointArg {
    /// Before the first frame of the checkpoint is sent.
    BeforeSend,
    /// After the checkpoint's first frame, before the rest.
    MidStream,
    /// When the secondary's ack arrives, before the primary acts on it.
    AfterAck,
    /// In the commit hook, before the commit is recorded (output not released).
    BeforeCommit,
    /// Right after the commit was recorded (output released).
    AfterCommit,
}

#[derive(clap::Args)]
struct GuestArgs {
    /// Path of xenft-synthetic-guest (default: next to this binary).
    #[arg(long)]
    guest_binary: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    memory_mib: u64,
}

/// How the resumed guest is protected after a take-over (`protect` on the control socket):
/// the engine then acts as `primary` does, toward the returning host's secondary.
#[derive(clap::Args)]
struct ReprotectArgs {
    /// This host's `xenft-blkback` control socket (stamped as `primary --blkback-control`).
    #[arg(long)]
    blkback_control: Option<PathBuf>,
    /// This host's `xenft-netback` control socket (as `primary --netback-control`). The relay
    /// runs in pass-through after the take-over: it is switched to buffered at the first
    /// checkpoint (its epochs numbered after its own) and back to pass-through, releasing
    /// what it holds, when protection ends.
    #[arg(long)]
    netback_control: Option<PathBuf>,
    /// Epoch length in ms when protecting.
    #[arg(long, default_value_t = 25)]
    protect_epoch_ms: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a synthetic guest (or take running Xen domain --xen-domid) and protect it,
    /// streaming to a secondary at --connect or over the A-link (--alink-path ...).
    Primary {
        #[command(flatten)]
        guest: GuestArgs,
        /// Protect running Xen domain D instead of a synthetic guest.
        #[arg(long, value_name = "D", conflicts_with_all = [
            "guest_binary", "memory_mib", "pattern", "hot_pages", "rate_mib", "write_len", "seed",
        ])]
        xen_domid: Option<u32>,
        /// The Xen domain's vCPU count.
        #[arg(long, default_value_t = 1, requires = "xen_domid")]
        xen_vcpus: u32,
        /// Unix socket of the secondary.
        #[arg(
            long,
            required_unless_present = "alink_paths",
            conflicts_with = "alink_paths"
        )]
        connect: Option<PathBuf>,
        #[command(flatten)]
        alink: AlinkArgs,
        /// A-link: give up when no path is up after this many seconds.
        #[arg(long, default_value_t = 120, requires = "alink_paths")]
        alink_wait_s: u64,
        #[arg(long, value_enum, default_value_t = PatternArg::Random)]
        pattern: PatternArg,
        /// Hot-set size in pages (pattern hot).
        #[arg(long, default_value_t = 1024)]
        hot_pages: u64,
        /// Dirtying rate, MiB/s.
        #[arg(long, default_value_t = 20)]
        rate_mib: u64,
        /// Bytes written per page write.
        #[arg(long, default_value_t = 512)]
        write_len: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Epoch length in ms.
        #[arg(long, default_value_t = 25)]
        epoch_ms: u64,
        /// Stop after this many checkpoints.
        #[arg(long)]
        checkpoints: Option<u64>,
        /// Append "commit N" lines here when epochs commit.
        #[arg(long)]
        commit_log: Option<PathBuf>,
        /// The VM's `xenft-blkback` primary control socket: each checkpoint N is sent as
        /// `checkpoint N` (later writes belong to epoch N + 1) and each commit as `commit N`
        /// (the secondary applies the disk writes of epochs <= N).
        #[arg(long)]
        blkback_control: Option<PathBuf>,
        /// The VM's `xenft-netback` control socket (relay in buffered mode): checkpoint N is
        /// sent as `begin_epoch N + 1` and each commit as `commit N` (releases the output).
        #[arg(long)]
        netback_control: Option<PathBuf>,
        /// Kill this process at --crash-point of the K-th checkpoint.
        #[arg(long, requires = "crash_point", conflicts_with = "control")]
        crash_at: Option<u64>,
        #[arg(long, value_enum)]
        crash_point: Option<CrashPointArg>,
        /// Control socket for the agent (`status`, `protect`, `unprotect`; events): a lost
        /// secondary ends protection, not the process; the guest runs on and `protect`
        /// protects it again toward a fresh secondary. The process runs until killed.
        #[arg(long)]
        control: Option<PathBuf>,
    },
    /// Receive checkpoints on --listen (or over the A-link) into a synthetic replica (or the
    /// paused Xen domain --xen-domid); when the primary goes away, fail over, print the outcome
    /// as JSON (a synthetic guest first runs for --run-ms, then the process exits; a Xen
    /// domain lives on and the process keeps running). With --control, the agent decides
    /// instead: nothing happens by itself; see `control_mode`.
    Secondary {
        #[command(flatten)]
        guest: GuestArgs,
        /// Receive into paused Xen domain D (`xl create -p` of the primary's configuration);
        /// its memory is zeroed first.
        #[arg(long, value_name = "D", conflicts_with_all = ["guest_binary", "memory_mib", "run_ms"])]
        xen_domid: Option<u32>,
        /// The Xen domain's vCPU count.
        #[arg(long, default_value_t = 1, requires = "xen_domid")]
        xen_vcpus: u32,
        /// Unix socket to receive on.
        #[arg(
            long,
            required_unless_present = "alink_paths",
            conflicts_with = "alink_paths"
        )]
        listen: Option<PathBuf>,
        #[command(flatten)]
        alink: AlinkArgs,
        #[arg(long, default_value_t = 1000)]
        run_ms: u64,
        /// Control socket for the agent (`status`, `stop`, `failover`, and after a take-over
        /// `protect`, `unprotect`); the process then runs until killed.
        #[arg(long)]
        control: Option<PathBuf>,
        #[command(flatten)]
        reprotect: ReprotectArgs,
    },
}

impl From<CrashPointArg> for CrashPoint {
    fn from(p: CrashPointArg) -> Self {
        match p {
            CrashPointArg::BeforeSend => CrashPoint::BeforeSend,
            CrashPointArg::MidStream => CrashPoint::MidStream,
            CrashPointArg::AfterAck => CrashPoint::AfterAck,
            CrashPointArg::BeforeCommit => CrashPoint::BeforeCommit,
            CrashPointArg::AfterCommit => CrashPoint::AfterCommit,
        }
    }
}

fn guest_binary(arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p);
    }
    let me = std::env::current_exe().context("locating this binary")?;
    Ok(me.with_file_name("xenft-synthetic-guest"))
}

fn guest_kind(
    guest: GuestArgs,
    xen_domid: Option<u32>,
    xen_vcpus: u32,
) -> anyhow::Result<GuestKind> {
    Ok(match xen_domid {
        Some(domid) => GuestKind::Xen {
            domid,
            vcpus: NonZeroU32::new(xen_vcpus).context("--xen-vcpus must be > 0")?,
        },
        None => GuestKind::Synthetic {
            binary: guest_binary(guest.guest_binary)?,
            memory_bytes: guest
                .memory_mib
                .checked_mul(1 << 20)
                .context("--memory-mib is too large")?,
        },
    })
}

/// What this process runs.
enum Run {
    Primary(PrimaryRun),
    ControlledPrimary(PrimaryRun, PathBuf),
    Secondary(SecondaryRun),
    Controlled(ControlledRun),
}

/// Checks the arguments (a bad link configuration is reported before the guest is touched).
fn config(cmd: Cmd) -> anyhow::Result<Run> {
    Ok(match cmd {
        Cmd::Primary {
            guest,
            xen_domid,
            xen_vcpus,
            connect,
            alink,
            alink_wait_s,
            pattern,
            hot_pages,
            rate_mib,
            write_len,
            seed,
            epoch_ms,
            checkpoints,
            commit_log,
            blkback_control,
            netback_control,
            crash_at,
            crash_point,
            control,
        } => {
            let pattern = match pattern {
                PatternArg::Sequential => Pattern::Sequential,
                PatternArg::Random => Pattern::Random,
                PatternArg::Hot => Pattern::HotSet {
                    hot_pages,
                    hot_percent: 90,
                },
            };
            if epoch_ms == 0 {
                bail!("--epoch-ms must be > 0");
            }
            let link_cfg = alink.link_config()?;
            let guest = guest_kind(guest, xen_domid, xen_vcpus)?;
            let transport = match (connect, link_cfg) {
                (Some(connect), None) => PrimaryTransport::Connect(connect),
                (None, Some(link)) => PrimaryTransport::Alink {
                    link,
                    wait: Duration::from_secs(alink_wait_s.max(1)),
                },
                _ => bail!("primary needs exactly one of --connect or --alink-path"),
            };
            let run = PrimaryRun {
                guest,
                workload: WorkloadSpec {
                    pattern,
                    write_len,
                    rate_bytes_per_s: rate_mib << 20,
                },
                seed,
                transport,
                epoch: Duration::from_millis(epoch_ms),
                checkpoints,
                commit_log,
                blkback_control,
                netback_control,
                crash: match (crash_at, crash_point) {
                    (Some(checkpoint), Some(point)) => Some(CrashAt {
                        checkpoint,
                        point: point.into(),
                    }),
                    _ => None,
                },
            };
            match control {
                Some(control) => Run::ControlledPrimary(run, control),
                None => Run::Primary(run),
            }
        }
        Cmd::Secondary {
            guest,
            xen_domid,
            xen_vcpus,
            listen,
            alink,
            run_ms,
            control,
            reprotect,
        } => {
            if control.is_some()
                && (reprotect.protect_epoch_ms == 0 || reprotect.protect_epoch_ms > 60_000)
            {
                bail!("--protect-epoch-ms must be 1..=60000");
            }
            let link_cfg = alink.link_config()?;
            let guest = guest_kind(guest, xen_domid, xen_vcpus)?;
            let transport = match (listen, link_cfg) {
                (Some(listen), None) => SecondaryTransport::Listen(listen),
                (None, Some(link)) => SecondaryTransport::Alink(link),
                _ => bail!("secondary needs exactly one of --listen or --alink-path"),
            };
            match control {
                Some(control) => Run::Controlled(ControlledRun {
                    guest,
                    transport,
                    control,
                    reprotect: Reprotect {
                        blkback_control: reprotect.blkback_control,
                        netback_control: reprotect.netback_control,
                        epoch: Duration::from_millis(reprotect.protect_epoch_ms),
                    },
                }),
                None => Run::Secondary(SecondaryRun {
                    guest,
                    transport,
                    run: Duration::from_millis(run_ms),
                }),
            }
        }
    })
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match config(Cli::parse().cmd)? {
        Run::Primary(cfg) => {
            let outcome = daemon::run_primary(cfg)?;
            println!("{}", serde_json::to_string(&outcome)?);
        }
        Run::Secondary(cfg) => {
            let failed_over = daemon::run_secondary(cfg)?;
            println!("{}", serde_json::to_string(&failed_over.outcome)?);
            failed_over.finish();
        }
        Run::Controlled(cfg) => match daemon::run_controlled(cfg)? {},
        Run::ControlledPrimary(cfg, control) => {
            match daemon::run_primary_controlled(cfg, &control)? {}
        }
    }
    Ok(())
}
