//! The primary's [`EpochEncoder`]: pages staged from the domain become an epoch's frames,
//! each run carried as zero, XOR + LZ4 against the copy last sent, or raw.

use bytes::Bytes;
use xxhash_rust::xxh3::Xxh3;

use super::error::WireError;
use super::frame::{
    push_run, Encoding, Frame, PageRun, MAGIC, MAX_RUN_PAGES, TARGET_FRAME_BYTES, VERSION,
};
use crate::domain::{VcpuContext, MAX_VCPU_CONTEXT};
use crate::workload::PAGE_SIZE;

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
