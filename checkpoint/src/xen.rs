//! Xen backend of [`Domain`]: a domain on this host driven through libxenctrl and
//! libxenforeignmemory (loaded at run time, see `sys::xen`).
//!
//! Dirty tracking is Xen's log-dirty mode (`XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY`, read and
//! cleared with `..._CLEAN`); pages are copied through foreign mappings (pfns that are holes
//! in the guest's physmap read as zeros and are skipped on write); vCPU state is the HVM
//! context (`xc_domain_hvm_getcontext`) for HVM/PVH domains and `xc_vcpu_getcontext` per vCPU
//! for PV ones. On the secondary, the replica is a paused domain built by the toolstack from
//! the same configuration (`xl create -p`); failover loads the context and unpauses it.
//!
//! A checkpoint of a real guest cannot be a bare pause: Xen state outside guest memory (event
//! channel bindings, timers, grant tables, the shared-info page) does not exist in the replica.
//! As in Remus, [`CheckpointMode::Suspend`] makes every checkpoint a cooperative suspend
//! (xenstore `control/shutdown = suspend`, wait for `SHUTDOWN_suspend`) and ends it with
//! `xc_domain_resume(fast)`, a cancelled suspend; on failover the replica starts inside the
//! suspend hypercall with a return value of 0 and the guest re-binds everything, as after a
//! migration. [`CheckpointMode::Pause`] (`xc_domain_pause`) is kept for probes.
//! This cannot run on a host without Xen: [`XenDomain::open`] then fails with
//! [`DomainError::XenUnavailable`].

use crate::domain::{check_pages, Domain, DomainError, VcpuContext};
use crate::sys::xen::XenCtrl;
pub use crate::sys::xen::VCPU_CONTEXT_BYTES;
use crate::workload::PAGE_SIZE;

/// The libxenctrl / libxenforeignmemory calls [`XenDomain`] makes, as a trait so the domain
/// logic can be tested with a fake (the real one is the run-time loaded library).
pub trait XenOps: Send {
    /// `xc_domain_pause`.
    fn pause(&mut self, domid: u32) -> Result<(), DomainError>;
    /// `xc_domain_unpause`.
    fn unpause(&mut self, domid: u32) -> Result<(), DomainError>;
    /// Pfns to replicate, `0..n`: `xc_domain_maximum_gpfn` + 1, capped at `max_pages` for
    /// HVM/PVH domains (their RAM; the special pages near 4 GiB are host-local).
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
    /// Copies pages out (`write == false`) or in through foreign mappings; returns the
    /// indices (into `pfns`) of pages that could not be mapped (holes; zeroed on a read).
    fn copy_pages(
        &mut self,
        domid: u32,
        pfns: &[u64],
        buf: &mut [u8],
        write: bool,
    ) -> Result<Vec<usize>, DomainError>;
    /// `xc_vcpu_getcontext` ([`VCPU_CONTEXT_BYTES`] bytes).
    fn vcpu_context(&mut self, domid: u32, vcpu: u32) -> Result<Vec<u8>, DomainError>;
    /// `xc_vcpu_setcontext`.
    fn set_vcpu_context(&mut self, domid: u32, vcpu: u32, ctx: &[u8]) -> Result<(), DomainError>;
    /// `XEN_DOMINF_*` flags.
    fn domain_flags(&mut self, domid: u32) -> Result<u32, DomainError>;
    /// `xc_domain_hvm_getcontext`.
    fn hvm_context(&mut self, domid: u32) -> Result<Vec<u8>, DomainError>;
    /// `xc_domain_hvm_setcontext`.
    fn set_hvm_context(&mut self, domid: u32, ctx: &[u8]) -> Result<(), DomainError>;
    /// Asks the guest to suspend (xenstore `control/shutdown = suspend`).
    fn request_suspend(&mut self, domid: u32) -> Result<(), DomainError>;
    /// `xc_domain_resume(fast = 1)`: a cancelled suspend.
    fn resume_cancelled(&mut self, domid: u32) -> Result<(), DomainError>;
}

