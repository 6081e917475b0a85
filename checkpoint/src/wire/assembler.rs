//! The secondary's [`EpochAssembler`]: stages an epoch's frames until its `End` and hands
//! out the epoch only when it is whole and its checksum matched.

use xxhash_rust::xxh3::Xxh3;

use super::error::WireError;
use super::frame::{Frame, PageRun};
use crate::domain::VcpuContext;

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
