//! What the primary tells the rest of the data path about epochs.
//!
//! The netback-shim buffers a VM's output per epoch and releases it on commit; the
//! blkback-shim secondary applies an epoch's disk writes on commit. Until their APIs land the
//! agent adapts them to [`CommitSink`]; [`RecordingSink`] records calls for tests.

use std::io::Write;
use std::sync::Mutex;

/// Receiver of epoch boundaries and commits (called from engine threads).
pub trait CommitSink: Send + Sync {
    /// Called while the domain is paused for checkpoint `epoch`: output produced before this
    /// call belongs to `epoch`, output after it to the next checkpoint.
    fn checkpoint(&self, epoch: u64);
    /// The secondary holds checkpoint `epoch` (and every earlier one): release its network
    /// output and apply its disk writes. Called once per checkpoint, in increasing order.
    fn commit(&self, epoch: u64);
}

/// One call seen by a [`RecordingSink`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkEvent {
    /// [`CommitSink::checkpoint`].
    Checkpoint(u64),
    /// [`CommitSink::commit`].
    Commit(u64),
}

/// A sink that records every call, optionally appending `checkpoint N` / `commit N` lines to a
/// file too (so a test can see what a killed process released).
#[derive(Default)]
pub struct RecordingSink {
    events: Mutex<Vec<SinkEvent>>,
    log: Option<Mutex<std::fs::File>>,
}

impl RecordingSink {
    /// An in-memory recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// A recorder that also appends `checkpoint N` / `commit N` lines to `file`.
    pub fn with_log(file: std::fs::File) -> Self {
        Self {
            events: Mutex::new(Vec::new()),
            log: Some(Mutex::new(file)),
        }
    }

    /// Every call so far.
    pub fn events(&self) -> Vec<SinkEvent> {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Committed epochs so far.
    pub fn committed(&self) -> Vec<u64> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                SinkEvent::Commit(n) => Some(n),
                SinkEvent::Checkpoint(_) => None,
            })
            .collect()
    }
}

impl CommitSink for RecordingSink {
    fn checkpoint(&self, epoch: u64) {
        if let Some(f) = &self.log {
            let mut f = f.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // One write per line, so a killed process leaves no torn line.
            let _ = f.write_all(format!("checkpoint {epoch}\n").as_bytes());
        }
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(SinkEvent::Checkpoint(epoch));
    }

    fn commit(&self, epoch: u64) {
        if let Some(f) = &self.log {
            let mut f = f.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let _ = f.write_all(format!("commit {epoch}\n").as_bytes());
        }
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(SinkEvent::Commit(epoch));
    }
}
