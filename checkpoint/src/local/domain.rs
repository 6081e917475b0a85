//! Engine side of the synthetic guest: [`LocalDomain`] implements [`Domain`].

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

use super::guest::Tracking;
use super::protocol::*;
use crate::domain::{check_pages, Domain, DomainError, VcpuContext};
use crate::workload::{WorkloadState, PAGE_SIZE, PAGE_SIZE_U64};

/// How to start a synthetic guest.
#[derive(Clone, Debug)]
pub struct LocalGuestConfig {
    /// Path of the `xenft-synthetic-guest` binary.
    pub binary: PathBuf,
    /// Memory size in bytes (a multiple of 4096).
    pub memory_bytes: u64,
    /// Workload to run from.
    pub workload: WorkloadState,
    /// Dirty tracking mode.
    pub tracking: Tracking,
}

struct GuestProc {
    child: Child,
    ctl: UnixStream,
    /// Responses not read yet (to `OP_RESUME`, which does not wait for its answer).
    unread: u32,
}

/// A synthetic guest: running (primary, or a replica after failover) or a bare replica memory.
///
/// The guest process dies with this value (Drop kills it), and exits by itself when the
/// engine process dies (its control socket closes).
pub struct LocalDomain {
    memory: File,
    pages: u64,
    binary: PathBuf,
    guest: Option<GuestProc>,
    pending_ctx: Option<WorkloadState>,
    tracking: Tracking,
    /// Mode the running guest reported.
    active_tracking: Option<Tracking>,
}

fn os(op: &'static str) -> impl FnOnce(std::io::Error) -> DomainError {
    move |source| DomainError::Os { op, source }
}

fn set_inheritable(fd: &impl AsRawFd, yes: bool) -> Result<(), DomainError> {
    let flags = if yes {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(flags))
        .map(|_| ())
        .map_err(|e| DomainError::Os {
            op: "fcntl(F_SETFD)",
            source: e.into(),
        })
}

