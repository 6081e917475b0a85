//! The vif socket, bound while the interface exists: the vif appears when the domain starts
//! (`vif<domid>.<n>`, or a fixed name) and goes when it stops or restarts.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{open_relay_socket, Inner};
use crate::sys::PacketSocket;

/// The index of the interface called `ifname` in the calling thread's network namespace, if
/// one exists.
fn current_ifindex(ifname: &str) -> Option<i32> {
    nix::net::if_::if_nametoindex(ifname)
        .ok()
        .and_then(|i| i32::try_from(i).ok())
}

/// An error of a socket whose interface may have gone (removed, or its domain destroyed).
pub(super) fn interface_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENXIO | libc::ENETDOWN | libc::ENODEV)
    )
}

impl Inner {
    /// The vif socket, while the interface exists.
    pub(super) fn vif_socket(&self) -> Option<Arc<PacketSocket>> {
        self.vif
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Compares the vif socket with the interface that has the vif's name now: drops a socket
    /// whose interface is gone or was replaced (new ifindex), and binds one when the interface
    /// exists and none is bound. Called by the monitor at each poll, and by the forwarding
    /// threads when the vif socket fails; never with the state lock held.
    pub(super) fn check_vif(&self) {
        let now = current_ifindex(&self.cfg.vif);
        let mut slot = self
            .vif
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut lost = None;
        if let Some(s) = slot.as_ref() {
            if now != Some(s.ifindex()) {
                lost = Some(s.ifindex());
                *slot = None;
            }
        }
        let mut bound = None;
        let mut open_error = None;
        if slot.is_none() && now.is_some() {
            match open_relay_socket("vif", &self.cfg.vif) {
                Ok(s) => {
                    bound = Some(s.ifindex());
                    *slot = Some(Arc::new(s));
                }
                Err(e) => open_error = Some(e),
            }
        }
        drop(slot);
        if let Some(old) = lost {
            tracing::warn!(vif = %self.cfg.vif, ifindex = old, "vif gone: frames for the VM are dropped until it is back");
        }
        if let Some(e) = open_error {
            // Retried at the next poll (the interface may be half set up, or just removed).
            if !self.vif_open_failed.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot bind the vif yet");
            }
        }
        if let Some(index) = bound {
            self.vif_open_failed.store(false, Ordering::Relaxed);
            tracing::info!(vif = %self.cfg.vif, ifindex = index, "vif bound");
        }
        if lost.is_some() || bound.is_some() {
            let mut st = self.lock();
            if lost.is_some() {
                st.c.vif_losses += 1;
            }
            if bound.is_some() {
                st.c.vif_binds += 1;
            }
            st.c.vif_bound = bound.is_some();
            st.c.vif_ifindex = bound;
        }
    }
}