/// How the primary stops the guest for a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointMode {
    /// `xc_domain_pause`: cheap, but a replica started from it lacks the guest's event
    /// channels and timers (fine for probes and for the fake).
    Pause,
    /// Cooperative suspend, ended by a cancelled resume (Remus): the replica can run.
    Suspend {
        /// Longest wait for the guest to acknowledge the suspend request.
        timeout: std::time::Duration,
    },
}

/// A Xen domain as a checkpoint source (primary) or replica (secondary).
pub struct XenDomain<X: XenOps = XenCtrlHandle> {
    ctrl: X,
    domid: u32,
    vcpus: u32,
    pages: u64,
    hvm: bool,
    mode: CheckpointMode,
    suspended: bool,
    bitmap: Vec<u8>,
    /// One bit per pfn: known not to be mapped (holes in the physmap).
    holes: Vec<u8>,
    skipped_writes: u64,
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
        // An HVM/PVH guest's pfn space runs up to its special pages just below 4 GiB
        // (0xfefff for a 128 MiB guest): tracking all of it would mean a 4 GiB shadow. Its
        // RAM starts at pfn 0 and fits under max_pages; pfns above (xenstore and console
        // rings, ioreq pages) belong to the host's own daemons and are not replicated.
        let top = self.0.memory_pages(domid)?;
        let flags = self.0.domain_flags(domid)?;
        if flags & crate::sys::xen::DOMINF_HVM_GUEST == 0 {
            return Ok(top);
        }
        Ok(top.min(self.0.max_pages(domid)?))
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
    ) -> Result<Vec<usize>, DomainError> {
        self.0.copy_pages(domid, pfns, buf, write)
    }
    fn vcpu_context(&mut self, domid: u32, vcpu: u32) -> Result<Vec<u8>, DomainError> {
        self.0.vcpu_context(domid, vcpu)
    }
    fn set_vcpu_context(&mut self, domid: u32, vcpu: u32, ctx: &[u8]) -> Result<(), DomainError> {
        self.0.set_vcpu_context(domid, vcpu, ctx)
    }
    fn domain_flags(&mut self, domid: u32) -> Result<u32, DomainError> {
        self.0.domain_flags(domid)
    }
    fn hvm_context(&mut self, domid: u32) -> Result<Vec<u8>, DomainError> {
        self.0.hvm_context(domid)
    }
    fn set_hvm_context(&mut self, domid: u32, ctx: &[u8]) -> Result<(), DomainError> {
        self.0.set_hvm_context(domid, ctx)
    }
    fn request_suspend(&mut self, domid: u32) -> Result<(), DomainError> {
        self.0.xs_write(
            &format!("/local/domain/{domid}/control/shutdown"),
            "suspend",
        )
    }
    fn resume_cancelled(&mut self, domid: u32) -> Result<(), DomainError> {
        self.0.resume_cancelled(domid)
    }
}

impl XenDomain {
    /// Opens domain `domid` with `vcpus` vCPUs through the host's Xen libraries. HVM/PVH
    /// domains are checkpointed by cooperative suspend ([`CheckpointMode::Suspend`], 30 s).
    pub fn open(domid: u32, vcpus: u32) -> Result<Self, DomainError> {
        let mut d = Self::with_ops(XenCtrlHandle(XenCtrl::open()?), domid, vcpus)?;
        if d.hvm {
            d.mode = CheckpointMode::Suspend {
                timeout: std::time::Duration::from_secs(30),
            };
        }
        Ok(d)
    }
}

impl XenDomain {
    /// Opens the paused replica `domid` on the secondary and zeroes its memory: the
    /// secondary decodes XOR deltas against the replica's pages, which must start as the
    /// all-zero base the primary's encoder assumes, and a toolstack-built domain
    /// (`xl create -p`) already holds the kernel, start info and page tables.
    pub fn open_replica(domid: u32, vcpus: u32) -> Result<Self, DomainError> {
        let mut d = Self::open(domid, vcpus)?;
        d.zero_memory()?;
        Ok(d)
    }
}

