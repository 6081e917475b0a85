//! `xenft-checkpoint`: run one side of level-3 protection: of a synthetic guest (default) or
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

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use xenft_alink::cli::AlinkArgs;
use xenft_alink::{Link, LinkConfig};
use xenft_checkpoint::alink::{CheckpointChannel, Cut};
use xenft_checkpoint::domain::{Domain, DomainError, VcpuContext};
use xenft_checkpoint::engine::commit::{CommitSink, RecordingSink};
use xenft_checkpoint::engine::primary::{
    start_protection, start_protection_keep_domain, EpochPolicy, Phase, PrimaryConfig, Protection,
};
use xenft_checkpoint::engine::secondary::{
    start_secondary, SecondaryConfig, SecondaryHandle, StoppedSecondary,
};
use xenft_checkpoint::engine::transport::{
    unix_stream, Endpoint, FrameReceiver, FrameSender, TransportError,
};
use xenft_checkpoint::local::{LocalDomain, LocalGuestConfig};
use xenft_checkpoint::run::{
    drive_primary, link_up, start_link, wait_primary_lost, Liveness, PeerLoss,
};
use xenft_checkpoint::shims::Shims;
use xenft_checkpoint::wire::Frame;
use xenft_checkpoint::workload::{Pattern, WorkloadSpec, WorkloadState};
use xenft_checkpoint::xen::XenDomain;
use xenft_control::checkpoint::{
    Event, Phase as ProtectPhase, Protecting, Reply, Request, State, Status,
};
use xenft_control::{Checkpoint as CheckpointComponent, ErrorReply, Events, Server, ServerOptions};

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
enum CrashPoint {
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
#[derive(clap::Args, Clone)]
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
        #[arg(long, requires = "crash_point")]
        crash_at: Option<u64>,
        #[arg(long, value_enum)]
        crash_point: Option<CrashPoint>,
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

fn guest_binary(arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p);
    }
    let me = std::env::current_exe().context("locating this binary")?;
    Ok(me.with_file_name("xenft-synthetic-guest"))
}

/// The guest the engine protects or replicates.
enum GuestKind {
    Synthetic { binary: PathBuf, memory_bytes: u64 },
    Xen { domid: u32, vcpus: u32 },
}

impl GuestKind {
    fn new(guest: GuestArgs, xen_domid: Option<u32>, xen_vcpus: u32) -> anyhow::Result<Self> {
        Ok(match xen_domid {
            Some(domid) => {
                if xen_vcpus == 0 {
                    bail!("--xen-vcpus must be > 0");
                }
                Self::Xen {
                    domid,
                    vcpus: xen_vcpus,
                }
            }
            None => Self::Synthetic {
                binary: guest_binary(guest.guest_binary)?,
                memory_bytes: guest
                    .memory_mib
                    .checked_mul(1 << 20)
                    .context("--memory-mib is too large")?,
            },
        })
    }

    /// The replica to receive into: an all-zero synthetic guest, or the paused Xen domain
    /// (zeroed).
    fn replica(&self) -> anyhow::Result<Guest> {
        Ok(match self {
            Self::Synthetic {
                binary,
                memory_bytes,
            } => Guest::Local(LocalDomain::replica(binary.clone(), *memory_bytes)?),
            Self::Xen { domid, vcpus } => Guest::Xen(Box::new(
                XenDomain::open_replica(*domid, *vcpus)
                    .with_context(|| format!("opening the replica, Xen domain {domid}"))?,
            )),
        })
    }
}

/// A synthetic guest or a Xen domain, as one [`Domain`].
enum Guest {
    Local(LocalDomain),
    Xen(Box<XenDomain>),
}

macro_rules! on_guest {
    ($g:expr, $d:ident => $e:expr) => {
        match $g {
            Guest::Local($d) => $e,
            Guest::Xen($d) => $e,
        }
    };
}

impl Guest {
    /// The synthetic guest's process id (none for a Xen domain).
    fn guest_pid(&self) -> Option<u32> {
        match self {
            Guest::Local(d) => d.guest_pid(),
            Guest::Xen(_) => None,
        }
    }
}

impl Domain for Guest {
    fn memory_pages(&self) -> u64 {
        on_guest!(self, d => d.memory_pages())
    }
    fn pause(&mut self) -> Result<(), DomainError> {
        on_guest!(self, d => d.pause())
    }
    fn resume(&mut self) -> Result<(), DomainError> {
        on_guest!(self, d => d.resume())
    }
    fn enable_dirty_log(&mut self) -> Result<(), DomainError> {
        on_guest!(self, d => d.enable_dirty_log())
    }
    fn disable_dirty_log(&mut self) -> Result<(), DomainError> {
        on_guest!(self, d => d.disable_dirty_log())
    }
    fn read_and_clear_dirty(&mut self) -> Result<Vec<u64>, DomainError> {
        on_guest!(self, d => d.read_and_clear_dirty())
    }
    fn read_pages(&mut self, pfns: &[u64], out: &mut [u8]) -> Result<(), DomainError> {
        on_guest!(self, d => d.read_pages(pfns, out))
    }
    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), DomainError> {
        on_guest!(self, d => d.write_pages(pfns, data))
    }
    fn vcpu_context(&mut self) -> Result<VcpuContext, DomainError> {
        on_guest!(self, d => d.vcpu_context())
    }
    fn pause_and_collect(&mut self) -> Result<(Vec<u64>, VcpuContext), DomainError> {
        on_guest!(self, d => d.pause_and_collect())
    }
    fn set_vcpu_context(&mut self, ctx: &VcpuContext) -> Result<(), DomainError> {
        on_guest!(self, d => d.set_vcpu_context(ctx))
    }
    fn start_from_replica(&mut self) -> Result<(), DomainError> {
        on_guest!(self, d => d.start_from_replica())
    }
}

