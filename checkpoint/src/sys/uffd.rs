//! Shared guest memory mapping and userfaultfd write-protect dirty tracking.
//!
//! The synthetic guest maps its memfd with [`GuestMapping`], registers the mapping with a
//! [`WpTracker`] and write-protects it; the first write to a protected page raises a fault
//! event, the tracker's thread records the page as dirty and removes the protection (waking the
//! writer). Collecting the dirty log re-protects exactly the pages that were written. This is
//! the mechanism QEMU's background snapshot uses (`UFFDIO_REGISTER_MODE_WP`).
//! Constants and structures follow `include/uapi/linux/userfaultfd.h`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::time::Duration;

use crate::workload::PAGE_SIZE;

const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);
nix::ioctl_readwrite!(uffdio_register, 0xAA, 0x00, UffdioRegister);
nix::ioctl_readwrite!(uffdio_writeprotect, 0xAA, 0x06, UffdioWriteprotect);
nix::ioctl_readwrite!(pagemap_scan, b'f', 16, PmScanArg);

/// `struct pm_scan_arg` (include/uapi/linux/fs.h).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// How written pages are found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackMode {
    /// `UFFD_FEATURE_WP_ASYNC`: the kernel resolves write faults itself and
    /// `PAGEMAP_SCAN` reads and re-protects the written pages in one call (Linux 6.7+).
    Async,
    /// Classic write-protect faults, resolved by a handler thread ([`WpTracker::next_fault`]).
    Sync,
}

/// A `MAP_SHARED` read-write mapping of a guest memory file.
pub struct GuestMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; all access goes through
// copying methods that take the byte range explicitly, so it can move between threads.
unsafe impl Send for GuestMapping {}
// SAFETY: as above; concurrent writes from several threads are data races on guest memory,
// which is exactly what a guest's memory is (and only the workload thread writes).
unsafe impl Sync for GuestMapping {}

impl GuestMapping {
    /// Maps `len` bytes of `fd` shared, read-write.
    pub fn map(fd: impl AsFd, len: usize) -> io::Result<Self> {
        let nz = std::num::NonZeroUsize::new(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"))?;
        // SAFETY: a fresh mapping at a kernel-chosen address aliases no Rust object; the fd is
        // valid for the call; the mapping is unmapped only in Drop.
        let p = unsafe {
            nix::sys::mman::mmap(
                None,
                nz,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .map_err(io::Error::from)?;
        Ok(Self { ptr: p.cast(), len })
    }

    /// Mapping length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Writes `data` at byte `offset`. Out-of-range writes are refused.
    pub fn write(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        if offset.checked_add(data.len()).is_none_or(|e| e > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write beyond mapping",
            ));
        }
        // SAFETY: the range was checked to lie inside the live mapping; `data` is a separate
        // Rust slice so the regions cannot overlap. A write to a write-protected page blocks
        // in the kernel until the tracker thread resolves the fault.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len());
        }
        Ok(())
    }
}

impl Drop for GuestMapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe the mapping created in `map`, not used after this.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}

/// A userfaultfd registered in write-protect mode over a [`GuestMapping`].
pub struct WpTracker {
    uffd: OwnedFd,
    base: u64,
    len: u64,
    mode: TrackMode,
    pagemap: Option<std::fs::File>,
}

