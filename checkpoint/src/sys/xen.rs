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
//! ```
//! Nothing here can run on a host without Xen; it is compiled and its load failure is tested.

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
}

/// Open handles on libxenctrl and libxenforeignmemory.
pub struct XenCtrl {
    fns: Fns,
    xch: *mut c_void,
    fmem: *mut c_void,
    // Kept loaded for as long as the function pointers above are used.
    _ctrl: Library,
    _fmem: Library,
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
            _ctrl: ctrl,
            _fmem: fmem,
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
    /// foreign mapping; `buf` is `pfns.len() * PAGE_SIZE` bytes.
    pub fn copy_pages(
        &mut self,
        domid: u32,
        pfns: &[u64],
        buf: &mut [u8],
        write: bool,
    ) -> Result<(), DomainError> {
        if pfns.is_empty() {
            return Ok(());
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
        let bad = err.iter().position(|&e| e != 0);
        if bad.is_none() {
            let len = pfns.len() * PAGE_SIZE;
            // SAFETY: the mapping spans pfns.len() pages (= len bytes); buf has len bytes
            // (checked by the caller) and is a separate allocation.
            unsafe {
                if write {
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), addr.cast::<u8>(), len);
                } else {
                    std::ptr::copy_nonoverlapping(addr.cast::<u8>(), buf.as_mut_ptr(), len);
                }
            }
        }
        // SAFETY: unmaps exactly the mapping returned above.
        unsafe { (self.fns.fm_unmap)(self.fmem, addr, arr.len()) };
        if let Some(i) = bad {
            return Err(DomainError::XenCall {
                call: "xenforeignmemory_map (page)",
                domid,
                source: io::Error::from_raw_os_error(-err[i]),
            });
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
        // SAFETY: both handles were opened in `open` and are not used after this.
        unsafe {
            (self.fns.fm_close)(self.fmem);
            (self.fns.close)(self.xch);
        }
    }
}
