//! xenft-lab: a two-host pool on one Linux machine, driven through XenAPI like a real pool,
//! and the fire drill that breaks it for real.
//!
//! `xenft-lab up` builds the pool out of network namespaces and real processes:
//!
//! ```text
//!   xftlab-host1                            xftlab-host2                 xftlab-client
//!   xenft-agent (host-local config)         xenft-agent                  client: PUT n every
//!    its components for vm1 (primary):      its components (secondary):  20 ms, logs each
//!    xenft-blkback, xenft-netback,  ==alink1== blkback, netback,          acknowledged n
//!    xenft-checkpoint (+ synthetic  ==alink2== checkpoint (replica)
//!    guest); hypervisor stand-in             hypervisor stand-in
//!    vif0 ── vm0 in xftlab-host1-vm: the VM   vif0 ── vm0 in xftlab-host2-vm
//!        \___ mgmt0 ___ xftlab-quorum: xenft-quorum, the pool's xapi ___ mgmt0 ___/
//!        \__________ prod0 ____ xftlab-switch: bridge br0 ____ prod0 __________/
//! ```
//!
//! One composition root: the pool runs the product as a pool administrator would. The XenAPI
//! test server (`xenft-fake-xapi`) is the pool's xapi, with host1, host2 and vm1 running on
//! host1 (a disk and a vif); `up` runs `xenft pool-init` (A-links, quorum server, the A-link
//! key) and `xenft vm-protect vm=vm1 level=3 secondary=host2`, and each host's production
//! `xenft-agent` — given host-local facts only — does the rest from the registry: membership,
//! quorum leases, its VM's components (`xenft-blkback`, `xenft-netback`, `xenft-checkpoint`
//! with the synthetic guest), the first sync, fencing, take-over, re-protection, `xenft.state`.
//! What only a namespace pool needs lives here ([`xapi_pool`]): per host a stand-in for
//! xenopsd that runs the VM where xapi records it ([`xapi_pool::hypervisor`]), the VM itself
//! (the record service on its disk, [`xapi_pool::vm`]), the status files the drills read
//! ([`xapi_pool::status`]), and the agent's restart on exit (what systemd does on a host).
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
//! Lab timing: the agents run with [`pool::lab_timing`] (path down 1 s, peer dead 1.5 s, lease
//! 1.5 s, margin 0.5 s) instead of the product defaults that fit a take-over within 1 s: this
//! machine is shared by several builds on two cores, where processes stall for hundreds of ms.
//!
//! # Modules
//! - [`topology`]: names, addresses, namespace and veth set-up/tear-down (`ip`).
//! - [`state`]: the state directory (PIDs, host status files, events).
//! - [`service`]: the VM's record service and its wire protocol.
//! - [`client`]: the client load generator.
//! - [`pool`]: `up` / `down` / `status`, the lab's agent timing.
//! - [`drill`]: the fire drill and its report.
//! - [`compat`]: what this machine supports per level (Xen and local pool), and why.
//! - [`demo`]: up (the `protect` row), a series of drills, a summary table, down.
//! - [`xapi_pool`]: the pool's xapi, each host's process, the VM, the `protect` row.

pub mod client;
pub mod compat;
pub mod demo;
pub mod drill;
pub mod pool;
pub mod service;
pub mod state;
pub mod topology;
pub mod xapi_pool;

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
/// stderr into `log`. The lab starts its processes so, and so do the
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

/// A value's JSON word (`"protected"` → `protected`), or its JSON text.
pub(crate) fn json_word<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
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
