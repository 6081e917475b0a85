//! `xenft-checkpoint`: run one side of level-3 protection for a synthetic guest over a Unix
//! socket (the Xen path is driven by the agent). Used by the failover tests and for demos.
//!
//! `--crash-at K --crash-point P` kills this process with SIGKILL at point P of the K-th
//! checkpoint, to test what the secondary keeps.
//!
//! With the shims: `primary --blkback-control S --netback-control T` stamps and commits the
//! VM's disk epochs on its blkback primary and output epochs on its relay (the engine's
//! `CommitSink`); `secondary --control C` leaves the take-over to the agent (`status`, `stop`
//! = freeze at the last committed checkpoint, `failover` = resume from it).

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use xenft_checkpoint::engine::commit::{CommitSink, RecordingSink};
use xenft_checkpoint::engine::primary::{start_protection, EpochPolicy, PrimaryConfig};
use xenft_checkpoint::engine::secondary::{
    start_secondary, SecondaryConfig, SecondaryHandle, StoppedSecondary,
};
use xenft_checkpoint::engine::transport::{
    unix_stream, FrameReceiver, FrameSender, TransportError,
};
use xenft_checkpoint::local::{LocalDomain, LocalGuestConfig};
use xenft_checkpoint::wire::Frame;
use xenft_checkpoint::workload::{Pattern, WorkloadSpec, WorkloadState};

#[derive(Parser)]
#[command(about = "Level-3 checkpoint replication of a synthetic guest")]
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

#[derive(Subcommand)]
enum Cmd {
    /// Start a synthetic guest and protect it, streaming to a secondary at --connect.
    Primary {
        #[command(flatten)]
        guest: GuestArgs,
        /// Unix socket of the secondary.
        #[arg(long)]
        connect: PathBuf,
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
    /// Receive checkpoints on --listen; when the primary goes away, fail over and run the
    /// guest for --run-ms, then print the outcome as JSON. With --control, the agent decides
    /// instead: nothing happens by itself; see `control_mode`.
    Secondary {
        #[command(flatten)]
        guest: GuestArgs,
        #[arg(long)]
        listen: PathBuf,
        #[arg(long, default_value_t = 1000)]
        run_ms: u64,
        /// Control socket for the agent (`status`, `stop`, `failover`); the process then
        /// runs until killed.
        #[arg(long)]
        control: Option<PathBuf>,
    },
}

fn guest_binary(arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p);
    }
    let me = std::env::current_exe().context("locating this binary")?;
    Ok(me.with_file_name("xenft-synthetic-guest"))
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
    /// The blkback primary's control socket (`--blkback-control`).
    blkback: Option<PathBuf>,
    /// The netback relay's control socket (`--netback-control`).
    netback: Option<PathBuf>,
}

/// One line to a shim's control socket; the reply must say `"ok":true`. A shim that fails
/// is logged: the disk then lags the memory checkpoints (its writes stay held, which the
/// take-over's commit-up-to-checkpoint handles), the relay holds its output longer.
fn shim_request(path: &std::path::Path, line: &str) {
    use std::io::{BufRead, BufReader, Read, Write};
    let r = (|| -> std::io::Result<String> {
        let mut s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        BufReader::new(s.take(64 * 1024)).read_line(&mut reply)?;
        Ok(reply)
    })();
    match r {
        Ok(reply) if reply.contains("\"ok\":true") => {}
        Ok(reply) => tracing::warn!(%line, reply = %reply.trim(), "shim refused"),
        Err(e) => tracing::warn!(%line, error = %e, "shim control socket"),
    }
}

