//! [`CheckpointDriver`]: the [`Checkpointer`] seam over the checkpoint engine's secondary
//! control socket (`xenft-checkpoint secondary --control`).
//!
//! On a level-3 take-over [`crate::seams::Seams::start`] calls, in this order:
//! 1. `committed_epoch` → `stop`: the replica stops receiving (a partly received epoch is
//!    discarded) and stays frozen at its last committed checkpoint `N`;
//! 2. the disk mirror's `promote(N)`: blkback applies its held disk epochs `<= N` and drops
//!    later ones, so disk and memory are the same checkpoint;
//! 3. `resume_last_epoch` → `failover`: the replica resumes from checkpoint `N`.
//!
//! Re-protection (level 3): when the old primary's host returns with a fresh secondary, the
//! runtime first resyncs the disk, then calls `protect`: if the local engine is that resumed
//! replica (`status` says `running`), it is asked to `protect <peer_listen>` (plain `protect`
//! when `peer_listen` is `"alink"`: toward the peer over the engine's own A-link), and memory
//! replication resumes toward the returning host without pausing the guest beyond an epoch's
//! checkpoint. The sync counts as done (the VM `protected`) once the returning host holds the
//! first checkpoint, within `checkpoint.protect_timeout_ms`. An engine started as `primary` by the host has no control socket here, and
//! protects by itself.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::control::{ControlError, ControlSocket};
use crate::ids::{HostId, VmId};
use crate::seams::{Checkpointer, SeamError};

/// Drives one VM's checkpoint-engine secondary.
#[derive(Debug, Clone)]
pub struct CheckpointDriver {
    ctl: ControlSocket,
    /// The peer's secondary socket, for re-protection.
    peer_listen: Option<PathBuf>,
    /// How long `protect` waits for the returning host's secondary to listen and hold its
    /// first checkpoint.
    protect_wait: Duration,
}

/// `checkpoint.peer_listen` value meaning: protect over the engine's own A-link (the engine
/// runs with `--alink-path`), toward the returning host's fresh secondary on the same link.
pub const PEER_ALINK: &str = "alink";

