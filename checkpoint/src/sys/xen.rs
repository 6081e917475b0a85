//! libxenctrl and libxenforeignmemory, loaded at run time (Xen 4.17 ABI).
//!
//! Prototypes, from `tools/include/xenctrl.h` and `xenforeignmemory.h`:
//! ```c
//! xc_interface *xc_interface_open(xentoollog_logger *, xentoollog_logger *, unsigned flags);
//! int  xc_interface_close(xc_interface *);
//! int  xc_domain_pause(xc_interface *, uint32_t domid);
//! int  xc_domain_unpause(xc_interface *, uint32_t domid);
//! int  xc_domain_maximum_gpfn(xc_interface *, uint32_t domid, xen_pfn_t *gpfns);
//! long long xc_logdirty_control(xc_interface *, uint32_t domid, unsigned sop,
//!          xc_hypercall_buffer_t *dirty_bitmap, unsigned long pages, unsigned mode,
//!          xc_shadow_op_stats_t *stats);
//! void *xc__hypercall_buffer_alloc_pages(xc_interface *, xc_hypercall_buffer_t *, int nr);
//! void  xc__hypercall_buffer_free_pages(xc_interface *, xc_hypercall_buffer_t *, int nr);
//! int  xc_vcpu_getcontext(xc_interface *, uint32_t domid, uint32_t vcpu, vcpu_guest_context_any_t *);
//! int  xc_vcpu_setcontext(xc_interface *, uint32_t domid, uint32_t vcpu, vcpu_guest_context_any_t *);
//! xenforeignmemory_handle *xenforeignmemory_open(xentoollog_logger *, unsigned flags);
//! int  xenforeignmemory_close(xenforeignmemory_handle *);
//! void *xenforeignmemory_map(xenforeignmemory_handle *, uint32_t dom, int prot, size_t pages,
//!          const xen_pfn_t arr[], int err[]);
//! int  xenforeignmemory_unmap(xenforeignmemory_handle *, void *addr, size_t pages);
//! int  xc_domain_hvm_getcontext(xc_interface *, uint32_t domid, uint8_t *buf, uint32_t size);
//! int  xc_domain_hvm_setcontext(xc_interface *, uint32_t domid, uint8_t *buf, uint32_t size);
//! int  xc_domain_getinfolist(xc_interface *, uint32_t first, unsigned max, xc_domaininfo_t *);
//! int  xc_domain_resume(xc_interface *, uint32_t domid, int fast);          // libxenguest
//! struct xs_handle *xs_open(unsigned long flags);                          // libxenstore
//! bool xs_write(struct xs_handle *, uint32_t t, const char *path, const void *data, unsigned len);
//! bool xs_resume_domain(struct xs_handle *, unsigned domid);
//! void xs_close(struct xs_handle *);
//! ```
//! Checked in the nested Xen lab (`scripts/xen-lab run domain`, Xen 4.17, PVH guest): pause,
//! log-dirty enable/clean, foreign mapping and contexts work as declared here. Lessons: a PVH
//! guest's pfn space (`xc_domain_maximum_gpfn`) runs up to its special pages below 4 GiB
//! (0xfefff for a 128 MiB guest), so most pfns are holes that fail to map one by one; and
//! an HVM/PVH vCPU is only fully described by the HVM context (`xc_domain_hvm_getcontext`:
//! segments, control registers, MSRs, LAPIC...), not by `xc_vcpu_getcontext`.

use std::ffi::{c_int, c_longlong, c_uint, c_ulong, c_void};
use std::io;

use libloading::Library;

use crate::domain::DomainError;
use crate::workload::PAGE_SIZE;

