//! The agent's view of the components it drives, as traits: the domain control (start, pause,
//! resume, destroy; XenAPI `VM.start_on` or the local synthetic guest in production), the disk
//! mirror (blkback-shim), the network relay (netback-shim) and the level-3 checkpoint engine.
//! The real implementations (driving the shims' control sockets and a local domain command)
//! are in [`crate::drivers`] and are wired in by the binary; the [`Recorder`] stand-in
//! records every call for tests and the demo (`"drivers": "record"` in the config).
//!
//! The methods are blocking (they may talk to xapi or a shim's control socket); the runtime
//! calls them from a blocking thread.

use std::sync::{Arc, Mutex};

use crate::core::StartMode;
use crate::decision::Component;
use crate::ids::{HostId, VmId};

/// A component refused or failed an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{component}: {operation} of {vm} failed: {reason}")]
pub struct SeamError {
    /// Which component.
    pub component: &'static str,
    /// What was asked.
    pub operation: &'static str,
    /// The VM.
    pub vm: VmId,
    /// Why.
    pub reason: String,
}

/// Domain control: start (level-1 restart on the reserved host, or boot from the mirrored
/// disk), pause, resume, destroy.
pub trait DomainStarter: Send + Sync {
    /// The protected VMs whose domain runs on this host now (read at agent start).
    fn running(&self) -> Vec<VmId> {
        Vec::new()
    }
    /// Boots the VM on this host.
    ///
    /// # Errors
    /// [`SeamError`].
    fn start(&self, vm: &VmId) -> Result<(), SeamError>;
    /// Pauses the local copy.
    ///
    /// # Errors
    /// [`SeamError`].
    fn pause(&self, vm: &VmId) -> Result<(), SeamError>;
    /// Unpauses the local copy.
    ///
    /// # Errors
    /// [`SeamError`].
    fn resume(&self, vm: &VmId) -> Result<(), SeamError>;
    /// Destroys the local copy.
    ///
    /// # Errors
    /// [`SeamError`].
    fn destroy(&self, vm: &VmId) -> Result<(), SeamError>;
}

/// The disk mirror (blkback-shim).
pub trait DiskMirror: Send + Sync {
    /// Full sync or resync of dirty regions to `peer`; returns when both copies match.
    ///
    /// # Errors
    /// [`SeamError`].
    fn sync(&self, vm: &VmId, peer: &HostId, full: bool) -> Result<(), SeamError>;
    /// Peer lost: stop mirroring, track dirty regions.
    ///
    /// # Errors
    /// [`SeamError`].
    fn suspend(&self, vm: &VmId) -> Result<(), SeamError>;
    /// Redirect disk I/O to the peer's copy (`on`) or back to the local disk.
    ///
    /// # Errors
    /// [`SeamError`].
    fn redirect(&self, vm: &VmId, on: bool) -> Result<(), SeamError>;
    /// Before the VM starts here: make the local copy the one that serves the disk. On a
    /// take-over the secondary copy is promoted; with `commit_epoch` (level 3) the held disk
    /// epochs up to it are applied first and every later (uncommitted) epoch is discarded. A
    /// copy that already serves is left as it is. The default is for mirrors without roles
    /// (nothing to promote).
    ///
    /// # Errors
    /// [`SeamError`].
    fn promote(&self, vm: &VmId, commit_epoch: Option<u64>) -> Result<(), SeamError> {
        let _ = (vm, commit_epoch);
        Ok(())
    }
    /// The mirror's state for the status API (role, link, dirty bytes, resync progress), if
    /// it reports one.
    fn report(&self, vm: &VmId) -> Option<serde_json::Value> {
        let _ = vm;
        None
    }
}

/// The network relay (netback-shim).
pub trait NetRelay: Send + Sync {
    /// Send the VM's traffic over the A-link to the peer's uplink (`on`) or locally.
    ///
    /// # Errors
    /// [`SeamError`].
    fn redirect(&self, vm: &VmId, on: bool) -> Result<(), SeamError>;
    /// After a take-over: announce the VM's addresses here (gratuitous ARP / unsolicited NA).
    ///
    /// # Errors
    /// [`SeamError`].
    fn announce(&self, vm: &VmId) -> Result<(), SeamError>;
    /// The relay's state for the status API (mode, epochs, redirect), if it reports one.
    fn report(&self, vm: &VmId) -> Option<serde_json::Value> {
        let _ = vm;
        None
    }
}

