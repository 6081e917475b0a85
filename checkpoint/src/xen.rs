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
use crate::sys::xen::XenCtrl;
pub use crate::sys::xen::VCPU_CONTEXT_BYTES;

/// The libxenctrl / libxenforeignmemory calls [`XenDomain`] makes, as a trait so the domain
/// logic can be tested with a fake (the real one is the run-time loaded library).
pub trait XenOps: Send {
    /// `xc_domain_pause`.
    fn pause(&mut self, domid: u32) -> Result<(), DomainError>;
    /// `xc_domain_unpause`.
    fn unpause(&mut self, domid: u32) -> Result<(), DomainError>;
    /// `xc_domain_maximum_gpfn` + 1.
    fn memory_pages(&mut self, domid: u32) -> Result<u64, DomainError>;
    /// Log-dirty mode on or off.
    fn logdirty(&mut self, domid: u32, enable: bool) -> Result<(), DomainError>;
    /// `XEN_DOMCTL_SHADOW_OP_CLEAN` into `bitmap` (one bit per page).
    fn logdirty_clean(
        &mut self,
        domid: u32,
        pages: u64,
        bitmap: &mut [u8],
    ) -> Result<(), DomainError>;
    /// Copies pages out (`write == false`) or in through foreign mappings.
    fn copy_pages(
        &mut self,
        domid: u32,
        pfns: &[u64],
        buf: &mut [u8],
        write: bool,
    ) -> Result<(), DomainError>;
    /// `xc_vcpu_getcontext` ([`VCPU_CONTEXT_BYTES`] bytes).
    fn vcpu_context(&mut self, domid: u32, vcpu: u32) -> Result<Vec<u8>, DomainError>;
    /// `xc_vcpu_setcontext`.
    fn set_vcpu_context(&mut self, domid: u32, vcpu: u32, ctx: &[u8]) -> Result<(), DomainError>;
}

/// A Xen domain as a checkpoint source (primary) or replica (secondary).
pub struct XenDomain<X: XenOps = XenCtrlHandle> {
    ctrl: X,
    domid: u32,
    vcpus: u32,
    pages: u64,
    bitmap: Vec<u8>,
    pending_ctx: Option<VcpuContext>,
}

/// The real Xen libraries (opaque handle).
pub struct XenCtrlHandle(XenCtrl);

impl XenOps for XenCtrlHandle {
    fn pause(&mut self, domid: u32) -> Result<(), DomainError> {
        self.0.pause(domid)
    }
    fn unpause(&mut self, domid: u32) -> Result<(), DomainError> {
        self.0.unpause(domid)
    }
    fn memory_pages(&mut self, domid: u32) -> Result<u64, DomainError> {
        self.0.memory_pages(domid)
    }
    fn logdirty(&mut self, domid: u32, enable: bool) -> Result<(), DomainError> {
        self.0.logdirty(domid, enable)
    }
    fn logdirty_clean(
        &mut self,
        domid: u32,
        pages: u64,
        bitmap: &mut [u8],
    ) -> Result<(), DomainError> {
        self.0.logdirty_clean(domid, pages, bitmap)
    }
    fn copy_pages(
        &mut self,
        domid: u32,
        pfns: &[u64],
        buf: &mut [u8],
        write: bool,
    ) -> Result<(), DomainError> {
        self.0.copy_pages(domid, pfns, buf, write)
    }
    fn vcpu_context(&mut self, domid: u32, vcpu: u32) -> Result<Vec<u8>, DomainError> {
        self.0.vcpu_context(domid, vcpu)
    }
    fn set_vcpu_context(&mut self, domid: u32, vcpu: u32, ctx: &[u8]) -> Result<(), DomainError> {
        self.0.set_vcpu_context(domid, vcpu, ctx)
    }
}

impl XenDomain {
    /// Opens domain `domid` with `vcpus` vCPUs through the host's Xen libraries.
    pub fn open(domid: u32, vcpus: u32) -> Result<Self, DomainError> {
        Self::with_ops(XenCtrlHandle(XenCtrl::open()?), domid, vcpus)
    }
}

