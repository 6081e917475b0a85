//! The [`DomainStarter`] seam through XenAPI, for xapi hosts (xenopsd owns the domains there;
//! on xl hosts the agent runs a configured command instead, `drivers::domain`).
//!
//! | seam call | XenAPI |
//! |---|---|
//! | `running` | the registry's VMs whose `resident_on` is this host |
//! | `start` | `VM.power_state_reset` if xapi still records the VM on another host (the take-over follows the quorum's proof that the old primary is fenced or dead: xapi's database is only told what is already true) and, when this host was the VM's secondary, `xenft.secondary` set to the old host (the roles swap), then `VM.start_on(vm, this host, false, false)` |
//! | `pause` / `resume` | `VM.pause` / `VM.unpause`; with [`LocalFence`] configured, the host-local command first (an isolated host cannot reach the master, and the fence must not wait on it), xapi told within a second |
//! | `destroy` | `VM.hard_shutdown`, only when xapi records the VM on this host (never the peer's running VM) |
//! | `resumed` (after a level-3 take-over) | as `start`: xapi records the VM on this host (`VM.power_state_reset`, the roles swapped in `xenft.secondary`, `VM.start_on`), where the toolstack adopts the guest whose memory the engine resumed. Only guests whose domain can be adopted so run at level 3 on xapi hosts (the local pool's synthetic guest): the engine plan refuses a Xen replica there, since xenopsd cannot adopt a domain it did not build |
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
    local_fence: Option<LocalFence>,
    /// Pause and resume one at a time, in the order the core asked for them: a resume must
    /// not overtake the pause's late `VM.pause` (xapi would then keep the VM paused).
    fence_order: std::sync::Mutex<()>,
}

/// `xapi.local_fence` in the agent's config: how this host pauses and unpauses a VM without
/// xapi. An isolated host cannot reach the pool master, so `VM.pause` fails exactly when
/// fencing matters; these host-local commands then pause the domain (on XCP-ng / XenServer
/// e.g. `["xl", "pause", "{domid}"]` and `["xl", "unpause", "{domid}"]`). `{vm}` is replaced
/// by the VM's uuid, `{domid}` by its domain id as last read from xapi.
#[derive(Clone, Debug, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LocalFence {
    /// Pauses the VM's domain.
    pub pause: Vec<String>,
    /// Unpauses it.
    pub resume: Vec<String>,
}

