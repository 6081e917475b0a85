//! The `xenft-checkpoint` daemon: one side of level-3 protection run as a process, of a
//! synthetic guest or a Xen domain, over a Unix socket or an A-link. The binary parses its
//! arguments into one of the configurations here and calls its entry function:
//!
//! - [`run_primary`] ([`PrimaryRun`]): protect the guest until the checkpoint budget is spent,
//!   the secondary goes away (over an A-link: no live path for the path timeout; the guest
//!   runs on, unprotected) or protection fails; returns the [`PrimaryOutcome`].
//! - [`run_secondary`] ([`SecondaryRun`]): receive checkpoints and fail over by itself when the
//!   primary is gone (a Unix socket: the stream ends; an A-link: no live path for the path
//!   timeout after a checkpoint was committed); returns what it [`FailedOver`] to.
//! - [`run_controlled`] ([`ControlledRun`]): receive checkpoints and leave the take-over to the
//!   agent on the control socket (the typed contract [`xenft_control::checkpoint`]), including
//!   re-protection of the resumed guest ([`Reprotect`]).
//! - [`run_primary_controlled`] (`primary --control`): protect the guest as the agent's
//!   component: the same state machine, started with the guest running; a lost secondary
//!   ends protection (an event), never the process, and `protect` protects again.
//!
//! The files: `guest` (the synthetic-or-Xen [`GuestKind`]), `link` (the channel's ends),
//! `crash` (crash injection for tests, [`CrashAt`]), `replica` (the `--control` state
//! machine), `reprotect` (`protect` / `unprotect` of a running guest), `controlled` (the
//! control socket around them, for either side).

mod controlled;
mod crash;
mod error;
mod guest;
mod link;
mod replica;
mod reprotect;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use xenft_alink::LinkConfig;

pub use controlled::{run_controlled, run_primary_controlled, ControlledRun};
pub use crash::{CrashAt, CrashPoint};
pub use error::{DaemonError, EngineOp, GuestOp, IoOp};
pub use guest::GuestKind;
pub use reprotect::Reprotect;

use crate::domain::Domain;
use crate::engine::commit::RecordingSink;
use crate::engine::primary::{start_protection, EpochPolicy, PrimaryConfig};
use crate::engine::secondary::{start_secondary, SecondaryConfig};
use crate::run::{drive_primary, link_up, wait_primary_lost, Liveness, PeerLoss};
use crate::shims::Shims;
use crate::workload::{WorkloadSpec, WorkloadState};
use crash::{Crash, CrashSink};
use guest::Guest;
use link::{primary_endpoint, secondary_endpoint, LinkHold};

/// Where the primary sends its checkpoints.
#[derive(Clone)]
pub enum PrimaryTransport {
    /// The secondary's Unix socket.
    Connect(PathBuf),
    /// The A-link's checkpoint channel.
    Alink {
        /// The link.
        link: LinkConfig,
        /// Give up when no path is up after this long.
        wait: Duration,
    },
}

/// Where the secondary receives checkpoints.
#[derive(Clone)]
pub enum SecondaryTransport {
    /// The first connection on this Unix socket (bound afresh).
    Listen(PathBuf),
    /// The A-link's checkpoint channel.
    Alink(LinkConfig),
}

/// `xenft-checkpoint primary`: what to protect, toward where, how.
pub struct PrimaryRun {
    /// The guest: a synthetic guest started now, or a running Xen domain.
    pub guest: GuestKind,
    /// The synthetic guest's workload (a Xen domain runs its own).
    pub workload: WorkloadSpec,
    /// The synthetic guest's workload seed.
    pub seed: u64,
    /// Toward the secondary.
    pub transport: PrimaryTransport,
    /// Epoch length.
    pub epoch: Duration,
    /// Stop after this many checkpoints.
    pub checkpoints: Option<u64>,
    /// Append "commit N" lines here when epochs commit.
    pub commit_log: Option<PathBuf>,
    /// The VM's `xenft-blkback` primary control socket: each checkpoint N is sent as
    /// `checkpoint N` (later writes belong to epoch N + 1) and each commit as `commit N`.
    pub blkback_control: Option<PathBuf>,
    /// The VM's `xenft-netback` control socket (relay in buffered mode): checkpoint N is sent
    /// as `begin_epoch N + 1` and each commit as `commit N` (releases the output).
    pub netback_control: Option<PathBuf>,
    /// Kill this process at a point of a checkpoint (tests).
    pub crash: Option<CrashAt>,
}

/// How a primary run ended (printed as one JSON line).
#[derive(Clone, Debug, Serialize)]
pub struct PrimaryOutcome {
    // Fields in name order: the line reads as it did when it was built as a JSON map.
    /// Checkpoints taken.
    pub checkpoints: u64,
    /// Last epoch the secondary acknowledged.
    pub committed_epoch: u64,
    /// 99th percentile of the guest's pause per checkpoint, ms.
    pub pause_p99_ms: f64,
    /// The engine's last phase (`Debug` form).
    pub phase: String,
    /// Dirty page bytes carried.
    pub raw_bytes: u64,
    /// Protection ended because the secondary was gone (A-link); the guest runs on.
    pub secondary_lost: bool,
    /// Bytes on the wire.
    pub wire_bytes: u64,
}

