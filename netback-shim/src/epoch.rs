//! The level-3 output buffer: frames the VM sends during epoch N, held in order until the
//! checkpoint of epoch N is committed on the secondary.
//!
//! Pure logic, no I/O: the relay pushes frames and drains what a commit releases.
//!
//! Epoch numbering follows the checkpoint engine: `begin_epoch(N)` is called when the VM
//! resumes after checkpoint N-1 was taken, so frames pushed afterwards belong to epoch N;
//! `commit(N)` means the secondary holds the state that produced those frames, so every frame of
//! epoch ≤ N may leave.

use std::collections::VecDeque;

use bytes::Bytes;

/// Default bound on held bytes per VM.
pub const DEFAULT_LIMIT_BYTES: usize = 16 << 20;

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// Held.
    Held,
    /// Held, and the buffer crossed its high-water mark for the first time this epoch: the
    /// checkpoint engine should be asked for an early checkpoint.
    HeldRequestEarlyCheckpoint,
    /// Not held: the buffer is full. The caller keeps the frame and retries after a commit.
    Full,
}

/// Epoch calls in the wrong order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EpochError {
    /// `begin_epoch` with a number not above the current epoch.
    #[error("epoch {requested} does not follow the current epoch {current}")]
    NotIncreasing {
        /// The current epoch.
        current: u64,
        /// The epoch asked for.
        requested: u64,
    },
    /// `commit` of an epoch that has not begun.
    #[error("cannot commit epoch {requested}: current epoch is {current}")]
    CommitAhead {
        /// The current epoch.
        current: u64,
        /// The epoch asked for.
        requested: u64,
    },
}

/// Frames held per epoch, in arrival order.
#[derive(Debug)]
pub struct EpochBuffer {
    frames: VecDeque<(u64, Bytes)>,
    bytes: usize,
    limit: usize,
    current: u64,
    committed: u64,
    early_requested_in: Option<u64>,
}

impl EpochBuffer {
    /// An empty buffer holding at most `limit` bytes (at least one maximum-size frame's worth
    /// is always allowed, so a tiny limit cannot wedge the relay).
    #[must_use]
    pub fn new(limit: usize) -> Self {
        EpochBuffer {
            frames: VecDeque::new(),
            bytes: 0,
            limit: limit.max(1),
            current: 0,
            committed: 0,
            early_requested_in: None,
        }
    }

    /// The epoch frames are currently assigned to.
    #[must_use]
    pub fn current_epoch(&self) -> u64 {
        self.current
    }

    /// The highest committed epoch.
    #[must_use]
    pub fn committed_epoch(&self) -> u64 {
        self.committed
    }

    /// Frames held now.
    #[must_use]
    pub fn held_frames(&self) -> usize {
        self.frames.len()
    }

    /// Bytes held now.
    #[must_use]
    pub fn held_bytes(&self) -> usize {
        self.bytes
    }

    /// The byte bound.
    #[must_use]
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Starts epoch `n`: frames pushed from now on belong to it.
    ///
    /// # Errors
    /// [`EpochError::NotIncreasing`] when `n` is not above the current epoch.
    pub fn begin_epoch(&mut self, n: u64) -> Result<(), EpochError> {
        if n <= self.current {
            return Err(EpochError::NotIncreasing {
                current: self.current,
                requested: n,
            });
        }
        self.current = n;
        Ok(())
    }

    /// Holds a frame in the current epoch, unless the buffer is full.
    pub fn push(&mut self, frame: Bytes) -> PushOutcome {
        let len = frame.len();
        if !self.frames.is_empty() && self.bytes + len > self.limit {
            return PushOutcome::Full;
        }
        self.bytes += len;
        self.frames.push_back((self.current, frame));
        // High-water mark: three quarters of the bound.
        if self.bytes >= self.limit / 4 * 3 && self.early_requested_in != Some(self.current) {
            self.early_requested_in = Some(self.current);
            return PushOutcome::HeldRequestEarlyCheckpoint;
        }
        PushOutcome::Held
    }

    /// Commits every epoch up to `n` and returns their frames, oldest first.
    ///
    /// # Errors
    /// [`EpochError::CommitAhead`] when `n` is above the current epoch.
    pub fn commit(&mut self, n: u64) -> Result<Vec<Bytes>, EpochError> {
        if n > self.current {
            return Err(EpochError::CommitAhead {
                current: self.current,
                requested: n,
            });
        }
        self.committed = self.committed.max(n);
        let mut out = Vec::new();
        while self.frames.front().is_some_and(|(e, _)| *e <= n) {
            if let Some((_, f)) = self.frames.pop_front() {
                self.bytes -= f.len();
                out.push(f);
            }
        }
        Ok(out)
    }

    /// Drops every held frame (the uncommitted epochs will never be committed). Returns the
    /// number of frames and bytes dropped.
    pub fn discard(&mut self) -> (usize, usize) {
        let dropped = (self.frames.len(), self.bytes);
        self.frames.clear();
        self.bytes = 0;
        dropped
    }

    /// Releases everything held regardless of epoch (used when output commit is switched off).
    pub fn drain_all(&mut self) -> Vec<Bytes> {
        self.bytes = 0;
        self.frames.drain(..).map(|(_, f)| f).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, len: usize) -> Bytes {
        Bytes::from(vec![tag; len])
    }

    #[test]
    fn commit_releases_only_committed_epochs_in_order() {
        let mut b = EpochBuffer::new(1 << 20);
        b.begin_epoch(1).unwrap();
        b.push(frame(1, 60));
        b.push(frame(2, 60));
        b.begin_epoch(2).unwrap();
        b.push(frame(3, 60));
        let out = b.commit(1).unwrap();
        assert_eq!(out.iter().map(|f| f[0]).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(b.held_frames(), 1);
        assert_eq!(b.held_bytes(), 60);
        let out = b.commit(2).unwrap();
        assert_eq!(out.iter().map(|f| f[0]).collect::<Vec<_>>(), vec![3]);
        assert_eq!(b.held_bytes(), 0);
        assert_eq!(b.committed_epoch(), 2);
    }

    #[test]
    fn epochs_must_increase_and_commits_cannot_run_ahead() {
        let mut b = EpochBuffer::new(1 << 20);
        b.begin_epoch(5).unwrap();
        assert!(matches!(
            b.begin_epoch(5),
            Err(EpochError::NotIncreasing { .. })
        ));
        assert!(matches!(b.commit(6), Err(EpochError::CommitAhead { .. })));
    }

    #[test]
    fn near_overflow_requests_one_early_checkpoint_per_epoch_then_reports_full() {
        let mut b = EpochBuffer::new(1000);
        b.begin_epoch(1).unwrap();
        let mut requests = 0;
        let mut full = false;
        for i in 0..20 {
            match b.push(frame(i, 100)) {
                PushOutcome::Held => {}
                PushOutcome::HeldRequestEarlyCheckpoint => requests += 1,
                PushOutcome::Full => {
                    full = true;
                    break;
                }
            }
        }
        assert_eq!(requests, 1);
        assert!(full);
        assert_eq!(b.held_bytes(), 1000, "the bound is never exceeded");
        b.begin_epoch(2).unwrap();
        b.commit(1).unwrap();
        assert_eq!(b.push(frame(0, 100)), PushOutcome::Held);
    }

    #[test]
    fn discard_forgets_held_frames() {
        let mut b = EpochBuffer::new(1 << 20);
        b.begin_epoch(1).unwrap();
        b.push(frame(1, 70));
        assert_eq!(b.discard(), (1, 70));
        assert!(b.commit(1).unwrap().is_empty());
    }
}