/// `XEN_DOMCTL_SHADOW_OP_OFF`.
pub const SHADOW_OP_OFF: c_uint = 0;
/// `XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY`.
pub const SHADOW_OP_ENABLE_LOGDIRTY: c_uint = 2;
/// `XEN_DOMCTL_SHADOW_OP_CLEAN`: read the dirty bitmap and clear it.
pub const SHADOW_OP_CLEAN: c_uint = 11;
/// Size reserved for one `vcpu_guest_context_any_t` (the x86-64 context is ~5 KiB).
pub const VCPU_CONTEXT_BYTES: usize = 8192;
/// `XEN_DOMINF_hvm_guest` (HVM and PVH domains).
pub const DOMINF_HVM_GUEST: u32 = 1 << 1;
/// `XEN_DOMINF_shutdown`.
pub const DOMINF_SHUTDOWN: u32 = 1 << 2;
/// `XEN_DOMINF_shutdownshift`: the shutdown reason sits in bits 16..24 of the flags.
pub const DOMINF_SHUTDOWN_SHIFT: u32 = 16;
/// `SHUTDOWN_suspend`.
pub const SHUTDOWN_SUSPEND: u32 = 2;
/// Largest HVM context accepted (a 1-vCPU PVH guest's is a few KiB).
pub const MAX_HVM_CONTEXT: usize = 512 * 1024;

/// `xc_hypercall_buffer_t` (`DECLARE_HYPERCALL_BUFFER` zero-initialises it).
#[repr(C)]
struct HypercallBuffer {
    hbuf: *mut c_void,
    param_shadow: *mut HypercallBuffer,
    dir: c_int,
    sbuf: *mut c_void,
    sz: usize,
}

/// `xc_shadow_op_stats_t`.
#[repr(C)]
#[derive(Default)]
struct ShadowOpStats {
    fault_count: u32,
    dirty_count: u32,
}

type OpenFn = unsafe extern "C" fn(*mut c_void, *mut c_void, c_uint) -> *mut c_void;
type CloseFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type DomFn = unsafe extern "C" fn(*mut c_void, u32) -> c_int;
type MaxGpfnFn = unsafe extern "C" fn(*mut c_void, u32, *mut c_ulong) -> c_int;
type LogdirtyFn = unsafe extern "C" fn(
    *mut c_void,
    u32,
    c_uint,
    *mut HypercallBuffer,
    c_ulong,
    c_uint,
    *mut ShadowOpStats,
) -> c_longlong;
type HbAllocFn = unsafe extern "C" fn(*mut c_void, *mut HypercallBuffer, c_int) -> *mut c_void;
type HbFreeFn = unsafe extern "C" fn(*mut c_void, *mut HypercallBuffer, c_int);
type CtxFn = unsafe extern "C" fn(*mut c_void, u32, u32, *mut c_void) -> c_int;
type FmOpenFn = unsafe extern "C" fn(*mut c_void, c_uint) -> *mut c_void;
type FmMapFn =
    unsafe extern "C" fn(*mut c_void, u32, c_int, usize, *const c_ulong, *mut c_int) -> *mut c_void;
type FmUnmapFn = unsafe extern "C" fn(*mut c_void, *mut c_void, usize) -> c_int;
type HvmCtxFn = unsafe extern "C" fn(*mut c_void, u32, *mut u8, u32) -> c_int;
type InfoListFn = unsafe extern "C" fn(*mut c_void, u32, c_uint, *mut c_void) -> c_int;
type ResumeFn = unsafe extern "C" fn(*mut c_void, u32, c_int) -> c_int;
type XsOpenFn = unsafe extern "C" fn(c_ulong) -> *mut c_void;
type XsWriteFn =
    unsafe extern "C" fn(*mut c_void, u32, *const std::ffi::c_char, *const c_void, c_uint) -> bool;
type XsCloseFn = unsafe extern "C" fn(*mut c_void);
type XsResumeFn = unsafe extern "C" fn(*mut c_void, c_uint) -> bool;

struct Fns {
    close: CloseFn,
    pause: DomFn,
    unpause: DomFn,
    max_gpfn: MaxGpfnFn,
    logdirty: LogdirtyFn,
    hb_alloc: HbAllocFn,
    hb_free: HbFreeFn,
    getctx: CtxFn,
    setctx: CtxFn,
    fm_close: CloseFn,
    fm_map: FmMapFn,
    fm_unmap: FmUnmapFn,
    hvm_get: HvmCtxFn,
    hvm_set: HvmCtxFn,
    infolist: InfoListFn,
    resume: ResumeFn,
    xs_open: XsOpenFn,
    xs_write: XsWriteFn,
    xs_close: XsCloseFn,
    xs_resume: XsResumeFn,
}