/// An A-link carrying the checkpoint channel, and the runtime it runs on; dropping it ends
/// the link.
struct LinkHold {
    link: Link,
    /// The link's checkpoint channel, for each engine run on it.
    channel: CheckpointChannel,
    /// No live path this long after a commit: the primary is gone (secondary).
    path_timeout: Duration,
    _rt: tokio::runtime::Runtime,
}

/// The checkpoint channel over an A-link; with `wait`, fails unless a path comes up in time.
fn alink_endpoint(cfg: LinkConfig, wait: Option<Duration>) -> anyhow::Result<(Endpoint, LinkHold)> {
    let rt = tokio::runtime::Runtime::new().context("tokio runtime")?;
    let path_timeout = cfg.path_timeout;
    let link = start_link(&rt, cfg, wait)?;
    let channel = CheckpointChannel::new(&link, rt.handle().clone())?;
    let (ep, _) = channel.endpoint();
    Ok((
        ep,
        LinkHold {
            link,
            channel,
            path_timeout,
            _rt: rt,
        },
    ))
}

/// The secondary's end of the checkpoint channel: the first connection on the Unix socket
/// `listen`, or the A-link.
fn secondary_endpoint(
    listen: Option<&std::path::Path>,
    alink: Option<LinkConfig>,
) -> anyhow::Result<(Endpoint, Option<LinkHold>)> {
    match (listen, alink) {
        (Some(listen), None) => {
            let _ = std::fs::remove_file(listen);
            let l = UnixListener::bind(listen)
                .with_context(|| format!("binding {}", listen.display()))?;
            let (sock, _) = l.accept()?;
            Ok((unix_stream(sock)?, None))
        }
        (None, Some(cfg)) => {
            let (ep, hold) = alink_endpoint(cfg, None)?;
            Ok((ep, Some(hold)))
        }
        _ => bail!("secondary needs exactly one of --listen or --alink-path"),
    }
}

fn die() -> ! {
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    std::process::abort()
}

/// Which epoch number the K-th checkpoint got (0 until known).
struct Crash {
    k: u64,
    point: CrashPoint,
    seen: AtomicU64,
    epoch: AtomicU64,
}

struct CrashSender {
    inner: Box<dyn FrameSender>,
    crash: Arc<Crash>,
    in_target: bool,
    last_epoch: u64,
}

impl FrameSender for CrashSender {
    fn send(&mut self, frame: Bytes) -> Result<(), TransportError> {
        if self.in_target && self.crash.point == CrashPoint::MidStream {
            die();
        }
        if let Ok(Frame::Begin {
            epoch,
            checkpoint: true,
            ..
        }) = Frame::decode(&frame)
        {
            // Count each checkpoint once, not its re-sends.
            if epoch <= self.last_epoch {
                return self.inner.send(frame);
            }
            self.last_epoch = epoch;
            let n = self.crash.seen.fetch_add(1, Ordering::SeqCst) + 1;
            if n == self.crash.k {
                self.crash.epoch.store(epoch, Ordering::SeqCst);
                if self.crash.point == CrashPoint::BeforeSend {
                    die();
                }
                self.in_target = true;
            }
        }
        self.inner.send(frame)
    }
}

struct CrashReceiver {
    inner: Box<dyn FrameReceiver>,
    crash: Arc<Crash>,
}

impl FrameReceiver for CrashReceiver {
    fn recv(&mut self, timeout: Duration) -> Result<Option<Bytes>, TransportError> {
        let r = self.inner.recv(timeout)?;
        if let Some(f) = &r {
            let target = self.crash.epoch.load(Ordering::SeqCst);
            if let (Ok(Frame::Ack { epoch }), true) = (Frame::decode(f), target != 0) {
                if epoch >= target && self.crash.point == CrashPoint::AfterAck {
                    die();
                }
            }
        }
        Ok(r)
    }
}

struct CrashSink {
    inner: RecordingSink,
    crash: Option<Arc<Crash>>,
    /// The VM's shims, stamped and committed per epoch.
    shims: Shims,
}

