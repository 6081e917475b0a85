//! xenft-lab: a two-host pool on one Linux machine, and the fire drill that breaks it for real.
//!
//! `xenft-lab up` builds the pool out of network namespaces and real processes:
//!
//! ```text
//!   xftlab-host1                      xftlab-host2                 xftlab-client
//!   node (primary)  ==alink1 veth==  node (secondary)             client: PUT n every 20 ms,
//!    synthetic guest ==alink2 veth==   replica memory              logs each acknowledged n
//!    blkback Primary (disk mirror) ->  blkback Secondary copy
//!    service on VIP 10.200.0.10:7000   (takes the VIP over)
//!        \______________ prod0 ____ xftlab-switch: bridge br0 ____ prod0 ______/
//! ```
//!
//! One A-link ([`xenft_alink::Link`], two paths over two veth pairs) carries the checkpoint
//! stream of a synthetic guest ([`xenft_checkpoint`], level 3: memory + vCPU epochs) and the
//! synchronous disk mirror ([`xenft_blkback`]). The VM's service (see [`service`]) stores every
//! client write as a record on the mirrored disk and acknowledges it only after the write
//! completed on both copies; the client logs what was acknowledged. On takeover host 2 resumes
//! the guest from its last applied checkpoint, opens its disk copy, recovers the service's
//! counter from it, moves the service address and announces it with a gratuitous ARP built by
//! [`xenft_netback::frame`].
//!
//! `xenft-lab drill` ([`drill`]) injects a fault for real (SIGKILL and interfaces down for a
//! host, `ip link set down` for A-links, an EIO-failing store for the disk), then measures from
//! outside: detection time and decision from the nodes' status files, downtime from the
//! client's acknowledgement log, data check by reading every acknowledged record back through
//! the service, and repair/resync time.
//!
//! # Modules
//! - [`topology`]: names, addresses, namespace and veth set-up/tear-down (`ip`).
//! - [`state`]: the state directory (PIDs, node status files, events).
//! - [`node`]: the per-host process (runs inside a host namespace).
//! - [`service`]: the VM's record service and its wire protocol.
//! - [`client`]: the client load generator.
//! - [`pool`]: `up` / `down` / `status`.
//! - [`drill`]: the fire drill and its report.
//! - [`compat`]: what this machine supports per level (Xen and local pool), and why.
//! - [`console`]: the availability console (HTML + server-sent events) served by each node.
//! - [`demo`]: up, a series of drills, a summary table, down.

pub mod client;
pub mod compat;
pub mod console;
pub mod demo;
pub mod drill;
pub mod node;
pub mod pool;
pub mod service;
pub mod state;
pub mod topology;

use std::path::PathBuf;

/// Everything that can go wrong in the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The lab needs root (network namespaces, veth, bridges).
    #[error("the local pool needs root: it creates network namespaces, veth pairs and a bridge (run as root or with sudo)")]
    NotRoot,
    /// A command could not be started.
    #[error("cannot run {cmd}: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{cmd} failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed.
        stderr: String,
    },
    /// File I/O in the state directory.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A state or status file is not what this version wrote.
    #[error("{path}: unreadable state: {reason}")]
    BadState {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `up` while a pool exists, `drill` without one, and similar.
    #[error("{0}")]
    WrongState(String),
    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A component failed.
    #[error("{what}: {reason}")]
    Component {
        /// Which component.
        what: &'static str,
        /// Its error.
        reason: String,
    },
}

impl LabError {
    pub(crate) fn component(what: &'static str, e: impl std::fmt::Display) -> Self {
        Self::Component {
            what,
            reason: e.to_string(),
        }
    }
}

/// Fails with [`LabError::NotRoot`] unless the process runs as root.
pub fn require_root() -> Result<(), LabError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(LabError::NotRoot)
    }
}

/// Milliseconds since the Unix epoch (shared clock of every lab process).
#[must_use]
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
