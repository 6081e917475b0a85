//! Checkpoint stream wire format, the page encoder (primary) and the epoch assembler
//! (secondary).
//!
//! An epoch is a sequence of frames, each one transport message:
//!
//! ```text
//! frame  = "XC" version:u8 kind:u8 body          (all integers little endian)
//! Begin  (1): epoch:u64 memory_pages:u64 page_count:u64 flags:u8   flags bit0 = checkpoint
//! Vcpu   (2): len:u32 bytes[len]                                   checkpoint epochs only
//! Pages  (3): runs:u32 { first_pfn:u64 count:u32 encoding:u8 len:u32 bytes[len] }*
//! End    (4): epoch:u64 checksum:u64 has_digest:u8 digest:u64
//! Ack    (5): epoch:u64                                            secondary -> primary
//! Nack   (6): expected:u64 reason:u8                               secondary -> primary
//! ```
//!
//! `checksum` is XXH3-64 over the bytes of every frame of the epoch before `End`. A run covers
//! `count` consecutive pages; its encoding is `Zero` (no bytes), `Raw` (the pages) or `XorLz4`
//! (LZ4 block of the pages XOR the copy last sent, which is what the secondary holds).
//! Epochs without the checkpoint flag are pre-copy chunks: pages only, no vCPU state, never a
//! resumable state on their own.

use bytes::Bytes;
use thiserror::Error;
use xxhash_rust::xxh3::Xxh3;

use crate::domain::{Domain, DomainError, VcpuContext, MAX_VCPU_CONTEXT};
use crate::workload::PAGE_SIZE;