impl CommitSink for CrashSink {
    fn checkpoint(&self, epoch: u64) {
        // Inside the pause: the disk writes issued from now on belong to the next epoch.
        self.shims.checkpoint(epoch);
        self.inner.checkpoint(epoch);
    }
    fn commit(&self, epoch: u64) {
        let hit = self.crash.as_ref().filter(|c| {
            let t = c.epoch.load(Ordering::SeqCst);
            t != 0 && epoch == t
        });
        if hit.is_some_and(|c| c.point == CrashPoint::BeforeCommit) {
            die();
        }
        self.shims.commit(epoch);
        self.inner.commit(epoch);
        if hit.is_some_and(|c| c.point == CrashPoint::AfterCommit) {
            die();
        }
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
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
            // A bad link configuration is reported before the guest is touched.
            let link_cfg = alink.link_config()?;
            let domain = match GuestKind::new(guest, xen_domid, xen_vcpus)? {
                GuestKind::Xen { domid, vcpus } => Guest::Xen(Box::new(
                    XenDomain::open(domid, vcpus)
                        .with_context(|| format!("opening Xen domain {domid}"))?,
                )),
                GuestKind::Synthetic {
                    binary,
                    memory_bytes,
                } => {
                    let workload = WorkloadState::new(
                        WorkloadSpec {
                            pattern,
                            write_len,
                            rate_bytes_per_s: rate_mib << 20,
                        },
                        seed,
                    )?;
                    Guest::Local(LocalDomain::spawn(&LocalGuestConfig {
                        binary,
                        memory_bytes,
                        workload,
                        tracking: Default::default(),
                    })?)
                }
            };
            let (endpoint, _link) = match (connect, link_cfg) {
                (Some(connect), None) => {
                    let sock = UnixStream::connect(&connect)
                        .with_context(|| format!("connecting to {}", connect.display()))?;
                    (unix_stream(sock)?, None)
                }
                (None, Some(cfg)) => {
                    let wait = Duration::from_secs(alink_wait_s.max(1));
                    let (ep, hold) = alink_endpoint(cfg, Some(wait))?;
                    (ep, Some(hold))
                }
                _ => bail!("primary needs exactly one of --connect or --alink-path"),
            };
            let (tx, rx) = endpoint;
            let crash = match (crash_at, crash_point) {
                (Some(k), Some(point)) => Some(Arc::new(Crash {
                    k,
                    point,
                    seen: AtomicU64::new(0),
                    epoch: AtomicU64::new(0),
                })),
                _ => None,
            };
            let (tx, rx): (Box<dyn FrameSender>, Box<dyn FrameReceiver>) = match &crash {
                Some(c) => (
                    Box::new(CrashSender {
                        inner: tx,
                        crash: Arc::clone(c),
                        in_target: false,
                        last_epoch: 0,
                    }),
                    Box::new(CrashReceiver {
                        inner: rx,
                        crash: Arc::clone(c),
                    }),
                ),
                None => (tx, rx),
            };
            let inner = match commit_log {
                Some(p) => RecordingSink::with_log(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&p)
                        .with_context(|| format!("opening {}", p.display()))?,
                ),
                None => RecordingSink::new(),
            };
            let sink = Arc::new(CrashSink {
                inner,
                crash,
                shims: Shims::new(blkback_control, netback_control),
            });
            let protection = start_protection(
                domain,
                (tx, rx),
                sink,
                PrimaryConfig {
                    epoch: EpochPolicy::Fixed(Duration::from_millis(epoch_ms)),
                    max_checkpoints: checkpoints,
                    ..PrimaryConfig::default()
                },
            )?;
            // Over the A-link a dead secondary does not close the stream: protection ends
            // when the link has had no live path for the path timeout; the guest runs on.
            let mut loss = _link
                .as_ref()
                .map(|h| (PeerLoss::new(h.path_timeout), &h.link));
            let mut peer_lost = false;
            let st = drive_primary(&protection, Duration::from_millis(20), |_| {
                if let Some((loss, link)) = loss.as_mut() {
                    if loss.observe(Instant::now(), link_up(link), Some(0)) {
                        tracing::warn!("the secondary is gone: protection ends, the guest runs on");
                        link.shutdown();
                        peer_lost = true;
                        return std::ops::ControlFlow::Break(());
                    }
                }
                std::ops::ControlFlow::Continue(())
            });
            drop(protection.stop());
            println!(
                "{}",
                serde_json::json!({
                    "phase": format!("{:?}", st.phase),
                    "secondary_lost": peer_lost,
                    "checkpoints": st.checkpoints,
                    "committed_epoch": st.committed_epoch,
                    "pause_p99_ms": st.pause.p99,
                    "raw_bytes": st.raw_bytes,
                    "wire_bytes": st.wire_bytes,
                })
            );
        }
        Cmd::Secondary {
            guest,
            xen_domid,
            xen_vcpus,
            listen,
            alink,
            control: Some(control),
            reprotect,
            ..
        } => {
            if reprotect.protect_epoch_ms == 0 || reprotect.protect_epoch_ms > 60_000 {
                bail!("--protect-epoch-ms must be 1..=60000");
            }
            let link_cfg = alink.link_config()?;
            let kind = GuestKind::new(guest, xen_domid, xen_vcpus)?;
            control_mode(&kind, listen.as_deref(), link_cfg, &control, reprotect)?;
        }
        Cmd::Secondary {
            guest,
            xen_domid,
            xen_vcpus,
            listen,
            alink,
            run_ms,
            control: None,
            ..
        } => {
            let link_cfg = alink.link_config()?;
            let replica = GuestKind::new(guest, xen_domid, xen_vcpus)?.replica()?;
            let (endpoint, link) = secondary_endpoint(listen.as_deref(), link_cfg)?;
            let sec = start_secondary(replica, endpoint, SecondaryConfig::default())?;
            let liveness = match &link {
                Some(h) => Liveness::Link {
                    link: &h.link,
                    dead_after: h.path_timeout,
                },
                None => Liveness::Stream,
            };
            let status =
                wait_primary_lost(&sec, &liveness, Duration::from_millis(20), None, |_| {})?;
            let (domain, epoch) = sec.failover()?;
            tracing::warn!(epoch, "failover: the replica runs from its last checkpoint");
            match domain {
                Guest::Local(mut domain) => {
                    std::thread::sleep(Duration::from_millis(run_ms));
                    domain.pause()?;
                    let st = WorkloadState::decode(&domain.vcpu_context()?.0)?;
                    println!(
                        "{}",
                        serde_json::json!({
                            "failover_epoch": epoch,
                            "applied_epochs": status.applied_epochs,
                            "rejected_epochs": status.rejected_epochs,
                            "guest_counter_after_run": st.counter,
                        })
                    );
                }
                Guest::Xen(domain) => {
                    println!(
                        "{}",
                        serde_json::json!({
                            "failover_epoch": epoch,
                            "applied_epochs": status.applied_epochs,
                            "rejected_epochs": status.rejected_epochs,
                            "xen_domid": xen_domid,
                        })
                    );
                    // The domain lives on: this process keeps it (and the link) until killed.
                    let _keep = (domain, link);
                    loop {
                        std::thread::park();
                    }
                }
            }
        }
    }
    Ok(())
}