/// Longest the fence waits for xapi to record it when a local fence is configured.
const XAPI_FENCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest a local fence command may take.
const LOCAL_FENCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
            local_fence: None,
            fence_order: std::sync::Mutex::new(()),
        }
    }

    /// With host-local pause / unpause commands for when xapi cannot be reached.
    #[must_use]
    pub fn with_local_fence(mut self, f: Option<LocalFence>) -> Self {
        self.local_fence = f;
        self
    }

    /// `pause` or `resume`. Without [`LocalFence`]: through xapi. With it, the fence does not
    /// wait on xapi: `pause` runs the local command first (the fence holds even when the
    /// master is out of reach), then asks xapi (`VM.pause`, at most [`XAPI_FENCE_TIMEOUT`],
    /// its failure only logged) so that its record shows the pause; `resume` asks xapi the
    /// same way, then runs the local command (each pause undone by its own unpause).
    fn fence(&self, op: &'static str, vm: &VmId, method: &str) -> Result<(), SeamError> {
        let _order = self
            .fence_order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(f) = &self.local_fence else {
            return self.call_here(op, vm, method);
        };
        let via_xapi = || {
            let r = self.rt.block_on(tokio::time::timeout(
                XAPI_FENCE_TIMEOUT,
                self.call_here_async(op, vm, method),
            ));
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(%vm, op, reason = %e.reason, "xapi did not record the fence");
                }
                Err(_) => {
                    tracing::warn!(%vm, op, "xapi did not answer in time: the fence is local only");
                }
            }
        };
        if op == "pause" {
            self.local(op, vm, &f.pause)?;
            via_xapi();
            Ok(())
        } else {
            via_xapi();
            self.local(op, vm, &f.resume)
        }
    }

    /// Runs a local fence command for `vm`.
    fn local(&self, op: &'static str, vm: &VmId, argv: &[String]) -> Result<(), SeamError> {
        let domid = self
            .desired
            .borrow()
            .as_ref()
            .and_then(|d| d.vms.get(vm.as_str()).and_then(|v| v.devices.domid));
        let mut args = Vec::with_capacity(argv.len());
        for a in argv {
            if a.contains("{domid}") && domid.is_none() {
                return Err(seam(
                    op,
                    vm,
                    "no domain id is known for the local fence command",
                ));
            }
            args.push(
                a.replace("{vm}", vm.as_str())
                    .replace("{domid}", &domid.map_or(String::new(), |d| d.to_string())),
            );
        }
        tracing::warn!(%vm, op, command = ?args, "fence: host-local command");
        run_bounded(op, vm, &args, LOCAL_FENCE_TIMEOUT)
    }

    /// Makes xapi record `vm` as running on this host: `VM.power_state_reset` if xapi still
    /// records it on another host (and, when this host was the VM's secondary, the roles
    /// swapped in `xenft.secondary`), then `VM.start_on` here. Nothing when xapi, read afresh,
    /// already records it running here (a retried start, or a take-over already recorded).
    /// Returns whether `VM.start_on` was called. On xapi hosts that call starts the domain;
    /// where the agent runs the domains itself (`super::domain_command`) it only records where
    /// the VM runs.
    ///
    /// # Errors
    /// xapi is unreachable or refuses a call: the reason.
    pub fn record_here(&self, vm: &VmId) -> Result<bool, SeamError> {
        let (api, vm_ref, me_ref, elsewhere) = self.context("start", vm)?;
        self.rt.block_on(async {
            let rec = api
                .vm_get_record(&vm_ref)
                .await
                .map_err(|e| seam("start", vm, e))?;
            if rec.resident_on == me_ref && rec.power_state == "Running" {
                return Ok(false);
            }
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
                .map_err(|e| seam("start", vm, e))?;
            Ok(true)
        })
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

    /// `method` on the VM, only if xapi records it on this host *now* (read afresh: the
    /// registry this agent holds may be stale, e.g. just after a partition healed, while the
    /// peer took the VM over): fencing or dropping this host's copy must never reach the
    /// peer's running VM. A VM recorded elsewhere is no domain of this host's for xapi:
    /// nothing to do (the relay's isolation keeps a stale copy here unreachable).
    fn call_here(&self, op: &'static str, vm: &VmId, method: &str) -> Result<(), SeamError> {
        self.rt.block_on(self.call_here_async(op, vm, method))
    }

    async fn call_here_async(
        &self,
        op: &'static str,
        vm: &VmId,
        method: &str,
    ) -> Result<(), SeamError> {
        let (api, vm_ref, me_ref, _) = self.context(op, vm)?;
        let rec = api
            .vm_get_record(&vm_ref)
            .await
            .map_err(|e| seam(op, vm, e))?;
        if rec.resident_on != me_ref {
            tracing::warn!(%vm, op, resident_on = %rec.resident_on, "xapi records the VM on another host: not calling {method}");
            return Ok(());
        }
        api.call(method, vec![Value::str(&vm_ref)])
            .await
            .map(drop)
            .map_err(|e| seam(op, vm, e))
    }
}

/// Runs `argv` (no shell) for `op` on `vm` and waits for it, at most `timeout` (then it is
/// killed): Ok when it exits with success, otherwise the program and how it ended.
pub(crate) fn run_bounded(
    op: &'static str,
    vm: &VmId,
    argv: &[String],
    timeout: std::time::Duration,
) -> Result<(), SeamError> {
    let Some((prog, rest)) = argv.split_first() else {
        return Err(seam(op, vm, "the command is empty"));
    };
    let mut child = std::process::Command::new(prog)
        .args(rest)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| seam(op, vm, format!("{op} command {prog}: {e}")))?;
    let start = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => {
                return Err(seam(
                    op,
                    vm,
                    format!("{op} command {prog} exited with {st}"),
                ))
            }
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(seam(
                    op,
                    vm,
                    format!("{op} command {prog} took more than {} s", timeout.as_secs()),
                ));
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) => return Err(seam(op, vm, format!("{op} command {prog}: {e}"))),
        }
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
        if self.record_here(vm)? {
            tracing::warn!(%vm, host = %self.me, "VM started here through VM.start_on");
        }
        Ok(())
    }

    fn pause(&self, vm: &VmId) -> Result<(), SeamError> {
        self.fence("pause", vm, "VM.pause")
    }

    fn resume(&self, vm: &VmId) -> Result<(), SeamError> {
        self.fence("resume", vm, "VM.unpause")
    }

    fn destroy(&self, vm: &VmId) -> Result<(), SeamError> {
        // The core drops this host's copy because the peer owns the VM: `VM.hard_shutdown`
        // only while xapi still records the VM here.
        self.call_here("destroy", vm, "VM.hard_shutdown")
    }

    fn resumed(&self, vm: &VmId) -> Result<(), SeamError> {
        // xapi is told where the VM runs now, as for a restart: on xapi hosts level 3 runs
        // only with a guest whose domain the toolstack adopts where `VM.start_on` finds its
        // memory resumed (the local pool's synthetic guest; the plan refuses a Xen replica
        // there, `engine_plan`), so the registry follows the take-over: the roles swap and
        // the returning host becomes the secondary.
        tracing::info!(%vm, "memory resumed here: recording the VM on this host in xapi");
        self.start(vm)
    }
}
