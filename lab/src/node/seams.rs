//! The lab's implementation of the agent's seam traits on the node's components.

use std::sync::Arc;
use std::time::Instant;

use xenft_agent::ids::{HostId, VmId};
use xenft_agent::seams::{Checkpointer, DomainStarter, SeamError};

/// The lab's implementation of every agent seam, on the node's components.
use super::vm::Vm;
use super::{lock, seam_err, Node, VM};
pub(super) struct LabSeams(pub(super) Arc<Node>);

impl LabSeams {
    pub(super) fn check(vm: &VmId, op: &'static str) -> Result<(), SeamError> {
        if vm.as_str() == VM {
            Ok(())
        } else {
            Err(seam_err(op, format!("unknown VM {vm}")))
        }
    }
}

impl DomainStarter for LabSeams {
    fn start(&self, vm: &VmId) -> Result<(), SeamError> {
        Self::check(vm, "start")?;
        let mut g = lock(&self.0.vm);
        if matches!(*g, Vm::Running(_)) {
            return Ok(()); // already runs here
        }
        *g = Vm::Standby;
        let r = self.0.boot().map_err(|e| seam_err("start", e))?;
        *g = Vm::Running(r);
        Ok(())
    }
    fn pause(&self, vm: &VmId) -> Result<(), SeamError> {
        Self::check(vm, "pause")?;
        self.0.event(
            &format!("{VM} paused (fenced)"),
            "the agent fenced its copy: service closed, address released, guest stopped",
        );
        self.0.pause().map_err(|e| seam_err("pause", e))
    }
    fn resume(&self, vm: &VmId) -> Result<(), SeamError> {
        Self::check(vm, "resume")?;
        self.0.resume().map_err(|e| seam_err("resume", e))
    }
    fn resumed(&self, vm: &VmId) -> Result<(), SeamError> {
        // The lab's resume_last_epoch already started the service beside the resumed guest.
        Self::check(vm, "resumed")
    }
    fn destroy(&self, vm: &VmId) -> Result<(), SeamError> {
        Self::check(vm, "destroy")?;
        self.0.event(
            &format!("{VM} copy dropped"),
            "the peer owns the VM: this node restarts as its secondary",
        );
        self.0.destroy();
        Ok(())
    }
}

impl Checkpointer for LabSeams {
    fn protect(&self, vm: &VmId, peer: &HostId) -> Result<(), SeamError> {
        Self::check(vm, "protect")?;
        let t = Instant::now();
        self.0
            .protect_memory()
            .map_err(|e| seam_err("protect", e))?;
        self.0.event(
            &format!("{VM} in sync with {peer} ({} ms)", t.elapsed().as_millis()),
            "disk in sync (blkback), memory checkpoints committed",
        );
        Ok(())
    }

    fn resume_last_epoch(&self, vm: &VmId) -> Result<(), SeamError> {
        Self::check(vm, "resume")?;
        self.0
            .resume_last_epoch()
            .map_err(|e| seam_err("resume last epoch", e))
    }
}
