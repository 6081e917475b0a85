//! The synthetic guest's workload: a deterministic page-writing program.
//!
//! Its whole "CPU state" is a [`WorkloadState`]: the program (pattern, write size, rate), a
//! progress counter and the RNG state. Operation `n` depends only on that state, so memory after
//! `n` operations is a pure function of (initial state, `n`) — [`replay`] computes it without a
//! guest process, which is what the tests compare replicas against.

use thiserror::Error;

/// Size of a guest page in bytes (x86 small pages, as Xen uses for log-dirty).
pub const PAGE_SIZE: usize = 4096;
/// [`PAGE_SIZE`] as a `u64`, for byte offsets.
pub const PAGE_SIZE_U64: u64 = 4096;

/// Which pages the workload writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Page `counter % pages`, in order.
    Sequential,
    /// Uniformly random page over all memory.
    Random,
    /// `hot_percent` % of writes go to the first `hot_pages` pages, the rest anywhere.
    HotSet {
        /// Size of the hot set in pages.
        hot_pages: u64,
        /// Share of writes hitting the hot set, 0..=100.
        hot_percent: u8,
    },
}

/// The workload program: what it writes and how fast.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// Page selection.
    pub pattern: Pattern,
    /// Bytes of pseudo-random data written per operation (1..=4096), inside one page.
    pub write_len: u32,
    /// Dirtying rate in page bytes per second (operations/s × 4096); 0 = as fast as possible.
    pub rate_bytes_per_s: u64,
}

/// Complete state of the workload: the synthetic guest's "vCPU context".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadState {
    /// The program.
    pub spec: WorkloadSpec,
    /// Operations completed so far.
    pub counter: u64,
    /// SplitMix64 state.
    pub rng: u64,
}

/// A workload state that could not be decoded or is not runnable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WorkloadError {
    /// Wrong length or magic.
    #[error("workload state: bad encoding ({0})")]
    Encoding(&'static str),
    /// A field is outside its range.
    #[error("workload state: {0}")]
    Invalid(&'static str),
}

const MAGIC: &[u8; 4] = b"XSG1";
/// Encoded size of a [`WorkloadState`].
pub const STATE_LEN: usize = 4 + 1 + 8 + 1 + 4 + 8 + 8 + 8;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One write of the workload: `data` at byte `offset` of memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Byte offset in guest memory.
    pub offset: u64,
    /// Bytes written.
    pub data: Vec<u8>,
}

impl WorkloadState {
    /// A fresh workload from `seed`.
    pub fn new(spec: WorkloadSpec, seed: u64) -> Result<Self, WorkloadError> {
        let s = Self {
            spec,
            counter: 0,
            rng: seed,
        };
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), WorkloadError> {
        if self.spec.write_len == 0 || self.spec.write_len > 4096 {
            return Err(WorkloadError::Invalid("write_len must be 1..=4096"));
        }
        if let Pattern::HotSet {
            hot_pages,
            hot_percent,
        } = self.spec.pattern
        {
            if hot_pages == 0 || hot_percent > 100 {
                return Err(WorkloadError::Invalid(
                    "hot set needs hot_pages > 0 and hot_percent <= 100",
                ));
            }
        }
        Ok(())
    }