impl<X: XenOps> XenDomain<X> {
    /// A domain driven through `ops` (tests use a fake).
    pub fn with_ops(mut ops: X, domid: u32, vcpus: u32) -> Result<Self, DomainError> {
        if vcpus == 0 {
            return Err(DomainError::BadContext(
                "a domain has at least one vCPU".into(),
            ));
        }
        let pages = ops.memory_pages(domid)?;
        Ok(Self {
            ctrl: ops,
            domid,
            vcpus,
            pages,
            bitmap: Vec::new(),
            pending_ctx: None,
        })
    }

    /// The operations handle (tests inspect their fake through it).
    pub fn ops(&self) -> &X {
        &self.ctrl
    }
}

impl<X: XenOps> Domain for XenDomain<X> {
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

    fn disable_dirty_log(&mut self) -> Result<(), DomainError> {
        self.ctrl.logdirty(self.domid, false)
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
    // Small test sizes fit every integer type.
    #![allow(clippy::cast_possible_truncation)]

    use super::*;
    use crate::engine::commit::RecordingSink;
    use crate::engine::primary::{start_protection, EpochPolicy, PrimaryConfig};
    use crate::engine::secondary::{start_secondary, SecondaryConfig};
    use crate::engine::transport::memory_pair;
    use crate::testing::MemoryDomain;
    use crate::workload::PAGE_SIZE;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A pretend hypervisor: every unpause lets the "guest" write a few pages and bump its
    /// vCPU registers; log-dirty is a bitmap.
    #[derive(Default)]
    struct FakeXen {
        memory: Vec<u8>,
        dirty: Vec<u8>,
        log: bool,
        paused: bool,
        runs: u64,
        contexts: Vec<Vec<u8>>,
        calls: Arc<Mutex<Vec<String>>>,
    }

    impl FakeXen {
        fn new(pages: usize, vcpus: usize) -> Self {
            Self {
                memory: vec![0; pages * PAGE_SIZE],
                dirty: vec![0; pages.div_ceil(8)],
                contexts: vec![vec![0; VCPU_CONTEXT_BYTES]; vcpus],
                ..Self::default()
            }
        }
        fn call(&self, c: String) {
            self.calls.lock().unwrap().push(c);
        }
    }

    impl XenOps for FakeXen {
        fn pause(&mut self, _: u32) -> Result<(), DomainError> {
            self.paused = true;
            Ok(())
        }
        fn unpause(&mut self, _: u32) -> Result<(), DomainError> {
            self.call("unpause".into());
            self.paused = false;
            self.runs += 1;
            let pages = self.memory.len() / PAGE_SIZE;
            for i in 0..3u64 {
                let p = ((self.runs * 7 + i * 13) as usize) % pages;
                self.memory[p * PAGE_SIZE + (self.runs as usize % 4000)] = self.runs as u8;
                if self.log {
                    self.dirty[p / 8] |= 1 << (p % 8);
                }
            }
            for c in &mut self.contexts {
                c[..8].copy_from_slice(&self.runs.to_le_bytes());
            }
            Ok(())
        }
        fn memory_pages(&mut self, _: u32) -> Result<u64, DomainError> {
            Ok((self.memory.len() / PAGE_SIZE) as u64)
        }
        fn logdirty(&mut self, _: u32, enable: bool) -> Result<(), DomainError> {
            self.log = enable;
            Ok(())
        }
        fn logdirty_clean(&mut self, _: u32, _: u64, bitmap: &mut [u8]) -> Result<(), DomainError> {
            bitmap[..self.dirty.len()].copy_from_slice(&self.dirty);
            self.dirty.fill(0);
            Ok(())
        }
        fn copy_pages(
            &mut self,
            _: u32,
            pfns: &[u64],
            buf: &mut [u8],
            write: bool,
        ) -> Result<(), DomainError> {
            for (i, &p) in pfns.iter().enumerate() {
                let m = &mut self.memory[p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE];
                let b = &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
                if write {
                    m.copy_from_slice(b);
                } else {
                    b.copy_from_slice(m);
                }
            }
            Ok(())
        }
        fn vcpu_context(&mut self, _: u32, vcpu: u32) -> Result<Vec<u8>, DomainError> {
            assert!(self.paused, "vCPU context read from a running domain");
            Ok(self.contexts[vcpu as usize].clone())
        }
        fn set_vcpu_context(&mut self, _: u32, vcpu: u32, ctx: &[u8]) -> Result<(), DomainError> {
            self.call(format!("setcontext {vcpu}"));
            self.contexts[vcpu as usize] = ctx.to_vec();
            Ok(())
        }
    }

    #[test]
    fn xen_primary_replicates_memory_and_every_vcpu() {
        let primary = XenDomain::with_ops(FakeXen::new(64, 2), 5, 2).unwrap();
        let replica = MemoryDomain::new(64);
        let (a, b) = memory_pair();
        let secondary = start_secondary(
            replica,
            b,
            SecondaryConfig {
                verify_memory_digest: true,
            },
        )
        .unwrap();
        let p = start_protection(
            primary,
            a,
            Arc::new(RecordingSink::new()),
            PrimaryConfig {
                epoch: EpochPolicy::Fixed(Duration::from_millis(1)),
                verify_memory_digest: true,
                max_checkpoints: Some(30),
                ..PrimaryConfig::default()
            },
        )
        .unwrap();
        assert!(
            p.wait_committed(31, Duration::from_secs(10)),
            "{:?}",
            p.status()
        );
        let primary = p.stop().unwrap();
        let st = secondary.status();
        assert_eq!((st.digest_checks, st.digest_mismatches), (30, 0), "{st:?}");
        let (replica, _) = secondary.failover().unwrap();
        // Both vCPU contexts of the last checkpoint, in order, reached the replica.
        assert_eq!(replica.vcpu.0.len(), 2 * VCPU_CONTEXT_BYTES);
        assert_eq!(
            replica.vcpu.0[..8],
            replica.vcpu.0[VCPU_CONTEXT_BYTES..VCPU_CONTEXT_BYTES + 8]
        );
        assert!(replica.started);
        assert!(primary.ops().runs >= 30);
        assert!(
            !primary.ops().log,
            "log-dirty mode is switched off when protection stops"
        );
    }

    #[test]
    fn failover_sets_each_vcpu_then_unpauses() {
        let mut d = XenDomain::with_ops(FakeXen::new(8, 3), 9, 3).unwrap();
        let calls = Arc::clone(&d.ops().calls);
        assert!(d.set_vcpu_context(&VcpuContext(vec![1; 10])).is_err());
        assert!(d.start_from_replica().is_err(), "no context yet");
        d.set_vcpu_context(&VcpuContext(vec![1; 3 * VCPU_CONTEXT_BYTES]))
            .unwrap();
        d.start_from_replica().unwrap();
        assert_eq!(
            *calls.lock().unwrap(),
            ["setcontext 0", "setcontext 1", "setcontext 2", "unpause"]
        );
    }

    #[test]
    fn pages_outside_the_domain_are_refused_before_any_mapping() {
        let mut d = XenDomain::with_ops(FakeXen::new(8, 1), 1, 1).unwrap();
        let mut buf = vec![0; PAGE_SIZE];
        assert!(matches!(
            d.read_pages(&[8], &mut buf),
            Err(DomainError::PfnOutOfRange { pfn: 8, pages: 8 })
        ));
    }

    #[test]
    fn bitmap_bits_become_sorted_pfns_within_memory() {
        let bm = [0b0000_0101u8, 0, 0b1000_0000, 0xff];
        assert_eq!(bitmap_to_pfns(&bm, 26), vec![0, 2, 23, 24, 25]);
    }
}