const MAGIC: &[u8; 2] = b"XC";
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
    fn code(self) -> u8 {
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
    fn code(self) -> u8 {
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
    /// vCPU state larger than [`MAX_VCPU_CONTEXT`].
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

fn push_run(v: &mut Vec<u8>, r: &PageRun) {
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

/// Pages and vCPU state copied out of a paused domain (or live, for pre-copy).
#[derive(Clone, Debug, Default)]
pub struct StagedEpoch {
    /// Epoch number.
    pub epoch: u64,
    /// vCPU state; `Some` makes this a checkpoint epoch.
    pub vcpu: Option<VcpuContext>,
    /// Sorted, unique page frame numbers.
    pub pfns: Vec<u64>,
    /// `pfns.len() * PAGE_SIZE` bytes of page contents.
    pub data: Vec<u8>,
    /// Optional digest of the whole memory at the checkpoint (verification mode).
    pub memory_digest: Option<u64>,
}

/// An epoch ready to send.
#[derive(Clone, Debug)]
pub struct EncodedEpoch {
    /// Epoch number.
    pub epoch: u64,
    /// Whether it is a checkpoint (not a pre-copy chunk).
    pub checkpoint: bool,
    /// Frames in order, `Begin` to `End`.
    pub frames: Vec<Bytes>,
    /// Dirty page bytes carried (pages × 4096).
    pub raw_bytes: u64,
    /// Bytes on the wire (sum of frame lengths).
    pub wire_bytes: u64,
}

fn is_zero(b: &[u8]) -> bool {
    // OR-fold per 64-byte block vectorises; the early exit is per block.
    b.chunks(64).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

fn xor_into(dst: &mut [u8], a: &[u8], b: &[u8]) {
    for ((d, x), y) in dst
        .chunks_exact_mut(8)
        .zip(a.chunks_exact(8))
        .zip(b.chunks_exact(8))
    {
        let mut xa = [0u8; 8];
        xa.copy_from_slice(x);
        let mut ya = [0u8; 8];
        ya.copy_from_slice(y);
        d.copy_from_slice(&(u64::from_ne_bytes(xa) ^ u64::from_ne_bytes(ya)).to_ne_bytes());
    }
}

/// Primary-side encoder; keeps a shadow of what the secondary holds (zero at start).
pub struct EpochEncoder {
    memory_pages: u64,
    shadow: Vec<u8>,
    scratch: Vec<u8>,
}

impl EpochEncoder {
    /// An encoder for a domain of `memory_pages` pages whose replica starts all zero.
    pub fn new(memory_pages: u64) -> Result<Self, WireError> {
        let bytes = usize::try_from(memory_pages)
            .ok()
            .and_then(|p| p.checked_mul(PAGE_SIZE))
            .ok_or(WireError::BadField("memory size"))?;
        Ok(Self {
            memory_pages,
            // calloc: pages never sent stay unbacked.
            shadow: vec![0u8; bytes],
            scratch: Vec::new(),
        })
    }

    /// Encodes `staged` into frames and updates the shadow.
    pub fn encode(&mut self, staged: &StagedEpoch) -> Result<EncodedEpoch, WireError> {
        if staged.data.len() != staged.pfns.len() * PAGE_SIZE {
            return Err(WireError::BadField("staged data length"));
        }
        let page_count =
            u64::try_from(staged.pfns.len()).map_err(|_| WireError::BadField("pages"))?;
        let mut frames = Vec::new();
        let mut hasher = Xxh3::new();
        let mut push = |frames: &mut Vec<Bytes>, f: Vec<u8>| {
            hasher.update(&f);
            frames.push(Bytes::from(f));
        };
        push(
            &mut frames,
            Frame::Begin {
                epoch: staged.epoch,
                memory_pages: self.memory_pages,
                page_count,
                checkpoint: staged.vcpu.is_some(),
            }
            .encode(),
        );
        if let Some(ctx) = &staged.vcpu {
            if ctx.0.len() > MAX_VCPU_CONTEXT {
                return Err(WireError::VcpuTooLarge(ctx.0.len()));
            }
            push(&mut frames, Frame::Vcpu(ctx.clone()).encode());
        }
        let mut body: Vec<u8> = Vec::new();
        let mut nruns: u32 = 0;
        let flush = |body: &mut Vec<u8>,
                     nruns: &mut u32,
                     frames: &mut Vec<Bytes>,
                     push: &mut dyn FnMut(&mut Vec<Bytes>, Vec<u8>)| {
            if *nruns == 0 {
                return;
            }
            let mut f = Vec::with_capacity(8 + body.len());
            f.extend_from_slice(MAGIC);
            f.push(VERSION);
            f.push(3);
            f.extend_from_slice(&nruns.to_le_bytes());
            f.extend_from_slice(body);
            push(frames, f);
            body.clear();
            *nruns = 0;
        };
        let mut i = 0;
        while i < staged.pfns.len() {
            let first = staged.pfns[i];
            if first >= self.memory_pages {
                return Err(WireError::PfnOutOfRange {
                    first_pfn: first,
                    count: 1,
                    pages: self.memory_pages,
                });
            }
            let zero = is_zero(&staged.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
            let mut j = i + 1;
            while j < staged.pfns.len()
                && j - i < MAX_RUN_PAGES as usize
                && staged.pfns[j] == staged.pfns[j - 1] + 1
                && staged.pfns[j] < self.memory_pages
                && is_zero(&staged.data[j * PAGE_SIZE..(j + 1) * PAGE_SIZE]) == zero
            {
                j += 1;
            }
            let count = u32::try_from(j - i).map_err(|_| WireError::BadRun("count"))?;
            let pages = &staged.data[i * PAGE_SIZE..j * PAGE_SIZE];
            let off = usize::try_from(first).map_err(|_| WireError::BadField("pfn"))? * PAGE_SIZE;
            let shadow = &mut self.shadow[off..off + pages.len()];
            let run = if zero {
                shadow.fill(0);
                PageRun {
                    first_pfn: first,
                    count,
                    encoding: Encoding::Zero,
                    bytes: Bytes::new(),
                }
            } else {
                self.scratch.resize(pages.len(), 0);
                xor_into(&mut self.scratch, pages, shadow);
                let compressed = lz4_flex::block::compress(&self.scratch);
                shadow.copy_from_slice(pages);
                if compressed.len() < pages.len() && !compressed.is_empty() {
                    PageRun {
                        first_pfn: first,
                        count,
                        encoding: Encoding::XorLz4,
                        bytes: Bytes::from(compressed),
                    }
                } else {
                    PageRun {
                        first_pfn: first,
                        count,
                        encoding: Encoding::Raw,
                        bytes: Bytes::copy_from_slice(pages),
                    }
                }
            };
            push_run(&mut body, &run);
            nruns += 1;
            if body.len() >= TARGET_FRAME_BYTES {
                flush(&mut body, &mut nruns, &mut frames, &mut push);
            }
            i = j;
        }
        flush(&mut body, &mut nruns, &mut frames, &mut push);
        let checksum = hasher.digest();
        frames.push(Bytes::from(
            Frame::End {
                epoch: staged.epoch,
                checksum,
                memory_digest: staged.memory_digest,
            }
            .encode(),
        ));
        let wire_bytes = frames.iter().map(|f| f.len() as u64).sum();
        Ok(EncodedEpoch {
            epoch: staged.epoch,
            checkpoint: staged.vcpu.is_some(),
            frames,
            raw_bytes: page_count * PAGE_SIZE as u64,
            wire_bytes,
        })
    }
}

/// An epoch whose frames all arrived and whose checksum matched; not yet applied.
#[derive(Clone, Debug)]
pub struct CompleteEpoch {
    /// Epoch number.
    pub epoch: u64,
    /// vCPU state (checkpoint epochs).
    pub vcpu: Option<VcpuContext>,
    /// Page runs, in stream order.
    pub runs: Vec<PageRun>,
    /// Total pages in `runs`.
    pub page_count: u64,
    /// Primary's whole-memory digest, when verification is on.
    pub memory_digest: Option<u64>,
}

struct Partial {
    epoch: u64,
    checkpoint: bool,
    page_count: u64,
    seen: u64,
    vcpu: Option<VcpuContext>,
    runs: Vec<PageRun>,
    hasher: Xxh3,
}

/// Secondary-side state machine: stages an epoch's frames until its `End`.
pub struct EpochAssembler {
    memory_pages: u64,
    cur: Option<Partial>,
}

/// What feeding one frame produced.
#[derive(Debug)]
pub enum Fed {
    /// The frame was staged; the epoch is not complete.
    Staged,
    /// An epoch completed and verified.
    Complete(CompleteEpoch),
    /// A control frame (ack/nack) — not part of an epoch.
    Control(Frame),
}

impl EpochAssembler {
    /// An assembler for a replica of `memory_pages` pages.
    pub fn new(memory_pages: u64) -> Self {
        Self {
            memory_pages,
            cur: None,
        }
    }

    /// Epoch being staged, if any.
    pub fn staging(&self) -> Option<u64> {
        self.cur.as_ref().map(|p| p.epoch)
    }

    /// Drops any partly received epoch.
    pub fn discard(&mut self) {
        self.cur = None;
    }

    /// Feeds one frame. On error the partial epoch is discarded (a following `Begin` that
    /// caused a truncation error is kept and staged).
    pub fn feed(&mut self, raw: &[u8]) -> Result<Fed, WireError> {
        let frame = match Frame::decode(raw) {
            Ok(f) => f,
            Err(e) => {
                let epoch = self.cur.take().map(|p| p.epoch);
                return Err(match (e, epoch) {
                    (WireError::Short { .. }, Some(epoch)) => WireError::EpochTruncated { epoch },
                    (e, _) => e,
                });
            }
        };
        match frame {
            Frame::Begin {
                epoch,
                memory_pages,
                page_count,
                checkpoint,
            } => {
                let prev = self.cur.take();
                if memory_pages != self.memory_pages {
                    return Err(WireError::MemoryMismatch {
                        ours: self.memory_pages,
                        theirs: memory_pages,
                    });
                }
                if page_count > self.memory_pages {
                    return Err(WireError::PageCount {
                        epoch,
                        announced: page_count,
                        seen: 0,
                    });
                }
                let mut hasher = Xxh3::new();
                hasher.update(raw);
                self.cur = Some(Partial {
                    epoch,
                    checkpoint,
                    page_count,
                    seen: 0,
                    vcpu: None,
                    runs: Vec::new(),
                    hasher,
                });
                match prev {
                    Some(p) => Err(WireError::EpochTruncated { epoch: p.epoch }),
                    None => Ok(Fed::Staged),
                }
            }
            Frame::Vcpu(ctx) => {
                let Some(p) = self.cur.as_mut() else {
                    return Err(WireError::Unexpected("vCPU frame outside an epoch"));
                };
                if !p.checkpoint || p.vcpu.is_some() {
                    self.cur = None;
                    return Err(WireError::Unexpected("vCPU frame"));
                }
                p.hasher.update(raw);
                p.vcpu = Some(ctx);
                Ok(Fed::Staged)
            }
            Frame::Pages(runs) => {
                let Some(p) = self.cur.as_mut() else {
                    return Err(WireError::Unexpected("pages outside an epoch"));
                };
                for r in &runs {
                    let end = r.first_pfn.checked_add(u64::from(r.count));
                    if end.is_none_or(|e| e > self.memory_pages) {
                        self.cur = None;
                        return Err(WireError::PfnOutOfRange {
                            first_pfn: r.first_pfn,
                            count: r.count,
                            pages: self.memory_pages,
                        });
                    }
                    p.seen += u64::from(r.count);
                    if p.seen > p.page_count {
                        let (epoch, announced, seen) = (p.epoch, p.page_count, p.seen);
                        self.cur = None;
                        return Err(WireError::PageCount {
                            epoch,
                            announced,
                            seen,
                        });
                    }
                }
                p.hasher.update(raw);
                p.runs.extend(runs);
                Ok(Fed::Staged)
            }
            Frame::End {
                epoch,
                checksum,
                memory_digest,
            } => {
                let Some(p) = self.cur.take() else {
                    return Err(WireError::Unexpected("end outside an epoch"));
                };
                if epoch != p.epoch {
                    return Err(WireError::EpochTruncated { epoch: p.epoch });
                }
                if p.hasher.digest() != checksum {
                    return Err(WireError::Checksum { epoch });
                }
                if p.seen != p.page_count {
                    return Err(WireError::PageCount {
                        epoch,
                        announced: p.page_count,
                        seen: p.seen,
                    });
                }
                if p.checkpoint && p.vcpu.is_none() {
                    return Err(WireError::MissingVcpu { epoch });
                }
                Ok(Fed::Complete(CompleteEpoch {
                    epoch,
                    vcpu: p.vcpu,
                    runs: p.runs,
                    page_count: p.page_count,
                    memory_digest,
                }))
            }
            f @ (Frame::Ack { .. } | Frame::Nack { .. }) => Ok(Fed::Control(f)),
        }
    }
}

/// Failure to apply a verified epoch.
#[derive(Debug, Error)]
pub enum ApplyError {
    /// The epoch's content is inconsistent (e.g. a delta that does not decompress).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The replica refused reads or writes.
    #[error(transparent)]
    Domain(#[from] DomainError),
}

/// Decodes every run of `epoch` against the replica's current pages, then writes all pages
/// in one call: nothing is written unless the whole epoch decodes.
pub fn apply_epoch(epoch: &CompleteEpoch, domain: &mut dyn Domain) -> Result<(), ApplyError> {
    let total = usize::try_from(epoch.page_count).map_err(|_| WireError::BadField("pages"))?;
    let mut pfns = Vec::with_capacity(total);
    let mut data = vec![0u8; total * PAGE_SIZE];
    let mut delta = Vec::new();
    let mut at = 0usize;
    for r in &epoch.runs {
        let n = usize::try_from(r.count).map_err(|_| WireError::BadRun("count"))?;
        let run_pfns: Vec<u64> = (r.first_pfn..r.first_pfn + u64::from(r.count)).collect();
        let dst =
            data.get_mut(at * PAGE_SIZE..(at + n) * PAGE_SIZE)
                .ok_or(WireError::PageCount {
                    epoch: epoch.epoch,
                    announced: epoch.page_count,
                    seen: u64::try_from(at + n).unwrap_or(u64::MAX),
                })?;
        match r.encoding {
            Encoding::Zero => dst.fill(0),
            Encoding::Raw => dst.copy_from_slice(&r.bytes),
            Encoding::XorLz4 => {
                delta.resize(n * PAGE_SIZE, 0);
                let got = lz4_flex::block::decompress_into(&r.bytes, &mut delta).map_err(|_| {
                    WireError::Decompress {
                        first_pfn: r.first_pfn,
                    }
                })?;
                if got != delta.len() {
                    return Err(WireError::Decompress {
                        first_pfn: r.first_pfn,
                    }
                    .into());
                }
                domain.read_pages(&run_pfns, dst)?;
                for (d, x) in dst.iter_mut().zip(delta.iter()) {
                    *d ^= x;
                }
            }
        }
        pfns.extend(run_pfns);
        at += n;
    }
    domain.write_pages(&pfns, &data)?;
    Ok(())
}

/// XXH3-64 of a domain's whole memory (verification mode), read in 1 MiB slices.
pub fn memory_digest(domain: &mut dyn Domain) -> Result<u64, DomainError> {
    let pages = domain.memory_pages();
    let mut h = Xxh3::new();
    let step = 256u64;
    let mut buf = vec![0u8; 256 * PAGE_SIZE];
    let mut p = 0;
    while p < pages {
        let n = step.min(pages - p);
        let pfns: Vec<u64> = (p..p + n).collect();
        let len = pfns.len() * PAGE_SIZE;
        domain.read_pages(&pfns, &mut buf[..len])?;
        h.update(&buf[..len]);
        p += n;
    }
    Ok(h.digest())
}

#[cfg(test)]
mod tests {
    // Small test sizes fit every integer type.
    #![allow(clippy::cast_possible_truncation)]

    use super::*;
    use crate::testing::MemoryDomain;
    use proptest::prelude::*;

    fn epoch_of(src: &mut MemoryDomain, epoch: u64, pfns: Vec<u64>) -> StagedEpoch {
        let mut data = vec![0u8; pfns.len() * PAGE_SIZE];
        src.read_pages(&pfns, &mut data).unwrap();
        StagedEpoch {
            epoch,
            vcpu: Some(VcpuContext(vec![epoch as u8; 16])),
            pfns,
            data,
            memory_digest: None,
        }
    }

    fn assemble(pages: u64, frames: &[Bytes]) -> Result<CompleteEpoch, WireError> {
        let mut a = EpochAssembler::new(pages);
        for f in frames {
            if let Fed::Complete(c) = a.feed(f)? {
                return Ok(c);
            }
        }
        Err(WireError::Unexpected("no end"))
    }

    proptest! {
        #[test]
        fn frames_round_trip(epoch in any::<u64>(), pages in any::<u64>(), ctx in proptest::collection::vec(any::<u8>(), 0..64),
                             pfn in any::<u64>(), count in 1u32..=MAX_RUN_PAGES, digest in proptest::option::of(any::<u64>())) {
            let raw = Bytes::from(vec![7u8; count as usize * PAGE_SIZE]);
            for f in [
                Frame::Begin { epoch, memory_pages: pages, page_count: pages / 2, checkpoint: epoch % 2 == 0 },
                Frame::Vcpu(VcpuContext(ctx.clone())),
                Frame::Pages(vec![
                    PageRun { first_pfn: pfn, count, encoding: Encoding::Zero, bytes: Bytes::new() },
                    PageRun { first_pfn: pfn, count, encoding: Encoding::Raw, bytes: raw.clone() },
                    PageRun { first_pfn: pfn, count, encoding: Encoding::XorLz4, bytes: Bytes::from_static(b"xyz") },
                ]),
                Frame::End { epoch, checksum: pages, memory_digest: digest },
                Frame::Ack { epoch },
                Frame::Nack { expected: epoch, reason: NackReason::Truncated },
            ] {
                prop_assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Frame::decode(&bytes);
            let mut a = EpochAssembler::new(64);
            let _ = a.feed(&bytes);
        }

        #[test]
        fn encoded_epochs_rebuild_the_primary_memory(
            writes in proptest::collection::vec((0usize..32 * PAGE_SIZE - 64, proptest::collection::vec(any::<u8>(), 1..64)), 1..40),
            zero_pages in proptest::collection::vec(0u64..32, 0..4),
        ) {
            let mut primary = MemoryDomain::new(32);
            let mut replica = MemoryDomain::new(32);
            let mut enc = EpochEncoder::new(32).unwrap();
            // Epoch 1 writes, epoch 2 rewrites half of them (XOR deltas) and zeroes pages.
            for (epoch, part) in [(1u64, &writes[..]), (2, &writes[writes.len() / 2..])] {
                for (off, data) in part {
                    let d: Vec<u8> = data.iter().map(|b| b.wrapping_add(epoch as u8)).collect();
                    primary.poke(*off, &d);
                }
                if epoch == 2 {
                    for &p in &zero_pages {
                        primary.poke(p as usize * PAGE_SIZE, &[0u8; PAGE_SIZE]);
                    }
                }
                let pfns = primary.read_and_clear_dirty().unwrap();
                let staged = epoch_of(&mut primary, epoch, pfns);
                let e = enc.encode(&staged).unwrap();
                let complete = assemble(32, &e.frames).unwrap();
                apply_epoch(&complete, &mut replica).unwrap();
                prop_assert_eq!(complete.vcpu, staged.vcpu);
            }
            prop_assert!(primary.memory == replica.memory);
        }

        #[test]
        fn any_damaged_byte_or_cut_refuses_the_whole_epoch(frame_pick in any::<prop::sample::Index>(), byte in any::<prop::sample::Index>(), cut in any::<bool>()) {
            let mut primary = MemoryDomain::new(16);
            for p in 0..16 {
                primary.poke(p * PAGE_SIZE + p, &[p as u8 + 1; 100]);
            }
            let pfns = primary.read_and_clear_dirty().unwrap();
            let e = EpochEncoder::new(16).unwrap().encode(&epoch_of(&mut primary, 1, pfns)).unwrap();
            let mut frames = e.frames.clone();
            let fi = frame_pick.index(frames.len());
            let mut f = frames[fi].to_vec();
            if cut {
                f.truncate(byte.index(f.len()));
            } else {
                let bi = byte.index(f.len());
                f[bi] ^= 0x5a;
            }
            frames[fi] = Bytes::from(f);
            let mut replica = MemoryDomain::new(16);
            let before = replica.memory.clone();
            match assemble(16, &frames) {
                Err(_) => {}
                Ok(c) => {
                    // Only a change that keeps the frame valid and the checksum equal could get
                    // here; XXH3 makes that practically impossible.
                    prop_assert!(false, "damaged epoch accepted: {:?}", c.epoch);
                }
            }
            prop_assert!(replica.memory == before);
            let _ = &mut replica;
        }
    }

    #[test]
    fn pages_beyond_the_replica_are_refused() {
        let mut a = EpochAssembler::new(8);
        let begin = Frame::Begin {
            epoch: 1,
            memory_pages: 8,
            page_count: 1,
            checkpoint: false,
        };
        a.feed(&begin.encode()).unwrap();
        let pages = Frame::Pages(vec![PageRun {
            first_pfn: 8,
            count: 1,
            encoding: Encoding::Zero,
            bytes: Bytes::new(),
        }]);
        assert!(matches!(
            a.feed(&pages.encode()),
            Err(WireError::PfnOutOfRange { first_pfn: 8, .. })
        ));
        assert_eq!(a.staging(), None);
        // A run whose end overflows u64 is refused too.
        a.feed(&begin.encode()).unwrap();
        let wrap = Frame::Pages(vec![PageRun {
            first_pfn: u64::MAX,
            count: 2,
            encoding: Encoding::Zero,
            bytes: Bytes::new(),
        }]);
        assert!(matches!(
            a.feed(&wrap.encode()),
            Err(WireError::PfnOutOfRange { .. })
        ));
    }

    #[test]
    fn an_epoch_cut_short_by_the_next_one_is_reported_truncated() {
        let mut src = MemoryDomain::new(4);
        src.poke(0, &[1; 10]);
        let pfns = src.read_and_clear_dirty().unwrap();
        let mut enc = EpochEncoder::new(4).unwrap();
        let e1 = enc.encode(&epoch_of(&mut src, 1, pfns.clone())).unwrap();
        let e2 = enc.encode(&epoch_of(&mut src, 2, pfns)).unwrap();
        let mut a = EpochAssembler::new(4);
        for f in &e1.frames[..e1.frames.len() - 1] {
            a.feed(f).unwrap();
        }
        assert_eq!(
            a.feed(&e2.frames[0]).unwrap_err(),
            WireError::EpochTruncated { epoch: 1 }
        );
        let mut last = None;
        for f in &e2.frames[1..] {
            last = Some(a.feed(f).unwrap());
        }
        assert!(matches!(
            last,
            Some(Fed::Complete(CompleteEpoch { epoch: 2, .. }))
        ));
    }

    #[test]
    fn a_delta_that_does_not_decompress_leaves_the_replica_untouched() {
        let mut replica = MemoryDomain::new(4);
        replica.poke(0, &[9; PAGE_SIZE]);
        let before = replica.memory.clone();
        let ep = CompleteEpoch {
            epoch: 1,
            vcpu: None,
            runs: vec![
                PageRun {
                    first_pfn: 0,
                    count: 1,
                    encoding: Encoding::Zero,
                    bytes: Bytes::new(),
                },
                PageRun {
                    first_pfn: 1,
                    count: 1,
                    encoding: Encoding::XorLz4,
                    bytes: Bytes::from_static(&[0xff, 1, 2]),
                },
            ],
            page_count: 2,
            memory_digest: None,
        };
        assert!(matches!(
            apply_epoch(&ep, &mut replica),
            Err(ApplyError::Wire(WireError::Decompress { first_pfn: 1 }))
        ));
        assert!(
            replica.memory == before,
            "page 0 must not be zeroed by a refused epoch"
        );
    }

    #[test]
    fn incompressible_pages_go_raw_and_repeated_pages_shrink() {
        let mut src = MemoryDomain::new(2);
        let noise: Vec<u8> = (0..PAGE_SIZE).map(|_| rand::random::<u8>()).collect();
        src.poke(0, &noise);
        let mut enc = EpochEncoder::new(2).unwrap();
        let pfns = src.read_and_clear_dirty().unwrap();
        let first = enc.encode(&epoch_of(&mut src, 1, pfns)).unwrap();
        src.poke(100, &[1, 2, 3, 4]);
        let pfns = src.read_and_clear_dirty().unwrap();
        let second = enc.encode(&epoch_of(&mut src, 2, pfns)).unwrap();
        assert!(first.wire_bytes > PAGE_SIZE as u64, "noise is sent raw");
        assert!(
            second.wire_bytes < 200,
            "a 4-byte change costs far less than a page: {}",
            second.wire_bytes
        );
    }
}