impl<X: XenOps> XenDomain<X> {
    /// Writes zeros over every page of the domain (holes are learned and skipped).
    pub fn zero_memory(&mut self) -> Result<(), DomainError> {
        const BATCH: u64 = 1024;
        let zeros = vec![0u8; usize::try_from(BATCH).unwrap_or(1024) * PAGE_SIZE];
        let mut first = 0;
        while first < self.pages {
            let n = BATCH.min(self.pages - first);
            let pfns: Vec<u64> = (first..first + n).collect();
            let len = pfns.len() * PAGE_SIZE;
            self.write_pages(&pfns, &zeros[..len])?;
            first += n;
        }
        Ok(())
    }

    /// A domain driven through `ops` (tests use a fake).
    pub fn with_ops(mut ops: X, domid: u32, vcpus: u32) -> Result<Self, DomainError> {
        if vcpus == 0 {
            return Err(DomainError::BadContext(
                "a domain has at least one vCPU".into(),
            ));
        }
        let pages = ops.memory_pages(domid)?;
        let hvm = ops.domain_flags(domid)? & crate::sys::xen::DOMINF_HVM_GUEST != 0;
        let holes = vec![0; usize::try_from(pages.div_ceil(8)).unwrap_or(0)];
        Ok(Self {
            ctrl: ops,
            domid,
            vcpus,
            pages,
            hvm,
            mode: CheckpointMode::Pause,
            suspended: false,
            bitmap: Vec::new(),
            holes,
            skipped_writes: 0,
            pending_ctx: None,
        })
    }

    /// The operations handle (tests inspect their fake through it).
    pub fn ops(&self) -> &X {
        &self.ctrl
    }

    /// Sets how checkpoints stop the guest.
    pub fn set_mode(&mut self, mode: CheckpointMode) {
        self.mode = mode;
    }

    /// Whether this is an HVM or PVH domain (its vCPU state is the HVM context).
    pub fn is_hvm(&self) -> bool {
        self.hvm
    }

    /// Whether the domain is suspended right now (shut down with `SHUTDOWN_suspend`); used
    /// to time checkpoints from outside (ours and `xl remus`'s alike).
    pub fn is_suspended(&mut self) -> Result<bool, DomainError> {
        use crate::sys::xen::{DOMINF_SHUTDOWN, DOMINF_SHUTDOWN_SHIFT, SHUTDOWN_SUSPEND};
        let f = self.ctrl.domain_flags(self.domid)?;
        Ok(f & DOMINF_SHUTDOWN != 0 && (f >> DOMINF_SHUTDOWN_SHIFT) & 0xff == SHUTDOWN_SUSPEND)
    }

