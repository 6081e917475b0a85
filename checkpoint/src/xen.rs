//! Xen backend of [`Domain`]: a domain on this host driven through libxenctrl and
//! libxenforeignmemory (loaded at run time, see `sys::xen`).
//!
//! Dirty tracking is Xen's log-dirty mode (`XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY`, read and
//! cleared with `..._CLEAN`); pages are copied through foreign mappings; vCPU state is
//! `xc_vcpu_getcontext` for each vCPU. On the secondary, the replica is a paused domain built
//! by the toolstack with the same memory size; failover sets the contexts and unpauses it.
//! This cannot run on a host without Xen: [`XenDomain::open`] then fails with
//! [`DomainError::XenUnavailable`].

use crate::domain::{check_pages, Domain, DomainError, VcpuContext};
use crate::sys::xen::{XenCtrl, VCPU_CONTEXT_BYTES};

/// A Xen domain as a checkpoint source (primary) or replica (secondary).
pub struct XenDomain {
    ctrl: XenCtrl,
    domid: u32,
    vcpus: u32,
    pages: u64,
    bitmap: Vec<u8>,
    pending_ctx: Option<VcpuContext>,
}

impl XenDomain {
    /// Opens domain `domid` with `vcpus` vCPUs.
    pub fn open(domid: u32, vcpus: u32) -> Result<Self, DomainError> {
        let mut ctrl = XenCtrl::open()?;
        let pages = ctrl.memory_pages(domid)?;
        Ok(Self {
            ctrl,
            domid,
            vcpus,
            pages,
            bitmap: Vec::new(),
            pending_ctx: None,
        })
    }
}

impl Domain for XenDomain {
    fn memory_pages(&self) -> u64 {
        self.pages
    }

    fn pause(&mut self) -> Result<(), DomainError> {
        self.ctrl.pause(self.domid)
    }

    fn resume(&mut self) -> Result<(), DomainError> {
        self.ctrl.unpause(self.domid)
    }

    fn enable_dirty_log(&mut self) -> Result<(), DomainError> {
        self.ctrl.logdirty(self.domid, true)?;
        // Start from an empty log.
        self.read_and_clear_dirty().map(|_| ())
    }

    fn read_and_clear_dirty(&mut self) -> Result<Vec<u64>, DomainError> {
        let bytes = usize::try_from(self.pages.div_ceil(8))
            .map_err(|_| DomainError::WrongState("memory size"))?;
        self.bitmap.resize(bytes, 0);
        self.ctrl
            .logdirty_clean(self.domid, self.pages, &mut self.bitmap)?;
        Ok(bitmap_to_pfns(&self.bitmap, self.pages))
    }

    fn read_pages(&mut self, pfns: &[u64], out: &mut [u8]) -> Result<(), DomainError> {
        check_pages(pfns, out.len(), self.pages)?;
        self.ctrl.copy_pages(self.domid, pfns, out, false)
    }

    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), DomainError> {
        check_pages(pfns, data.len(), self.pages)?;
        let mut buf = data.to_vec();
        self.ctrl.copy_pages(self.domid, pfns, &mut buf, true)
    }

    fn vcpu_context(&mut self) -> Result<VcpuContext, DomainError> {
        let mut all = Vec::new();
        for v in 0..self.vcpus {
            all.extend(self.ctrl.vcpu_context(self.domid, v)?);
        }
        Ok(VcpuContext(all))
    }

    fn set_vcpu_context(&mut self, ctx: &VcpuContext) -> Result<(), DomainError> {
        let want = VCPU_CONTEXT_BYTES * usize::try_from(self.vcpus).unwrap_or(0);
        if ctx.0.len() != want {
            return Err(DomainError::BadContext(format!(
                "{} bytes for {} vCPUs",
                ctx.0.len(),
                self.vcpus
            )));
        }
        self.pending_ctx = Some(ctx.clone());
        Ok(())
    }

    fn start_from_replica(&mut self) -> Result<(), DomainError> {
        let ctx = self
            .pending_ctx
            .take()
            .ok_or(DomainError::WrongState("start without vCPU context"))?;
        for (v, chunk) in (0u32..).zip(ctx.0.chunks(VCPU_CONTEXT_BYTES)) {
            self.ctrl.set_vcpu_context(self.domid, v, chunk)?;
        }
        self.ctrl.unpause(self.domid)
    }
}

/// Page numbers of the set bits of a little-endian bitmap of `pages` bits.
pub fn bitmap_to_pfns(bitmap: &[u8], pages: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for (byte_idx, &b) in (0u64..).zip(bitmap.iter()) {
        if b == 0 {
            continue;
        }
        for bit in 0..8u64 {
            let pfn = byte_idx * 8 + bit;
            if b & (1 << bit) != 0 && pfn < pages {
                out.push(pfn);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_bits_become_sorted_pfns_within_memory() {
        let bm = [0b0000_0101u8, 0, 0b1000_0000, 0xff];
        assert_eq!(bitmap_to_pfns(&bm, 26), vec![0, 2, 23, 24, 25]);
    }
}
