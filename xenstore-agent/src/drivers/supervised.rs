//! Drivers of the components the agent supervises itself (`crate::xapi::components`): their
//! control sockets are found by convention, `<run_dir>/<vm>/<component>.sock`, instead of
//! being configured per VM.

use std::sync::Arc;

use super::control::Client;
use super::netback::NetbackDriver;
use super::Convention;
use crate::ids::VmId;
use crate::seams::{NetRelay, SeamError};

/// The relay of each supervised VM that has one (`<run_dir>/<vm>/netback.sock`).
struct RelayByConvention(Convention);

impl RelayByConvention {
    fn get(&self, vm: &VmId) -> Option<NetbackDriver> {
        let sock = self.0.run_dir.join(vm.as_str()).join("netback.sock");
        // The relay learns the VM's addresses from its frames: none are configured.
        sock.exists()
            .then(|| NetbackDriver::new(Client::new(sock, self.0.request_timeout), Vec::new()))
    }
}

impl NetRelay for RelayByConvention {
    fn redirect(&self, vm: &VmId, on: bool) -> Result<(), SeamError> {
        self.get(vm)
            .ok_or_else(|| super::missing("netback", "redirect", vm))?
            .redirect(vm, on)
    }
    fn announce(&self, vm: &VmId) -> Result<(), SeamError> {
        // A VM without a relay (level 1, no VIF) announces itself when it boots.
        self.get(vm).map_or(Ok(()), |d| d.announce(vm))
    }
    fn isolate(&self, vm: &VmId, on: bool) -> Result<(), SeamError> {
        // No relay (level 1, no VIF): the domain's pause is the fence.
        self.get(vm).map_or(Ok(()), |d| d.isolate(vm, on))
    }
    fn report(&self, vm: &VmId) -> Option<serde_json::Value> {
        self.get(vm).and_then(|d| d.report(vm))
    }
}

/// The relays of VMs whose components the agent supervises (sockets by `convention`).
#[must_use]
pub fn relays(convention: Convention) -> Arc<dyn NetRelay> {
    Arc::new(RelayByConvention(convention))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_vm_without_a_relay_socket_is_reported_not_guessed() {
        let dir = std::env::temp_dir().join(format!("xenft-supervised-{}", std::process::id()));
        let r = relays(Convention {
            run_dir: dir.clone(),
            request_timeout: Duration::from_secs(1),
            sync_timeout: Duration::from_secs(1),
        });
        let vm = VmId::new("vm-x").unwrap();
        // Announcing a VM with no relay is nothing to do; redirecting it is an error naming it.
        r.announce(&vm).unwrap();
        let e = r.redirect(&vm, true).unwrap_err();
        assert_eq!(e.component, "netback");
        assert!(e.reason.contains("no netback"), "{e}");
        assert!(r.report(&vm).is_none());
    }
}
