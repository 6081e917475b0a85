//! The checkpoint stream's frames and their byte layout (see [`super`] for the format):
//! [`Frame::encode`] and [`Frame::decode`], which refuses any malformed input with a
//! [`WireError`].

use bytes::Bytes;

use super::error::WireError;
use crate::domain::{VcpuContext, MAX_VCPU_CONTEXT};
use crate::workload::PAGE_SIZE;

pub(super) const MAGIC: &[u8; 2] = b"XC";
/// Wire format version.
pub const VERSION: u8 = 1;
/// Most pages in one run.
pub const MAX_RUN_PAGES: u32 = 256;
/// Pages-frame payload target size; frames are cut near this.
pub const TARGET_FRAME_BYTES: usize = 1 << 20;

/// How a run's pages are carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// All pages are zero; no bytes.
    Zero,
    /// The pages themselves.
    Raw,
    /// LZ4 block of (pages XOR the secondary's current copy).
    XorLz4,
}

impl Encoding {
    pub(super) fn code(self) -> u8 {
        match self {
            Encoding::Zero => 0,
            Encoding::Raw => 1,
            Encoding::XorLz4 => 2,
        }
    }
    fn from_code(c: u8) -> Result<Self, WireError> {
        match c {
            0 => Ok(Encoding::Zero),
            1 => Ok(Encoding::Raw),
            2 => Ok(Encoding::XorLz4),
            _ => Err(WireError::BadRun("unknown encoding")),
        }
    }
}

/// Consecutive pages sharing one encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// First page frame number.
    pub first_pfn: u64,
    /// Number of pages (1..=[`MAX_RUN_PAGES`]).
    pub count: u32,
    /// Encoding of `bytes`.
    pub encoding: Encoding,
    /// Encoded pages.
    pub bytes: Bytes,
}

/// Why the secondary refused an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NackReason {
    /// Checksum mismatch or undecodable frame.
    Corrupt,
    /// The epoch ended early or frames are missing.
    Truncated,
    /// Not the epoch expected next.
    OutOfOrder,
    /// A page outside the replica's memory, or a memory size mismatch.
    OutOfRange,
    /// The replica could not store the epoch.
    ApplyFailed,
}

impl NackReason {
    pub(super) fn code(self) -> u8 {
        match self {
            NackReason::Corrupt => 1,
            NackReason::Truncated => 2,
            NackReason::OutOfOrder => 3,
            NackReason::OutOfRange => 4,
            NackReason::ApplyFailed => 5,
        }
    }
    fn from_code(c: u8) -> Result<Self, WireError> {
        Ok(match c {
            1 => NackReason::Corrupt,
            2 => NackReason::Truncated,
            3 => NackReason::OutOfOrder,
            4 => NackReason::OutOfRange,
            5 => NackReason::ApplyFailed,
            _ => return Err(WireError::BadField("nack reason")),
        })
    }
}

/// One message of the checkpoint stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Starts an epoch.
    Begin {
        /// Epoch number (1, 2, ...; pre-copy chunks and checkpoints share the sequence).
        epoch: u64,
        /// Size of the protected domain; must match the replica.
        memory_pages: u64,
        /// Pages carried by the epoch's runs.
        page_count: u64,
        /// Carries vCPU state and forms a resumable state.
        checkpoint: bool,
    },
    /// vCPU state of a checkpoint epoch.
    Vcpu(VcpuContext),
    /// Page runs.
    Pages(Vec<PageRun>),
    /// Ends an epoch.
    End {
        /// Epoch number, same as in `Begin`.
        epoch: u64,
        /// XXH3-64 over the epoch's previous frames.
        checksum: u64,
        /// Optional XXH3-64 of the primary's whole memory at the checkpoint (verification mode).
        memory_digest: Option<u64>,
    },
    /// The secondary applied every epoch up to `epoch`.
    Ack {
        /// Highest applied epoch.
        epoch: u64,
    },
    /// The secondary refused an epoch and expects `expected` next.
    Nack {
        /// Next epoch the secondary can apply.
        expected: u64,
        /// Why.
        reason: NackReason,
    },
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        match end {
            Some(e) => {
                let s = &self.b[self.at..e];
                self.at = e;
                Ok(s)
            }
            None => Err(WireError::Short {
                need: n,
                at: self.at,
                len: self.b.len(),
            }),
        }
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn len_u32(&mut self) -> Result<usize, WireError> {
        usize::try_from(self.u32()?).map_err(|_| WireError::BadField("length"))
    }
}

fn run_raw_len(count: u32) -> usize {
    usize::try_from(count).unwrap_or(usize::MAX) * PAGE_SIZE
}