/// The control request that protects toward `peer`: `protect` over the engine's A-link
/// ([`PEER_ALINK`]), else `protect <socket>`.
fn protect_request(peer: &std::path::Path) -> String {
    if peer == std::path::Path::new(PEER_ALINK) {
        "protect".to_string()
    } else {
        format!("protect {}", peer.display())
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
    pub fn new(ctl: ControlSocket) -> Self {
        Self {
            ctl,
            peer_listen: None,
            protect_wait: PROTECT_WAIT,
        }
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

    /// One re-protection attempt; `Ok`: protected (or nothing to do here).
    fn protect_once(&self) -> Result<(), Attempt> {
        let st = match self.ctl.request("status") {
            Ok(v) => v,
            // No control socket: the engine runs as `primary`, started by the host.
            Err(ControlError::Connect { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(());
            }
            Err(e) => return Err(Attempt::Retry(e.to_string())),
        };
        match st.get("state").and_then(Value::as_str) {
            Some("protecting") => {
                let phase = st["primary"]["phase"].as_str().unwrap_or("");
                if phase == "failed" {
                    // The engine hands the guest back by itself; ask again.
                    return Err(Attempt::Retry("the previous protection failed".into()));
                }
                // Protected once the peer holds a checkpoint to resume from.
                match st["primary"]["committed_epoch"].as_u64() {
                    Some(n) if n > 0 => Ok(()),
                    _ => Err(Attempt::Retry(
                        "waiting for the peer's first committed checkpoint".into(),
                    )),
                }
            }
            Some("running") => {
                let Some(peer) = &self.peer_listen else {
                    return Err(Attempt::Final(
                        "the guest runs in the resumed replica but no checkpoint.peer_listen is \
                         configured: memory cannot be replicated to the returning host"
                            .into(),
                    ));
                };
                match self.ctl.request(&protect_request(peer)) {
                    Ok(_) => Err(Attempt::Retry(
                        "protection started; waiting for the peer's first checkpoint".into(),
                    )),
                    // Typically: the returning host's secondary does not listen yet.
                    Err(e) => Err(Attempt::Retry(e.to_string())),
                }
            }
            Some(other) => Err(Attempt::Final(format!(
                "the local engine is in state {:?}, not a resumed guest: nothing to protect",
                other.chars().take(32).collect::<String>()
            ))),
            None => Err(Attempt::Final(format!(
                "{}: status has no state",
                self.ctl.path().display()
            ))),
        }
    }

    fn epoch(&self, v: &Value, name: &str) -> Result<Option<u64>, ControlError> {
        match v.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_u64().map(Some).ok_or_else(|| ControlError::Malformed {
                path: self.ctl.path().to_path_buf(),
                detail: format!("{name} is not an epoch number"),
            }),
        }
    }
}

impl Checkpointer for CheckpointDriver {
    fn committed_epoch(&self, vm: &VmId) -> Result<Option<u64>, SeamError> {
        let v = self
            .ctl
            .request("stop")
            .map_err(|e| seam("committed-epoch", vm, e))?;
        let n = self
            .epoch(&v, "committed_epoch")
            .map_err(|e| seam("committed-epoch", vm, e))?
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
        let v = self
            .ctl
            .request("failover")
            .map_err(|e| seam("resume", vm, e))?;
        let n = self.epoch(&v, "epoch").map_err(|e| seam("resume", vm, e))?;
        tracing::warn!(%vm, epoch = ?n, "VM resumed from its last committed checkpoint");
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
}

#[cfg(test)]
mod tests {
    use super::super::control::fake;
    use super::*;
    use std::time::Duration;

    fn vm() -> VmId {
        VmId::new("vm1").unwrap()
    }

    #[test]
    fn take_over_freezes_the_replica_then_resumes_it() {
        let (_d, p, seen) = fake::serve(Box::new(|l| match l {
            "stop" => r#"{"ok":true,"committed_epoch":41}"#.into(),
            _ => r#"{"ok":true,"epoch":41}"#.into(),
        }));
        let drv = CheckpointDriver::new(ControlSocket::new(&p, Duration::from_secs(2)));
        assert_eq!(drv.committed_epoch(&vm()).unwrap(), Some(41));
        drv.resume_last_epoch(&vm()).unwrap();
        assert_eq!(*seen.lock().unwrap(), vec!["stop", "failover"]);
    }

    fn host() -> HostId {
        HostId::new("h1").unwrap()
    }

    #[test]
    fn a_resumed_replica_is_asked_to_protect_and_counts_once_the_peer_holds_a_checkpoint() {
        use std::sync::atomic::{AtomicU32, Ordering};
        // running → (protect) → protecting in pre-copy → protecting with checkpoint 3.
        let step = std::sync::Arc::new(AtomicU32::new(0));
        let (_d, p, seen) = fake::serve(Box::new(move |l| {
            match (l, step.load(Ordering::SeqCst)) {
            ("status", 0) => r#"{"ok":true,"state":"running","committed_epoch":7}"#.into(),
            ("status", 1) => {
                step.store(2, Ordering::SeqCst);
                r#"{"ok":true,"state":"protecting","primary":{"phase":"precopy","committed_epoch":0}}"#.into()
            }
            ("status", _) => r#"{"ok":true,"state":"protecting","primary":{"phase":"protected","committed_epoch":3}}"#.into(),
            _ => {
                step.store(1, Ordering::SeqCst);
                r#"{"ok":true}"#.into()
            }
        }
        }));
        let drv = CheckpointDriver::new(ControlSocket::new(&p, Duration::from_secs(2)))
            .with_peer_listen(Some("/run/xenft/peer-ck.sock".into()));
        drv.protect(&vm(), &host()).unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                "status",
                "protect /run/xenft/peer-ck.sock",
                "status",
                "status"
            ]
        );
    }

    #[test]
    fn peer_listen_alink_sends_a_plain_protect_over_the_engines_own_link() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let asked = std::sync::Arc::new(AtomicBool::new(false));
        let a = asked.clone();
        let (_d, p, seen) = fake::serve(Box::new(move |l| {
            match l {
            "status" if a.load(Ordering::SeqCst) => {
                r#"{"ok":true,"state":"protecting","primary":{"phase":"protected","committed_epoch":2}}"#.into()
            }
            "status" => r#"{"ok":true,"state":"running","committed_epoch":7}"#.into(),
            _ => {
                a.store(true, Ordering::SeqCst);
                r#"{"ok":true,"peer":"alink:h1"}"#.into()
            }
        }
        }));
        let drv = CheckpointDriver::new(ControlSocket::new(&p, Duration::from_secs(2)))
            .with_peer_listen(Some(PEER_ALINK.into()));
        drv.protect(&vm(), &host()).unwrap();
        assert_eq!(*seen.lock().unwrap(), vec!["status", "protect", "status"]);
        assert_eq!(
            protect_request(std::path::Path::new("/run/p.sock")),
            "protect /run/p.sock"
        );
    }

    #[test]
    fn an_engine_already_protecting_or_without_control_socket_is_left_alone() {
        let (_d, p, seen) = fake::serve(Box::new(|_| {
            r#"{"ok":true,"state":"protecting","primary":{"phase":"protected","committed_epoch":9}}"#.into()
        }));
        let drv = CheckpointDriver::new(ControlSocket::new(&p, Duration::from_secs(2)))
            .with_peer_listen(Some("/x.sock".into()));
        drv.protect(&vm(), &host()).unwrap();
        assert_eq!(*seen.lock().unwrap(), vec!["status"]);
        let none = CheckpointDriver::new(ControlSocket::new(
            "/nonexistent/xenft-ck.ctl",
            Duration::from_secs(2),
        ));
        none.protect(&vm(), &host()).unwrap();
    }

    #[test]
    fn re_protection_fails_without_a_peer_socket_or_when_the_peer_never_listens() {
        let (_d, p, _) = fake::serve(Box::new(|l| match l {
            "status" => r#"{"ok":true,"state":"running"}"#.into(),
            _ => r#"{"ok":false,"error":"connecting to the secondary: refused"}"#.into(),
        }));
        let ctl = ControlSocket::new(&p, Duration::from_secs(2));
        let e = CheckpointDriver::new(ctl.clone())
            .protect(&vm(), &host())
            .unwrap_err();
        assert!(e.reason.contains("peer_listen"), "{e}");
        let e = CheckpointDriver::new(ctl)
            .with_peer_listen(Some("/x.sock".into()))
            .with_protect_wait(Duration::from_millis(300))
            .protect(&vm(), &host())
            .unwrap_err();
        assert!(e.reason.contains("not protected after"), "{e}");
        let (_d2, p2, _) = fake::serve(Box::new(|_| r#"{"ok":true,"state":"receiving"}"#.into()));
        let e = CheckpointDriver::new(ControlSocket::new(&p2, Duration::from_secs(2)))
            .with_peer_listen(Some("/x.sock".into()))
            .protect(&vm(), &host())
            .unwrap_err();
        assert!(e.reason.contains("nothing to protect"), "{e}");
    }

    #[test]
    fn no_checkpoint_yet_and_a_hostile_epoch_are_told_apart() {
        let (_d, p, _) = fake::serve(Box::new(|_| r#"{"ok":true,"committed_epoch":null}"#.into()));
        let drv = CheckpointDriver::new(ControlSocket::new(&p, Duration::from_secs(2)));
        let e = drv.committed_epoch(&vm()).unwrap_err();
        assert!(e.reason.contains("no committed checkpoint"), "{e}");
        let (_d2, p2, _) = fake::serve(Box::new(|_| r#"{"ok":true,"committed_epoch":-3}"#.into()));
        let drv2 = CheckpointDriver::new(ControlSocket::new(&p2, Duration::from_secs(2)));
        let e = drv2.committed_epoch(&vm()).unwrap_err();
        assert!(e.reason.contains("not an epoch"), "{e}");
    }
}
