//! [`WireError`]: bad bytes on the checkpoint stream, and the `Nack` reason each one gives.

use thiserror::Error;

use super::frame::NackReason;

/// Bad bytes on the checkpoint stream.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    /// The frame ends before a field.
    #[error("frame truncated: needs {need} bytes at offset {at}, has {len}")]
    Short {
        /// Bytes the field needs.
        need: usize,
        /// Offset of the field.
        at: usize,
        /// Frame length.
        len: usize,
    },
    /// Not a checkpoint frame.
    #[error("bad frame magic")]
    BadMagic,
    /// Another protocol version.
    #[error("unsupported wire version {0}")]
    BadVersion(u8),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Bytes after the last field.
    #[error("{0} trailing bytes after frame")]
    Trailing(usize),
    /// A malformed page run.
    #[error("bad page run: {0}")]
    BadRun(&'static str),
    /// A malformed field.
    #[error("bad field: {0}")]
    BadField(&'static str),
    /// vCPU state larger than [`crate::domain::MAX_VCPU_CONTEXT`].
    #[error("vCPU context of {0} bytes is too large")]
    VcpuTooLarge(usize),
    /// A run beyond the replica's memory.
    #[error("pages {first_pfn}+{count} out of range (memory has {pages} pages)")]
    PfnOutOfRange {
        /// First pfn of the run.
        first_pfn: u64,
        /// Run length.
        count: u32,
        /// Replica size.
        pages: u64,
    },
    /// The primary protects a domain of another size.
    #[error("memory size mismatch: replica has {ours} pages, stream says {theirs}")]
    MemoryMismatch {
        /// Replica pages.
        ours: u64,
        /// Announced pages.
        theirs: u64,
    },
    /// More or fewer pages than announced in `Begin`.
    #[error("epoch {epoch}: announced {announced} pages, carried {seen}")]
    PageCount {
        /// Epoch.
        epoch: u64,
        /// From `Begin`.
        announced: u64,
        /// Counted so far.
        seen: u64,
    },
    /// Checksum mismatch at `End`.
    #[error("epoch {epoch}: checksum mismatch")]
    Checksum {
        /// Epoch.
        epoch: u64,
    },
    /// The epoch's frames stopped before its `End`.
    #[error("epoch {epoch} truncated")]
    EpochTruncated {
        /// Epoch.
        epoch: u64,
    },
    /// A frame that does not fit the stream's state.
    #[error("unexpected frame: {0}")]
    Unexpected(&'static str),
    /// A checkpoint epoch without vCPU state.
    #[error("epoch {epoch}: checkpoint without vCPU state")]
    MissingVcpu {
        /// Epoch.
        epoch: u64,
    },
    /// The LZ4 delta does not decode to the run's size.
    #[error("pages at {first_pfn}: compressed delta does not decode")]
    Decompress {
        /// First pfn of the run.
        first_pfn: u64,
    },
}

impl WireError {
    /// The reason to send back in a `Nack`.
    pub fn nack_reason(&self) -> NackReason {
        match self {
            WireError::PfnOutOfRange { .. } | WireError::MemoryMismatch { .. } => {
                NackReason::OutOfRange
            }
            WireError::EpochTruncated { .. } | WireError::PageCount { .. } => NackReason::Truncated,
            _ => NackReason::Corrupt,
        }
    }
}
