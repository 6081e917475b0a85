//! Applying a verified epoch to the replica ([`apply_epoch`]: whole or not at all), and the
//! whole-memory digest of verification mode ([`memory_digest`]).

use thiserror::Error;
use xxhash_rust::xxh3::Xxh3;

use super::assembler::CompleteEpoch;
use super::error::WireError;
use super::frame::Encoding;
use crate::domain::{Domain, DomainError};
use crate::workload::PAGE_SIZE;

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