/// Open handles on libxenctrl and libxenforeignmemory.
pub struct XenCtrl {
    fns: Fns,
    xch: *mut c_void,
    fmem: *mut c_void,
    /// xenstore handle, opened on first use.
    xs: *mut c_void,
    // Kept loaded for as long as the function pointers above are used.
    _ctrl: Library,
    _fmem: Library,
    _guest: Library,
    _store: Library,
}

// SAFETY: libxenctrl handles may be used from any thread as long as calls are not concurrent;
// XenCtrl is only ever used through `&mut self` of its single owner.
unsafe impl Send for XenCtrl {}

fn load(names: &[&str]) -> Result<Library, DomainError> {
    let mut last = String::new();
    for n in names {
        // SAFETY: loading a Xen tools library runs its initialisers, which only set up
        // library-internal state.
        match unsafe { Library::new(n) } {
            Ok(l) => return Ok(l),
            Err(e) => last = e.to_string(),
        }
    }
    Err(DomainError::XenUnavailable(last))
}

macro_rules! sym {
    ($lib:expr, $name:literal, $ty:ty) => {{
        // SAFETY: the symbol's C prototype (module docs) matches the Rust fn type `$ty`.
        let s: libloading::Symbol<$ty> = unsafe { $lib.get(concat!($name, "\0").as_bytes()) }
            .map_err(|e| DomainError::XenUnavailable(format!("{}: {e}", $name)))?;
        *s
    }};
}

fn errno(call: &'static str, domid: u32) -> DomainError {
    DomainError::XenCall {
        call,
        domid,
        source: io::Error::last_os_error(),
    }
}

