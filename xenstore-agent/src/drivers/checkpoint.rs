//! [`CheckpointDriver`]: the [`Checkpointer`] seam over one VM's checkpoint-engine control
//! socket: `xenft-checkpoint secondary --control` where the VM's replica is, `primary
//! --control` where it runs (the contract [`xenft_control::checkpoint`]).
//!
//! On a level-3 take-over [`crate::seams::Seams::start`] calls, in this order, on the
//! secondary's engine:
//! 1. `committed_epoch` → `stop`: the replica stops receiving (a partly received epoch is
//!    discarded) and stays frozen at its last committed checkpoint `N`;
//! 2. the disk mirror's `promote(N)`: blkback applies its held disk epochs `<= N` and drops
//!    later ones, so disk and memory are the same checkpoint;
//! 3. `resume_last_epoch` → `failover`: the replica resumes from checkpoint `N`.
//!
//! Protection (`protect`, once the disk is in sync with the peer): the engine where the VM
//! runs is either a controlled primary or a resumed replica; both are `running` while
//! unprotected and `protecting` while protected, and the driver treats them alike. If the
//! engine is `running` (a take-over happened here, or a controlled primary's secondary went
//! away and protection ended — the guest ran on), it is asked to `protect <peer_listen>`
//! (plain `protect` when `peer_listen` is `"alink"`: toward the peer over the engine's own
//! A-link, where the peer runs a fresh secondary), retried while the peer's secondary is not
//! there yet; memory replication resumes without pausing the guest beyond an epoch's
//! checkpoint. The sync counts as done (the VM `protected`) once the peer holds a committed
//! checkpoint, within `checkpoint.protect_timeout_ms`. An engine with no control socket is a
//! `primary` the host started by itself, which protects on its own — unless the driver
//! expects the socket ([`CheckpointDriver::expecting_socket`]: the agent supervises the
//! engine, which may just be starting), then its absence is retried.
//!
//! [`CheckpointDriver::status_report`]: the engine's `status` for the status API.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use xenft_control::checkpoint::{Phase, Reply, Request, State, Status};
use xenft_control::Checkpoint;

use super::control::{Client, ControlError};
use crate::ids::{HostId, VmId};
use crate::seams::{Checkpointer, SeamError};

/// Drives one VM's checkpoint-engine secondary.
#[derive(Debug, Clone)]
pub struct CheckpointDriver {
    ctl: Client<Checkpoint>,
    /// The peer's secondary socket, for re-protection.
    peer_listen: Option<PathBuf>,
    /// How long `protect` waits for the returning host's secondary to listen and hold its
    /// first checkpoint.
    protect_wait: Duration,
    /// A missing control socket is an engine not started yet (supervised), not a primary
    /// that protects by itself.
    expect_socket: bool,
}

/// `checkpoint.peer_listen` value meaning: protect over the engine's own A-link (the engine
/// runs with `--alink-path`), toward the returning host's fresh secondary on the same link.
pub const PEER_ALINK: &str = xenft_control::checkpoint::PEER_ALINK;

/// The control request that protects toward `peer`: `protect` over the engine's A-link
/// ([`PEER_ALINK`]), else `protect` naming the socket.
fn protect_request(peer: &std::path::Path) -> Request {
    Request::Protect {
        peer: (peer != std::path::Path::new(PEER_ALINK)).then(|| peer.display().to_string()),
    }
}

/// Default of [`CheckpointDriver::with_protect_wait`].
pub const PROTECT_WAIT: Duration = Duration::from_secs(120);
const PROTECT_POLL: Duration = Duration::from_millis(200);

/// One `protect` attempt's failure: worth retrying (the peer's secondary may not listen yet)
/// or final.
enum Attempt {
    Retry(String),
    Final(String),
}

#[allow(clippy::needless_pass_by_value)] // callers pass temporaries (errors, literals)
fn seam(op: &'static str, vm: &VmId, e: impl ToString) -> SeamError {
    SeamError {
        component: "checkpoint",
        operation: op,
        vm: vm.clone(),
        reason: e.to_string(),
    }
}

impl CheckpointDriver {
    /// A driver for the engine whose control socket is `ctl`.
    #[must_use]
    pub fn new(ctl: Client<Checkpoint>) -> Self {
        Self {
            ctl,
            peer_listen: None,
            protect_wait: PROTECT_WAIT,
            expect_socket: false,
        }
    }

    /// The engine's control socket must exist (the agent supervises the engine): its
    /// absence is retried by `protect`, never taken for a self-protecting primary.
    #[must_use]
    pub fn expecting_socket(mut self) -> Self {
        self.expect_socket = true;
        self
    }