/// The secondary as the agent drives it (`--control`).
enum Replica {
    /// No primary connected yet.
    Waiting,
    /// Receiving checkpoints.
    Receiving(SecondaryHandle<Guest>),
    /// Frozen at its last committed checkpoint (take-over begun).
    Stopped(StoppedSecondary<Guest>),
    /// Resumed from checkpoint `epoch`; the guest runs unprotected. `last_error`: why the
    /// last protection ended, if it failed.
    Running {
        domain: Guest,
        epoch: u64,
        last_error: Option<String>,
    },
    /// Resumed, and protected again toward a returning host (`protect`).
    Protecting(Box<Reprotection>),
    /// A step failed; why.
    Failed(String),
}

/// The resumed guest as the engine sees it while protecting: each checkpoint's vCPU state
/// (the synthetic guest's workload counter) is noted, so `status` shows the guest progressing.
struct Observed {
    inner: Guest,
    /// The workload counter at the last checkpoint.
    counter: Arc<AtomicU64>,
}

impl Observed {
    fn note(&self, ctx: &VcpuContext) {
        if let Ok(w) = WorkloadState::decode(&ctx.0) {
            self.counter.store(w.counter, Ordering::Relaxed);
        }
    }
}

impl Domain for Observed {
    fn memory_pages(&self) -> u64 {
        self.inner.memory_pages()
    }
    fn pause(&mut self) -> Result<(), DomainError> {
        self.inner.pause()
    }
    fn resume(&mut self) -> Result<(), DomainError> {
        self.inner.resume()
    }
    fn enable_dirty_log(&mut self) -> Result<(), DomainError> {
        self.inner.enable_dirty_log()
    }
    fn disable_dirty_log(&mut self) -> Result<(), DomainError> {
        self.inner.disable_dirty_log()
    }
    fn read_and_clear_dirty(&mut self) -> Result<Vec<u64>, DomainError> {
        self.inner.read_and_clear_dirty()
    }
    fn read_pages(&mut self, pfns: &[u64], out: &mut [u8]) -> Result<(), DomainError> {
        self.inner.read_pages(pfns, out)
    }
    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), DomainError> {
        self.inner.write_pages(pfns, data)
    }
    fn vcpu_context(&mut self) -> Result<VcpuContext, DomainError> {
        let c = self.inner.vcpu_context()?;
        self.note(&c);
        Ok(c)
    }
    fn pause_and_collect(&mut self) -> Result<(Vec<u64>, VcpuContext), DomainError> {
        let (d, c) = self.inner.pause_and_collect()?;
        self.note(&c);
        Ok((d, c))
    }
    fn set_vcpu_context(&mut self, ctx: &VcpuContext) -> Result<(), DomainError> {
        self.inner.set_vcpu_context(ctx)
    }
    fn start_from_replica(&mut self) -> Result<(), DomainError> {
        self.inner.start_from_replica()
    }
}

/// The resumed guest, protected by this process as a primary.
struct Reprotection {
    protection: Protection<Observed>,
    /// The guest's workload counter at the last checkpoint.
    counter: Arc<AtomicU64>,
    /// The relay to put back in pass-through when protection ends.
    relay: Option<PathBuf>,
    /// A handle on the channel, to cut it when protection must end now (`unprotect`).
    link: PeerCut,
    /// Where the secondary is.
    peer: Peer,
    /// Over the A-link: the judgement that the secondary is gone (no live path for the path
    /// timeout), which ends protection as `primary` does.
    loss: Option<PeerLoss>,
    /// The checkpoint the guest resumed from at take-over.
    resumed_epoch: u64,
    guest_pid: Option<u32>,
}

