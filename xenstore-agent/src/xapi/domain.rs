//! The [`DomainStarter`] seam through XenAPI, for xapi hosts (xenopsd owns the domains there;
//! on xl hosts the agent runs a configured command instead, `drivers::domain`).
//!
//! | seam call | XenAPI |
//! |---|---|
//! | `running` | the registry's VMs whose `resident_on` is this host |
//! | `start` | `VM.power_state_reset` if xapi still records the VM on another host (the take-over follows the quorum's proof that the old primary is fenced or dead: xapi's database is only told what is already true) and, when this host was the VM's secondary, `xenft.secondary` set to the old host (the roles swap), then `VM.start_on(vm, this host, false, false)` |
//! | `pause` / `resume` | `VM.pause` / `VM.unpause` |
//! | `destroy` | `VM.hard_shutdown` |
//! | `resumed` (after a level-3 take-over) | nothing: the checkpoint engine's resumed replica is the domain (built paused by the toolstack, unpaused by the engine); xapi's record of where the VM resides is not corrected here |
//!
//! The calls go through the control plane's current session (toward the master); while xapi
//! is unreachable they fail with that reason, and the core retries as it does for any seam.

use std::sync::Arc;

use tokio::sync::watch;
use xenft_xapi::api::Class;
use xenft_xapi::registry::VM_SECONDARY;
use xenft_xapi::xmlrpc::Value;
use xenft_xapi::XenApi;

use super::desired::Desired;
use crate::ids::{HostId, VmId};
use crate::seams::{DomainStarter, SeamError};

/// Domains through xapi.
pub struct XapiDomain {
    api: watch::Receiver<Option<Arc<XenApi>>>,
    desired: watch::Receiver<Option<Arc<Desired>>>,
    me: HostId,
    rt: tokio::runtime::Handle,
}

fn seam(operation: &'static str, vm: &VmId, reason: impl std::fmt::Display) -> SeamError {
    SeamError {
        component: "xapi",
        operation,
        vm: vm.clone(),
        reason: reason.to_string(),
    }
}

impl XapiDomain {
    /// Domains of host `me`, through the plane's session (`api`) and registry (`desired`);
    /// the calls run on `rt`.
    #[must_use]
    pub fn new(
        api: watch::Receiver<Option<Arc<XenApi>>>,
        desired: watch::Receiver<Option<Arc<Desired>>>,
        me: HostId,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Self {
            api,
            desired,
            me,
            rt,
        }
    }

    /// The session, the registry, the VM's ref and this host's ref.
    fn context(
        &self,
        op: &'static str,
        vm: &VmId,
    ) -> Result<(Arc<XenApi>, String, String, Option<String>), SeamError> {
        let api = self
            .api
            .borrow()
            .clone()
            .ok_or_else(|| seam(op, vm, "xapi is unreachable"))?;
        let d = self
            .desired
            .borrow()
            .clone()
            .ok_or_else(|| seam(op, vm, "the registry was never read"))?;
        let vm_ref = d
            .refs
            .get(vm.as_str())
            .cloned()
            .ok_or_else(|| seam(op, vm, "no such VM in the registry"))?;
        let me_uuid = d
            .host_uuid(self.me.as_str())
            .ok_or_else(|| seam(op, vm, format!("no host named {} in the pool", self.me)))?;
        let me_ref = d
            .host_refs
            .get(me_uuid)
            .cloned()
            .ok_or_else(|| seam(op, vm, "this host has no ref"))?;
        let resident = d.vms.get(vm.as_str()).and_then(|v| v.resident_on.clone());
        Ok((api, vm_ref, me_ref, resident.filter(|r| r != me_uuid)))
    }

    /// The registry's secondary of `vm` (host uuid).
    fn secondary_of(&self, vm: &VmId) -> Option<String> {
        let d = self.desired.borrow().clone()?;
        d.vms.get(vm.as_str()).map(|v| v.secondary.clone())
    }

    /// This host's uuid.
    fn me_uuid(&self, vm: &VmId) -> Result<String, SeamError> {
        self.desired
            .borrow()
            .as_ref()
            .and_then(|d| d.host_uuid(self.me.as_str()).map(str::to_string))
            .ok_or_else(|| {
                seam(
                    "start",
                    vm,
                    format!("no host named {} in the pool", self.me),
                )
            })
    }

    fn call(&self, op: &'static str, vm: &VmId, method: &str) -> Result<(), SeamError> {
        let (api, vm_ref, _, _) = self.context(op, vm)?;
        self.rt
            .block_on(api.call(method, vec![Value::str(&vm_ref)]))
            .map(drop)
            .map_err(|e| seam(op, vm, e))
    }
}

impl DomainStarter for XapiDomain {
    fn running(&self) -> Vec<VmId> {
        let Some(d) = self.desired.borrow().clone() else {
            return Vec::new();
        };
        let me = d.host_uuid(self.me.as_str()).map(str::to_string);
        d.vms
            .values()
            .filter(|v| v.resident_on.is_some() && v.resident_on == me)
            .filter_map(|v| VmId::new(v.uuid.as_str()).ok())
            .collect()
    }

    fn start(&self, vm: &VmId) -> Result<(), SeamError> {
        let (api, vm_ref, me_ref, elsewhere) = self.context("start", vm)?;
        self.rt.block_on(async {
            if let Some(old) = elsewhere {
                tracing::warn!(%vm, old_host = %old, "xapi still records the VM on its old host: resetting its power state");
                api.call("VM.power_state_reset", vec![Value::str(&vm_ref)])
                    .await
                    .map_err(|e| seam("start", vm, e))?;
                // The roles swap: the old primary's host holds the copy from now on (and is
                // re-protected toward when it returns). Written before the VM starts here, so
                // the registry never shows the VM running on its own secondary.
                if self.secondary_of(vm).as_deref() == Some(self.me_uuid(vm)?.as_str()) {
                    api.set_map_key(Class::Vm, &vm_ref, "other_config", VM_SECONDARY, &old)
                        .await
                        .map_err(|e| seam("start", vm, format!("recording the copy on {old}: {e}")))?;
                    tracing::warn!(%vm, secondary = %old, "the VM's copy is now on its old primary");
                }
            }
            api.vm_start_on(&vm_ref, &me_ref, false)
                .await
                .map_err(|e| seam("start", vm, e))
        })?;
        tracing::warn!(%vm, host = %self.me, "VM started here through VM.start_on");
        Ok(())
    }

    fn pause(&self, vm: &VmId) -> Result<(), SeamError> {
        self.call("pause", vm, "VM.pause")
    }

    fn resume(&self, vm: &VmId) -> Result<(), SeamError> {
        self.call("resume", vm, "VM.unpause")
    }

    fn destroy(&self, vm: &VmId) -> Result<(), SeamError> {
        self.call("destroy", vm, "VM.hard_shutdown")
    }

    fn resumed(&self, vm: &VmId) -> Result<(), SeamError> {
        // Starting it through xapi would build a second domain of the VM.
        tracing::info!(%vm, "memory resumed here: the resumed replica is the domain");
        Ok(())
    }
}