/// The level-3 checkpoint engine.
pub trait Checkpointer: Send + Sync {
    /// On the secondary, at take-over: stop receiving and name the last checkpoint epoch
    /// whose memory image is complete here; the disk epochs up to it are committed before the
    /// VM resumes. An engine with no checkpoint to resume must fail here, before the disk is
    /// touched. `None` (the default): this engine does not number epochs for the disk.
    ///
    /// # Errors
    /// [`SeamError`].
    fn committed_epoch(&self, vm: &VmId) -> Result<Option<u64>, SeamError> {
        let _ = vm;
        Ok(None)
    }
    /// On the secondary: discard any uncommitted epoch and resume the VM from the last
    /// committed one.
    ///
    /// # Errors
    /// [`SeamError`].
    fn resume_last_epoch(&self, vm: &VmId) -> Result<(), SeamError>;
    /// On the primary, once the disk is in sync with `peer`: make sure memory replicates to
    /// it. After a take-over the guest runs inside this host's resumed replica, which must now
    /// protect it toward the returning host (level-3 re-protection). An engine that protects
    /// by itself (started as primary by the host) has nothing to do. Default: nothing.
    ///
    /// # Errors
    /// [`SeamError`]: the memory is not replicated (the VM must not count as protected).
    fn protect(&self, vm: &VmId, peer: &HostId) -> Result<(), SeamError> {
        let _ = (vm, peer);
        Ok(())
    }
    /// The engine's state for the status API (state, committed checkpoint, protection
    /// progress), if it reports one.
    fn report(&self, vm: &VmId) -> Option<serde_json::Value> {
        let _ = vm;
        None
    }
}

/// The set of components the runtime drives.
#[derive(Clone)]
pub struct Seams {
    /// Domain control.
    pub domains: Arc<dyn DomainStarter>,
    /// Disk mirror.
    pub disk: Arc<dyn DiskMirror>,
    /// Network relay.
    pub net: Arc<dyn NetRelay>,
    /// Checkpoint engine.
    pub checkpoint: Arc<dyn Checkpointer>,
}

impl Seams {
    /// Every seam served by one recorder.
    #[must_use]
    pub fn recording(r: &Arc<Recorder>) -> Self {
        Self {
            domains: r.clone(),
            disk: r.clone(),
            net: r.clone(),
            checkpoint: r.clone(),
        }
    }

    /// Starts a VM as the core asked: make the local disk copy the serving one (committing
    /// the disk epochs up to the memory replica's checkpoint, level 3), resume the checkpoint
    /// (level 3) or boot, then announce.
    ///
    /// # Errors
    /// [`SeamError`] of the failing step.
    pub fn start(&self, vm: &VmId, mode: StartMode) -> Result<(), SeamError> {
        match mode {
            StartMode::ResumeCheckpoint => {
                let epoch = self.checkpoint.committed_epoch(vm)?;
                self.disk.promote(vm, epoch)?;
                self.checkpoint.resume_last_epoch(vm)?;
            }
            StartMode::Boot => {
                self.disk.promote(vm, None)?;
                self.domains.start(vm)?;
            }
        }
        self.net.announce(vm)
    }

    /// Redirects or restores a component.
    ///
    /// # Errors
    /// [`SeamError`].
    pub fn redirect(&self, vm: &VmId, component: Component, on: bool) -> Result<(), SeamError> {
        match component {
            Component::Disk => self.disk.redirect(vm, on),
            Component::Uplink => self.net.redirect(vm, on),
        }
    }
}

/// A stand-in for every seam that records the calls (`"start vm1"`, `"sync vm1 h2 full"`...).
/// Operations succeed unless the VM is listed in `fail_start`.
#[derive(Debug, Default)]
pub struct Recorder {
    calls: Mutex<Vec<String>>,
    fail_start: Mutex<Vec<VmId>>,
}

impl Recorder {
    /// A new recorder.
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The calls so far.
    #[must_use]
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Makes starting `vm` fail.
    pub fn fail_start(&self, vm: VmId) {
        if let Ok(mut f) = self.fail_start.lock() {
            f.push(vm);
        }
    }

    fn rec(&self, s: String) {
        if let Ok(mut c) = self.calls.lock() {
            c.push(s);
        }
    }