/// Protects the guest until the checkpoint budget is spent, protection fails, or (over an
/// A-link) the link has had no live path for the path timeout; the guest is left running.
///
/// # Errors
/// A [`DaemonError`] naming the step that failed before protection started.
pub fn run_primary(cfg: PrimaryRun) -> Result<PrimaryOutcome, DaemonError> {
    let domain = cfg.guest.protected(cfg.workload, cfg.seed)?;
    let (endpoint, link) = primary_endpoint(cfg.transport)?;
    let crash = cfg.crash.map(Crash::new);
    let endpoint = match &crash {
        Some(c) => c.wrap(endpoint),
        None => endpoint,
    };
    let inner = match cfg.commit_log {
        Some(path) => RecordingSink::with_log(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(DaemonError::io(IoOp::CommitLog, path))?,
        ),
        None => RecordingSink::new(),
    };
    let sink = Arc::new(CrashSink {
        inner,
        crash,
        shims: Shims::new(cfg.blkback_control, cfg.netback_control),
    });
    let protection = start_protection(
        domain,
        endpoint,
        sink,
        PrimaryConfig {
            epoch: EpochPolicy::Fixed(cfg.epoch),
            max_checkpoints: cfg.checkpoints,
            ..PrimaryConfig::default()
        },
    )
    .map_err(DaemonError::engine(EngineOp::StartProtection))?;
    // Over the A-link a dead secondary does not close the stream: protection ends
    // when the link has had no live path for the path timeout; the guest runs on.
    let mut loss = link
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
    Ok(PrimaryOutcome {
        checkpoints: st.checkpoints,
        committed_epoch: st.committed_epoch,
        pause_p99_ms: st.pause.p99,
        phase: format!("{:?}", st.phase),
        raw_bytes: st.raw_bytes,
        secondary_lost: peer_lost,
        wire_bytes: st.wire_bytes,
    })
}

/// `xenft-checkpoint secondary` without `--control`: fails over by itself.
pub struct SecondaryRun {
    /// The replica: an all-zero synthetic guest, or the paused Xen domain (zeroed first).
    pub guest: GuestKind,
    /// From the primary.
    pub transport: SecondaryTransport,
    /// How long a resumed synthetic guest runs before its state is read.
    pub run: Duration,
}

/// What a secondary failed over to (printed as one JSON line).
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum SecondaryOutcome {
    /// A synthetic guest, which ran for [`SecondaryRun::run`].
    Synthetic {
        /// Epochs applied before the failover.
        applied_epochs: u64,
        /// The checkpoint the replica resumed from.
        failover_epoch: u64,
        /// The guest's workload counter after its run.
        guest_counter_after_run: u64,
        /// Epochs refused.
        rejected_epochs: u64,
    },
    /// A Xen domain, which lives on.
    Xen {
        /// Epochs applied before the failover.
        applied_epochs: u64,
        /// The checkpoint the domain resumed from.
        failover_epoch: u64,
        /// Epochs refused.
        rejected_epochs: u64,
        /// The domain.
        xen_domid: Option<u32>,
    },
}

/// A secondary that failed over: what it resumed, and the guest (and link) it holds.
pub struct FailedOver {
    /// What it failed over to.
    pub outcome: SecondaryOutcome,
    held: (Guest, Option<LinkHold>),
}

impl FailedOver {
    /// After the outcome is reported: a synthetic guest ends with its process (returns); a
    /// Xen domain lives on, and this holds it and the link until the process is killed.
    pub fn finish(self) {
        if matches!(self.held.0, Guest::Xen(_)) {
            let _keep = self.held;
            loop {
                std::thread::park();
            }
        }
    }
}

/// Receives checkpoints until the primary is gone, then resumes the replica from the last
/// checkpoint it applied; a synthetic guest then runs for [`SecondaryRun::run`].
///
/// # Errors
/// A [`DaemonError`] naming the step that failed.
pub fn run_secondary(cfg: SecondaryRun) -> Result<FailedOver, DaemonError> {
    let xen_domid = match &cfg.guest {
        GuestKind::Xen { domid, .. } => Some(*domid),
        GuestKind::Synthetic { .. } => None,
    };
    let replica = cfg.guest.replica()?;
    let (endpoint, link) = secondary_endpoint(cfg.transport)?;
    let sec = start_secondary(replica, endpoint, SecondaryConfig::default())
        .map_err(DaemonError::engine(EngineOp::StartSecondary))?;
    let liveness = match &link {
        Some(h) => Liveness::Link {
            link: &h.link,
            dead_after: h.path_timeout,
        },
        None => Liveness::Stream,
    };
    let status = wait_primary_lost(&sec, &liveness, Duration::from_millis(20), None, |_| {})
        .map_err(DaemonError::WaitPrimary)?;
    let (domain, epoch) = sec
        .failover()
        .map_err(DaemonError::engine(EngineOp::Failover))?;
    tracing::warn!(epoch, "failover: the replica runs from its last checkpoint");
    let mut domain = domain;
    let outcome = match &mut domain {
        Guest::Local(local) => {
            std::thread::sleep(cfg.run);
            local
                .pause()
                .map_err(DaemonError::guest(GuestOp::AfterRun))?;
            let ctx = local
                .vcpu_context()
                .map_err(DaemonError::guest(GuestOp::AfterRun))?;
            let st = WorkloadState::decode(&ctx.0).map_err(DaemonError::Workload)?;
            SecondaryOutcome::Synthetic {
                applied_epochs: status.applied_epochs,
                failover_epoch: epoch,
                guest_counter_after_run: st.counter,
                rejected_epochs: status.rejected_epochs,
            }
        }
        Guest::Xen(_) => SecondaryOutcome::Xen {
            applied_epochs: status.applied_epochs,
            failover_epoch: epoch,
            rejected_epochs: status.rejected_epochs,
            xen_domid,
        },
    };
    Ok(FailedOver {
        outcome,
        held: (domain, link),
    })
}