/// Where `protect` sends the checkpoints.
#[derive(Clone, PartialEq, Eq)]
enum Peer {
    /// A `secondary --listen` Unix socket.
    Socket(PathBuf),
    /// The returning host's fresh secondary over this process's own A-link (its peer host).
    Alink(String),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Socket(p) => write!(f, "{}", p.display()),
            Peer::Alink(host) => write!(f, "alink:{host}"),
        }
    }
}

/// Ends a protection's channel now.
enum PeerCut {
    Socket(UnixStream),
    Alink(Cut),
}

impl PeerCut {
    fn cut(&self) {
        match self {
            PeerCut::Socket(s) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            PeerCut::Alink(c) => c.cut(),
        }
    }
}

/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why a `protect` request is refused (the guest keeps running in every case).
#[derive(Debug, thiserror::Error)]
enum ProtectError {
    #[error("this secondary has no A-link (it listens on a Unix socket): protect <absolute path of the returning host's secondary socket>")]
    NoAlink,
    #[error("the A-link to {0} has no live path: start the returning host's `xenft-checkpoint secondary` with the mirrored A-link options first")]
    AlinkDown(String),
    #[error("the peer on the A-link to {0} is still the process this host last exchanged checkpoints with: protect needs a fresh `xenft-checkpoint secondary` there")]
    SamePeer(String),
    #[error("the secondary's socket must be an absolute path of at most {MAX_SOCKET_PATH} bytes without control characters")]
    BadPeer,
    #[error("no resumed guest to protect (state {0}): protect follows failover")]
    NotRunning(&'static str),
    #[error("already protecting toward {0}")]
    AlreadyProtecting(String),
    #[error("connecting to the secondary at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("starting protection: {0}")]
    Engine(String),
}

/// Parses and checks `protect`'s argument: none or `alink` is this process's A-link (to
/// `alink_peer`, if it has one), else a socket path.
fn peer_of(arg: Option<&str>, alink_peer: Option<&str>) -> Result<Peer, ProtectError> {
    let a = arg.map(str::trim).filter(|a| !a.is_empty());
    match a {
        None | Some("alink") => alink_peer
            .map(|h| Peer::Alink(h.to_string()))
            .ok_or(ProtectError::NoAlink),
        Some(a) => {
            if a.len() > MAX_SOCKET_PATH || !a.starts_with('/') || a.chars().any(char::is_control) {
                return Err(ProtectError::BadPeer);
            }
            Ok(Peer::Socket(PathBuf::from(a)))
        }
    }
}

fn state_of(state: &Replica) -> State {
    match state {
        Replica::Waiting => State::Waiting,
        Replica::Receiving(_) => State::Receiving,
        Replica::Stopped(_) => State::Stopped,
        Replica::Running { .. } => State::Running,
        Replica::Protecting(_) => State::Protecting,
        Replica::Failed(_) => State::Failed,
    }
}

fn state_name(state: &Replica) -> &'static str {
    match state {
        Replica::Waiting => "waiting",
        Replica::Receiving(_) => "receiving",
        Replica::Stopped(_) => "stopped",
        Replica::Running { .. } => "running",
        Replica::Protecting(_) => "protecting",
        Replica::Failed(_) => "failed",
    }
}

/// Ends a protection and takes the (running) guest back. `cut`: cut the link first, so a
/// send in progress cannot hold the stop.
fn reclaim(r: Reprotection, cut: bool, why: Option<String>) -> Replica {
    if cut {
        r.link.cut();
    }
    let epoch = r.resumed_epoch;
    let stopped = r.protection.stop_keep_domain();
    // Unprotected again: the relay releases what it holds and passes output through.
    Shims::new(None, r.relay.clone()).relay_passthrough();
    match stopped {
        Ok(domain) => Replica::Running {
            domain: domain.inner,
            epoch,
            last_error: why,
        },
        Err((Some(domain), e)) => Replica::Running {
            domain: domain.inner,
            epoch,
            last_error: why.or_else(|| Some(e.to_string())),
        },
        Err((None, e)) => Replica::Failed(format!("protection lost the guest: {e}")),
    }
}

/// A protection that ended by itself (the secondary went away) gives the guest back. Over
/// the A-link (`alink`), a secondary with no live path for the path timeout is gone too.
/// Returns why, when a protection ended.
fn refresh(state: &mut Replica, alink: Option<&LinkHold>) -> Option<String> {
    let mut lost = None;
    if let (Replica::Protecting(r), Some(hold)) = (&mut *state, alink) {
        if let Some(loss) = r.loss.as_mut() {
            if loss.observe(Instant::now(), link_up(&hold.link), Some(0)) {
                lost = Some(format!(
                    "the secondary is gone: no A-link path for {:?}",
                    hold.path_timeout
                ));
            }
        }
    }
    let ended =
        lost.is_some() || matches!(state, Replica::Protecting(r) if r.protection.is_finished());
    if !ended {
        return None;
    }
    let Replica::Protecting(r) = std::mem::replace(state, Replica::Waiting) else {
        return None;
    };
    let why = match (lost, r.protection.status().phase) {
        (Some(why), _) | (None, Phase::Failed(why)) => why,
        _ => "protection ended".to_string(),
    };
    tracing::warn!(reason = %why, "protection of the resumed guest ended; the guest keeps running");
    *state = reclaim(*r, true, Some(why.clone()));
    Some(why)
}