    fn start_result(&self, op: &'static str, vm: &VmId) -> Result<(), SeamError> {
        let fail = self.fail_start.lock().is_ok_and(|f| f.contains(vm));
        if fail {
            Err(SeamError {
                component: "recorder",
                operation: op,
                vm: vm.clone(),
                reason: "configured to fail".into(),
            })
        } else {
            Ok(())
        }
    }
}

impl DomainStarter for Recorder {
    fn start(&self, vm: &VmId) -> Result<(), SeamError> {
        self.rec(format!("start {vm}"));
        self.start_result("start", vm)
    }
    fn pause(&self, vm: &VmId) -> Result<(), SeamError> {
        self.rec(format!("pause {vm}"));
        Ok(())
    }
    fn resume(&self, vm: &VmId) -> Result<(), SeamError> {
        self.rec(format!("resume {vm}"));
        Ok(())
    }
    fn destroy(&self, vm: &VmId) -> Result<(), SeamError> {
        self.rec(format!("destroy {vm}"));
        Ok(())
    }
}

impl DiskMirror for Recorder {
    fn sync(&self, vm: &VmId, peer: &HostId, full: bool) -> Result<(), SeamError> {
        self.rec(format!(
            "sync {vm} {peer} {}",
            if full { "full" } else { "dirty" }
        ));
        Ok(())
    }
    fn suspend(&self, vm: &VmId) -> Result<(), SeamError> {
        self.rec(format!("suspend {vm}"));
        Ok(())
    }
    fn redirect(&self, vm: &VmId, on: bool) -> Result<(), SeamError> {
        self.rec(format!("disk-redirect {vm} {on}"));
        Ok(())
    }
    fn promote(&self, vm: &VmId, commit_epoch: Option<u64>) -> Result<(), SeamError> {
        match commit_epoch {
            Some(e) => self.rec(format!("promote {vm} {e}")),
            None => self.rec(format!("promote {vm}")),
        }
        Ok(())
    }
}

impl NetRelay for Recorder {
    fn redirect(&self, vm: &VmId, on: bool) -> Result<(), SeamError> {
        self.rec(format!("net-redirect {vm} {on}"));
        Ok(())
    }
    fn announce(&self, vm: &VmId) -> Result<(), SeamError> {
        self.rec(format!("announce {vm}"));
        Ok(())
    }
}

/// The recorder's checkpoint engine always holds checkpoint 0.
impl Checkpointer for Recorder {
    fn committed_epoch(&self, vm: &VmId) -> Result<Option<u64>, SeamError> {
        self.rec(format!("committed-epoch {vm}"));
        Ok(Some(0))
    }
    fn resume_last_epoch(&self, vm: &VmId) -> Result<(), SeamError> {
        self.rec(format!("resume-epoch {vm}"));
        self.start_result("resume-epoch", vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoCheckpoint;

    impl Checkpointer for NoCheckpoint {
        fn committed_epoch(&self, vm: &VmId) -> Result<Option<u64>, SeamError> {
            Err(SeamError {
                component: "checkpoint",
                operation: "committed-epoch",
                vm: vm.clone(),
                reason: "no committed checkpoint yet".into(),
            })
        }
        fn resume_last_epoch(&self, _: &VmId) -> Result<(), SeamError> {
            Ok(())
        }
    }

    #[test]
    fn a_level3_start_promotes_the_disk_at_the_checkpoint_between_freeze_and_resume() {
        let r = Recorder::new();
        let vm = VmId::new("vm1").unwrap();
        Seams::recording(&r)
            .start(&vm, StartMode::ResumeCheckpoint)
            .unwrap();
        assert_eq!(
            r.calls(),
            vec![
                "committed-epoch vm1",
                "promote vm1 0",
                "resume-epoch vm1",
                "announce vm1"
            ]
        );
    }

    #[test]
    fn without_a_checkpoint_the_disk_is_not_promoted() {
        let r = Recorder::new();
        let vm = VmId::new("vm1").unwrap();
        let seams = Seams {
            checkpoint: Arc::new(NoCheckpoint),
            ..Seams::recording(&r)
        };
        let e = seams.start(&vm, StartMode::ResumeCheckpoint).unwrap_err();
        assert!(e.reason.contains("no committed checkpoint"), "{e}");
        assert!(r.calls().is_empty(), "{:?}", r.calls());
    }
}