    /// Serialises the state (the local backend's vCPU context).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(STATE_LEN);
        v.extend_from_slice(MAGIC);
        let (tag, hot_pages, hot_percent) = match self.spec.pattern {
            Pattern::Sequential => (0u8, 0u64, 0u8),
            Pattern::Random => (1, 0, 0),
            Pattern::HotSet {
                hot_pages,
                hot_percent,
            } => (2, hot_pages, hot_percent),
        };
        v.push(tag);
        v.extend_from_slice(&hot_pages.to_le_bytes());
        v.push(hot_percent);
        v.extend_from_slice(&self.spec.write_len.to_le_bytes());
        v.extend_from_slice(&self.spec.rate_bytes_per_s.to_le_bytes());
        v.extend_from_slice(&self.counter.to_le_bytes());
        v.extend_from_slice(&self.rng.to_le_bytes());
        v
    }

    /// Parses a state produced by [`WorkloadState::encode`]; hostile input gives an error.
    pub fn decode(b: &[u8]) -> Result<Self, WorkloadError> {
        if b.len() != STATE_LEN {
            return Err(WorkloadError::Encoding("length"));
        }
        if &b[..4] != MAGIC {
            return Err(WorkloadError::Encoding("magic"));
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let hot_pages = u64_at(5);
        let hot_percent = b[13];
        let pattern = match b[4] {
            0 => Pattern::Sequential,
            1 => Pattern::Random,
            2 => Pattern::HotSet {
                hot_pages,
                hot_percent,
            },
            _ => return Err(WorkloadError::Encoding("pattern tag")),
        };
        let mut wl = [0u8; 4];
        wl.copy_from_slice(&b[14..18]);
        let s = Self {
            spec: WorkloadSpec {
                pattern,
                write_len: u32::from_le_bytes(wl),
                rate_bytes_per_s: u64_at(18),
            },
            counter: u64_at(26),
            rng: u64_at(34),
        };
        s.validate()?;
        Ok(s)
    }

    /// Computes the next operation for a memory of `pages` pages and advances the state.
    pub fn next_op(&mut self, pages: u64, data: &mut Vec<u8>) -> u64 {
        let pages = pages.max(1);
        let page = match self.spec.pattern {
            Pattern::Sequential => self.counter % pages,
            Pattern::Random => splitmix(&mut self.rng) % pages,
            Pattern::HotSet {
                hot_pages,
                hot_percent,
            } => {
                let pick = splitmix(&mut self.rng) % 100;
                if pick < u64::from(hot_percent) {
                    splitmix(&mut self.rng) % hot_pages.min(pages)
                } else {
                    splitmix(&mut self.rng) % pages
                }
            }
        };
        let len = u64::from(self.spec.write_len);
        let slots = (PAGE_SIZE_U64 - len) / 8 + 1;
        let within = (splitmix(&mut self.rng) % slots) * 8;
        data.clear();
        while u64::try_from(data.len()).unwrap_or(u64::MAX) < len {
            data.extend_from_slice(&splitmix(&mut self.rng).to_le_bytes());
        }
        data.truncate(usize::try_from(len).unwrap_or(PAGE_SIZE));
        self.counter += 1;
        page * PAGE_SIZE_U64 + within
    }
}

/// Runs the workload on `mem` (a plain buffer of whole pages) until `state.counter == until`.
pub fn replay(mem: &mut [u8], state: &mut WorkloadState, until: u64) {
    let pages = u64::try_from(mem.len() / PAGE_SIZE).unwrap_or(0);
    let mut data = Vec::with_capacity(PAGE_SIZE);
    while state.counter < until {
        let off = usize::try_from(state.next_op(pages, &mut data)).unwrap_or(usize::MAX);
        if let Some(dst) = mem.get_mut(off..off + data.len()) {
            dst.copy_from_slice(&data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pattern: Pattern) -> WorkloadSpec {
        WorkloadSpec {
            pattern,
            write_len: 100,
            rate_bytes_per_s: 0,
        }
    }

    #[test]
    fn state_round_trips_through_encoding() {
        let mut s = WorkloadState::new(
            spec(Pattern::HotSet {
                hot_pages: 7,
                hot_percent: 90,
            }),
            42,
        )
        .unwrap();
        let mut d = Vec::new();
        s.next_op(100, &mut d);
        assert_eq!(WorkloadState::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn hostile_state_bytes_are_rejected() {
        let s = WorkloadState::new(spec(Pattern::Random), 1).unwrap();
        let mut b = s.encode();
        assert!(WorkloadState::decode(&b[..10]).is_err());
        b[4] = 9;
        assert_eq!(
            WorkloadState::decode(&b),
            Err(WorkloadError::Encoding("pattern tag"))
        );
    }

    #[test]
    fn replay_split_in_two_equals_replay_in_one_go() {
        let start = WorkloadState::new(spec(Pattern::Random), 7).unwrap();
        let mut a = vec![0u8; 16 * PAGE_SIZE];
        let mut sa = start;
        replay(&mut a, &mut sa, 500);
        let mut b = vec![0u8; 16 * PAGE_SIZE];
        let mut sb = start;
        replay(&mut b, &mut sb, 200);
        let mut sb2 = WorkloadState::decode(&sb.encode()).unwrap();
        replay(&mut b, &mut sb2, 500);
        assert_eq!(a, b);
        assert_eq!(sa, sb2);
    }

    #[test]
    fn writes_stay_inside_one_page() {
        let mut s = WorkloadState::new(
            WorkloadSpec {
                write_len: 4096,
                ..spec(Pattern::Sequential)
            },
            3,
        )
        .unwrap();
        let mut d = Vec::new();
        for _ in 0..10 {
            let off = s.next_op(4, &mut d);
            assert_eq!(off % PAGE_SIZE_U64, 0);
            assert_eq!(d.len(), 4096);
        }
    }
}