impl XenCtrl {
    /// Loads the libraries and opens both interfaces.
    pub fn open() -> Result<Self, DomainError> {
        let ctrl = load(&["libxenctrl.so.4.17", "libxenctrl.so"])?;
        let fmem = load(&["libxenforeignmemory.so.1", "libxenforeignmemory.so"])?;
        let guest = load(&["libxenguest.so.4.17", "libxenguest.so"])?;
        let store = load(&["libxenstore.so.4", "libxenstore.so"])?;
        // Xen's tools libraries can be installed on any Debian machine; only a dom0 (or a
        // privileged domU) has the privcmd device they need. Say so plainly instead of
        // letting xc_interface_open print its own error and fail with ENOENT.
        if !["/dev/xen/privcmd", "/proc/xen/privcmd"]
            .iter()
            .any(|p| std::path::Path::new(p).exists())
        {
            return Err(DomainError::NotOnXen(
                "the Xen libraries are installed but /dev/xen/privcmd is missing \
                 (not running under the Xen hypervisor)"
                    .into(),
            ));
        }
        let open: OpenFn = sym!(ctrl, "xc_interface_open", OpenFn);
        let fm_open: FmOpenFn = sym!(fmem, "xenforeignmemory_open", FmOpenFn);
        let fns = Fns {
            close: sym!(ctrl, "xc_interface_close", CloseFn),
            pause: sym!(ctrl, "xc_domain_pause", DomFn),
            unpause: sym!(ctrl, "xc_domain_unpause", DomFn),
            max_gpfn: sym!(ctrl, "xc_domain_maximum_gpfn", MaxGpfnFn),
            logdirty: sym!(ctrl, "xc_logdirty_control", LogdirtyFn),
            hb_alloc: sym!(ctrl, "xc__hypercall_buffer_alloc_pages", HbAllocFn),
            hb_free: sym!(ctrl, "xc__hypercall_buffer_free_pages", HbFreeFn),
            getctx: sym!(ctrl, "xc_vcpu_getcontext", CtxFn),
            setctx: sym!(ctrl, "xc_vcpu_setcontext", CtxFn),
            fm_close: sym!(fmem, "xenforeignmemory_close", CloseFn),
            fm_map: sym!(fmem, "xenforeignmemory_map", FmMapFn),
            fm_unmap: sym!(fmem, "xenforeignmemory_unmap", FmUnmapFn),
            hvm_get: sym!(ctrl, "xc_domain_hvm_getcontext", HvmCtxFn),
            hvm_set: sym!(ctrl, "xc_domain_hvm_setcontext", HvmCtxFn),
            infolist: sym!(ctrl, "xc_domain_getinfolist", InfoListFn),
            resume: sym!(guest, "xc_domain_resume", ResumeFn),
            xs_open: sym!(store, "xs_open", XsOpenFn),
            xs_write: sym!(store, "xs_write", XsWriteFn),
            xs_close: sym!(store, "xs_close", XsCloseFn),
            xs_resume: sym!(store, "xs_resume_domain", XsResumeFn),
        };
        // SAFETY: NULL loggers select libxenctrl's default logger; flags 0.
        let xch = unsafe { open(std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        if xch.is_null() {
            return Err(errno("xc_interface_open", 0));
        }
        // SAFETY: NULL logger, flags 0, as documented.
        let fm = unsafe { fm_open(std::ptr::null_mut(), 0) };
        if fm.is_null() {
            // SAFETY: xch was opened above and is not used afterwards.
            unsafe { (fns.close)(xch) };
            return Err(errno("xenforeignmemory_open", 0));
        }
        Ok(Self {
            fns,
            xch,
            fmem: fm,
            xs: std::ptr::null_mut(),
            _ctrl: ctrl,
            _fmem: fmem,
            _guest: guest,
            _store: store,
        })
    }

    /// `xc_domain_pause`.
    pub fn pause(&mut self, domid: u32) -> Result<(), DomainError> {
        // SAFETY: valid open handle; integer domid.
        if unsafe { (self.fns.pause)(self.xch, domid) } != 0 {
            return Err(errno("xc_domain_pause", domid));
        }
        Ok(())
    }

    /// `xc_domain_unpause`.
    pub fn unpause(&mut self, domid: u32) -> Result<(), DomainError> {
        // SAFETY: valid open handle; integer domid.
        if unsafe { (self.fns.unpause)(self.xch, domid) } != 0 {
            return Err(errno("xc_domain_unpause", domid));
        }
        Ok(())
    }

    /// Highest guest pfn + 1.
    pub fn memory_pages(&mut self, domid: u32) -> Result<u64, DomainError> {
        let mut gpfn: c_ulong = 0;
        // SAFETY: valid handle; `gpfn` is a live xen_pfn_t (unsigned long on x86).
        if unsafe { (self.fns.max_gpfn)(self.xch, domid, &mut gpfn) } < 0 {
            return Err(errno("xc_domain_maximum_gpfn", domid));
        }
        Ok(gpfn + 1)
    }

    /// Enables (`true`) or disables log-dirty mode.
    pub fn logdirty(&mut self, domid: u32, enable: bool) -> Result<(), DomainError> {
        let op = if enable {
            SHADOW_OP_ENABLE_LOGDIRTY
        } else {
            SHADOW_OP_OFF
        };
        let mut stats = ShadowOpStats::default();
        // SAFETY: ENABLE/OFF take no bitmap (NULL, 0 pages); `stats` is live.
        let r = unsafe {
            (self.fns.logdirty)(self.xch, domid, op, std::ptr::null_mut(), 0, 0, &mut stats)
        };
        if r < 0 {
            return Err(errno("xc_logdirty_control", domid));
        }
        Ok(())
    }

    /// `XEN_DOMCTL_SHADOW_OP_CLEAN`: fills `bitmap` (one bit per page, `pages` bits) and clears
    /// the log.
    pub fn logdirty_clean(
        &mut self,
        domid: u32,
        pages: u64,
        bitmap: &mut [u8],
    ) -> Result<(), DomainError> {
        let bytes =
            usize::try_from(pages.div_ceil(8)).map_err(|_| DomainError::WrongState("size"))?;
        if bitmap.len() < bytes {
            return Err(DomainError::BufferSize {
                got: bitmap.len(),
                pages: usize::try_from(pages).unwrap_or(usize::MAX),
            });
        }
        let nr = c_int::try_from(bytes.div_ceil(PAGE_SIZE))
            .map_err(|_| DomainError::WrongState("size"))?;
        let mut hb = HypercallBuffer {
            hbuf: std::ptr::null_mut(),
            param_shadow: std::ptr::null_mut(),
            dir: 0,
            sbuf: std::ptr::null_mut(),
            sz: 0,
        };
        // SAFETY: `hb` is a zeroed xc_hypercall_buffer_t as DECLARE_HYPERCALL_BUFFER makes.
        let buf = unsafe { (self.fns.hb_alloc)(self.xch, &mut hb, nr) };
        if buf.is_null() {
            return Err(errno("xc_hypercall_buffer_alloc_pages", domid));
        }
        let mut stats = ShadowOpStats::default();
        let npages = c_ulong::try_from(pages).map_err(|_| DomainError::WrongState("size"))?;
        // SAFETY: `hb` owns `nr` hypercall-safe pages, enough for `pages` bits.
        let r = unsafe {
            (self.fns.logdirty)(
                self.xch,
                domid,
                SHADOW_OP_CLEAN,
                &mut hb,
                npages,
                0,
                &mut stats,
            )
        };
        if r >= 0 {
            // SAFETY: `buf` points at `nr * PAGE_SIZE >= bytes` readable bytes.
            unsafe { std::ptr::copy_nonoverlapping(buf.cast::<u8>(), bitmap.as_mut_ptr(), bytes) };
        }
        // SAFETY: frees exactly what hb_alloc returned.
        unsafe { (self.fns.hb_free)(self.xch, &mut hb, nr) };
        if r < 0 {
            return Err(errno("xc_logdirty_control", domid));
        }
        Ok(())
    }

    /// Copies (`write == false`) or stores (`write == true`) the pages `pfns` through a
    /// foreign mapping; `buf` is `pfns.len() * PAGE_SIZE` bytes. Pages that cannot be mapped
    /// (holes in the guest's pfn space) are skipped; their indices in `pfns` are returned
    /// (on a read their part of `buf` is zeroed).
    pub fn copy_pages(
        &mut self,
        domid: u32,
        pfns: &[u64],
        buf: &mut [u8],
        write: bool,
    ) -> Result<Vec<usize>, DomainError> {
        if pfns.is_empty() {
            return Ok(Vec::new());
        }
        if buf.len() != pfns.len() * PAGE_SIZE {
            return Err(DomainError::BufferSize {
                got: buf.len(),
                pages: pfns.len(),
            });
        }
        let arr: Vec<c_ulong> = pfns
            .iter()
            .map(|&p| c_ulong::try_from(p).map_err(|_| DomainError::WrongState("pfn")))
            .collect::<Result<_, _>>()?;
        let mut err = vec![0 as c_int; pfns.len()];
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: arr and err hold pfns.len() elements each, as the call requires.
        let addr = unsafe {
            (self.fns.fm_map)(
                self.fmem,
                domid,
                prot,
                arr.len(),
                arr.as_ptr(),
                err.as_mut_ptr(),
            )
        };
        if addr.is_null() {
            return Err(errno("xenforeignmemory_map", domid));
        }
        let mut holes = Vec::new();
        let mut first_err = None;
        for (i, (&e, page)) in err.iter().zip(buf.chunks_mut(PAGE_SIZE)).enumerate() {
            if e != 0 {
                // A page that failed to map is left unmapped in the range: never touch it.
                if e != -libc::ENOENT && e != -libc::EINVAL && e != -libc::EFAULT {
                    first_err.get_or_insert(e);
                }
                holes.push(i);
                if !write {
                    page.fill(0);
                }
                continue;
            }
            // SAFETY: page i of the mapping is mapped (err[i] == 0) and spans PAGE_SIZE
            // bytes; `page` is a separate allocation of PAGE_SIZE bytes.
            unsafe {
                let p = addr.cast::<u8>().add(i * PAGE_SIZE);
                if write {
                    std::ptr::copy_nonoverlapping(page.as_ptr(), p, PAGE_SIZE);
                } else {
                    std::ptr::copy_nonoverlapping(p, page.as_mut_ptr(), PAGE_SIZE);
                }
            }
        }
        // SAFETY: unmaps exactly the mapping returned above.
        unsafe { (self.fns.fm_unmap)(self.fmem, addr, arr.len()) };
        if let Some(e) = first_err {
            return Err(DomainError::XenCall {
                call: "xenforeignmemory_map (page)",
                domid,
                source: io::Error::from_raw_os_error(-e),
            });
        }
        Ok(holes)
    }

    /// `xc_domain_hvm_getcontext`: the whole HVM save context (every vCPU's registers,
    /// segments, MSRs, LAPIC, ...). The domain must be paused.
    pub fn hvm_context(&mut self, domid: u32) -> Result<Vec<u8>, DomainError> {
        // SAFETY: a NULL buffer asks for the size only.
        let size = unsafe { (self.fns.hvm_get)(self.xch, domid, std::ptr::null_mut(), 0) };
        let size = usize::try_from(size).map_err(|_| errno("xc_domain_hvm_getcontext", domid))?;
        if size == 0 || size > MAX_HVM_CONTEXT {
            return Err(DomainError::BadContext(format!(
                "HVM context of {size} bytes"
            )));
        }
        let mut buf = vec![0u8; size];
        let len = u32::try_from(size).map_err(|_| DomainError::WrongState("size"))?;
        // SAFETY: buf has `len` writable bytes.
        let got = unsafe { (self.fns.hvm_get)(self.xch, domid, buf.as_mut_ptr(), len) };
        let got = usize::try_from(got).map_err(|_| errno("xc_domain_hvm_getcontext", domid))?;
        buf.truncate(got.min(size));
        Ok(buf)
    }

    /// `xc_domain_hvm_setcontext` from [`XenCtrl::hvm_context`]'s output.
    pub fn set_hvm_context(&mut self, domid: u32, ctx: &[u8]) -> Result<(), DomainError> {
        let len = u32::try_from(ctx.len()).map_err(|_| DomainError::WrongState("size"))?;
        let mut buf = ctx.to_vec();
        // SAFETY: buf has `len` bytes; Xen only reads them.
        if unsafe { (self.fns.hvm_set)(self.xch, domid, buf.as_mut_ptr(), len) } != 0 {
            return Err(errno("xc_domain_hvm_setcontext", domid));
        }
        Ok(())
    }

    /// The `XEN_DOMINF_*` flags of `domid` (`xc_domain_getinfolist` for one domain).
    pub fn domain_flags(&mut self, domid: u32) -> Result<u32, DomainError> {
        self.domain_info(domid).map(|(flags, _)| flags)
    }

    /// `max_pages` of `domid`: the most RAM pages it may own (the toolstack's memory
    /// setting plus slack).
    pub fn max_pages(&mut self, domid: u32) -> Result<u64, DomainError> {
        self.domain_info(domid).map(|(_, max)| max)
    }

    fn domain_info(&mut self, domid: u32) -> Result<(u32, u64), DomainError> {
        // xc_domaininfo_t is struct xen_domctl_getdomaininfo: domid_t domain at offset 0,
        // uint32_t flags at offset 4, tot_pages at 8, max_pages at 16 (uint64_aligned_t);
        // the whole struct is well under 1 KiB.
        let mut info = [0u64; 128];
        // SAFETY: `info` is 1 KiB, 8-byte aligned: room for one xc_domaininfo_t.
        let n = unsafe { (self.fns.infolist)(self.xch, domid, 1, info.as_mut_ptr().cast()) };
        if n < 0 {
            return Err(errno("xc_domain_getinfolist", domid));
        }
        let word = info[0].to_le_bytes();
        let got = u32::from(u16::from_le_bytes([word[0], word[1]]));
        if n != 1 || got != domid {
            return Err(DomainError::XenCall {
                call: "xc_domain_getinfolist",
                domid,
                source: io::Error::from_raw_os_error(libc::ESRCH),
            });
        }
        Ok((
            u32::from_le_bytes([word[4], word[5], word[6], word[7]]),
            info[2],
        ))
    }

    fn xs_handle(&mut self) -> Result<*mut c_void, DomainError> {
        if self.xs.is_null() {
            // SAFETY: flags 0 = a socket connection to xenstored.
            self.xs = unsafe { (self.fns.xs_open)(0) };
            if self.xs.is_null() {
                return Err(errno("xs_open", 0));
            }
        }
        Ok(self.xs)
    }

    /// Writes `value` to xenstore node `path` (opens the xenstore connection on first use).
    pub fn xs_write(&mut self, path: &str, value: &str) -> Result<(), DomainError> {
        let xs = self.xs_handle()?;
        let p = std::ffi::CString::new(path).map_err(|_| DomainError::WrongState("path"))?;
        let len = c_uint::try_from(value.len()).map_err(|_| DomainError::WrongState("value"))?;
        // SAFETY: open handle, NUL-terminated path, `len` bytes of value; XBT_NULL = 0.
        if !unsafe { (self.fns.xs_write)(xs, 0, p.as_ptr(), value.as_ptr().cast(), len) } {
            return Err(errno("xs_write", 0));
        }
        Ok(())
    }

    /// `xc_domain_resume(.., fast = 1)`: ends a guest's suspend as cancelled (the guest's
    /// suspend hypercall returns 1 and it carries on with its event channels intact), then
    /// `xs_resume_domain`, as libxl does: xenstored marked the domain shut down when it
    /// suspended and fires `@releaseDomain` for a later suspend only once told it resumed
    /// (without it the next `xl` suspend of the guest waits forever).
    pub fn resume_cancelled(&mut self, domid: u32) -> Result<(), DomainError> {
        // SAFETY: valid handle; integer arguments.
        if unsafe { (self.fns.resume)(self.xch, domid, 1) } != 0 {
            return Err(errno("xc_domain_resume", domid));
        }
        let xs = self.xs_handle()?;
        let id = c_uint::try_from(domid).map_err(|_| DomainError::WrongState("domid"))?;
        // SAFETY: open handle; integer domid.
        if !unsafe { (self.fns.xs_resume)(xs, id) } {
            return Err(errno("xs_resume_domain", domid));
        }
        Ok(())
    }

    /// `xc_vcpu_getcontext` into a [`VCPU_CONTEXT_BYTES`] buffer.
    pub fn vcpu_context(&mut self, domid: u32, vcpu: u32) -> Result<Vec<u8>, DomainError> {
        let mut buf = vec![0u8; VCPU_CONTEXT_BYTES];
        // SAFETY: buf is larger than vcpu_guest_context_any_t.
        if unsafe { (self.fns.getctx)(self.xch, domid, vcpu, buf.as_mut_ptr().cast()) } != 0 {
            return Err(errno("xc_vcpu_getcontext", domid));
        }
        Ok(buf)
    }

    /// `xc_vcpu_setcontext` from a buffer produced by [`XenCtrl::vcpu_context`].
    pub fn set_vcpu_context(
        &mut self,
        domid: u32,
        vcpu: u32,
        ctx: &[u8],
    ) -> Result<(), DomainError> {
        if ctx.len() != VCPU_CONTEXT_BYTES {
            return Err(DomainError::BadContext(format!(
                "{} bytes, expected {VCPU_CONTEXT_BYTES}",
                ctx.len()
            )));
        }
        let mut buf = ctx.to_vec();
        // SAFETY: buf holds a full context buffer; Xen reads only vcpu_guest_context_any_t.
        if unsafe { (self.fns.setctx)(self.xch, domid, vcpu, buf.as_mut_ptr().cast()) } != 0 {
            return Err(errno("xc_vcpu_setcontext", domid));
        }
        Ok(())
    }
}

impl Drop for XenCtrl {
    fn drop(&mut self) {
        // SAFETY: the handles were opened in `open` / `xs_write` and are not used after this.
        unsafe {
            if !self.xs.is_null() {
                (self.fns.xs_close)(self.xs);
            }
            (self.fns.fm_close)(self.fmem);
            (self.fns.close)(self.xch);
        }
    }
}
