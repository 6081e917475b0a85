//! The state directory: the pool record (PIDs), host status files, the event log and the
//! client's acknowledgement log. Every lab process shares one filesystem, so files are the
//! simplest honest way for `status` and `drill` to observe the hosts from outside.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::topology::Host;
use crate::LabError;

/// Default state directory.
pub const DEFAULT_DIR: &str = "/run/xenft-lab";

/// Largest state/status file read (they are small; anything bigger is not ours).
const MAX_FILE: u64 = 4 << 20;

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// A state directory at `root` (not created yet).
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Its path.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A file inside it.
    #[must_use]
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Opens the log file `name` in the state directory for appending (created if missing).
    ///
    /// # Errors
    /// [`LabError::Io`].
    pub fn open_log(&self, name: &str) -> Result<std::fs::File, LabError> {
        let path = self.file(name);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| LabError::Io { path, source })
    }

    /// The pool record.
    #[must_use]
    pub fn pool_file(&self) -> PathBuf {
        self.file("pool.json")
    }

    /// A host's status file.
    #[must_use]
    pub fn status_file(&self, h: Host) -> PathBuf {
        self.file(&format!("{}.status.json", h.name()))
    }

    /// The client's acknowledgement log (`n unix_ms` per line).
    #[must_use]
    pub fn acks_file(&self) -> PathBuf {
        self.file("client.acks")
    }

    /// The event log (JSON lines).
    #[must_use]
    pub fn events_file(&self) -> PathBuf {
        self.file("events.log")
    }

    /// Creates the directory.
    pub fn create(&self) -> Result<(), LabError> {
        std::fs::create_dir_all(&self.root).map_err(|source| LabError::Io {
            path: self.root.clone(),
            source,
        })
    }

    /// Writes `value` as JSON to `path` atomically (temp file + rename).
    pub fn write_json<T: Serialize>(&self, path: &Path, value: &T) -> Result<(), LabError> {
        let tmp = path.with_extension("tmp");
        let io = |source| LabError::Io {
            path: path.to_owned(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| LabError::BadState {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads JSON from `path`; `Ok(None)` if it does not exist.
    pub fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        path: &Path,
    ) -> Result<Option<T>, LabError> {
        match read_bounded(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| LabError::BadState {
                    path: path.to_owned(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LabError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Appends one event to the event log (best effort: the log is for people).
    pub fn log_event(&self, ev: &Event) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.events_file())
        {
            if let Ok(mut line) = serde_json::to_string(ev) {
                line.push('\n');
                let _ = f.write_all(line.as_bytes());
            }
        }
    }

    /// Every event logged at or after `since_ms`.
    pub fn events_since(&self, since_ms: u64) -> Result<Vec<Event>, LabError> {
        let path = self.events_file();
        let text = match read_bounded(&path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(LabError::Io { path, source }),
        };
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<Event>(l).ok())
            .filter(|e| e.t_ms >= since_ms)
            .collect())
    }

    /// The client's acknowledgements: `(n, unix_ms)` in log order.
    pub fn acks(&self) -> Result<Vec<(u64, u64)>, LabError> {
        let path = self.acks_file();
        let b = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(LabError::Io { path, source }),
        };
        Ok(String::from_utf8_lossy(&b)
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
            })
            .collect())
    }
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut b = Vec::new();
    f.take(MAX_FILE).read_to_end(&mut b)?;
    Ok(b)
}

/// The pool record written by `up`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolRecord {
    /// When the pool was built.
    pub created_ms: u64,
    /// Host process (`xenft-lab host`) of host 1.
    pub host1_pid: i32,
    /// Host process of host 2.
    pub host2_pid: i32,
    /// Client process.
    pub client_pid: i32,
    /// Quorum server process (`xenft-quorum`).
    pub quorum_pid: i32,
    /// The `xenft-lab` binary and the host process arguments of host 1 and host 2 (to restart a
    /// repaired host).
    pub exe: PathBuf,
    /// Host process arguments, `[host1, host2]`.
    pub node_args: [Vec<String>; 2],
}

impl PoolRecord {
    /// The host process PID of `h`.
    #[must_use]
    pub fn pid(&self, h: Host) -> i32 {
        match h {
            Host::Host1 => self.host1_pid,
            Host::Host2 => self.host2_pid,
        }
    }

    /// Records a new host process PID for `h`.
    pub fn set_pid(&mut self, h: Host, pid: i32) {
        match h {
            Host::Host1 => self.host1_pid = pid,
            Host::Host2 => self.host2_pid = pid,
        }
    }

