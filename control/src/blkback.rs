//! `xenft-blkback`'s control contract: requests, replies, events and the status it reports.
//!
//! | request (`op`) | role | reply (`reply`) |
//! |---|---|---|
//! | `status` | any | `status`: role, role status, `alink` |
//! | `resync_rate {bytes_per_sec}` | primary | `done` (0 = unlimited) |
//! | `verify {block?}` | primary | `verify`: differing ranges (default 64 KiB blocks) |
//! | `checkpoint {epoch}` | primary | `checkpoint {next_epoch}`: later writes belong to `epoch + 1` |
//! | `set_epoch {epoch}` | primary | `done`: stamps later writes with `epoch` |
//! | `commit {epoch}` | primary | `done` once the secondary applied epoch `epoch` |
//! | `epoch_mode {on}` | secondary | `done`: hold writes per epoch (level 3) |
//! | `commit_local {epoch}` | secondary | `applied {applied}`: held epochs `<= epoch` applied |
//! | `discard` | secondary | `discarded {discarded}`: uncommitted epochs dropped |
//! | `promote {epoch?, force}` | secondary | `promoted`: take-over in place, serve as primary |
//!
//! A request for another role is refused (`refused`). Events: `peer_lost`, `resync_progress`
//! (about once a second while a resync runs), `in_sync`, `disk_redirected` (the local store
//! failed: the disk is served from the peer's copy), `promoted`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A request to `xenft-blkback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The process's role and status.
    Status,
    /// Sets the resync rate limit.
    ResyncRate {
        /// Bytes per second; 0 = unlimited.
        bytes_per_sec: u64,
    },
    /// Online verify of both copies by block checksums.
    Verify {
        /// Checksum block size (default 64 KiB).
        #[serde(default)]
        block: Option<u64>,
    },
    /// Checkpoint boundary (inside the checkpoint engine's pause): later writes belong to
    /// `epoch + 1`.
    Checkpoint {
        /// The checkpoint's epoch.
        epoch: u64,
    },
    /// Stamps subsequent writes with `epoch`.
    SetEpoch {
        /// The epoch.
        epoch: u64,
    },
    /// Commits epoch `epoch` on the secondary; replies once applied there.
    Commit {
        /// The epoch.
        epoch: u64,
    },
    /// Secondary: hold writes per epoch until committed.
    EpochMode {
        /// On or off.
        on: bool,
    },
    /// Secondary: applies the held epochs `<= epoch`.
    CommitLocal {
        /// The epoch.
        epoch: u64,
    },
    /// Secondary (failover): drops uncommitted epochs.
    Discard,
    /// Secondary: take-over in place (see `xenft_blkback::daemon`).
    Promote {
        /// Level 3: the checkpoint the memory replica resumes; held epochs up to it are
        /// applied, later ones dropped.
        #[serde(default)]
        epoch: Option<u64>,
        /// Promote a copy that is not consistent (a resync was in flight).
        #[serde(default)]
        force: bool,
    },
}

/// A reply of `xenft-blkback`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Done, nothing to report.
    Done,
    /// `status`.
    Status(Box<Status>),
    /// `verify`.
    Verify {
        /// The comparison.
        verify: VerifyReport,
    },
    /// `checkpoint`.
    Checkpoint {
        /// The epoch later writes belong to.
        next_epoch: u64,
    },
    /// `commit_local`.
    Applied {
        /// Held writes applied.
        applied: usize,
    },
    /// `discard`.
    Discarded {
        /// Held writes dropped.
        discarded: usize,
    },
    /// `promote`.
    Promoted {
        /// What the promotion did.
        promoted: Promoted,
    },
}

/// An event pushed by `xenft-blkback`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Primary: the session with the secondary ended; writes are recorded as dirty.
    PeerLost {
        /// Why, when known.
        reason: Option<String>,
    },
    /// Primary: resync progress (about once a second while it runs).
    ResyncProgress(ResyncProgress),
    /// Primary: the secondary holds everything acknowledged.
    InSync,
    /// Primary: the local store failed; the disk is served from the peer's copy over the
    /// A-link (remote mode).
    DiskRedirected {
        /// The store's failure.
        cause: String,
    },
    /// Secondary: promoted to primary.
    Promoted(Promoted),
}

/// `status`: the role and its status, and the process's own A-link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The role and its status.
    #[serde(flatten)]
    pub node: NodeStatus,
    /// The A-link's per-path status and counters (`xenft_alink`'s format), when this process
    /// runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alink: Option<Value>,
}

/// The role and its status (`"role": "local" | "primary" | "secondary"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum NodeStatus {
    /// Serving the disk without a peer.
    Local,
    /// Serving and mirroring.
    Primary {
        /// The primary's status.
        primary: PrimaryStatus,
    },
    /// Holding the copy.
    Secondary {
        /// The secondary's status.
        secondary: SecondaryStatus,
    },
}

/// Connection state towards the secondary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerLink {
    /// No session: writes are recorded in the dirty bitmap.
    #[default]
    Degraded,
    /// Session up, resync running.
    Resyncing,
    /// Session up, secondary identical as of the last acknowledgement.
    InSync,
}

/// What the secondary knows about its own copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerDiskState {
    /// Never synced: the primary must run a full sync.
    Fresh,
    /// A resync was interrupted: the primary's dirty bitmap still covers what is missing.
    Inconsistent,
    /// Identical to the primary as of the last acknowledged message.
    Consistent,
}