/// The checkpoint channel toward `peer`, and how to cut it; over the A-link also the judge
/// of the secondary's loss.
fn protect_channel(
    peer: &Peer,
    alink: Option<&LinkHold>,
) -> Result<(Endpoint, PeerCut, Option<PeerLoss>), ProtectError> {
    match (peer, alink) {
        (Peer::Socket(path), _) => {
            let sock = UnixStream::connect(path).map_err(|source| ProtectError::Connect {
                path: path.display().to_string(),
                source,
            })?;
            let cut = sock
                .try_clone()
                .map_err(|e| ProtectError::Engine(e.to_string()))?;
            let endpoint = unix_stream(sock).map_err(|e| ProtectError::Engine(e.to_string()))?;
            Ok((endpoint, PeerCut::Socket(cut), None))
        }
        (Peer::Alink(host), Some(hold)) => {
            if !link_up(&hold.link) {
                return Err(ProtectError::AlinkDown(host.clone()));
            }
            // The returning host's secondary is a fresh process: a peer session this host
            // already exchanged checkpoints with is the old primary (still alive behind a
            // partition) or a secondary that already received a protection.
            let now = hold.link.status().peer_session;
            if now.is_none() || now == hold.channel.last_peer_session() {
                return Err(ProtectError::SamePeer(host.clone()));
            }
            let (endpoint, cut) = hold.channel.endpoint();
            // Once streamed to, that secondary is not fresh any more (whatever happens next).
            hold.channel.note_peer_session(now);
            Ok((
                endpoint,
                PeerCut::Alink(cut),
                Some(PeerLoss::new(hold.path_timeout)),
            ))
        }
        (Peer::Alink(_), None) => Err(ProtectError::NoAlink),
    }
}

/// `protect [<socket>|alink]`: the resumed guest is protected toward a secondary at `socket`,
/// or toward the peer over this process's A-link (`alink`).
fn protect(
    state: &mut Replica,
    arg: Option<&str>,
    re: &ReprotectArgs,
    alink: Option<&LinkHold>,
) -> Result<Reply, ProtectError> {
    let alink_peer = alink.map(|h| h.link.status().peer_host);
    let peer = peer_of(arg, alink_peer.as_deref())?;
    match &*state {
        Replica::Running { .. } => {}
        Replica::Protecting(r) if r.peer == peer => {
            return Ok(Reply::Protecting {
                peer: peer.to_string(),
                already: true,
            });
        }
        Replica::Protecting(r) => return Err(ProtectError::AlreadyProtecting(r.peer.to_string())),
        other => return Err(ProtectError::NotRunning(state_name(other))),
    }
    let (endpoint, link, loss) = protect_channel(&peer, alink)?;
    let shims = Shims::new(re.blkback_control.clone(), re.netback_control.clone()).reprotecting();
    shims.restart_disk_epochs();
    let Replica::Running { domain, epoch, .. } = std::mem::replace(state, Replica::Waiting) else {
        return Err(ProtectError::NotRunning("changed"));
    };
    let guest_pid = domain.guest_pid();
    let sink = Arc::new(CrashSink {
        inner: RecordingSink::new(),
        crash: None,
        shims,
    });
    let config = PrimaryConfig {
        epoch: EpochPolicy::Fixed(Duration::from_millis(re.protect_epoch_ms)),
        ..PrimaryConfig::default()
    };
    let counter = Arc::new(AtomicU64::new(0));
    let observed = Observed {
        inner: domain,
        counter: Arc::clone(&counter),
    };
    match start_protection_keep_domain(observed, endpoint, sink, config) {
        Ok(protection) => {
            tracing::warn!(%peer, "the resumed guest is protected again");
            *state = Replica::Protecting(Box::new(Reprotection {
                protection,
                counter,
                relay: re.netback_control.clone(),
                link,
                peer: peer.clone(),
                loss,
                resumed_epoch: epoch,
                guest_pid,
            }));
            Ok(Reply::Protecting {
                peer: peer.to_string(),
                already: false,
            })
        }
        Err((domain, e)) => {
            link.cut();
            let why = e.to_string();
            *state = match domain {
                Some(domain) => Replica::Running {
                    domain: domain.inner,
                    epoch,
                    last_error: Some(why.clone()),
                },
                None => Replica::Failed(format!("protection lost the guest: {why}")),
            };
            Err(ProtectError::Engine(why))
        }
    }
}

