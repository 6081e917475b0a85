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
    /// After a level-3 take-over: the checkpoint engine has resumed the VM's memory replica
    /// on this host ([`Checkpointer::resume_last_epoch`]), so the VM runs here from now on.
    /// Where the resumed replica is the domain itself (Xen: the engine unpaused the replica
    /// domain the toolstack built) there is nothing to start; where the VM is more than its
    /// memory (the local pool: a process beside the synthetic guest) it is started now, if it
    /// does not run here already. Either way the local copy is this seam's to pause, resume
    /// and destroy afterwards.
    ///
    /// # Errors
    /// [`SeamError`]: the VM cannot run here (the take-over fails and is reported).
    fn resumed(&self, vm: &VmId) -> Result<(), SeamError>;
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
    /// This copy owns the VM's network presence from now on: an isolation left from an
    /// earlier fence ends.
    ///
    /// # Errors
    /// [`SeamError`].
    fn announce(&self, vm: &VmId) -> Result<(), SeamError>;
    /// Fencing: cut the local copy off the network (`on`: no frame passes in either
    /// direction, whatever the domain does — a paused process still has its address and its
    /// kernel still answers ARP and TCP SYN), or let it through again (unfence). A VM without a
    /// relay (level 1) has nothing to cut here.
    ///
    /// # Errors
    /// [`SeamError`].
    fn isolate(&self, vm: &VmId, on: bool) -> Result<(), SeamError>;
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
    /// and tell the domain seam the VM runs here now (level 3) or boot, then announce.
    ///
    /// # Errors
    /// [`SeamError`] of the failing step.
    pub fn start(&self, vm: &VmId, mode: StartMode) -> Result<(), SeamError> {
        match mode {
            StartMode::ResumeCheckpoint => {
                let epoch = self.checkpoint.committed_epoch(vm)?;
                self.disk.promote(vm, epoch)?;
                self.checkpoint.resume_last_epoch(vm)?;
                self.domains.resumed(vm)?;
            }
            StartMode::Boot => {
                self.disk.promote(vm, None)?;
                self.domains.start(vm)?;
            }
            StartMode::Restart => self.domains.start(vm)?,
        }
        self.net.announce(vm)
    }

    /// Fences the local copy: first cut it off the network (the relay passes nothing, so the
    /// copy is silent even if pausing the domain fails or takes time), then pause the domain.
    /// Both steps are tried whatever the other does.
    ///
    /// # Errors
    /// [`SeamError`] of the first failing step.
    pub fn fence(&self, vm: &VmId) -> Result<(), SeamError> {
        let net = self.net.isolate(vm, true);
        let dom = self.domains.pause(vm);
        net.and(dom)
    }

    /// Unfences the local copy (proven that nobody else took the VM over): resume the domain,
    /// then let its frames through again. Both steps are tried whatever the other does.
    ///
    /// # Errors
    /// [`SeamError`] of the first failing step.
    pub fn unfence(&self, vm: &VmId) -> Result<(), SeamError> {
        let dom = self.domains.resume(vm);
        let net = self.net.isolate(vm, false);
        dom.and(net)
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
    fn resumed(&self, vm: &VmId) -> Result<(), SeamError> {
        self.rec(format!("resumed {vm}"));
        self.start_result("resumed", vm)
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
    fn isolate(&self, vm: &VmId, on: bool) -> Result<(), SeamError> {
        self.rec(format!("net-isolate {vm} {on}"));
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
    fn a_level3_start_promotes_the_disk_at_the_checkpoint_then_resumes_and_runs_the_domain() {
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
                "resumed vm1",
                "announce vm1"
            ]
        );
    }

    /// A domain seam whose every call fails (and is recorded).
    struct BrokenDomain(Arc<Recorder>);

    impl DomainStarter for BrokenDomain {
        fn start(&self, vm: &VmId) -> Result<(), SeamError> {
            self.fail("start", vm)
        }
        fn pause(&self, vm: &VmId) -> Result<(), SeamError> {
            self.fail("pause", vm)
        }
        fn resume(&self, vm: &VmId) -> Result<(), SeamError> {
            self.fail("resume", vm)
        }
        fn destroy(&self, vm: &VmId) -> Result<(), SeamError> {
            self.fail("destroy", vm)
        }
        fn resumed(&self, vm: &VmId) -> Result<(), SeamError> {
            self.fail("resumed", vm)
        }
    }

    impl BrokenDomain {
        fn fail(&self, op: &'static str, vm: &VmId) -> Result<(), SeamError> {
            self.0.rec(format!("{op} {vm} (fails)"));
            Err(SeamError {
                component: "domain",
                operation: op,
                vm: vm.clone(),
                reason: "broken".into(),
            })
        }
    }

    #[test]
    fn a_level3_take_over_whose_vm_cannot_run_here_is_not_announced() {
        let r = Recorder::new();
        let vm = VmId::new("vm1").unwrap();
        let seams = Seams {
            domains: Arc::new(BrokenDomain(r.clone())),
            ..Seams::recording(&r)
        };
        let e = seams.start(&vm, StartMode::ResumeCheckpoint).unwrap_err();
        assert_eq!(e.operation, "resumed");
        assert_eq!(
            r.calls(),
            vec![
                "committed-epoch vm1",
                "promote vm1 0",
                "resume-epoch vm1",
                "resumed vm1 (fails)"
            ]
        );
    }

    #[test]
    fn a_boot_does_not_tell_the_domain_of_a_resume() {
        let r = Recorder::new();
        let vm = VmId::new("vm1").unwrap();
        Seams::recording(&r).start(&vm, StartMode::Boot).unwrap();
        assert_eq!(r.calls(), vec!["promote vm1", "start vm1", "announce vm1"]);
    }

    #[test]
    fn a_level_1_restart_leaves_any_mirror_copy_alone() {
        // A raise to level 2 may have a half-filled copy here: it must not become the disk.
        let r = Recorder::new();
        let vm = VmId::new("vm1").unwrap();
        Seams::recording(&r).start(&vm, StartMode::Restart).unwrap();
        assert_eq!(r.calls(), vec!["start vm1", "announce vm1"]);
    }

    #[test]
    fn a_fence_silences_the_network_before_pausing_and_an_unfence_reopens_it_after_resuming() {
        let r = Recorder::new();
        let vm = VmId::new("vm1").unwrap();
        let seams = Seams::recording(&r);
        seams.fence(&vm).unwrap();
        seams.unfence(&vm).unwrap();
        assert_eq!(
            r.calls(),
            vec![
                "net-isolate vm1 true",
                "pause vm1",
                "resume vm1",
                "net-isolate vm1 false"
            ]
        );
    }

    #[test]
    fn a_fence_whose_pause_fails_still_silences_the_network() {
        let r = Recorder::new();
        let vm = VmId::new("vm1").unwrap();
        let seams = Seams {
            domains: Arc::new(BrokenDomain(r.clone())),
            ..Seams::recording(&r)
        };
        let e = seams.fence(&vm).unwrap_err();
        assert_eq!(e.operation, "pause");
        let e = seams.unfence(&vm).unwrap_err();
        assert_eq!(e.operation, "resume");
        assert_eq!(
            r.calls(),
            vec![
                "net-isolate vm1 true",
                "pause vm1 (fails)",
                "resume vm1 (fails)",
                "net-isolate vm1 false"
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