    /// Pfns found to be holes so far (not mapped in the domain's physmap).
    pub fn known_holes(&self) -> u64 {
        self.holes.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Non-zero pages the replica could not store because it lacks the pfn.
    pub fn skipped_writes(&self) -> u64 {
        self.skipped_writes
    }

    fn is_hole(&self, pfn: u64) -> bool {
        usize::try_from(pfn / 8)
            .ok()
            .and_then(|i| self.holes.get(i))
            .is_some_and(|b| b & (1 << (pfn % 8)) != 0)
    }

    fn mark_hole(&mut self, pfn: u64) {
        if let Some(b) = usize::try_from(pfn / 8)
            .ok()
            .and_then(|i| self.holes.get_mut(i))
        {
            *b |= 1 << (pfn % 8);
        }
    }

    /// Copies pages, skipping known holes and learning new ones.
    fn copy(&mut self, pfns: &[u64], buf: &mut [u8], write: bool) -> Result<(), DomainError> {
        let mut want = Vec::with_capacity(pfns.len());
        let mut tmp = Vec::new();
        for (i, &p) in pfns.iter().enumerate() {
            let page = &buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            if self.is_hole(p) {
                if write && page.iter().any(|&b| b != 0) {
                    self.skipped_writes += 1;
                }
                continue;
            }
            want.push(i);
        }
        if want.len() == pfns.len() {
            let holes = self.ctrl.copy_pages(self.domid, pfns, buf, write)?;
            return self.learn_holes(pfns, buf, &holes, write);
        }
        let sub: Vec<u64> = want.iter().map(|&i| pfns[i]).collect();
        tmp.resize(sub.len() * PAGE_SIZE, 0);
        if write {
            for (j, &i) in want.iter().enumerate() {
                tmp[j * PAGE_SIZE..(j + 1) * PAGE_SIZE]
                    .copy_from_slice(&buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
            }
        }
        let holes = self.ctrl.copy_pages(self.domid, &sub, &mut tmp, write)?;
        let res = self.learn_holes(&sub, &tmp, &holes, write);
        if !write {
            for (i, &p) in pfns.iter().enumerate() {
                if self.is_hole(p) && !sub.contains(&p) {
                    buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].fill(0);
                }
            }
            for (j, &i) in want.iter().enumerate() {
                buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                    .copy_from_slice(&tmp[j * PAGE_SIZE..(j + 1) * PAGE_SIZE]);
            }
        }
        res
    }

    fn learn_holes(
        &mut self,
        pfns: &[u64],
        buf: &[u8],
        holes: &[usize],
        write: bool,
    ) -> Result<(), DomainError> {
        for &i in holes {
            let Some(&p) = pfns.get(i) else { continue };
            self.mark_hole(p);
            let page = buf.get(i * PAGE_SIZE..(i + 1) * PAGE_SIZE).unwrap_or(&[]);
            if write && page.iter().any(|&b| b != 0) {
                // Data for a page the replica does not have (a frame the guest mapped into
                // its physmap, e.g. shared info or grant frames, which it re-maps on resume).
                self.skipped_writes += 1;
                tracing::warn!(pfn = p, "page data for a hole in the replica skipped");
            }
        }
        Ok(())
    }

    fn suspend(&mut self, timeout: std::time::Duration) -> Result<(), DomainError> {
        use crate::sys::xen::{DOMINF_SHUTDOWN, DOMINF_SHUTDOWN_SHIFT, SHUTDOWN_SUSPEND};
        self.ctrl.request_suspend(self.domid)?;
        let start = std::time::Instant::now();
        loop {
            let f = self.ctrl.domain_flags(self.domid)?;
            if f & DOMINF_SHUTDOWN != 0 {
                let reason = (f >> DOMINF_SHUTDOWN_SHIFT) & 0xff;
                if reason == SHUTDOWN_SUSPEND {
                    self.suspended = true;
                    return Ok(());
                }
                return Err(DomainError::WrongState(
                    "the domain shut down instead of suspending",
                ));
            }
            if start.elapsed() > timeout {
                return Err(DomainError::WrongState("the guest did not suspend in time"));
            }
            std::thread::sleep(std::time::Duration::from_micros(500));
        }
    }
}

impl<X: XenOps> Domain for XenDomain<X> {
    fn memory_pages(&self) -> u64 {
        self.pages
    }

    fn pause(&mut self) -> Result<(), DomainError> {
        match self.mode {
            CheckpointMode::Pause => self.ctrl.pause(self.domid),
            CheckpointMode::Suspend { timeout } => self.suspend(timeout),
        }
    }

    fn resume(&mut self) -> Result<(), DomainError> {
        if std::mem::take(&mut self.suspended) {
            self.ctrl.resume_cancelled(self.domid)
        } else {
            self.ctrl.unpause(self.domid)
        }
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
        self.copy(pfns, out, false)
    }

    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), DomainError> {
        check_pages(pfns, data.len(), self.pages)?;
        let mut buf = data.to_vec();
        self.copy(pfns, &mut buf, true)
    }

    fn vcpu_context(&mut self) -> Result<VcpuContext, DomainError> {
        if self.hvm {
            return Ok(VcpuContext(self.ctrl.hvm_context(self.domid)?));
        }
        let mut all = Vec::new();
        for v in 0..self.vcpus {
            all.extend(self.ctrl.vcpu_context(self.domid, v)?);
        }
        Ok(VcpuContext(all))
    }