fn new_uffd() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
    // SAFETY: plain syscall with integer flags; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        let fd = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    // Fall back to /dev/userfaultfd (works when the syscall is restricted by policy).
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer argument and returns a new fd.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), userfaultfd_ioc_new_code(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd returned by the ioctl, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn userfaultfd_ioc_new_code() -> libc::Ioctl {
    // _IO(0xAA, 0x00)
    nix::request_code_none!(0xAA, 0x00) as libc::Ioctl
}

impl WpTracker {
    /// Creates a userfaultfd, enables write-protect tracking (including never-touched shmem
    /// pages) and registers the whole mapping; asynchronous mode when the kernel has it,
    /// else fault-driven. Nothing is protected yet.
    pub fn new(mapping: &GuestMapping) -> io::Result<Self> {
        match Self::with_mode(mapping, TrackMode::Async) {
            Ok(t) => Ok(t),
            Err(_) => Self::with_mode(mapping, TrackMode::Sync),
        }
    }

    /// Like [`WpTracker::new`] with a chosen mode.
    pub fn with_mode(mapping: &GuestMapping, mode: TrackMode) -> io::Result<Self> {
        let uffd = new_uffd()?;
        let mut features = UFFD_FEATURE_PAGEFAULT_FLAG_WP
            | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
            | UFFD_FEATURE_WP_UNPOPULATED;
        if mode == TrackMode::Async {
            features |= UFFD_FEATURE_WP_ASYNC;
        }
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: `api` is a live, correctly laid out uffdio_api for the duration of the call.
        unsafe { uffdio_api(uffd.as_raw_fd(), &mut api) }.map_err(|e| {
            io::Error::other(format!(
                "UFFDIO_API with write-protect features {features:#x} refused ({e}); kernel too old?"
            ))
        })?;
        let base = mapping.addr();
        let len = u64::try_from(mapping.len()).map_err(|_| io::Error::other("length"))?;
        let mut reg = UffdioRegister {
            range: UffdioRange { start: base, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: `reg` is a live uffdio_register describing our own mapping.
        unsafe { uffdio_register(uffd.as_raw_fd(), &mut reg) }.map_err(io::Error::from)?;
        let pagemap = match mode {
            TrackMode::Async => Some(std::fs::File::open("/proc/self/pagemap")?),
            TrackMode::Sync => None,
        };
        let t = Self {
            uffd,
            base,
            len,
            mode,
            pagemap,
        };
        if mode == TrackMode::Async {
            // Probe PAGEMAP_SCAN once so a kernel without it falls back to sync mode.
            let mut probe = Vec::new();
            t.scan_written(&mut probe)?;
        }
        Ok(t)
    }

    /// The tracking mode in use.
    pub fn mode(&self) -> TrackMode {
        self.mode
    }

    /// Async mode: appends the indices of pages written since they were last protected and
    /// protects them again, atomically per page (`PAGEMAP_SCAN` + `PM_SCAN_WP_MATCHING`).
    pub fn scan_written(&self, out: &mut Vec<u32>) -> io::Result<()> {
        let Some(pagemap) = &self.pagemap else {
            return Err(io::Error::other("scan_written needs async tracking"));
        };
        let mut regions = vec![PageRegion::default(); 512];
        let end = self.base + self.len;
        let mut start = self.base;
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start,
                end,
                vec: regions.as_mut_ptr() as u64,
                vec_len: regions.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..PmScanArg::default()
            };
            // SAFETY: `arg` is a live pm_scan_arg whose `vec` points at `regions`, a live
            // buffer of `vec_len` page_region entries; the range is our registered mapping.
            let n =
                unsafe { pagemap_scan(pagemap.as_raw_fd(), &mut arg) }.map_err(io::Error::from)?;
            let n = usize::try_from(n).map_err(|_| io::Error::other("pagemap_scan count"))?;
            for r in regions.iter().take(n) {
                if r.start < self.base || r.end > end || r.start > r.end {
                    return Err(io::Error::other("pagemap_scan region outside the mapping"));
                }
                let first = (r.start - self.base) / PAGE_SIZE as u64;
                let last = (r.end - self.base) / PAGE_SIZE as u64;
                for p in first..last {
                    out.push(u32::try_from(p).map_err(|_| io::Error::other("page index"))?);
                }
            }
            if arg.walk_end <= start {
                return Err(io::Error::other("pagemap_scan made no progress"));
            }
            start = arg.walk_end;
        }
        Ok(())
    }

    /// Sets (`protect == true`) or clears write protection on pages
    /// `first_page..first_page + pages`; clearing also wakes threads blocked on them.
    pub fn set_protection(&self, first_page: u64, pages: u64, protect: bool) -> io::Result<()> {
        let page = crate::workload::PAGE_SIZE_U64;
        let start = first_page
            .checked_mul(page)
            .filter(|s| s.saturating_add(pages * page) <= self.len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range"))?;
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: self.base + start,
                len: pages * page,
            },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        loop {
            // SAFETY: `wp` is a live uffdio_writeprotect over a range inside the registered
            // mapping (checked above).
            match unsafe { uffdio_writeprotect(self.uffd.as_raw_fd(), &mut wp) } {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Waits up to `timeout` for a write-protect fault; returns the faulting page index.
    pub fn next_fault(&self, timeout: Duration) -> io::Result<Option<u64>> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN)];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let mut msg = [0u8; 32];
        match nix::unistd::read(self.uffd.as_raw_fd(), &mut msg) {
            Ok(32) => {}
            Ok(_) => return Err(io::Error::other("short uffd_msg")),
            Err(nix::errno::Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        if msg[0] != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        let mut f = [0u8; 8];
        f.copy_from_slice(&msg[8..16]);
        let flags = u64::from_ne_bytes(f);
        f.copy_from_slice(&msg[16..24]);
        let addr = u64::from_ne_bytes(f);
        if flags & UFFD_PAGEFAULT_FLAG_WP == 0 || addr < self.base || addr >= self.base + self.len {
            return Err(io::Error::other(format!(
                "unexpected fault flags {flags:#x} at {addr:#x}"
            )));
        }
        Ok(Some((addr - self.base) / PAGE_SIZE as u64))
    }
}
