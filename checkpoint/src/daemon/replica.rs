//! The engine as the agent drives it (`secondary --control`, `primary --control`): the
//! [`Replica`] state machine and the control socket's requests on it. A controlled primary
//! is that machine started at `running` with its guest, protecting it at once
//! (`protecting`); when its secondary goes away it is `running` (unprotected) again until the
//! agent asks `protect`. It refuses `stop` and `failover`. A controlled secondary receives
//! checkpoints; the agent's control socket decides the take-over:
//! - `status` → `{"ok":true,"state":"waiting|receiving|stopped|running|protecting|failed",
//!   "committed_epoch":N|null,"applied_epochs":..,"rejected_epochs":..,"primary_gone":..}`;
//!   once resumed also `"guest_pid"`, and while protecting `"primary":{"phase","reason",
//!   "epoch","committed_epoch","checkpoints","pause_p99_ms","pause_max_ms","guest_counter"
//!   (the guest's workload counter at the last checkpoint),"peer" (the socket, or
//!   `alink:<peer host>`)}`; after a
//!   failed protection `"last_error"`;
//! - `stop` → stops receiving (a partly received epoch is discarded) and freezes the replica at
//!   its last committed checkpoint: `{"ok":true,"committed_epoch":N|null}` (the agent commits
//!   the disk epochs up to N before resuming);
//! - `failover` → resumes the replica from that checkpoint: `{"ok":true,"epoch":N,
//!   "guest_counter":C|null}` (a synthetic guest's workload counter in that checkpoint);
//! - `protect <socket>` (after `failover`) → protects the running guest toward a fresh
//!   `xenft-checkpoint secondary --listen <socket>` (the returning host), stamping this
//!   host's shims as `primary` does (`--blkback-control`, `--netback-control`); a failure is
//!   reported and the guest keeps running;
//! - `protect` or `protect alink` (after `failover`, this secondary runs over an A-link) →
//!   the same toward the peer over this process's A-link, where the returning host runs a
//!   fresh `xenft-checkpoint secondary` with the mirrored A-link options. Refused while no
//!   path is up, or while the peer is still the process this one last exchanged checkpoints
//!   with (the old primary, or a secondary that already received): the agent retries. The
//!   peer counts as gone, and protection ends, after the path timeout without a live path.
//!   On a Unix-socket secondary it is an error naming the socket form;
//! - `unprotect` → ends that protection; the guest keeps running.
//!
//! `stop`, `failover`, `protect` (same socket) and `unprotect` are idempotent. One JSON line per
//! request line; lines are capped at 4 KiB, a connection idle for 5 s is closed.

use std::sync::atomic::Ordering;

use xenft_control::checkpoint::{Phase as ProtectPhase, Protecting, Reply, Request, State, Status};
use xenft_control::ErrorReply;

use super::guest::Guest;
use super::link::LinkHold;
use super::reprotect::{protect, reclaim, refresh, ProtectError, Reprotect, Reprotection};
use crate::engine::primary::Phase;
use crate::engine::secondary::{SecondaryHandle, StoppedSecondary};
use crate::workload::WorkloadState;

/// The secondary as the agent drives it (`--control`).
pub(super) enum Replica {
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

pub(super) fn state_name(state: &Replica) -> &'static str {
    match state {
        Replica::Waiting => "waiting",
        Replica::Receiving(_) => "receiving",
        Replica::Stopped(_) => "stopped",
        Replica::Running { .. } => "running",
        Replica::Protecting(_) => "protecting",
        Replica::Failed(_) => "failed",
    }
}

/// Which side of the protection the engine was started as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    /// `primary --control`: the guest runs here from the start (`running` / `protecting`).
    Primary,
    /// `secondary --control`: a replica until the agent's take-over.
    Secondary,
}

pub(super) fn control_command(
    state: &mut Replica,
    side: Side,
    req: Request,
    re: &Reprotect,
    alink: Option<&LinkHold>,
) -> Result<Reply, ErrorReply> {
    refresh(state, alink);
    if side == Side::Primary && matches!(req, Request::Stop | Request::Failover) {
        return Err(ErrorReply::refused(
            "this engine is the primary: its guest runs here, there is no replica to stop or \
             resume (ask the secondary's engine)",
        ));
    }
    match req {
        Request::Status => Ok(Reply::Status(Box::new(status_of(state, side)))),
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

/// `status`. A secondary's `committed_epoch` is the checkpoint it holds (once resumed: the
/// one it resumed from); a primary's is the last checkpoint its secondary holds (none while
/// unprotected).
fn status_of(state: &Replica, side: Side) -> Status {
    let committed_epoch = match (state, side) {
        (Replica::Waiting | Replica::Failed(_), _) | (Replica::Running { .. }, Side::Primary) => {
            None
        }
        (Replica::Receiving(h), _) => h.status().committed_epoch,
        (Replica::Stopped(s), _) => s.committed().map(|(e, _)| e),
        (Replica::Running { epoch, .. }, Side::Secondary) => Some(*epoch),
        (Replica::Protecting(r), Side::Secondary) => Some(r.resumed_epoch),
        (Replica::Protecting(r), Side::Primary) => {
            Some(r.protection.status().committed_epoch).filter(|&e| e > 0)
        }
    };
    let mut st = Status::new(state_of(state), committed_epoch);
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