    fn set_vcpu_context(&mut self, ctx: &VcpuContext) -> Result<(), DomainError> {
        if self.hvm {
            if ctx.0.is_empty() || ctx.0.len() > crate::sys::xen::MAX_HVM_CONTEXT {
                return Err(DomainError::BadContext(format!(
                    "HVM context of {} bytes",
                    ctx.0.len()
                )));
            }
            self.pending_ctx = Some(ctx.clone());
            return Ok(());
        }
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
        if self.hvm {
            self.ctrl.set_hvm_context(self.domid, &ctx.0)?;
            return self.ctrl.unpause(self.domid);
        }
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
        holes: Vec<u64>,
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
        ) -> Result<Vec<usize>, DomainError> {
            let mut holes = Vec::new();
            for (i, &p) in pfns.iter().enumerate() {
                if self.holes.contains(&p) {
                    holes.push(i);
                    if !write {
                        buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].fill(0);
                    }
                    continue;
                }
                let m = &mut self.memory[p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE];
                let b = &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
                if write {
                    m.copy_from_slice(b);
                } else {
                    b.copy_from_slice(m);
                }
            }
            Ok(holes)
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
        fn domain_flags(&mut self, _: u32) -> Result<u32, DomainError> {
            Ok(0)
        }
        fn hvm_context(&mut self, _: u32) -> Result<Vec<u8>, DomainError> {
            Err(DomainError::WrongState("PV fake"))
        }
        fn set_hvm_context(&mut self, _: u32, _: &[u8]) -> Result<(), DomainError> {
            Err(DomainError::WrongState("PV fake"))
        }
        fn request_suspend(&mut self, _: u32) -> Result<(), DomainError> {
            Err(DomainError::WrongState("PV fake"))
        }
        fn resume_cancelled(&mut self, _: u32) -> Result<(), DomainError> {
            Err(DomainError::WrongState("PV fake"))
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
    fn a_replica_is_zeroed_before_it_takes_deltas() {
        let mut fake = FakeXen::new(2050, 1);
        fake.memory.fill(0x5a);
        fake.holes = vec![2049];
        let mut d = XenDomain::with_ops(fake, 1, 1).unwrap();
        d.zero_memory().unwrap();
        assert!(d
            .ops()
            .memory
            .iter()
            .enumerate()
            .all(|(i, &b)| b == 0 || i / PAGE_SIZE == 2049));
    }

    #[test]
    fn holes_in_the_physmap_read_as_zeros_and_take_only_zero_writes() {
        let mut fake = FakeXen::new(8, 1);
        fake.memory[PAGE_SIZE * 2] = 7;
        fake.holes = vec![3, 5];
        let mut d = XenDomain::with_ops(fake, 1, 1).unwrap();
        let mut buf = vec![0xaa; 4 * PAGE_SIZE];
        d.read_pages(&[2, 3, 4, 5], &mut buf).unwrap();
        assert_eq!(buf[0], 7);
        assert!(buf[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&b| b == 0));
        assert!(buf[3 * PAGE_SIZE..].iter().all(|&b| b == 0));
        assert_eq!(d.known_holes(), 2);
        // Known holes are not mapped again; zero pages for them are accepted and skipped.
        let mut again = vec![0xaa; 3 * PAGE_SIZE];
        d.read_pages(&[3, 4, 5], &mut again).unwrap();
        assert!(again[..PAGE_SIZE].iter().all(|&b| b == 0));
        d.write_pages(&[3, 4], &vec![0; 2 * PAGE_SIZE]).unwrap();
        let mut data = vec![0; 2 * PAGE_SIZE];
        data[PAGE_SIZE] = 1;
        d.write_pages(&[4, 3], &vec![0; 2 * PAGE_SIZE]).unwrap();
        assert_eq!(d.skipped_writes(), 0);
        data[0] = 9;
        d.write_pages(&[4, 3], &data).unwrap();
        assert_eq!(
            d.skipped_writes(),
            1,
            "data for a page the replica lacks is counted"
        );
        let mut back = vec![0; PAGE_SIZE];
        d.read_pages(&[4], &mut back).unwrap();
        assert_eq!(back[0], 9, "the mapped page of the batch was written");
    }

    #[test]
    fn bitmap_bits_become_sorted_pfns_within_memory() {
        let bm = [0b0000_0101u8, 0, 0b1000_0000, 0xff];
        assert_eq!(bitmap_to_pfns(&bm, 26), vec![0, 2, 23, 24, 25]);
    }
}