impl Frame {
    /// Serialises the frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(MAGIC);
        v.push(VERSION);
        match self {
            Frame::Begin {
                epoch,
                memory_pages,
                page_count,
                checkpoint,
            } => {
                v.push(1);
                v.extend_from_slice(&epoch.to_le_bytes());
                v.extend_from_slice(&memory_pages.to_le_bytes());
                v.extend_from_slice(&page_count.to_le_bytes());
                v.push(u8::from(*checkpoint));
            }
            Frame::Vcpu(ctx) => {
                v.push(2);
                v.extend_from_slice(&u32::try_from(ctx.0.len()).unwrap_or(u32::MAX).to_le_bytes());
                v.extend_from_slice(&ctx.0);
            }
            Frame::Pages(runs) => {
                v.push(3);
                v.extend_from_slice(&u32::try_from(runs.len()).unwrap_or(u32::MAX).to_le_bytes());
                for r in runs {
                    push_run(&mut v, r);
                }
            }
            Frame::End {
                epoch,
                checksum,
                memory_digest,
            } => {
                v.push(4);
                v.extend_from_slice(&epoch.to_le_bytes());
                v.extend_from_slice(&checksum.to_le_bytes());
                v.push(u8::from(memory_digest.is_some()));
                v.extend_from_slice(&memory_digest.unwrap_or(0).to_le_bytes());
            }
            Frame::Ack { epoch } => {
                v.push(5);
                v.extend_from_slice(&epoch.to_le_bytes());
            }
            Frame::Nack { expected, reason } => {
                v.push(6);
                v.extend_from_slice(&expected.to_le_bytes());
                v.push(reason.code());
            }
        }
        v
    }

    /// Parses one frame; any malformed input gives a [`WireError`].
    pub fn decode(b: &[u8]) -> Result<Frame, WireError> {
        let mut r = Reader { b, at: 0 };
        if r.take(2)? != MAGIC {
            return Err(WireError::BadMagic);
        }
        let ver = r.u8()?;
        if ver != VERSION {
            return Err(WireError::BadVersion(ver));
        }
        let frame = match r.u8()? {
            1 => {
                let epoch = r.u64()?;
                let memory_pages = r.u64()?;
                let page_count = r.u64()?;
                let checkpoint = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::BadField("begin flags")),
                };
                Frame::Begin {
                    epoch,
                    memory_pages,
                    page_count,
                    checkpoint,
                }
            }
            2 => {
                let len = r.len_u32()?;
                if len > MAX_VCPU_CONTEXT {
                    return Err(WireError::VcpuTooLarge(len));
                }
                Frame::Vcpu(VcpuContext(r.take(len)?.to_vec()))
            }
            3 => {
                let n = r.len_u32()?;
                // Each run takes at least 17 bytes: bound the allocation by the frame size.
                let mut runs = Vec::with_capacity(n.min(b.len() / 17));
                for _ in 0..n {
                    let first_pfn = r.u64()?;
                    let count = r.u32()?;
                    let encoding = Encoding::from_code(r.u8()?)?;
                    let len = r.len_u32()?;
                    if count == 0 || count > MAX_RUN_PAGES {
                        return Err(WireError::BadRun("page count"));
                    }
                    let raw = run_raw_len(count);
                    let ok = match encoding {
                        Encoding::Zero => len == 0,
                        Encoding::Raw => len == raw,
                        Encoding::XorLz4 => len > 0 && len < raw,
                    };
                    if !ok {
                        return Err(WireError::BadRun("length does not fit encoding"));
                    }
                    let bytes = Bytes::copy_from_slice(r.take(len)?);
                    runs.push(PageRun {
                        first_pfn,
                        count,
                        encoding,
                        bytes,
                    });
                }
                Frame::Pages(runs)
            }
            4 => {
                let epoch = r.u64()?;
                let checksum = r.u64()?;
                let has = r.u8()?;
                let digest = r.u64()?;
                let memory_digest = match has {
                    0 if digest == 0 => None,
                    0 => return Err(WireError::BadField("digest without flag")),
                    1 => Some(digest),
                    _ => return Err(WireError::BadField("digest flag")),
                };
                Frame::End {
                    epoch,
                    checksum,
                    memory_digest,
                }
            }
            5 => Frame::Ack { epoch: r.u64()? },
            6 => {
                let expected = r.u64()?;
                Frame::Nack {
                    expected,
                    reason: NackReason::from_code(r.u8()?)?,
                }
            }
            k => return Err(WireError::UnknownKind(k)),
        };
        if r.at != b.len() {
            return Err(WireError::Trailing(b.len() - r.at));
        }
        Ok(frame)
    }
}

pub(super) fn push_run(v: &mut Vec<u8>, r: &PageRun) {
    v.extend_from_slice(&r.first_pfn.to_le_bytes());
    v.extend_from_slice(&r.count.to_le_bytes());
    v.push(r.encoding.code());
    v.extend_from_slice(
        &u32::try_from(r.bytes.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    v.extend_from_slice(&r.bytes);
}