    /// The engine's `status` for the status API: its state, the checkpoint it (or, on a
    /// primary, its secondary) holds, and while protecting the protection's progress.
    #[must_use]
    pub fn status_report(&self) -> Option<serde_json::Value> {
        self.status()
            .ok()
            .and_then(|s| serde_json::to_value(s).ok())
    }

    /// Sets the peer's `xenft-checkpoint secondary --listen` socket (re-protection).
    #[must_use]
    pub fn with_peer_listen(mut self, p: Option<PathBuf>) -> Self {
        self.peer_listen = p;
        self
    }

    /// Sets how long `protect` waits for the peer's secondary (default [`PROTECT_WAIT`]).
    #[must_use]
    pub fn with_protect_wait(mut self, d: Duration) -> Self {
        self.protect_wait = d;
        self
    }

    /// The engine's status.
    fn status(&self) -> Result<Status, ControlError> {
        match self.ctl.call(&Request::Status)? {
            Reply::Status(s) => Ok(*s),
            other => Err(ControlError::unexpected(self.ctl.path(), other)),
        }
    }

    /// One re-protection attempt; `Ok`: protected (or nothing to do here).
    fn protect_once(&self) -> Result<(), Attempt> {
        let st = match self.status() {
            Ok(st) => st,
            // No control socket: the engine runs as `primary`, started by the host.
            Err(e) if e.is_absent() && !self.expect_socket => return Ok(()),
            Err(e) => return Err(Attempt::Retry(e.to_string())),
        };
        match st.state {
            State::Protecting => {
                let Some(p) = st.primary else {
                    return Err(Attempt::Retry(
                        "protecting, no progress reported yet".into(),
                    ));
                };
                if p.phase == Phase::Failed {
                    // The engine hands the guest back by itself; ask again.
                    return Err(Attempt::Retry("the previous protection failed".into()));
                }
                // Protected once the peer holds a checkpoint to resume from.
                if p.committed_epoch > 0 {
                    Ok(())
                } else {
                    Err(Attempt::Retry(
                        "waiting for the peer's first committed checkpoint".into(),
                    ))
                }
            }
            State::Running => {
                let Some(peer) = &self.peer_listen else {
                    return Err(Attempt::Final(
                        "the guest runs unprotected in the local engine but no \
                         checkpoint.peer_listen is configured: memory cannot be replicated to \
                         the peer"
                            .into(),
                    ));
                };
                match self.ctl.call(&protect_request(peer)) {
                    Ok(_) => Err(Attempt::Retry(
                        "protection started; waiting for the peer's first checkpoint".into(),
                    )),
                    // Typically: the returning host's secondary does not listen yet.
                    Err(e) => Err(Attempt::Retry(e.to_string())),
                }
            }
            other => Err(Attempt::Final(format!(
                "the local engine is in state {other:?}, not a running guest: nothing to protect"
            ))),
        }
    }
}

impl Checkpointer for CheckpointDriver {
    fn committed_epoch(&self, vm: &VmId) -> Result<Option<u64>, SeamError> {
        let n = match self.ctl.call(&Request::Stop) {
            Ok(Reply::Stopped { committed_epoch }) => committed_epoch,
            Ok(other) => {
                return Err(seam(
                    "committed-epoch",
                    vm,
                    ControlError::unexpected(self.ctl.path(), other),
                ))
            }
            Err(e) => return Err(seam("committed-epoch", vm, e)),
        }
        .ok_or_else(|| {
            seam(
                "committed-epoch",
                vm,
                "no committed checkpoint yet (still in pre-copy): nothing to resume",
            )
        })?;
        tracing::warn!(%vm, epoch = n, "memory replica frozen at its last committed checkpoint");
        Ok(Some(n))
    }

    fn resume_last_epoch(&self, vm: &VmId) -> Result<(), SeamError> {
        let n = match self.ctl.call(&Request::Failover) {
            Ok(Reply::Resumed { epoch, .. }) => epoch,
            Ok(other) => {
                return Err(seam(
                    "resume",
                    vm,
                    ControlError::unexpected(self.ctl.path(), other),
                ))
            }
            Err(e) => return Err(seam("resume", vm, e)),
        };
        tracing::warn!(%vm, epoch = n, "VM resumed from its last committed checkpoint");
        Ok(())
    }

