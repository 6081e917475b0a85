//! The engine under the agent's control (`--control`): one state machine ([`Replica`]) for
//! both sides, served on the control socket ([`xenft_control::checkpoint`]).
//!
//! - [`run_controlled`] (`secondary --control`): receives checkpoints; the agent decides the
//!   take-over (`stop`, `failover`) and the re-protection of the resumed guest.
//! - [`run_primary_controlled`] (`primary --control`): starts (or takes) the guest, which is
//!   then `running`, and protects it at once toward the secondary (`protecting`). When the
//!   secondary goes away protection ends — the event `protection_ended` with its reason — and
//!   the guest runs on unprotected in the same process; the agent's `protect` protects it
//!   again toward a fresh secondary, `unprotect` ends protection. The process stays.

use std::convert::Infallible;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use xenft_control::checkpoint::{Event, Request};
use xenft_control::{Checkpoint as CheckpointComponent, Events, Server, ServerOptions};

use super::crash::CrashSink;
use super::error::{DaemonError, EngineOp, IoOp};
use super::link::{alink_hold, secondary_endpoint, LinkHold};
use super::replica::{control_command, Replica, Side};
use super::reprotect::{protect_with, refresh, ProtectError, Reprotect, Start};
use super::{GuestKind, PrimaryRun, PrimaryTransport, SecondaryTransport};
use crate::engine::commit::RecordingSink;
use crate::engine::primary::{EpochPolicy, PrimaryConfig};
use crate::engine::secondary::{start_secondary, SecondaryConfig};
use crate::shims::Shims;

/// How often a protection that ended by itself is looked for.
const REFRESH: Duration = Duration::from_millis(100);
/// `primary --control --connect`: how long the first protection waits for the socket.
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// Between two attempts of the first protection.
const RETRY: Duration = Duration::from_millis(100);

type Shared = Arc<Mutex<Replica>>;
type SharedLink = Arc<OnceLock<LinkHold>>;

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, Replica> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves the control socket on `state`, and notices (every [`REFRESH`]) a protection that
/// ended by itself (the secondary died): the guest is taken back, the relay stops holding its
/// output, and `protection_ended` is published.
fn serve(
    control: &Path,
    side: Side,
    state: &Shared,
    alink: &SharedLink,
    reprotect: Reprotect,
) -> Result<(Server, Arc<Events<Event>>), DaemonError> {
    let events: Arc<Events<Event>> = Events::new();
    let (st, al) = (Arc::clone(state), Arc::clone(alink));
    let handler =
        move |req: Request| control_command(&mut lock(&st), side, req, &reprotect, al.get());
    let server = Server::start::<CheckpointComponent, _>(
        control,
        Arc::new(handler),
        Arc::clone(&events),
        ServerOptions {
            idle: Duration::from_secs(5),
            ..ServerOptions::default()
        },
    )
    .map_err(DaemonError::io(IoOp::Bind, control))?;
    let (st, al, ev) = (Arc::clone(state), Arc::clone(alink), Arc::clone(&events));
    std::thread::spawn(move || loop {
        std::thread::sleep(REFRESH);
        let ended = refresh(&mut lock(&st), al.get());
        if let Some(reason) = ended {
            ev.publish(&Event::ProtectionEnded { reason });
        }
    });
    Ok((server, events))
}

/// `xenft-checkpoint secondary --control`: the agent decides the take-over.
pub struct ControlledRun {
    /// The replica.
    pub guest: GuestKind,
    /// From the primary.
    pub transport: SecondaryTransport,
    /// The agent's control socket (`status`, `stop`, `failover`, `protect`, `unprotect`).
    pub control: PathBuf,
    /// How `protect` protects the resumed guest.
    pub reprotect: Reprotect,
}

/// Serves the control socket, then receives checkpoints; the agent's requests drive the
/// take-over and re-protection (see the control contract [`xenft_control::checkpoint`]).
/// Runs until the process is killed.
///
/// # Errors
/// A [`DaemonError`] naming the step that failed before receiving started.
pub fn run_controlled(cfg: ControlledRun) -> Result<Infallible, DaemonError> {
    let ControlledRun {
        guest,
        transport,
        control,
        reprotect,
    } = cfg;
    let state: Shared = Arc::new(Mutex::new(Replica::Waiting));
    // The A-link, once started (after the control socket listens): `protect` reuses it.
    let alink: SharedLink = Arc::default();
    let _server = serve(&control, Side::Secondary, &state, &alink, reprotect)?;
    let replica = guest.replica()?;
    let (endpoint, hold) = secondary_endpoint(transport)?;
    if let Some(hold) = hold {
        let _ = alink.set(hold);
    }
    let sec = start_secondary(replica, endpoint, SecondaryConfig::default())
        .map_err(DaemonError::engine(EngineOp::StartSecondary))?;
    *lock(&state) = Replica::Receiving(sec);
    loop {
        std::thread::park();
    }
}