/// `--control`: receive checkpoints; the agent's control socket decides the take-over:
/// - `status` → `{"ok":true,"state":"waiting|receiving|stopped|running|protecting|failed",
///   "committed_epoch":N|null,"applied_epochs":..,"rejected_epochs":..,"primary_gone":..}`;
///   once resumed also `"guest_pid"`, and while protecting `"primary":{"phase","reason",
///   "epoch","committed_epoch","checkpoints","pause_p99_ms","pause_max_ms","guest_counter"
///   (the guest's workload counter at the last checkpoint),"peer" (the socket, or
///   `alink:<peer host>`)}`; after a
///   failed protection `"last_error"`;
/// - `stop` → stops receiving (a partly received epoch is discarded) and freezes the replica at
///   its last committed checkpoint: `{"ok":true,"committed_epoch":N|null}` (the agent commits
///   the disk epochs up to N before resuming);
/// - `failover` → resumes the replica from that checkpoint: `{"ok":true,"epoch":N,
///   "guest_counter":C|null}` (a synthetic guest's workload counter in that checkpoint);
/// - `protect <socket>` (after `failover`) → protects the running guest toward a fresh
///   `xenft-checkpoint secondary --listen <socket>` (the returning host), stamping this
///   host's shims as `primary` does (`--blkback-control`, `--netback-control`); a failure is
///   reported and the guest keeps running;
/// - `protect` or `protect alink` (after `failover`, this secondary runs over an A-link) →
///   the same toward the peer over this process's A-link, where the returning host runs a
///   fresh `xenft-checkpoint secondary` with the mirrored A-link options. Refused while no
///   path is up, or while the peer is still the process this one last exchanged checkpoints
///   with (the old primary, or a secondary that already received): the agent retries. The
///   peer counts as gone, and protection ends, after the path timeout without a live path.
///   On a Unix-socket secondary it is an error naming the socket form;
/// - `unprotect` → ends that protection; the guest keeps running.
///
/// `stop`, `failover`, `protect` (same socket) and `unprotect` are idempotent. One JSON line per
/// request line; lines are capped at 4 KiB, a connection idle for 5 s is closed.
fn control_mode(
    kind: &GuestKind,
    listen: Option<&std::path::Path>,
    link_cfg: Option<LinkConfig>,
    control: &std::path::Path,
    reprotect: ReprotectArgs,
) -> anyhow::Result<()> {
    use std::sync::Mutex;
    let state = Arc::new(Mutex::new(Replica::Waiting));
    // The A-link, once started (after the control socket listens): `protect` reuses it.
    let alink: Arc<std::sync::OnceLock<LinkHold>> = Arc::default();
    let events: Arc<Events<Event>> = Events::new();
    let st = Arc::clone(&state);
    let al = Arc::clone(&alink);
    let handler = move |req: Request| {
        let mut g = st.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        control_command(&mut g, req, &reprotect, al.get())
    };
    let _server = Server::start::<CheckpointComponent, _>(
        control,
        Arc::new(handler),
        Arc::clone(&events),
        ServerOptions {
            idle: Duration::from_secs(5),
            ..ServerOptions::default()
        },
    )
    .with_context(|| format!("binding {}", control.display()))?;
    // A protection that ends by itself (the secondary died) is noticed without waiting for a
    // request: the guest is taken back and the relay stops holding its output.
    let st = Arc::clone(&state);
    let al = Arc::clone(&alink);
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(100));
        let ended = refresh(
            &mut st.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            al.get(),
        );
        if let Some(reason) = ended {
            events.publish(&Event::ProtectionEnded { reason });
        }
    });
    let replica = kind.replica()?;
    let (endpoint, hold) = secondary_endpoint(listen, link_cfg)?;
    if let Some(hold) = hold {
        let _ = alink.set(hold);
    }
    let sec = start_secondary(replica, endpoint, SecondaryConfig::default())?;
    *state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Replica::Receiving(sec);
    loop {
        std::thread::park();
    }
}

fn control_command(
    state: &mut Replica,
    req: Request,
    re: &ReprotectArgs,
    alink: Option<&LinkHold>,
) -> Result<Reply, ErrorReply> {
    refresh(state, alink);
    match req {
        Request::Status => Ok(Reply::Status(Box::new(status_of(state)))),
        Request::Stop => {
            if matches!(state, Replica::Receiving(_)) {
                let Replica::Receiving(h) = std::mem::replace(state, Replica::Waiting) else {
                    return Err(ErrorReply::failed("state changed"));
                };
                *state = match h.stop() {
                    Ok(s) => Replica::Stopped(s),
                    Err(e) => Replica::Failed(e.to_string()),
                };
            }
            match &*state {
                Replica::Stopped(s) => Ok(Reply::Stopped {
                    committed_epoch: s.committed().map(|(e, _)| e),
                }),
                Replica::Running { epoch, .. } => Ok(Reply::Stopped {
                    committed_epoch: Some(*epoch),
                }),
                Replica::Protecting(r) => Ok(Reply::Stopped {
                    committed_epoch: Some(r.resumed_epoch),
                }),
                Replica::Waiting => Err(ErrorReply::refused(
                    "no primary has connected: nothing to stop",
                )),
                Replica::Failed(why) => Err(ErrorReply::failed(why)),
                Replica::Receiving(_) => Err(ErrorReply::failed("still receiving")),
            }
        }
        Request::Failover => failover(state),
        Request::Protect { peer } => protect(state, peer.as_deref(), re, alink).map_err(|e| {
            tracing::warn!(error = %e, "protect refused; the guest keeps running");
            match e {
                ProtectError::Engine(_) | ProtectError::Connect { .. } => ErrorReply::failed(e),
                _ => ErrorReply::refused(e),
            }
        }),
        Request::Unprotect => {
            if matches!(state, Replica::Protecting(_)) {
                let Replica::Protecting(r) = std::mem::replace(state, Replica::Waiting) else {
                    return Err(ErrorReply::failed("state changed"));
                };
                *state = match reclaim(*r, true, None) {
                    // The cut link is how it was asked to end: not an error.
                    Replica::Running { domain, epoch, .. } => Replica::Running {
                        domain,
                        epoch,
                        last_error: None,
                    },
                    other => other,
                };
                tracing::warn!("protection ended on request; the guest keeps running");
            }
            match &*state {
                Replica::Running { epoch, .. } => Ok(Reply::Running { epoch: *epoch }),
                Replica::Failed(why) => Err(ErrorReply::failed(why)),
                other => Err(ErrorReply::refused(format!(
                    "nothing to unprotect (state {})",
                    state_name(other)
                ))),
            }
        }
    }
}

