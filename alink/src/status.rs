//! What callers can observe: path liveness, counters and events.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::frame::FrameError;

/// Liveness of one path.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PathStatus {
    /// Index in the configured paths.
    pub index: usize,
    /// This host's address on the path.
    pub local: SocketAddr,
    /// The peer's address on the path.
    pub peer: SocketAddr,
    /// True while an authenticated connection is live and heard from within the timeout.
    pub up: bool,
    /// Round-trip time of the last answered heartbeat.
    pub rtt_ms: Option<f64>,
    /// Time since anything was last received on the path.
    pub last_seen_ms_ago: Option<u64>,
    /// How many times the path has (re)connected.
    pub connects: u64,
}

/// A snapshot of the whole link.
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    /// This host.
    pub local_host: String,
    /// The peer host.
    pub peer_host: String,
    /// True while at least one path is up.
    pub connected: bool,
    /// The path that carries data now.
    pub active_path: Option<usize>,
    /// The peer process's session id (changes when it restarts).
    pub peer_session: Option<u64>,
    /// Every path.
    pub paths: Vec<PathStatus>,
    /// Bytes queued and not yet acknowledged, all channels.
    pub queued_bytes: u64,
    /// Counters since the link started.
    pub counters: CounterSnapshot,
}

/// Something that happened on a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum LinkEvent {
    /// A path connected and authenticated.
    PathUp {
        /// Its index.
        path: usize,
    },
    /// A path failed (timeout, I/O error, rejected frame).
    PathDown {
        /// Its index.
        path: usize,
        /// Why.
        reason: String,
    },
    /// The peer process restarted: messages it had not acknowledged were dropped, and every
    /// channel starts afresh. Application protocols resynchronise on this.
    PeerRestarted {
        /// The new session id.
        session: u64,
    },
}

/// Live counters (atomics).
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub(crate) frames_sent: AtomicU64,
    pub(crate) frames_received: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) messages_received: AtomicU64,
    pub(crate) resent_frames: AtomicU64,
    pub(crate) duplicates_dropped: AtomicU64,
    pub(crate) gaps: AtomicU64,
    pub(crate) undeliverable: AtomicU64,
    pub(crate) handshake_failures: AtomicU64,
    pub(crate) rejected_bad_magic: AtomicU64,
    pub(crate) rejected_bad_version: AtomicU64,
    pub(crate) rejected_bad_kind: AtomicU64,
    pub(crate) rejected_bad_channel: AtomicU64,
    pub(crate) rejected_too_long: AtomicU64,
    pub(crate) rejected_bad_mac: AtomicU64,
    pub(crate) rejected_truncated: AtomicU64,
}

/// A copy of the counters.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Frames written, all paths.
    pub frames_sent: u64,
    /// Frames read and authenticated, all paths.
    pub frames_received: u64,
    /// Bytes written.
    pub bytes_sent: u64,
    /// Bytes read.
    pub bytes_received: u64,
    /// Application messages delivered.
    pub messages_received: u64,
    /// Fragments written again after a path failure or a Nack.
    pub resent_frames: u64,
    /// Fragments received twice and dropped.
    pub duplicates_dropped: u64,
    /// Out-of-order fragments (answered with a Nack).
    pub gaps: u64,
    /// Messages for a channel whose receiver was dropped.
    pub undeliverable: u64,
    /// Connections refused during the handshake (wrong host, wrong path, timeout, bad frame).
    pub handshake_failures: u64,
    /// Frames rejected for their magic.
    pub rejected_bad_magic: u64,
    /// Frames rejected for an unknown version.
    pub rejected_bad_version: u64,
    /// Frames rejected for an unknown kind.
    pub rejected_bad_kind: u64,
    /// Frames rejected for an unknown channel.
    pub rejected_bad_channel: u64,
    /// Frames rejected for an impossible length.
    pub rejected_too_long: u64,
    /// Frames rejected for a bad MAC.
    pub rejected_bad_mac: u64,
    /// Frames cut short.
    pub rejected_truncated: u64,
}

impl CounterSnapshot {
    /// All rejected frames.
    #[must_use]
    pub fn rejected(&self) -> u64 {
        self.rejected_bad_magic
            + self.rejected_bad_version
            + self.rejected_bad_kind
            + self.rejected_bad_channel
            + self.rejected_too_long
            + self.rejected_bad_mac
            + self.rejected_truncated
    }
}

impl LinkCounters {
    pub(crate) fn count_reject(&self, e: &FrameError) {
        let c = match e {
            FrameError::BadMagic(_) => &self.rejected_bad_magic,
            FrameError::UnknownVersion(_) => &self.rejected_bad_version,
            FrameError::UnknownKind(_) => &self.rejected_bad_kind,
            FrameError::BadChannel(_) => &self.rejected_bad_channel,
            FrameError::TooLong { .. } => &self.rejected_too_long,
            FrameError::BadMac => &self.rejected_bad_mac,
            FrameError::Truncated(_) => &self.rejected_truncated,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> CounterSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            frames_sent: g(&self.frames_sent),
            frames_received: g(&self.frames_received),
            bytes_sent: g(&self.bytes_sent),
            bytes_received: g(&self.bytes_received),
            messages_received: g(&self.messages_received),
            resent_frames: g(&self.resent_frames),
            duplicates_dropped: g(&self.duplicates_dropped),
            gaps: g(&self.gaps),
            undeliverable: g(&self.undeliverable),
            handshake_failures: g(&self.handshake_failures),
            rejected_bad_magic: g(&self.rejected_bad_magic),
            rejected_bad_version: g(&self.rejected_bad_version),
            rejected_bad_kind: g(&self.rejected_bad_kind),
            rejected_bad_channel: g(&self.rejected_bad_channel),
            rejected_too_long: g(&self.rejected_too_long),
            rejected_bad_mac: g(&self.rejected_bad_mac),
            rejected_truncated: g(&self.rejected_truncated),
        }
    }
}