/// `xenft-checkpoint primary --control C`: starts (or takes) the guest, serves `control`, and
/// protects the guest toward the secondary (`--connect` socket, or the A-link once a path is
/// up and the peer is a fresh secondary, within `--alink-wait-s`). From then on the agent
/// drives it like a resumed replica: the guest runs whatever happens to protection, and the
/// process runs until it is killed. `--crash-at` is not used here.
///
/// # Errors
/// A [`DaemonError`] naming the step that failed before the guest ran.
pub fn run_primary_controlled(cfg: PrimaryRun, control: &Path) -> Result<Infallible, DaemonError> {
    let commit_log = match &cfg.commit_log {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(DaemonError::io(IoOp::CommitLog, path))?,
        ),
        None => None,
    };
    let reprotect = Reprotect {
        blkback_control: cfg.blkback_control.clone(),
        netback_control: cfg.netback_control.clone(),
        epoch: cfg.epoch,
    };
    let domain = cfg.guest.protected(cfg.workload, cfg.seed)?;
    let state: Shared = Arc::new(Mutex::new(Replica::Running {
        domain,
        epoch: 0,
        last_error: None,
    }));
    let alink: SharedLink = Arc::default();
    let (_server, events) = serve(control, Side::Primary, &state, &alink, reprotect.clone())?;
    let (peer, wait) = match cfg.transport {
        PrimaryTransport::Connect(path) => {
            let path = if path.is_absolute() {
                path
            } else {
                std::env::current_dir()
                    .map_err(DaemonError::io(IoOp::Connect, &path))?
                    .join(path)
            };
            (Some(path.display().to_string()), CONNECT_WAIT)
        }
        PrimaryTransport::Alink { link, wait } => {
            let _ = alink.set(alink_hold(link, None)?);
            (None, wait)
        }
    };
    let first = FirstProtection {
        peer,
        reprotect,
        commit_log,
        max_checkpoints: cfg.checkpoints,
    };
    if let Err(why) = first.run(&state, &alink, wait) {
        tracing::warn!(reason = %why, "the guest runs unprotected until the agent asks protect");
        if let Replica::Running { last_error, .. } = &mut *lock(&state) {
            *last_error = Some(why.clone());
        }
        events.publish(&Event::ProtectionEnded { reason: why });
    }
    loop {
        std::thread::park();
    }
}

/// The controlled primary's own first `protect`.
struct FirstProtection {
    /// `None`: over the A-link; else the secondary's socket.
    peer: Option<String>,
    reprotect: Reprotect,
    commit_log: Option<File>,
    max_checkpoints: Option<u64>,
}

impl FirstProtection {
    /// How this protection starts: the shims stamped as `primary` does (the relay already
    /// buffers; the disk epochs numbered from 0, so an engine restarted next to a running
    /// blkback starts clean), the commit log appended to.
    fn start(&self) -> Start {
        let re = &self.reprotect;
        let shims = Shims::new(re.blkback_control.clone(), re.netback_control.clone());
        shims.restart_disk_epochs();
        let inner = match self.commit_log.as_ref().map(File::try_clone) {
            Some(Ok(f)) => RecordingSink::with_log(f),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the commit log cannot be written");
                RecordingSink::new()
            }
            None => RecordingSink::new(),
        };
        Start {
            sink: CrashSink {
                inner,
                crash: None,
                shims,
            },
            config: PrimaryConfig {
                epoch: EpochPolicy::Fixed(re.epoch),
                max_checkpoints: self.max_checkpoints,
                ..PrimaryConfig::default()
            },
        }
    }

    /// Protects the guest, retrying while the secondary is not there yet (no live path, the
    /// peer not fresh, the socket refusing) for up to `wait`. Returns early, with nothing to
    /// do, once the guest is no longer `running` (the agent protected it meanwhile).
    fn run(&self, state: &Shared, alink: &SharedLink, wait: Duration) -> Result<(), String> {
        let deadline = Instant::now() + wait;
        loop {
            let attempt = {
                let mut g = lock(state);
                if !matches!(&*g, Replica::Running { .. }) {
                    return Ok(());
                }
                protect_with(
                    &mut g,
                    self.peer.as_deref(),
                    &self.reprotect,
                    alink.get(),
                    || self.start(),
                )
            };
            match attempt {
                Ok(_) => return Ok(()),
                Err(
                    e @ (ProtectError::AlinkDown(_)
                    | ProtectError::SamePeer(_)
                    | ProtectError::Connect { .. }),
                ) => {
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "no secondary to protect toward after {wait:?}: {e}"
                        ));
                    }
                    std::thread::sleep(RETRY);
                }
                Err(e) => return Err(format!("protection did not start: {e}")),
            }
        }
    }
}
