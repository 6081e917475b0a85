//! xenft-lab: a two-host pool on one Linux machine, and the fire drill that breaks it for real.
//!
//! `xenft-lab up` builds the pool out of network namespaces and real processes:
//!
//! ```text
//!   xftlab-host1                          xftlab-host2                  xftlab-client
//!   node: agent + VM (primary)  ==alink1==  node: agent + replica        client: PUT n every
//!    xenft-blkback (primary)    ==alink2==   xenft-blkback (secondary)  20 ms, logs each
//!    xenft-netback (passthrough)             xenft-netback (standby)     acknowledged n
//!    vif0 ── vm0 in xftlab-host1-vm          vif0 ── vm0 in xftlab-host2-vm
//!        \___ mgmt0 ___ xftlab-quorum (xenft-quorum, routes mgmt) ___ mgmt0 ___/
//!        \__________ prod0 ____ xftlab-switch: bridge br0 ____ prod0 __________/
//! ```
//!
//! Each host runs one node process ([`node`]) that embeds the product's agent
//! ([`xenft_agent::runtime::Agent`]): heartbeats over the A-link (its `Heartbeat` channel,
//! per-path liveness from the link) and the management network, quorum leases from the
//! `xenft-quorum` server in its own namespace, fencing, take-over and re-protection. The
//! agent decides; its commands reach the production component processes through the
//! production drivers — `xenft-blkback` (the VM's disk over NBD, mirrored synchronously to the
//! other host's blkback, promoted on take-over, remote mode on a failed store) through
//! [`xenft_agent::drivers::blkback::BlkbackDriver`], `xenft-netback` (the VM's vif relayed to
//! the production network, take-over announcement, uplink redirect through the peer's relay)
//! through [`xenft_agent::drivers::netback::NetbackDriver`] — and the components' events
//! reach it through the production follower ([`xenft_agent::drivers::events::follow`]). The
//! domain and checkpoint seams are still the node's own (the level-3 checkpoint engine
//! [`xenft_checkpoint`] in process, memory + vCPU epochs of a synthetic guest; the VM's service,
//! see [`service`], in the VM's namespace). Roles are not fixed: the host running the VM
//! replicates it to the other one; after a take-over the old primary, once repaired, comes
//! back as the secondary.
//!
//! The service stores every client write as a record on the VM's disk through blkback's NBD
//! export and acknowledges it only after blkback acknowledged the write (on both copies); the
//! client logs what was acknowledged.
//!
//! `xenft-lab drill` ([`drill`]) injects a fault for real against whichever host runs the VM
//! (SIGKILL of every process of the host and interfaces down, `ip link set down` for A-links
//! and the uplink, management forwarding off for a partition, the disk file truncated under
//! blkback for the disk), then measures from outside: detection time and the agent's decision
//! with its reason from the event log, downtime from the client's acknowledgement log, never
//! two serving copies (partition, isolate), the data check by reading every acknowledged record
//! back through the service, repair/resync time and the final state.
//!
//! Lab timing: the agent runs with [`node::lab_timing`] (path down 1 s, peer dead 1.5 s, lease
//! 1.5 s, margin 0.5 s) instead of the product defaults that fit a take-over within 1 s: this
//! machine is shared by several builds on two cores, where processes stall for hundreds of ms.
//!
//! # Modules
//! - [`topology`]: names, addresses, namespace and veth set-up/tear-down (`ip`).
//! - [`state`]: the state directory (PIDs, node status files, events).
//! - [`node`]: the per-host process: the agent, its production disk and network drivers over
//!   the host's component processes, and the lab's domain and checkpoint seams (runs in a host
//!   namespace).
//! - [`service`]: the VM's record service and its wire protocol.
//! - [`client`]: the client load generator.
//! - [`pool`]: `up` / `down` / `status`.
//! - [`drill`]: the fire drill and its report.
//! - [`compat`]: what this machine supports per level (Xen and local pool), and why.
//! - [`console`]: the availability console (HTML + server-sent events, protect/unprotect)
//!   served by each node.
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

/// Starts `cmd` as a daemon of the pool: no stdin, no stdout, its log (`RUST_LOG=info`) on
/// stderr into `log`. The lab's nodes start their hosts' components so, and so do the
/// integration tests' pools.
///
/// # Errors
/// When the program cannot be started.
pub fn spawn_logged(
    cmd: &mut std::process::Command,
    log: std::fs::File,
) -> std::io::Result<std::process::Child> {
    use std::process::Stdio;
    cmd.env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
}

/// Milliseconds since the Unix epoch (shared clock of every lab process).
#[must_use]
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
