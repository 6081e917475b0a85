// In-memory test double: sizes are small and fit every integer type.
#![allow(clippy::cast_possible_truncation)]

//! Test helpers usable by other crates: an in-memory [`Domain`] without a guest process.

use crate::domain::{check_pages, Domain, DomainError, VcpuContext};
use crate::workload::PAGE_SIZE;

/// A domain that is only memory: pages in a `Vec`, an explicit dirty set, a stored vCPU
/// context. Useful as a secondary replica in unit tests, or as a primary driven by hand.
#[derive(Clone, Debug)]
pub struct MemoryDomain {
    /// Memory contents.
    pub memory: Vec<u8>,
    /// Pages written through [`MemoryDomain::poke`] since the last dirty read.
    pub dirty: std::collections::BTreeSet<u64>,
    /// The vCPU context returned and set.
    pub vcpu: VcpuContext,
    /// Whether the domain is paused.
    pub paused: bool,
    /// Whether `start_from_replica` was called.
    pub started: bool,
}

impl MemoryDomain {
    /// An all-zero domain of `pages` pages.
    pub fn new(pages: usize) -> Self {
        Self {
            memory: vec![0; pages * PAGE_SIZE],
            dirty: Default::default(),
            vcpu: VcpuContext::default(),
            paused: false,
            started: false,
        }
    }

    /// Writes `data` at byte `offset` as a guest would, marking the pages dirty.
    pub fn poke(&mut self, offset: usize, data: &[u8]) {
        self.memory[offset..offset + data.len()].copy_from_slice(data);
        for p in offset / PAGE_SIZE..=(offset + data.len().max(1) - 1) / PAGE_SIZE {
            self.dirty.insert(p as u64);
        }
    }
}

impl Domain for MemoryDomain {
    fn memory_pages(&self) -> u64 {
        (self.memory.len() / PAGE_SIZE) as u64
    }
    fn pause(&mut self) -> Result<(), DomainError> {
        self.paused = true;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), DomainError> {
        self.paused = false;
        Ok(())
    }
    fn enable_dirty_log(&mut self) -> Result<(), DomainError> {
        self.dirty.clear();
        Ok(())
    }
    fn read_and_clear_dirty(&mut self) -> Result<Vec<u64>, DomainError> {
        Ok(std::mem::take(&mut self.dirty).into_iter().collect())
    }
    fn read_pages(&mut self, pfns: &[u64], out: &mut [u8]) -> Result<(), DomainError> {
        check_pages(pfns, out.len(), self.memory_pages())?;
        for (i, &p) in pfns.iter().enumerate() {
            let p = p as usize;
            out[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                .copy_from_slice(&self.memory[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]);
        }
        Ok(())
    }
    fn write_pages(&mut self, pfns: &[u64], data: &[u8]) -> Result<(), DomainError> {
        check_pages(pfns, data.len(), self.memory_pages())?;
        for (i, &p) in pfns.iter().enumerate() {
            let p = p as usize;
            self.memory[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
                .copy_from_slice(&data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
        }
        Ok(())
    }
    fn vcpu_context(&mut self) -> Result<VcpuContext, DomainError> {
        Ok(self.vcpu.clone())
    }
    fn set_vcpu_context(&mut self, ctx: &VcpuContext) -> Result<(), DomainError> {
        self.vcpu = ctx.clone();
        Ok(())
    }
    fn start_from_replica(&mut self) -> Result<(), DomainError> {
        self.started = true;
        Ok(())
    }
}
