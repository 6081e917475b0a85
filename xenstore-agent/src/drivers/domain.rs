//! [`CommandDomain`]: the [`DomainStarter`] seam for the local pool — the VM is a process
//! (the synthetic guest, or any configured command) that this agent spawns (`start`), stops
//! with SIGSTOP (`pause`), continues with SIGCONT (`resume`) and kills (`destroy`).
//!
//! On a Xen host the same seam is XenAPI: `VM.start_on` (level 1 and 2), `VM.pause`,
//! `VM.unpause`, `VM.hard_shutdown`, and for level 3 the checkpoint engine's restore. That
//! backend is not written yet: a config cannot select it, so a Xen pool cannot silently run
//! this process-based starter in its place.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::ids::VmId;
use crate::seams::{DomainStarter, SeamError};

/// Starts, pauses, resumes and kills each VM's configured command.
#[derive(Debug, Default)]
pub struct CommandDomain {
    commands: BTreeMap<VmId, Vec<String>>,
    children: Mutex<BTreeMap<VmId, Child>>,
}

#[allow(clippy::needless_pass_by_value)] // callers pass temporaries (errors, literals)
fn seam(op: &'static str, vm: &VmId, e: impl ToString) -> SeamError {
    SeamError {
        component: "domain",
        operation: op,
        vm: vm.clone(),
        reason: e.to_string(),
    }
}

impl CommandDomain {
    /// One command line (program and arguments) per VM.
    #[must_use]
    pub fn new(commands: BTreeMap<VmId, Vec<String>>) -> Self {
        Self {
            commands,
            children: Mutex::new(BTreeMap::new()),
        }
    }

    fn children(&self) -> std::sync::MutexGuard<'_, BTreeMap<VmId, Child>> {
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends `sig` to the VM's live process.
    fn signal(&self, op: &'static str, vm: &VmId, sig: Signal) -> Result<(), SeamError> {
        let mut children = self.children();
        let child = children
            .get_mut(vm)
            .ok_or_else(|| seam(op, vm, "not started by this agent"))?;
        if let Ok(Some(st)) = child.try_wait() {
            children.remove(vm);
            return Err(seam(op, vm, format!("the VM's process exited ({st})")));
        }
        let pid = i32::try_from(child.id()).map_err(|_| seam(op, vm, "pid out of range"))?;
        kill(Pid::from_raw(pid), sig).map_err(|e| seam(op, vm, e))
    }
}

impl DomainStarter for CommandDomain {
    fn running(&self) -> Vec<VmId> {
        let mut children = self.children();
        children.retain(|_, c| matches!(c.try_wait(), Ok(None)));
        children.keys().cloned().collect()
    }

    fn start(&self, vm: &VmId) -> Result<(), SeamError> {
        let argv = self
            .commands
            .get(vm)
            .ok_or_else(|| seam("start", vm, "no command configured"))?;
        let (prog, args) = argv
            .split_first()
            .ok_or_else(|| seam("start", vm, "empty command"))?;
        let mut children = self.children();
        if let Some(c) = children.get_mut(vm) {
            if matches!(c.try_wait(), Ok(None)) {
                return Ok(());
            }
        }
        let child = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| seam("start", vm, format!("{prog}: {e}")))?;
        tracing::info!(%vm, pid = child.id(), %prog, "VM process started");
        children.insert(vm.clone(), child);
        Ok(())
    }

    fn pause(&self, vm: &VmId) -> Result<(), SeamError> {
        self.signal("pause", vm, Signal::SIGSTOP)
    }

    fn resume(&self, vm: &VmId) -> Result<(), SeamError> {
        self.signal("resume", vm, Signal::SIGCONT)
    }

    fn destroy(&self, vm: &VmId) -> Result<(), SeamError> {
        let Some(mut child) = self.children().remove(vm) else {
            return Ok(());
        };
        let _ = child.kill();
        let _ = child.wait();
        Ok(())
    }
}

impl Drop for CommandDomain {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut *self.children()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> VmId {
        VmId::new("vm1").unwrap()
    }

    #[test]
    fn a_started_command_runs_pauses_resumes_and_dies() {
        let d = CommandDomain::new(BTreeMap::from([(
            vm(),
            vec!["sleep".to_string(), "30".to_string()],
        )]));
        d.start(&vm()).unwrap();
        assert_eq!(d.running(), vec![vm()]);
        d.pause(&vm()).unwrap();
        d.resume(&vm()).unwrap();
        d.destroy(&vm()).unwrap();
        assert!(d.running().is_empty());
        assert!(d.pause(&vm()).is_err());
    }

    #[test]
    fn a_missing_program_is_a_start_error() {
        let d = CommandDomain::new(BTreeMap::from([(
            vm(),
            vec!["/nonexistent/guest".to_string()],
        )]));
        let e = d.start(&vm()).unwrap_err();
        assert!(e.reason.contains("/nonexistent/guest"), "{e}");
    }
}
