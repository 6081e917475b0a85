//! # xenft-alink: availability links
//!
//! The private links between two hosts of a protected pair. They carry heartbeats, disk
//! mirroring, checkpoints and tunnelled network frames, and they survive the loss of any
//! single path.
//!
//! What it is not: it knows nothing of disks, memory or VMs (its users own the channels'
//! payloads), and it does not decide that a peer is dead (the agent does, from every path).
//!
//! - A [`Link`] joins this host to one peer over two or more independent TCP paths
//!   ([`PathConfig`]: one address per host per path, e.g. two private NICs).
//! - Every frame ([`frame`]) carries magic, version, kind, channel, sequence number, length,
//!   payload and a keyed-BLAKE3 MAC under a key derived from the pool secret (per-connection
//!   keys after the handshake). Bad magic, unknown versions, impossible lengths, bad MACs and truncated frames
//!   are rejected, counted and logged at most once a minute; lengths are capped from the header
//!   before any allocation: the handshake accepts only 1 KiB control frames, so a peer that
//!   fails authentication cannot make us allocate more than that; authenticated data frames
//!   are capped at 1 MiB.
//! - Five [`Channel`]s are multiplexed on a link, each reliable and ordered: control,
//!   heartbeat, disk, checkpoint, net. Messages up to 64 MiB are cut into 1 MiB fragments.
//!   Each path has two TCP connections: an urgent lane (link heartbeats, acks, Control and
//!   Heartbeat channels) and a bulk lane (Disk, Checkpoint, Net) whose writer serves channels by
//!   priority, so a large checkpoint never holds up a heartbeat and holds up a disk write for at
//!   most one fragment.
//! - Losing a path loses nothing: unacknowledged fragments are resent on a surviving path and
//!   the receiver drops duplicates by sequence number. A path that comes back is used again
//!   without operator action.
//! - Each path sends a heartbeat every 100 ms (settable); [`Link::status`] exposes per-path
//!   liveness (up, last seen, RTT) and counters, [`Link::subscribe`] path and peer events.
//!
//! Cost: `scripts/bench alink` moves 1 MiB messages over two loopback paths at 1000–3000
//! MiB/s on the shared 2-core development machine (0.15–0.88× a raw TCP stream in the same
//! run, depending on the other load; typically ~1600 MiB/s, 0.5×); with HMAC-SHA256 it was
//! ~1100 MiB/s, 0.32×. The MAC runs on both ends at ~7 GiB/s each, overlapped with the
//! transfer. In CPU time the MAC is what the link costs over a bare TCP connection: in
//! `scripts/bench mirror` BLAKE3 takes ~0.2 s per mirrored GiB on each host (4.5–5.5 GiB/s
//! measured in place under load), and with the payload MAC switched off in an experiment the
//! A-link's CPU per GiB was that of plain TCP within the run-to-run noise (median of 5 runs
//! 1.16× on each host, vs 1.36× primary and 1.49× secondary over 10 runs with it). [`Link::send_parts`] / [`Link::send_parts_now`] send an application header and
//! its data without copying them together.
//!
//! Where it sits: blkback-shim (Disk), the checkpoint engine (Checkpoint), netback-shim (Net)
//! and the agent (Control, Heartbeat) all talk to their peer through one `Link` per host pair.
//!
//! ```no_run
//! # async fn demo() -> Result<(), xenft_alink::LinkError> {
//! use xenft_alink::{Channel, Link, LinkConfig, PathConfig};
//! let paths = vec![
//!     PathConfig { local: "10.1.0.1:7010".parse().unwrap(), peer: "10.1.0.2:7010".parse().unwrap() },
//!     PathConfig { local: "10.2.0.1:7010".parse().unwrap(), peer: "10.2.0.2:7010".parse().unwrap() },
//! ];
//! let link = Link::start(LinkConfig::new("host1", "host2", b"a pool secret of 16+ bytes".to_vec(), paths)).await?;
//! link.send(Channel::Control, bytes::Bytes::from_static(b"hello")).await?;
//! let mut rx = link.receiver(Channel::Control).expect("taken once");
//! let _reply = rx.recv().await;
//! # Ok(()) }
//! ```

pub mod cli;
mod config;
pub mod frame;
mod link;
mod status;
pub mod testing;

pub use config::{LinkConfig, PathConfig};
pub use frame::Channel;
pub use link::{Link, Receiver};
pub use status::{CounterSnapshot, LinkCounters, LinkEvent, LinkStatus, PathStatus};

/// Errors of the link API.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The configuration is unusable; the message names the problem.
    #[error("invalid A-link configuration: {0}")]
    Config(String),
    /// A listening address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A message above the configured maximum.
    #[error("message of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The link was shut down.
    #[error("the link is shut down")]
    Closed,
}