/// Resync progress.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResyncProgress {
    /// Whether this is the full initial sync.
    pub full: bool,
    /// Bytes to copy when the resync started.
    pub total_bytes: u64,
    /// Bytes still dirty.
    pub bytes_left: u64,
    /// Data bytes sent as resync copies so far.
    pub bytes_copied: u64,
    /// Bytes sent as zero/hole ranges (no data on the wire).
    pub bytes_zeroed: u64,
    /// Copy rate so far, bytes per second.
    pub rate_bytes_per_sec: f64,
    /// Estimated seconds to completion (`None` before a rate is known).
    pub eta_secs: Option<f64>,
    /// Seconds since the resync started.
    pub elapsed_secs: f64,
}

/// The primary's status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrimaryStatus {
    /// Link state.
    pub peer: PeerLink,
    /// State the secondary announced for its copy in the current session.
    pub peer_disk: Option<PeerDiskState>,
    /// Bytes the secondary may lack (dirty bitmap).
    pub dirty_bytes: u64,
    /// Whether the secondary completed a full sync once.
    pub peer_synced: bool,
    /// Current resync, if any.
    pub resync: Option<ResyncProgress>,
    /// Last completed resync.
    pub last_resync: Option<ResyncProgress>,
    /// Local store failure that switched the disk to remote mode (`None`: local store fine).
    pub local_failure: Option<String>,
    /// Last failure the secondary reported, or why the last session ended.
    pub peer_failure: Option<String>,
    /// Resync rate limit (bytes/s, 0 = unlimited).
    pub resync_rate_limit: u64,
    /// Client writes acknowledged by the secondary.
    pub writes_mirrored: u64,
    /// Client writes completed while degraded (recorded in the bitmap).
    pub writes_degraded: u64,
    /// Sessions opened so far.
    pub sessions: u64,
    /// Current level-3 epoch stamped on writes.
    pub epoch: u64,
    /// Activity-log extents currently active.
    pub al_active_extents: usize,
    /// Extents found active at start (unclean stop while connected), queued for resync.
    pub al_recovered_extents: u64,
}

/// The secondary's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecondaryStatus {
    /// Whether a primary session is up.
    pub connected: bool,
    /// State of the local copy.
    pub disk: PeerDiskState,
    /// Client-write bytes applied.
    pub bytes_applied: u64,
    /// Resync bytes applied (data, not zero ranges).
    pub resync_bytes: u64,
    /// Highest sequence applied in the current session.
    pub last_seq: u64,
    /// Epoch mode on.
    pub epoch_mode: bool,
    /// Epochs with held writes.
    pub held_epochs: Vec<u64>,
    /// Held bytes.
    pub held_bytes: u64,
    /// Highest committed epoch.
    pub committed_epoch: u64,
    /// Last store failure.
    pub failure: Option<String>,
}

/// Result of an online verify.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Bytes compared.
    pub bytes_checked: u64,
    /// Checksum block size.
    pub block: u64,
    /// Differing ranges `(offset, length)`, adjacent blocks merged.
    pub differing: Vec<(u64, u64)>,
    /// Total bytes in differing ranges.
    pub differing_bytes: u64,
}

/// What a successful promotion did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promoted {
    /// Held epoch writes applied (level 3, `promote` with an epoch).
    pub committed_writes: usize,
    /// Uncommitted epoch writes dropped.
    pub discarded_writes: usize,
    /// Whether a session with the old primary was still up when promotion began.
    pub was_connected: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode_incoming, decode_outgoing, encode_reply, Incoming, Outgoing};

    fn primary() -> PrimaryStatus {
        PrimaryStatus {
            peer: PeerLink::InSync,
            peer_disk: Some(PeerDiskState::Consistent),
            peer_synced: true,
            last_resync: Some(ResyncProgress {
                full: true,
                total_bytes: 1 << 20,
                ..ResyncProgress::default()
            }),
            writes_mirrored: 5,
            sessions: 1,
            epoch: u64::MAX,
            ..PrimaryStatus::default()
        }
    }

    #[test]
    fn status_keeps_the_shape_scripts_grep_for_and_round_trips() {
        let st = Reply::Status(Box::new(Status {
            node: NodeStatus::Primary { primary: primary() },
            alink: Some(serde_json::json!({"paths": []})),
        }));
        let line = encode_reply(&Ok(st.clone()));
        assert!(line.contains(r#""role":"primary""#), "{line}");
        assert!(line.contains(r#""peer":"in_sync""#), "{line}");
        let Outgoing::Reply(Ok(back)) = decode_outgoing::<Reply, Event>(line.as_bytes()).unwrap()
        else {
            panic!("a reply")
        };
        assert_eq!(back, st);
    }

    #[test]
    fn promote_takes_optional_epoch_and_force() {
        let r = |s: &str| decode_incoming::<Request>(s.as_bytes()).unwrap();
        assert_eq!(
            r(r#"{"v":1,"req":{"op":"promote"}}"#),
            Incoming::Request(Request::Promote {
                epoch: None,
                force: false
            })
        );
        assert_eq!(
            r(r#"{"v":1,"req":{"op":"promote","epoch":3,"force":true}}"#),
            Incoming::Request(Request::Promote {
                epoch: Some(3),
                force: true
            })
        );
    }
}