impl LocalDomain {
    fn with_memory(binary: PathBuf, memory_bytes: u64) -> Result<Self, DomainError> {
        if memory_bytes == 0 || !memory_bytes.is_multiple_of(PAGE_SIZE_U64) {
            return Err(DomainError::WrongState(
                "memory size must be a non-zero multiple of 4096",
            ));
        }
        let pages = memory_bytes / PAGE_SIZE_U64;
        if pages > u64::from(u32::MAX) {
            return Err(DomainError::WrongState("memory size above 16 TiB"));
        }
        let fd: OwnedFd = nix::sys::memfd::memfd_create(
            c"xenft-guest-ram",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(|e| DomainError::Os {
            op: "memfd_create",
            source: e.into(),
        })?;
        let memory = File::from(fd);
        memory
            .set_len(memory_bytes)
            .map_err(os("ftruncate(memfd)"))?;
        Ok(Self {
            memory,
            pages,
            binary,
            guest: None,
            pending_ctx: None,
            tracking: Tracking::Auto,
            active_tracking: None,
        })
    }

    /// Creates guest memory and starts a running guest on it (a primary).
    pub fn spawn(cfg: &LocalGuestConfig) -> Result<Self, DomainError> {
        let mut d = Self::with_memory(cfg.binary.clone(), cfg.memory_bytes)?;
        d.tracking = cfg.tracking;
        d.start_guest(cfg.workload)?;
        Ok(d)
    }

    /// Creates an all-zero replica memory with no guest running (a secondary).
    pub fn replica(binary: PathBuf, memory_bytes: u64) -> Result<Self, DomainError> {
        Self::with_memory(binary, memory_bytes)
    }

    /// Sets the dirty tracking mode for a guest started later (replica failover).
    pub fn with_tracking(mut self, tracking: Tracking) -> Self {
        self.tracking = tracking;
        self
    }

    /// Dirty tracking mode the running guest uses (never `Auto`).
    pub fn tracking(&self) -> Option<Tracking> {
        self.active_tracking
    }

    /// Pid of the guest process, if one runs.
    pub fn guest_pid(&self) -> Option<u32> {
        self.guest.as_ref().map(|g| g.child.id())
    }

    /// Kills the guest process (as a host crash would) and forgets it.
    pub fn kill_guest(&mut self) {
        self.active_tracking = None;
        if let Some(mut g) = self.guest.take() {
            let _ = g.child.kill();
            let _ = g.child.wait();
        }
    }

    fn start_guest(&mut self, state: WorkloadState) -> Result<(), DomainError> {
        if self.guest.is_some() {
            return Err(DomainError::WrongState("guest already running"));
        }
        let (ours, theirs) = UnixStream::pair().map_err(os("socketpair"))?;
        set_inheritable(&self.memory, true)?;
        set_inheritable(&theirs, true)?;
        let ctx_hex: String = state.encode().iter().map(|b| format!("{b:02x}")).collect();
        let spawned = Command::new(&self.binary)
            .arg("--memory-fd")
            .arg(self.memory.as_raw_fd().to_string())
            .arg("--control-fd")
            .arg(theirs.as_raw_fd().to_string())
            .arg("--pages")
            .arg(self.pages.to_string())
            .arg("--context")
            .arg(ctx_hex)
            .arg("--tracking")
            .arg(self.tracking.name())
            .stdin(Stdio::null())
            .spawn();
        set_inheritable(&self.memory, false)?;
        drop(theirs);
        let child = spawned.map_err(os("spawn synthetic guest"))?;
        ours.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(os("set_read_timeout"))?;
        let mut g = GuestProc {
            child,
            ctl: ours,
            unread: 0,
        };
        // The guest answers once memory is mapped and write-protected.
        let ready = read_response(&mut g.ctl, 4096);
        match ready {
            Ok((STATUS_OK, mode)) => {
                let name = String::from_utf8_lossy(&mode).into_owned();
                match Tracking::from_name(&name) {
                    Some(t @ (Tracking::Async | Tracking::Sync)) => self.active_tracking = Some(t),
                    _ => {
                        let _ = g.child.kill();
                        let _ = g.child.wait();
                        return Err(DomainError::GuestProtocol(format!(
                            "unknown tracking mode {name:?}"
                        )));
                    }
                }
                self.guest = Some(g);
                Ok(())
            }
            Ok((_, msg)) => {
                let _ = g.child.kill();
                let _ = g.child.wait();
                Err(DomainError::GuestProtocol(
                    String::from_utf8_lossy(&msg).into_owned(),
                ))
            }
            Err(e) => {
                let _ = g.child.kill();
                let status = g.child.wait().map(|s| s.to_string()).unwrap_or_default();
                Err(DomainError::GuestGone(format!("{e} ({status})")))
            }
        }
    }

    fn request(&mut self, op: u8) -> Result<Vec<u8>, DomainError> {
        let max = usize::try_from(self.pages)
            .unwrap_or(usize::MAX)
            .saturating_mul(4)
            + 4096;
        let g = self
            .guest
            .as_mut()
            .ok_or(DomainError::WrongState("no guest process running"))?;
        let res = std::io::Write::write_all(&mut g.ctl, &[op]).and_then(|()| {
            // Answers to earlier un-awaited requests come first.
            while g.unread > 0 {
                g.unread -= 1;
                let (status, msg) = read_response(&mut g.ctl, max)?;
                if status != STATUS_OK {
                    return Err(std::io::Error::other(
                        String::from_utf8_lossy(&msg).into_owned(),
                    ));
                }
            }
            read_response(&mut g.ctl, max)
        });
        match res {
            Ok((STATUS_OK, p)) => Ok(p),
            Ok((_, msg)) => Err(DomainError::GuestProtocol(
                String::from_utf8_lossy(&msg).into_owned(),
            )),
            Err(e) => {
                let exit = g.child.try_wait().ok().flatten();
                Err(DomainError::GuestGone(match exit {
                    Some(s) => format!("{e}; guest exited with {s}"),
                    None => e.to_string(),
                }))
            }
        }
    }

    fn parse_pfns(&self, p: &[u8]) -> Result<Vec<u64>, DomainError> {
        if !p.len().is_multiple_of(4) {
            return Err(DomainError::GuestProtocol(
                "dirty list not a multiple of 4".into(),
            ));
        }
        let mut out = Vec::with_capacity(p.len() / 4);
        for c in p.chunks_exact(4) {
            let mut a = [0u8; 4];
            a.copy_from_slice(c);
            let pfn = u64::from(u32::from_le_bytes(a));
            if pfn >= self.pages {
                return Err(DomainError::PfnOutOfRange {
                    pfn,
                    pages: self.pages,
                });
            }
            out.push(pfn);
        }
        Ok(out)
    }

    fn runs(pfns: &[u64]) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mut i = 0;
        std::iter::from_fn(move || {
            if i >= pfns.len() {
                return None;
            }
            let mut j = i + 1;
            while j < pfns.len() && pfns[j] == pfns[j - 1] + 1 {
                j += 1;
            }
            let r = (i, j);
            i = j;
            Some(r)
        })
    }
}

