//! The synthetic guest's own side: runs inside the `xenft-synthetic-guest` process.
//!
//! Three threads: the workload (writes pages, parks on pause), the fault handler (records
//! write-protect faults as dirty pages and unprotects them) and the control loop (this
//! process's main thread, serving [`super::protocol`] requests).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::protocol::*;
use crate::sys::uffd::{GuestMapping, TrackMode, WpTracker};
use crate::workload::{WorkloadState, PAGE_SIZE};

/// Why the guest process stopped.
#[derive(Debug, Error)]
pub enum GuestError {
    /// Setting up memory or dirty tracking failed.
    #[error("guest setup: {0}")]
    Setup(String),
    /// The control socket failed.
    #[error("control socket: {0}")]
    Control(#[from] std::io::Error),
    /// Dirty tracking failed while running.
    #[error("dirty tracking: {0}")]
    Tracking(String),
}

/// Which dirty tracking the guest uses.
///
/// The default is fault-driven: collecting its log costs O(dirty pages), while
/// `PAGEMAP_SCAN` walks every page table entry of the guest (about 1 ms per GiB measured
/// here), which dominated the pause at low dirty rates. Asynchronous tracking costs nothing
/// per write, so it wins at high dirty rates on small guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Tracking {
    /// Asynchronous if the kernel supports it, else fault-driven.
    Auto,
    /// `UFFD_FEATURE_WP_ASYNC` + `PAGEMAP_SCAN` (Linux 6.7+): no per-write round trip; the
    /// log is collected by scanning all of the guest's page tables.
    Async,
    /// Write-protect faults resolved by a handler thread (QEMU background-snapshot style).
    #[default]
    Sync,
}

impl Tracking {
    /// Name used on the guest command line and in its ready message.
    pub fn name(self) -> &'static str {
        match self {
            Tracking::Auto => "auto",
            Tracking::Async => "async",
            Tracking::Sync => "sync",
        }
    }

    /// Parses [`Tracking::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        [Tracking::Auto, Tracking::Async, Tracking::Sync]
            .into_iter()
            .find(|t| t.name() == s)
    }
}

/// Everything the guest process needs.
pub struct GuestArgs {
    /// The memory file (memfd), at least `pages` pages long.
    pub memory: std::fs::File,
    /// Control connection to the engine.
    pub control: UnixStream,
    /// Memory size in pages.
    pub pages: u64,
    /// Workload to continue.
    pub state: WorkloadState,
    /// Stay paused until the first resume.
    pub start_paused: bool,
    /// Dirty tracking mode.
    pub tracking: Tracking,
}

struct Dirty {
    bits: Vec<u64>,
    list: Vec<u32>,
}

struct Ctl {
    pause_requested: bool,
    parked: bool,
    state: WorkloadState,
    stop: bool,
}

struct Shared {
    mem: GuestMapping,
    tracker: WpTracker,
    pages: u64,
    dirty: Mutex<Dirty>,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    pause_flag: AtomicBool,
    stop_flag: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn mark_dirty(&self, pfn: u64) -> std::io::Result<()> {
        let mut d = lock(&self.dirty);
        let (w, b) = (usize::try_from(pfn / 64).unwrap_or(usize::MAX), pfn % 64);
        if let Some(word) = d.bits.get_mut(w) {
            if *word & (1 << b) == 0 {
                *word |= 1 << b;
                let p = u32::try_from(pfn).map_err(|_| std::io::Error::other("pfn"))?;
                d.list.push(p);
            }
        }
        // Unprotect while holding the lock so a concurrent collection cannot re-protect the
        // page between our marking and the unprotect.
        self.tracker.set_protection(pfn, 1, false)
    }

    fn collect_dirty(&self) -> std::io::Result<Vec<u32>> {
        if self.tracker.mode() == TrackMode::Async {
            let mut list = Vec::new();
            self.tracker.scan_written(&mut list)?;
            return Ok(list);
        }
        let mut d = lock(&self.dirty);
        let mut list = std::mem::take(&mut d.list);
        for &p in &list {
            if let Some(word) = d
                .bits
                .get_mut(usize::try_from(p / 64).unwrap_or(usize::MAX))
            {
                *word &= !(1u64 << (p % 64));
            }
        }
        list.sort_unstable();
        let mut i = 0;
        while i < list.len() {
            let mut j = i + 1;
            while j < list.len() && list[j] == list[j - 1] + 1 {
                j += 1;
            }
            let n = u64::try_from(j - i).unwrap_or(0);
            self.tracker.set_protection(u64::from(list[i]), n, true)?;
            i = j;
        }
        Ok(list)
    }

