//! The control contract of `xenft-checkpoint secondary --control` (the level-3 replica the
//! agent takes a VM over with, and re-protects from) and of `xenft-checkpoint primary
//! --control` (the same machine started with its guest running: `running` / `protecting`;
//! it refuses `stop` and `failover`, its `committed_epoch` is the last checkpoint its
//! secondary holds, and a lost secondary ends protection — `protection_ended` — not the
//! process).
//!
//! | request (`op`) | reply (`reply`) |
//! |---|---|
//! | `status` | `status`: [`Status`] |
//! | `stop` | `stopped {committed_epoch}`: receiving stopped, replica frozen at its last committed checkpoint |
//! | `failover` | `resumed {epoch, guest_counter}`: the replica runs from that checkpoint |
//! | `protect {peer?}` | `protecting {peer, already}`: the resumed guest is checkpointed toward the returning host (`peer` absent or `"alink"`: over the engine's A-link; else the absolute path of that host's secondary socket) |
//! | `unprotect` | `running {epoch}`: protection ended, the guest runs on |
//!
//! `stop`, `failover`, `protect` (same peer) and `unprotect` are idempotent. Events:
//! `protection_ended` (a protection ended by itself: the secondary went away; or a controlled
//! primary found no secondary to protect toward at its start).

use serde::{Deserialize, Serialize};

/// `protect`'s peer value meaning "over the engine's own A-link".
pub const PEER_ALINK: &str = "alink";

/// A request to the checkpoint engine's secondary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The replica's state.
    Status,
    /// Stop receiving; freeze at the last committed checkpoint.
    Stop,
    /// Resume the replica from its last committed checkpoint.
    Failover,
    /// Protect the resumed guest toward the returning host.
    Protect {
        /// `None` or [`PEER_ALINK`]: over the engine's A-link; else the secondary's socket.
        #[serde(default)]
        peer: Option<String>,
    },
    /// End that protection; the guest runs on.
    Unprotect,
}

/// A reply of the checkpoint engine's secondary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// `status`.
    Status(Box<Status>),
    /// `stop`.
    Stopped {
        /// The checkpoint the replica is frozen at (`None`: none was committed).
        committed_epoch: Option<u64>,
    },
    /// `failover`.
    Resumed {
        /// The checkpoint the guest resumed from.
        epoch: u64,
        /// A synthetic guest's workload counter in that checkpoint.
        guest_counter: Option<u64>,
    },
    /// `protect`.
    Protecting {
        /// Where the checkpoints go (a socket, or `alink:<peer host>`).
        peer: String,
        /// That protection was already running.
        already: bool,
    },
    /// `unprotect`.
    Running {
        /// The checkpoint the guest resumed from.
        epoch: u64,
    },
}

/// An event pushed by the checkpoint engine's secondary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A re-protection ended by itself; the guest keeps running.
    ProtectionEnded {
        /// Why.
        reason: String,
    },
}

/// The replica's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// No primary connected yet.
    Waiting,
    /// Receiving checkpoints.
    Receiving,
    /// Frozen at the last committed checkpoint (take-over begun).
    Stopped,
    /// Resumed; the guest runs unprotected.
    Running,
    /// Resumed and protected toward the returning host.
    Protecting,
    /// The replica failed.
    Failed,
}

/// `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The state.
    pub state: State,
    /// The last committed checkpoint (the one a take-over resumes).
    pub committed_epoch: Option<u64>,
    /// Receiving: checkpoints applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_epochs: Option<u64>,
    /// Receiving: checkpoints rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_epochs: Option<u64>,
    /// Receiving: the primary's stream ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_gone: Option<bool>,
    /// Failed: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Running or protecting: the synthetic guest's process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_pid: Option<u32>,
    /// Running: why the last protection ended, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Protecting: the protection's progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<Protecting>,
}

impl Status {
    /// A status in `state` at `committed_epoch`, with no state-specific detail yet.
    #[must_use]
    pub fn new(state: State, committed_epoch: Option<u64>) -> Self {
        Self {
            state,
            committed_epoch,
            applied_epochs: None,
            rejected_epochs: None,
            primary_gone: None,
            error: None,
            guest_pid: None,
            last_error: None,
            primary: None,
        }
    }
}

/// Phase of a protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Initial copy of memory.
    Precopy,
    /// Checkpointing.
    Protected,
    /// Ended.
    Stopped,
    /// Failed (see `reason`).
    Failed,
}

/// A re-protection's progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Protecting {
    /// Phase.
    pub phase: Phase,
    /// Why it failed.
    pub reason: Option<String>,
    /// Current epoch.
    pub epoch: u64,
    /// Last epoch the returning host holds.
    pub committed_epoch: u64,
    /// Checkpoints taken.
    pub checkpoints: u64,
    /// 99th percentile pause.
    pub pause_p99_ms: f64,
    /// Longest pause.
    pub pause_max_ms: f64,
    /// The synthetic guest's workload counter at the last checkpoint.
    pub guest_counter: u64,
    /// Where the checkpoints go.
    pub peer: String,
}