impl Drop for LocalDomain {
    fn drop(&mut self) {
        if let Some(g) = self.guest.as_mut() {
            let _ = std::io::Write::write_all(&mut g.ctl, &[OP_SHUTDOWN]);
        }
        self.kill_guest();
    }
}

impl Domain for LocalDomain {
    fn memory_pages(&self) -> u64 {
        self.pages
    }

    fn pause(&mut self) -> Result<(), DomainError> {
        self.request(OP_PAUSE).map(|_| ())
    }

    fn resume(&mut self) -> Result<(), DomainError> {
        // Do not wait for the answer: the guest runs as soon as it reads the request, and the
        // answer is checked with the next request.
        let g = self
            .guest
            .as_mut()
            .ok_or(DomainError::WrongState("no guest process running"))?;
        std::io::Write::write_all(&mut g.ctl, &[OP_RESUME])
            .map_err(|e| DomainError::GuestGone(e.to_string()))?;
        g.unread += 1;
        Ok(())
    }

    fn pause_and_collect(&mut self) -> Result<(Vec<u64>, VcpuContext), DomainError> {
        let p = self.request(OP_CHECKPOINT)?;
        let bad = || DomainError::GuestProtocol("malformed checkpoint answer".into());
        let len_bytes: [u8; 4] = p.get(..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?;
        let len = usize::try_from(u32::from_le_bytes(len_bytes)).map_err(|_| bad())?;
        let ctx = p.get(4..4 + len).ok_or_else(bad)?.to_vec();
        let pfns = self.parse_pfns(p.get(4 + len..).ok_or_else(bad)?)?;
        Ok((pfns, VcpuContext(ctx)))
    }

    fn enable_dirty_log(&mut self) -> Result<(), DomainError> {
        self.request(OP_ENABLE_DIRTY_LOG).map(|_| ())
    }

    fn read_and_clear_dirty(&mut self) -> Result<Vec<u64>, DomainError> {
        let p = self.request(OP_READ_CLEAR_DIRTY)?;
        self.parse_pfns(&p)
    }
    fn read_pages(&mut self, pfns: &[u64], out: &mut [u8]) -> Result<(), DomainError> {
        check_pages(pfns, out.len(), self.pages)?;
        for (i, j) in Self::runs(pfns) {
            self.memory
                .read_exact_at(
                    &mut out[i * PAGE_SIZE..j * PAGE_SIZE],
                    pfns[i] * PAGE_SIZE_U64,
                )
                .map_err(os("pread(guest memory)"))?;
        }
        Ok(())
    }

    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), DomainError> {
        check_pages(pfns, data.len(), self.pages)?;
        for (i, j) in Self::runs(pfns) {
            let bytes = &data[i * PAGE_SIZE..j * PAGE_SIZE];
            let off = pfns[i] * PAGE_SIZE_U64;
            if bytes
                .chunks(64)
                .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
            {
                // Zero pages: release the memory instead of storing zeros.
                let len = i64::try_from(bytes.len()).map_err(|_| DomainError::WrongState("len"))?;
                let off = i64::try_from(off).map_err(|_| DomainError::WrongState("offset"))?;
                nix::fcntl::fallocate(
                    self.memory.as_raw_fd(),
                    nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                        | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                )
                .map_err(|e| DomainError::Os {
                    op: "fallocate(punch hole)",
                    source: e.into(),
                })?;
            } else {
                self.memory
                    .write_all_at(bytes, off)
                    .map_err(os("pwrite(replica memory)"))?;
            }
        }
        Ok(())
    }

    fn vcpu_context(&mut self) -> Result<VcpuContext, DomainError> {
        self.request(OP_GET_CONTEXT).map(VcpuContext)
    }

    fn set_vcpu_context(&mut self, ctx: &VcpuContext) -> Result<(), DomainError> {
        let st =
            WorkloadState::decode(&ctx.0).map_err(|e| DomainError::BadContext(e.to_string()))?;
        self.pending_ctx = Some(st);
        Ok(())
    }

    fn start_from_replica(&mut self) -> Result<(), DomainError> {
        let st = self
            .pending_ctx
            .take()
            .ok_or(DomainError::WrongState("start without vCPU context"))?;
        self.start_guest(st)
    }
}