    fn protect(&self, vm: &VmId, peer: &HostId) -> Result<(), SeamError> {
        let start = Instant::now();
        loop {
            match self.protect_once() {
                Ok(()) => {
                    tracing::info!(%vm, %peer, "memory replicated to the peer");
                    return Ok(());
                }
                Err(Attempt::Final(why)) => return Err(seam("protect", vm, why)),
                Err(Attempt::Retry(why)) if start.elapsed() >= self.protect_wait => {
                    return Err(seam(
                        "protect",
                        vm,
                        format!("not protected after {:?}: {why}", self.protect_wait),
                    ))
                }
                Err(Attempt::Retry(why)) => {
                    tracing::debug!(%vm, %peer, reason = %why, "protect: retrying");
                    std::thread::sleep(PROTECT_POLL);
                }
            }
        }
    }

    fn report(&self, vm: &VmId) -> Option<serde_json::Value> {
        let _ = vm;
        self.status_report()
    }
}

#[cfg(test)]
mod tests {
    use super::super::control::fake;
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use xenft_control::checkpoint::Protecting;
    use xenft_control::ErrorReply;

    fn vm() -> VmId {
        VmId::new("vm1").unwrap()
    }

    fn host() -> HostId {
        HostId::new("h1").unwrap()
    }

    fn status(state: State, committed: Option<u64>) -> Status {
        Status::new(state, committed)
    }

    fn protecting(phase: Phase, committed: u64) -> Result<Reply, ErrorReply> {
        let mut st = status(State::Protecting, Some(7));
        st.primary = Some(Protecting {
            phase,
            reason: None,
            epoch: committed + 1,
            committed_epoch: committed,
            checkpoints: committed,
            pause_p99_ms: 1.0,
            pause_max_ms: 1.0,
            guest_counter: 0,
            peer: "x".into(),
        });
        Ok(Reply::Status(Box::new(st)))
    }

    fn running() -> Result<Reply, ErrorReply> {
        Ok(Reply::Status(Box::new(status(State::Running, Some(7)))))
    }

    #[test]
    fn take_over_freezes_the_replica_then_resumes_it() {
        let f = fake::serve::<Checkpoint>(|req| match req {
            Request::Stop => Ok(Reply::Stopped {
                committed_epoch: Some(41),
            }),
            _ => Ok(Reply::Resumed {
                epoch: 41,
                guest_counter: None,
            }),
        });
        let drv = CheckpointDriver::new(f.client());
        assert_eq!(drv.committed_epoch(&vm()).unwrap(), Some(41));
        drv.resume_last_epoch(&vm()).unwrap();
        assert_eq!(f.seen(), vec![Request::Stop, Request::Failover]);
    }

    #[test]
    fn a_resumed_replica_is_asked_to_protect_and_counts_once_the_peer_holds_a_checkpoint() {
        // running → (protect) → protecting in pre-copy → protecting with checkpoint 3.
        let step = Arc::new(AtomicU32::new(0));
        let f = fake::serve::<Checkpoint>(move |req| match (req, step.load(Ordering::SeqCst)) {
            (Request::Status, 0) => running(),
            (Request::Status, 1) => {
                step.store(2, Ordering::SeqCst);
                protecting(Phase::Precopy, 0)
            }
            (Request::Status, _) => protecting(Phase::Protected, 3),
            _ => {
                step.store(1, Ordering::SeqCst);
                Ok(Reply::Protecting {
                    peer: "/run/xenft/peer-ck.sock".into(),
                    already: false,
                })
            }
        });
        let drv = CheckpointDriver::new(f.client())
            .with_peer_listen(Some("/run/xenft/peer-ck.sock".into()));
        drv.protect(&vm(), &host()).unwrap();
        assert_eq!(
            f.seen(),
            vec![
                Request::Status,
                Request::Protect {
                    peer: Some("/run/xenft/peer-ck.sock".into())
                },
                Request::Status,
                Request::Status
            ]
        );
    }

    #[test]
    fn peer_listen_alink_sends_a_plain_protect_over_the_engines_own_link() {
        use std::sync::atomic::AtomicBool;
        let asked = Arc::new(AtomicBool::new(false));
        let a = asked.clone();
        let f = fake::serve::<Checkpoint>(move |req| match req {
            Request::Status if a.load(Ordering::SeqCst) => protecting(Phase::Protected, 2),
            Request::Status => running(),
            _ => {
                a.store(true, Ordering::SeqCst);
                Ok(Reply::Protecting {
                    peer: "alink:h1".into(),
                    already: false,
                })
            }
        });
        let drv = CheckpointDriver::new(f.client()).with_peer_listen(Some(PEER_ALINK.into()));
        drv.protect(&vm(), &host()).unwrap();
        assert_eq!(
            f.seen(),
            vec![
                Request::Status,
                Request::Protect { peer: None },
                Request::Status
            ]
        );
    }

