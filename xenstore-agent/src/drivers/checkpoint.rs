//! [`CheckpointDriver`]: the [`Checkpointer`] seam over the checkpoint engine's secondary
//! control socket (`xenft-checkpoint secondary --control`).
//!
//! On a level-3 take-over [`crate::seams::Seams::start`] calls, in this order:
//! 1. `committed_epoch` → `stop`: the replica stops receiving (a partly received epoch is
//!    discarded) and stays frozen at its last committed checkpoint `N`;
//! 2. the disk mirror's `promote(N)`: blkback applies its held disk epochs `<= N` and drops
//!    later ones, so disk and memory are the same checkpoint;
//! 3. `resume_last_epoch` → `failover`: the replica resumes from checkpoint `N`.

use serde_json::Value;

use super::control::{ControlError, ControlSocket};
use crate::ids::VmId;
use crate::seams::{Checkpointer, SeamError};

/// Drives one VM's checkpoint-engine secondary.
#[derive(Debug, Clone)]
pub struct CheckpointDriver {
    ctl: ControlSocket,
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
        Self { ctl }
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
