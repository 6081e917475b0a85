//! The domain seam: what the checkpoint engine needs from a running VM.
//!
//! Two backends implement [`Domain`]: [`crate::local::LocalDomain`] (a synthetic guest process
//! with userfaultfd write-protect dirty tracking) and [`crate::xen::XenDomain`] (libxenctrl +
//! libxenforeignmemory loaded at run time).

use thiserror::Error;

/// Opaque vCPU state of a domain (for Xen: the `vcpu_guest_context_any_t` of each vCPU,
/// concatenated; for the synthetic guest: its encoded workload state).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct VcpuContext(pub Vec<u8>);

/// Largest vCPU context accepted from the wire (64 vCPUs of 8 KiB each).
pub const MAX_VCPU_CONTEXT: usize = 512 * 1024;

/// Errors from a domain backend.
#[derive(Debug, Error)]
pub enum DomainError {
    /// The Xen control libraries could not be loaded.
    #[error("libxenctrl not found: this host has no Xen ({0})")]
    XenUnavailable(String),
    /// The Xen libraries are installed but the host does not run on the Xen hypervisor.
    #[error("this host has no Xen: {0}")]
    NotOnXen(String),
    /// A Xen library call failed.
    #[error("Xen call {call} failed for domain {domid}: {source}")]
    XenCall {
        /// Function name.
        call: &'static str,
        /// Domain id.
        domid: u32,
        /// errno at the time of failure.
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A page frame number outside the domain's memory.
    #[error("page frame {pfn} out of range (domain has {pages} pages)")]
    PfnOutOfRange {
        /// Offending frame.
        pfn: u64,
        /// Domain size in pages.
        pages: u64,
    },
    /// A buffer does not hold exactly the pages asked for.
    #[error("buffer of {got} bytes for {pages} pages")]
    BufferSize {
        /// Bytes supplied.
        got: usize,
        /// Pages requested.
        pages: usize,
    },
    /// The synthetic guest broke its control protocol.
    #[error("synthetic guest protocol: {0}")]
    GuestProtocol(String),
    /// The synthetic guest process is gone.
    #[error("synthetic guest exited: {0}")]
    GuestGone(String),
    /// A vCPU context that the backend cannot use.
    #[error("invalid vCPU context: {0}")]
    BadContext(String),
    /// The operation does not apply to the domain in its present state.
    #[error("{0} is not possible in the domain's present state")]
    WrongState(&'static str),
}

/// A running (primary) or standby (secondary) domain, as the checkpoint engine sees it.
///
/// Primary side uses: `pause`, `resume`, `enable_dirty_log`, `read_and_clear_dirty`,
/// `read_pages`, `vcpu_context`. Secondary side uses: `read_pages` (XOR bases), `write_pages`,
/// `set_vcpu_context`, `start_from_replica`.
pub trait Domain: Send {
    /// Memory size in pages of [`crate::workload::PAGE_SIZE`] bytes; pfns are `0..pages`.
    fn memory_pages(&self) -> u64;
    /// Stops the domain's vCPUs; returns when they are stopped.
    fn pause(&mut self) -> Result<(), DomainError>;
    /// Lets the vCPUs run again.
    fn resume(&mut self) -> Result<(), DomainError>;
    /// Starts (or restarts) dirty logging with an empty log.
    fn enable_dirty_log(&mut self) -> Result<(), DomainError>;
    /// Stops dirty logging (protection ended). Backends where logging costs nothing keep
    /// the default no-op.
    fn disable_dirty_log(&mut self) -> Result<(), DomainError> {
        Ok(())
    }
    /// Returns the pfns written since the last call (sorted, unique) and empties the log.
    fn read_and_clear_dirty(&mut self) -> Result<Vec<u64>, DomainError>;
    /// Copies the given pages into `out` (`pfns.len() * PAGE_SIZE` bytes), in order.
    fn read_pages(&mut self, pfns: &[u64], out: &mut [u8]) -> Result<(), DomainError>;
    /// Writes `data` (`pfns.len() * PAGE_SIZE` bytes) to the given pages; secondary only.
    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), DomainError>;
    /// The vCPU state; the domain must be paused.
    fn vcpu_context(&mut self) -> Result<VcpuContext, DomainError>;
    /// Pauses, then reads and clears the dirty log and reads the vCPU state: the start of
    /// every checkpoint. Backends with a cheaper combined path override it.
    fn pause_and_collect(&mut self) -> Result<(Vec<u64>, VcpuContext), DomainError> {
        self.pause()?;
        let dirty = self.read_and_clear_dirty()?;
        let ctx = self.vcpu_context()?;
        Ok((dirty, ctx))
    }
    /// Sets the vCPU state used by [`Domain::start_from_replica`].
    fn set_vcpu_context(&mut self, ctx: &VcpuContext) -> Result<(), DomainError>;
    /// Starts the replica running from the memory and vCPU state written so far (failover).
    fn start_from_replica(&mut self) -> Result<(), DomainError>;
}

/// Checks `pfns` against `pages` and the buffer size, shared by the backends.
pub(crate) fn check_pages(pfns: &[u64], buf_len: usize, pages: u64) -> Result<(), DomainError> {
    if buf_len != pfns.len() * crate::workload::PAGE_SIZE {
        return Err(DomainError::BufferSize {
            got: buf_len,
            pages: pfns.len(),
        });
    }
    if let Some(&pfn) = pfns.iter().find(|&&p| p >= pages) {
        return Err(DomainError::PfnOutOfRange { pfn, pages });
    }
    Ok(())
}