impl CommitSink for CrashSink {
    fn checkpoint(&self, epoch: u64) {
        // Inside the pause: the disk writes issued from now on belong to the next epoch.
        if let Some(b) = &self.blkback {
            shim_request(b, &format!("checkpoint {epoch}"));
        }
        if let Some(n) = &self.netback {
            let next = epoch.saturating_add(1);
            shim_request(n, &format!("{{\"op\":\"begin_epoch\",\"epoch\":{next}}}"));
        }
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
        if let Some(b) = &self.blkback {
            shim_request(b, &format!("commit {epoch}"));
        }
        if let Some(n) = &self.netback {
            shim_request(n, &format!("{{\"op\":\"commit\",\"epoch\":{epoch}}}"));
        }
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
            connect,
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
            let workload = WorkloadState::new(
                WorkloadSpec {
                    pattern,
                    write_len,
                    rate_bytes_per_s: rate_mib << 20,
                },
                seed,
            )?;
            let domain = LocalDomain::spawn(&LocalGuestConfig {
                binary: guest_binary(guest.guest_binary)?,
                memory_bytes: guest.memory_mib << 20,
                workload,
                tracking: Default::default(),
            })?;
            let sock = UnixStream::connect(&connect)
                .with_context(|| format!("connecting to {}", connect.display()))?;
            let (tx, rx) = unix_stream(sock)?;
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
                blkback: blkback_control,
                netback: netback_control,
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
            while !protection.is_finished() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let st = protection.status();
            drop(protection.stop());
            println!(
                "{}",
                serde_json::json!({
                    "phase": format!("{:?}", st.phase),
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
            listen,
            control: Some(control),
            ..
        } => control_mode(&guest, &listen, &control)?,
        Cmd::Secondary {
            guest,
            listen,
            run_ms,
            control: None,
        } => {
            let _ = std::fs::remove_file(&listen);
            let l = UnixListener::bind(&listen)
                .with_context(|| format!("binding {}", listen.display()))?;
            let (sock, _) = l.accept()?;
            let binary = guest_binary(guest.guest_binary)?;
            let replica = LocalDomain::replica(binary, guest.memory_mib << 20)?;
            let sec = start_secondary(replica, unix_stream(sock)?, SecondaryConfig::default())?;
            while !sec.status().primary_gone {
                std::thread::sleep(Duration::from_millis(20));
            }
            let status = sec.status();
            let (mut domain, epoch) = sec.failover()?;
            std::thread::sleep(Duration::from_millis(run_ms));
            use xenft_checkpoint::domain::Domain;
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
    }
    Ok(())
}

/// The secondary as the agent drives it (`--control`).
enum Replica {
    /// No primary connected yet.
    Waiting,
    /// Receiving checkpoints.
    Receiving(SecondaryHandle<LocalDomain>),
    /// Frozen at its last committed checkpoint (take-over begun).
    Stopped(StoppedSecondary<LocalDomain>),
    /// Resumed from checkpoint `epoch`; the guest runs.
    Running { _domain: LocalDomain, epoch: u64 },
    /// A step failed; why.
    Failed(String),
}

/// Longest control request line.
const MAX_CONTROL_LINE: u64 = 4096;

/// `--control`: receive checkpoints; the agent's control socket decides the take-over:
/// - `status` → `{"ok":true,"state":"waiting|receiving|stopped|running|failed",
///   "committed_epoch":N|null,"applied_epochs":..,"rejected_epochs":..,"primary_gone":..}`;
/// - `stop` → stops receiving (a partly received epoch is discarded) and freezes the replica at
///   its last committed checkpoint: `{"ok":true,"committed_epoch":N|null}` (the agent commits
///   the disk epochs up to N before resuming);
/// - `failover` → resumes the replica from that checkpoint: `{"ok":true,"epoch":N}`.
///
/// `stop` and `failover` are idempotent. One JSON line per request line; lines are capped at
/// 4 KiB, a connection idle for 5 s is closed.
fn control_mode(
    guest: &GuestArgs,
    listen: &std::path::Path,
    control: &std::path::Path,
) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::Mutex;
    let state = Arc::new(Mutex::new(Replica::Waiting));
    let _ = std::fs::remove_file(control);
    let cl =
        UnixListener::bind(control).with_context(|| format!("binding {}", control.display()))?;
    let st = Arc::clone(&state);
    std::thread::spawn(move || {
        for conn in cl.incoming() {
            let Ok(conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let Ok(mut out) = conn.try_clone() else {
                continue;
            };
            let mut rd = BufReader::new(conn);
            loop {
                let mut buf = Vec::new();
                match rd
                    .by_ref()
                    .take(MAX_CONTROL_LINE)
                    .read_until(b'\n', &mut buf)
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let reply = match std::str::from_utf8(&buf) {
                    Ok(line) if buf.last() == Some(&b'\n') => {
                        let mut g = st.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        control_command(&mut g, line.trim())
                    }
                    _ => serde_json::json!({"ok": false, "error": "bad request line"}),
                };
                if writeln!(out, "{reply}").is_err() {
                    break;
                }
            }
        }
    });
    let _ = std::fs::remove_file(listen);
    let l = UnixListener::bind(listen).with_context(|| format!("binding {}", listen.display()))?;
    let (sock, _) = l.accept()?;
    let binary = guest_binary(guest.guest_binary.clone())?;
    let replica = LocalDomain::replica(binary, guest.memory_mib << 20)?;
    let sec = start_secondary(replica, unix_stream(sock)?, SecondaryConfig::default())?;
    *state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Replica::Receiving(sec);
    loop {
        std::thread::park();
    }
}

fn control_command(state: &mut Replica, line: &str) -> serde_json::Value {
    use serde_json::json;
    let fail = |e: &str| json!({"ok": false, "error": e});
    match line {
        "status" => {
            let (name, committed, engine) = match &*state {
                Replica::Waiting => ("waiting", None, None),
                Replica::Receiving(h) => {
                    let s = h.status();
                    ("receiving", s.committed_epoch, Some(s))
                }
                Replica::Stopped(s) => ("stopped", s.committed().map(|(e, _)| e), None),
                Replica::Running { epoch, .. } => ("running", Some(*epoch), None),
                Replica::Failed(_) => ("failed", None, None),
            };
            let mut v = json!({"ok": true, "state": name, "committed_epoch": committed});
            if let Some(s) = engine {
                v["applied_epochs"] = json!(s.applied_epochs);
                v["rejected_epochs"] = json!(s.rejected_epochs);
                v["primary_gone"] = json!(s.primary_gone);
            }
            if let Replica::Failed(why) = &*state {
                v["error"] = json!(why);
            }
            v
        }
        "stop" => {
            if matches!(state, Replica::Receiving(_)) {
                let Replica::Receiving(h) = std::mem::replace(state, Replica::Waiting) else {
                    return fail("state changed");
                };
                *state = match h.stop() {
                    Ok(s) => Replica::Stopped(s),
                    Err(e) => Replica::Failed(e.to_string()),
                };
            }
            match &*state {
                Replica::Stopped(s) => {
                    json!({"ok": true, "committed_epoch": s.committed().map(|(e, _)| e)})
                }
                Replica::Running { epoch, .. } => json!({"ok": true, "committed_epoch": epoch}),
                Replica::Waiting => fail("no primary has connected: nothing to stop"),
                Replica::Failed(why) => fail(why),
                Replica::Receiving(_) => fail("still receiving"),
            }
        }
        "failover" => {
            if let Replica::Running { epoch, .. } = &*state {
                return json!({"ok": true, "epoch": epoch});
            }
            let stopped = match std::mem::replace(state, Replica::Waiting) {
                Replica::Receiving(h) => h.stop(),
                Replica::Stopped(s) => Ok(s),
                Replica::Waiting => return fail("no primary has connected: no checkpoint"),
                other @ (Replica::Failed(_) | Replica::Running { .. }) => {
                    *state = other;
                    return fail("the replica failed before");
                }
            };
            match stopped.and_then(StoppedSecondary::failover) {
                Ok((domain, epoch)) => {
                    tracing::warn!(epoch, "failover: the replica runs from its last checkpoint");
                    *state = Replica::Running {
                        _domain: domain,
                        epoch,
                    };
                    json!({"ok": true, "epoch": epoch})
                }
                Err(e) => {
                    let why = e.to_string();
                    *state = Replica::Failed(why.clone());
                    fail(&why)
                }
            }
        }
        _ => fail("unknown command (status, stop, failover)"),
    }
}