/// `status`.
fn status_of(state: &Replica) -> Status {
    let committed_epoch = match state {
        Replica::Waiting | Replica::Failed(_) => None,
        Replica::Receiving(h) => h.status().committed_epoch,
        Replica::Stopped(s) => s.committed().map(|(e, _)| e),
        Replica::Running { epoch, .. } => Some(*epoch),
        Replica::Protecting(r) => Some(r.resumed_epoch),
    };
    let mut st = Status {
        state: state_of(state),
        committed_epoch,
        applied_epochs: None,
        rejected_epochs: None,
        primary_gone: None,
        error: None,
        guest_pid: None,
        last_error: None,
        primary: None,
    };
    match state {
        Replica::Receiving(h) => {
            let s = h.status();
            st.applied_epochs = Some(s.applied_epochs);
            st.rejected_epochs = Some(s.rejected_epochs);
            st.primary_gone = Some(s.primary_gone);
        }
        Replica::Failed(why) => st.error = Some(why.clone()),
        Replica::Running {
            domain, last_error, ..
        } => {
            st.guest_pid = domain.guest_pid();
            st.last_error.clone_from(last_error);
        }
        Replica::Protecting(r) => {
            let s = r.protection.status();
            let (phase, reason) = match &s.phase {
                Phase::Precopy => (ProtectPhase::Precopy, None),
                Phase::Protected => (ProtectPhase::Protected, None),
                Phase::Stopped => (ProtectPhase::Stopped, None),
                Phase::Failed(why) => (ProtectPhase::Failed, Some(why.clone())),
            };
            st.guest_pid = r.guest_pid;
            st.primary = Some(Protecting {
                phase,
                reason,
                epoch: s.epoch,
                committed_epoch: s.committed_epoch,
                checkpoints: s.checkpoints,
                pause_p99_ms: s.pause.p99,
                pause_max_ms: s.pause.max,
                guest_counter: r.counter.load(Ordering::Relaxed),
                peer: r.peer.to_string(),
            });
        }
        Replica::Waiting | Replica::Stopped(_) => {}
    }
    st
}

/// `failover`: resume the replica from its last committed checkpoint (idempotent).
fn failover(state: &mut Replica) -> Result<Reply, ErrorReply> {
    match &*state {
        Replica::Running { epoch, .. } => {
            return Ok(Reply::Resumed {
                epoch: *epoch,
                guest_counter: None,
            })
        }
        Replica::Protecting(r) => {
            return Ok(Reply::Resumed {
                epoch: r.resumed_epoch,
                guest_counter: None,
            })
        }
        _ => {}
    }
    let stopped = match std::mem::replace(state, Replica::Waiting) {
        Replica::Receiving(h) => h.stop(),
        Replica::Stopped(s) => Ok(s),
        Replica::Waiting => {
            return Err(ErrorReply::refused(
                "no primary has connected: no checkpoint",
            ))
        }
        other @ (Replica::Failed(_) | Replica::Running { .. } | Replica::Protecting(_)) => {
            *state = other;
            return Err(ErrorReply::refused("the replica failed before"));
        }
    };
    // A synthetic guest's workload counter in that checkpoint: where it resumes.
    let counter = |s: &mut StoppedSecondary<Guest>| {
        let ctx = s.committed().map(|(_, c)| c.0.clone())?;
        matches!(s.domain_mut(), Guest::Local(_))
            .then(|| WorkloadState::decode(&ctx).ok().map(|w| w.counter))
            .flatten()
    };
    let resumed = stopped.and_then(|mut s| {
        let c = counter(&mut s);
        s.failover().map(|r| (r, c))
    });
    match resumed {
        Ok(((domain, epoch), guest_counter)) => {
            tracing::warn!(epoch, "failover: the replica runs from its last checkpoint");
            *state = Replica::Running {
                domain,
                epoch,
                last_error: None,
            };
            Ok(Reply::Resumed {
                epoch,
                guest_counter,
            })
        }
        Err(e) => {
            let why = e.to_string();
            *state = Replica::Failed(why.clone());
            Err(ErrorReply::failed(why))
        }
    }
}
