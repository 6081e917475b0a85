//! The service address inside the VM's namespace: claimed on `vm0` while the VM runs here
//! unfenced (its traffic then leaves through the vif and `xenft-netback`), released when it is
//! fenced or dropped; and the service's listening socket, created in that namespace.

use std::time::Duration;

use tokio::net::TcpListener;

use super::Node;
use crate::topology::{SERVICE_IP, SERVICE_PORT, VM_IF};
use crate::LabError;

impl Node {
    /// Adds the service address to the VM's interface on this host (no error if it is there).
    pub(super) fn claim_address(&self) -> Result<(), LabError> {
        let ip = format!("{SERVICE_IP}/24");
        match crate::topology::ip_in(self.me().vm_netns(), &["addr", "add", &ip, "dev", VM_IF]) {
            Ok(_) => Ok(()),
            Err(LabError::Command { stderr, .. }) if stderr.contains("exists") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes the service address from the VM's interface on this host (no error if it is
    /// not there).
    pub(super) fn release_address(&self) {
        let ip = format!("{SERVICE_IP}/24");
        let _ = crate::topology::ip_in(self.me().vm_netns(), &["addr", "del", &ip, "dev", VM_IF]);
    }

    /// The service's listener on the service address, in the VM's namespace.
    pub(super) async fn bind_service(&self) -> std::io::Result<TcpListener> {
        // The address was just added; a restarted service may find the old socket lingering.
        let ns = self.me().vm_netns();
        let mut last = None;
        for _ in 0..20 {
            match bind_in(ns) {
                Ok(l) => return TcpListener::from_std(l),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("bind failed")))
    }
}

/// Binds the service address in namespace `ns` from a thread that enters it (the socket stays
/// in the namespace it was made in).
fn bind_in(ns: &'static str) -> std::io::Result<std::net::TcpListener> {
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        let l = std::net::TcpListener::bind((SERVICE_IP, SERVICE_PORT))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .join()
    .map_err(|_| std::io::Error::other("bind thread panicked"))?
}