    #[test]
    fn an_engine_already_protecting_or_without_control_socket_is_left_alone() {
        let f = fake::serve::<Checkpoint>(|_| protecting(Phase::Protected, 9));
        let drv = CheckpointDriver::new(f.client()).with_peer_listen(Some("/x.sock".into()));
        drv.protect(&vm(), &host()).unwrap();
        assert_eq!(f.seen(), vec![Request::Status]);
        let none = CheckpointDriver::new(Client::new(
            "/nonexistent/xenft-ck.ctl",
            Duration::from_secs(2),
        ));
        none.protect(&vm(), &host()).unwrap();
    }

    #[test]
    fn re_protection_fails_without_a_peer_socket_or_when_the_peer_never_listens() {
        let f = fake::serve::<Checkpoint>(|req| match req {
            Request::Status => running(),
            _ => Err(ErrorReply::failed("connecting to the secondary: refused")),
        });
        let e = CheckpointDriver::new(f.client())
            .protect(&vm(), &host())
            .unwrap_err();
        assert!(e.reason.contains("peer_listen"), "{e}");
        let e = CheckpointDriver::new(f.client())
            .with_peer_listen(Some("/x.sock".into()))
            .with_protect_wait(Duration::from_millis(300))
            .protect(&vm(), &host())
            .unwrap_err();
        assert!(e.reason.contains("not protected after"), "{e}");
        let f2 = fake::serve::<Checkpoint>(|_| {
            Ok(Reply::Status(Box::new(status(State::Receiving, None))))
        });
        let e = CheckpointDriver::new(f2.client())
            .with_peer_listen(Some("/x.sock".into()))
            .protect(&vm(), &host())
            .unwrap_err();
        assert!(e.reason.contains("nothing to protect"), "{e}");
    }

    #[test]
    fn a_controlled_primary_whose_secondary_went_away_is_protected_again_and_reported() {
        // A primary after `protection_ended`: running, no committed checkpoint, last error.
        let asked = Arc::new(AtomicU32::new(0));
        let a = asked.clone();
        let f = fake::serve::<Checkpoint>(move |req| match (req, a.load(Ordering::SeqCst)) {
            (Request::Status, 0) => {
                let mut st = status(State::Running, None);
                st.last_error = Some("the secondary is gone: no A-link path for 1s".into());
                Ok(Reply::Status(Box::new(st)))
            }
            (Request::Status, 1) => {
                a.store(2, Ordering::SeqCst);
                protecting(Phase::Protected, 0)
            }
            (Request::Status, _) => protecting(Phase::Protected, 4),
            _ => {
                a.store(1, Ordering::SeqCst);
                Ok(Reply::Protecting {
                    peer: "alink:h2".into(),
                    already: false,
                })
            }
        });
        let drv = CheckpointDriver::new(f.client())
            .with_peer_listen(Some(PEER_ALINK.into()))
            .expecting_socket();
        drv.protect(&vm(), &host()).unwrap();
        assert_eq!(
            f.seen(),
            vec![
                Request::Status,
                Request::Protect { peer: None },
                Request::Status,
                Request::Status
            ]
        );
        let r = drv.status_report().expect("a report");
        assert_eq!(r["state"], "protecting", "{r}");
        assert_eq!(r["primary"]["committed_epoch"], 4, "{r}");
    }

    #[test]
    fn a_supervised_engine_without_its_socket_is_not_protected() {
        let drv = CheckpointDriver::new(Client::new(
            "/nonexistent/xenft-ck.sock",
            Duration::from_secs(1),
        ))
        .with_peer_listen(Some(PEER_ALINK.into()))
        .with_protect_wait(Duration::from_millis(300))
        .expecting_socket();
        let e = drv.protect(&vm(), &host()).unwrap_err();
        assert!(e.reason.contains("not protected after"), "{e}");
        assert!(drv.status_report().is_none());
    }

    #[test]
    fn no_checkpoint_yet_and_a_hostile_epoch_are_told_apart() {
        let f = fake::serve::<Checkpoint>(|_| {
            Ok(Reply::Stopped {
                committed_epoch: None,
            })
        });
        let e = CheckpointDriver::new(f.client())
            .committed_epoch(&vm())
            .unwrap_err();
        assert!(e.reason.contains("no committed checkpoint"), "{e}");
        let (_d, p) =
            fake::raw("{\"v\":1,\"ok\":{\"reply\":\"stopped\",\"committed_epoch\":-3}}\n");
        let e = CheckpointDriver::new(Client::new(&p, Duration::from_secs(2)))
            .committed_epoch(&vm())
            .unwrap_err();
        assert!(e.reason.contains("malformed"), "{e}");
    }
}