    /// The host process arguments of `h`.
    #[must_use]
    pub fn args(&self, h: Host) -> &[String] {
        match h {
            Host::Host1 => &self.node_args[0],
            Host::Host2 => &self.node_args[1],
        }
    }
}

/// Something a host did, with its reason.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// When (Unix ms).
    pub t_ms: u64,
    /// Which host.
    pub host: String,
    /// What happened.
    pub what: String,
    /// Why.
    pub why: String,
}

/// What a host runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    /// Runs the VM (and replicates it when its agent protects it).
    Primary,
    /// Holds the replica.
    Secondary,
    /// Holds the VM but paused it: its agent fenced it.
    Fenced,
    /// Neither runs the VM nor holds a replica yet (a restarted host waiting for its agent).
    Standby,
}

/// What the host's agent (`xenft_agent`) says about the VM and the peer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentView {
    /// The VM's protection phase (`protected`, `degraded`, `failed-over`...), empty when the
    /// agent has no record.
    pub phase: String,
    /// Which host the agent believes runs the VM.
    pub primary: String,
    /// Role generation.
    pub generation: u64,
    /// State of the local copy (`running`, `stopped`, `paused`, `starting`).
    pub local: String,
    /// Holds a live quorum lease.
    pub lease_valid: bool,
    /// The peer is silent on every path.
    pub peer_silent: bool,
    /// Per path: name, up.
    pub paths: Vec<(String, bool)>,
    /// Whether the last quorum request succeeded.
    pub quorum_ok: bool,
    /// Quorum requests sent since the agent started (leases renewed or claims).
    #[serde(default)]
    pub quorum_requests: u64,
    /// Expected take-over time with the agent's timing (peer dead or lease expiry, plus a
    /// heartbeat), ms.
    #[serde(default)]
    pub expected_failover_ms: u64,
}

/// A-link view.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LinkView {
    /// At least one path up.
    pub connected: bool,
    /// Per path: up, RTT.
    pub paths: Vec<PathView>,
}

/// One A-link path.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PathView {
    /// Up now.
    pub up: bool,
    /// Last RTT.
    pub rtt_ms: Option<f64>,
    /// Times (re)connected.
    pub connects: u64,
}

/// Checkpoint (memory replication) view.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckpointView {
    /// Precopy / Protected / Failed(..) on the primary; "receiving" / "failed over" on host 2.
    pub phase: String,
    /// Last checkpoint taken (primary).
    pub epoch: u64,
    /// Last checkpoint acknowledged (primary) or applied (secondary).
    pub committed_epoch: u64,
    /// Bytes sent and not yet acknowledged (RPO in bytes).
    pub lag_bytes: u64,
    /// Age of the last commit, ms.
    pub last_commit_age_ms: Option<u64>,
}

/// What a host did when its agent made it take the VM over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Takeover {
    /// When the agent decided to take over (its `fail_over` decision reached the lab).
    pub decided_ms: u64,
    /// When the service answered on the service address again.
    pub serving_ms: u64,
    /// The checkpoint the guest resumed from.
    pub failover_epoch: u64,
    /// The service's counter recovered from the disk copy.
    pub recovered_count: u64,
    /// The reasoning.
    pub reason: String,
}

/// The VM's network relay on a host (`xenft-netback`'s counters).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetView {
    /// `passthrough`, `buffered` or `standby`.
    pub mode: String,
    /// The VM's frames go through the peer's uplink.
    pub redirecting: bool,
    /// This relay carries the peer's VM frames (the peer's uplink failed).
    pub serving_peer: bool,
    /// The uplink has its carrier.
    pub uplink_up: bool,
}

/// A host's status, rewritten every 100 ms.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Which host.
    pub host: Host,
    /// Host process PID.
    pub pid: u32,
    /// When written (Unix ms).
    pub updated_ms: u64,
    /// Current role.
    pub role: NodeRole,
    /// Whether the VM's service runs here.
    pub serving: bool,
    /// Highest record the service stored.
    pub service_count: u64,
    /// Guest process PID (running VM), if any.
    pub guest_pid: Option<u32>,
    /// The A-link.
    pub link: LinkView,
    /// Memory replication.
    pub checkpoint: CheckpointView,
    /// Disk state in one word: in_sync / resyncing / degraded / remote / copy / local.
    pub disk_state: String,
    /// blkback's own status.
    pub disk: serde_json::Value,
    /// The VM's network relay (`xenft-netback`), when it answers.
    #[serde(default)]
    pub net: Option<NetView>,
    /// After this host took the VM over.
    pub takeover: Option<Takeover>,
    /// The agent's view.
    pub agent: AgentView,
}