    fn enable_log(&self) -> std::io::Result<()> {
        let mut d = lock(&self.dirty);
        d.list.clear();
        d.bits.iter_mut().for_each(|w| *w = 0);
        self.tracker.set_protection(0, self.pages, true)
    }
}

fn workload(shared: &Shared, mut st: WorkloadState) {
    let rate_ops = st.spec.rate_bytes_per_s / PAGE_SIZE as u64;
    let mut data = Vec::with_capacity(PAGE_SIZE);
    let mut since = Instant::now();
    let mut ops: u64 = 0;
    loop {
        if shared.pause_flag.load(Ordering::Acquire) {
            let mut c = lock(&shared.ctl);
            c.parked = true;
            c.state = st;
            shared.cv.notify_all();
            while c.pause_requested && !c.stop {
                c = shared
                    .cv
                    .wait(c)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if c.stop {
                return;
            }
            c.parked = false;
            drop(c);
            since = Instant::now();
            ops = 0;
        }
        if shared.stop_flag.load(Ordering::Acquire) {
            return;
        }
        if rate_ops > 0 {
            let due = Duration::from_nanos(
                u64::try_from(u128::from(ops) * 1_000_000_000 / u128::from(rate_ops))
                    .unwrap_or(u64::MAX),
            );
            let elapsed = since.elapsed();
            if due > elapsed + Duration::from_micros(500) {
                let c = lock(&shared.ctl);
                if !c.pause_requested && !c.stop {
                    let wait = (due - elapsed).min(Duration::from_millis(2));
                    let _ = shared.cv.wait_timeout(c, wait);
                }
                continue;
            }
        }
        let off = st.next_op(shared.pages, &mut data);
        let off = usize::try_from(off).unwrap_or(usize::MAX);
        if shared.mem.write(off, &data).is_err() {
            return;
        }
        ops += 1;
    }
}

fn fault_loop(shared: &Shared) -> Result<(), GuestError> {
    while !shared.stop_flag.load(Ordering::Acquire) {
        match shared.tracker.next_fault(Duration::from_millis(100)) {
            Ok(Some(pfn)) => shared
                .mark_dirty(pfn)
                .map_err(|e| GuestError::Tracking(e.to_string()))?,
            Ok(None) => {}
            Err(e) => return Err(GuestError::Tracking(e.to_string())),
        }
    }
    Ok(())
}

/// Runs the guest until the engine disconnects or asks it to shut down; the caller then
/// exits the process (the worker threads are left to die with it).
pub fn run_guest(args: GuestArgs) -> Result<(), GuestError> {
    let GuestArgs {
        memory,
        mut control,
        pages,
        state,
        start_paused,
        tracking,
    } = args;
    let setup = || -> Result<Arc<Shared>, GuestError> {
        let len = usize::try_from(pages)
            .ok()
            .and_then(|p| p.checked_mul(PAGE_SIZE))
            .ok_or_else(|| GuestError::Setup("memory size".into()))?;
        let file_len = memory
            .metadata()
            .map_err(|e| GuestError::Setup(format!("memory file: {e}")))?
            .len();
        if file_len < u64::try_from(len).unwrap_or(u64::MAX) {
            return Err(GuestError::Setup(format!(
                "memory file has {file_len} bytes, need {len}"
            )));
        }
        let mem =
            GuestMapping::map(&memory, len).map_err(|e| GuestError::Setup(format!("mmap: {e}")))?;
        let tracker = match tracking {
            Tracking::Auto => WpTracker::new(&mem),
            Tracking::Async => WpTracker::with_mode(&mem, TrackMode::Async),
            Tracking::Sync => WpTracker::with_mode(&mem, TrackMode::Sync),
        }
        .map_err(|e| GuestError::Setup(format!("userfaultfd: {e}")))?;
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(0);
        let shared = Arc::new(Shared {
            mem,
            tracker,
            pages,
            dirty: Mutex::new(Dirty {
                bits: vec![0; words],
                list: Vec::new(),
            }),
            ctl: Mutex::new(Ctl {
                pause_requested: start_paused,
                parked: false,
                state,
                stop: false,
            }),
            cv: Condvar::new(),
            pause_flag: AtomicBool::new(start_paused),
            stop_flag: AtomicBool::new(false),
        });
        shared
            .enable_log()
            .map_err(|e| GuestError::Setup(format!("write-protect: {e}")))?;
        Ok(shared)
    };
    let shared = match setup() {
        Ok(s) => s,
        Err(e) => {
            let _ = write_response(&mut control, STATUS_ERR, e.to_string().as_bytes());
            return Err(e);
        }
    };
    let fault_shared = Arc::clone(&shared);
    let needs_handler = shared.tracker.mode() == TrackMode::Sync;
    let fault = std::thread::Builder::new()
        .name("uffd-faults".into())
        .spawn(move || {
            if !needs_handler {
                return;
            }
            if let Err(e) = fault_loop(&fault_shared) {
                // Without the fault handler the workload would hang forever: exit loudly.
                eprintln!("xenft-synthetic-guest: {e}");
                std::process::exit(3);
            }
        })
        .map_err(|e| GuestError::Setup(e.to_string()))?;
    let wl_shared = Arc::clone(&shared);
    let wl = std::thread::Builder::new()
        .name("workload".into())
        .spawn(move || workload(&wl_shared, state))
        .map_err(|e| GuestError::Setup(e.to_string()))?;
    let mode = match shared.tracker.mode() {
        TrackMode::Async => Tracking::Async,
        TrackMode::Sync => Tracking::Sync,
    };
    write_response(&mut control, STATUS_OK, mode.name().as_bytes())?;

    let result = control_loop(&shared, &mut control);
    // The engine is gone or asked us to stop: stop the threads without waiting for them (a
    // write blocked on a protected page or a sleeping workload must not delay the exit; the
    // process exits right after this returns).
    shared.stop_flag.store(true, Ordering::Release);
    {
        let mut c = lock(&shared.ctl);
        c.stop = true;
        shared.cv.notify_all();
    }
    drop((wl, fault));
    result
}

/// Stops the workload at a safe point and waits until it is parked.
fn pause(shared: &Shared) -> Result<(), String> {
    let mut c = lock(&shared.ctl);
    c.pause_requested = true;
    shared.pause_flag.store(true, Ordering::Release);
    shared.cv.notify_all();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.parked && Instant::now() < deadline {
        c = shared
            .cv
            .wait_timeout(c, Duration::from_millis(100))
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
    if c.parked {
        Ok(())
    } else {
        Err("workload did not reach a safe point within 5 s".to_string())
    }
}

fn control_loop(shared: &Shared, control: &mut UnixStream) -> Result<(), GuestError> {
    loop {
        let mut op = [0u8; 1];
        match control.read(&mut op) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // The engine died with answers unread: same as a clean close.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let reply: Result<Vec<u8>, String> = match op[0] {
            OP_PAUSE => pause(shared).map(|()| Vec::new()),
            OP_CHECKPOINT => pause(shared).and_then(|()| {
                let ctx = lock(&shared.ctl).state.encode();
                let dirty = shared.collect_dirty().map_err(|e| e.to_string())?;
                let mut out = Vec::with_capacity(4 + ctx.len() + dirty.len() * 4);
                let len = u32::try_from(ctx.len()).map_err(|_| "context size".to_string())?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&ctx);
                out.extend(dirty.iter().flat_map(|p| p.to_le_bytes()));
                Ok(out)
            }),
            OP_RESUME => {
                let mut c = lock(&shared.ctl);
                c.pause_requested = false;
                shared.pause_flag.store(false, Ordering::Release);
                shared.cv.notify_all();
                Ok(Vec::new())
            }
            OP_GET_CONTEXT => {
                let c = lock(&shared.ctl);
                if c.parked && c.pause_requested {
                    Ok(c.state.encode())
                } else {
                    Err("guest is not paused".to_string())
                }
            }
            OP_READ_CLEAR_DIRTY => shared
                .collect_dirty()
                .map(|l| l.iter().flat_map(|p| p.to_le_bytes()).collect())
                .map_err(|e| e.to_string()),
            OP_ENABLE_DIRTY_LOG => shared
                .enable_log()
                .map(|()| Vec::new())
                .map_err(|e| e.to_string()),
            OP_SHUTDOWN => {
                write_response(control, STATUS_OK, &[])?;
                return Ok(());
            }
            other => Err(format!("unknown opcode {other}")),
        };
        match reply {
            Ok(p) => write_response(control, STATUS_OK, &p)?,
            Err(m) => write_response(control, STATUS_ERR, m.as_bytes())?,
        }
        control.flush()?;
    }
}
