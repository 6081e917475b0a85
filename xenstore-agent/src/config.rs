//! The agent's configuration file (JSON) and its validation into a [`ValidConfig`].
//!
//! ```json
//! {
//!   "host": "h1",
//!   "secret_file": "/etc/xenft/pool-secret",
//!   "state_file": "/var/lib/xenft/agent-state.json",
//!   "peers": [{
//!     "host": "h2",
//!     "alink": [{"local": "10.10.0.1:7480", "peer": "10.10.0.2:7480"},
//!               {"local": "10.11.0.1:7480", "peer": "10.11.0.2:7480"}],
//!     "mgmt": {"local": "192.168.1.11:7480", "peer": "192.168.1.12:7480"}
//!   }],
//!   "storage_heartbeat_dir": "/run/sr-mount/xenft-hb",
//!   "quorum": ["192.168.1.50:7479", "192.168.2.50:7479"],
//!   "timing": {"heartbeat_ms": 100, "path_down_ms": 350, "peer_dead_ms": 500,
//!              "lease_ms": 600, "margin_ms": 200, "quorum_request_timeout_ms": 150},
//!   "status": {"listen": "127.0.0.1:7481"},
//!   "vms": [{"vm": "web01", "level": 3, "primary": "h1", "secondary": "h2", "memory_mb": 2048}],
//!   "alink_transport": "udp",
//!   "xenstore": true,
//!   "drivers": "real",
//!   "vm_drivers": {
//!     "web01": {
//!       "domain": {"command": ["/usr/lib/xenft/xenft-synthetic-guest", "--memory-mib", "2048"],
//!                  "after_resume": "start"},
//!       "blkback": {"control": "/run/xenft/web01-blkback.sock", "sync_timeout_ms": 3600000},
//!       "netback": {"control": "/run/xenft/web01-netback.sock", "addresses": ["192.168.1.80"]},
//!       "checkpoint": {"control": "/run/xenft/web01-checkpoint.sock",
//!                      "peer_listen": "/run/xenft/h2/web01-checkpoint-listen.sock"}
//!     }
//!   }
//! }
//! ```
//! `drivers` says what the agent drives: `"real"` (the default) needs a `vm_drivers` entry for
//! every VM with each component its level uses ([`crate::drivers::VmDriversFile`]); only an
//! explicit `"record"` runs the recording stand-ins ([`crate::seams::Recorder`]), so a
//! production config cannot silently drive nothing. `quorum` lists the preferred server first, then the alternate (0 to 2 entries);
//! `xenft-quorum --lease-ms` must equal `timing.lease_ms`. Every field is checked: unknown
//! fields, names with odd characters, VMs on hosts outside the pool, more than two quorum
//! servers or a non-loopback status address without `token_file` are refused.
//!
//! `checkpoint.peer_listen` (level 3, optional): the peer host's `xenft-checkpoint secondary
//! --listen` socket. After a take-over here the guest runs in this host's resumed replica;
//! when the old primary's host returns with a fresh secondary, the agent resyncs the disk and
//! then asks the engine to `protect` toward that socket, so the VM is fully protected again
//! without operator action. Either a Unix socket path, like `xenft-checkpoint primary
//! --connect` (the local pool's hosts share a filesystem; absolute, at most 107 bytes), or the
//! string `"alink"`: the engine (`xenft-checkpoint secondary --alink-path ...`) protects over
//! its own A-link toward the returning host's fresh secondary, started with the mirrored
//! A-link options (the agent sends a plain `protect`); that is the case between real hosts.
//! Anything else is refused, naming the field. The VM counts
//! as protected once that host holds the first checkpoint, within
//! `checkpoint.protect_timeout_ms` (default 120000).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::core::{CoreConfig, VmSpec};
use crate::drivers::VmDriversFile;
use crate::ids::{HostId, PathId, VmId};
use crate::timing::{Timing, TimingError};

/// Largest accepted config or secret file.
pub const MAX_CONFIG_FILE: u64 = 1 << 20;
/// Most A-link paths per peer.
pub const MAX_ALINK_PATHS: usize = 8;
/// Most protected VMs per agent.
pub const MAX_VMS: usize = 1024;

/// One heartbeat path to a peer: a local UDP address and the peer's.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PathAddrs {
    /// Local address to bind.
    pub local: SocketAddr,
    /// The peer's address on that path.
    pub peer: SocketAddr,
}

/// A peer host and how to reach it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerFile {
    /// The peer's name.
    pub host: HostId,
    /// A-link paths, in order.
    pub alink: Vec<PathAddrs>,
    /// Management network path.
    pub mgmt: Option<PathAddrs>,
}

/// Status API settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusFile {
    /// Listen address (loopback by default).
    #[serde(default = "default_status")]
    pub listen: SocketAddr,
    /// File with the bearer token; required when `listen` is not loopback.
    pub token_file: Option<PathBuf>,
}

fn default_status() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7481))
}

impl Default for StatusFile {
    fn default() -> Self {
        Self {
            listen: default_status(),
            token_file: None,
        }
    }
}

/// How A-link heartbeats travel.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AlinkTransport {
    /// One UDP datagram per A-link path per interval (the agent's own per-path heartbeats).
    #[default]
    Udp,
    /// The `xenft-alink` link (TCP paths on the same addresses): heartbeats on its
    /// `Heartbeat` channel, per-path liveness from its status.
    Link,
}

/// The configuration file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// This host's name.
    pub host: HostId,
    /// File with the pool secret.
    pub secret_file: PathBuf,
    /// Where the agent persists its state.
    pub state_file: PathBuf,
    /// Peers. Left out with an `xapi` section: they come from the pool's registry
    /// (`crate::xapi::membership`).
    #[serde(default)]
    pub peers: Vec<PeerFile>,
    /// Shared-storage directory for the storage heartbeat.
    pub storage_heartbeat_dir: Option<PathBuf>,
    /// Quorum servers: preferred first, then alternate.
    #[serde(default)]
    pub quorum: Vec<SocketAddr>,
    /// Timeouts.
    #[serde(default)]
    pub timing: Timing,
    /// Status API.
    #[serde(default)]
    pub status: StatusFile,
    /// VMs to protect.
    #[serde(default)]
    pub vms: Vec<VmSpec>,
    /// Free memory for VMs (MiB), when not read from the hypervisor.
    pub free_memory_mb: Option<u64>,
    /// Event log length.
    #[serde(default = "default_log")]
    pub event_log: usize,
    /// A-link heartbeat transport.
    #[serde(default)]
    pub alink_transport: AlinkTransport,
    /// Connect to xenstored (`XENSTORED_PATH` or `/run/xenstored/socket`): publish the VM
    /// states, read the shims' reports, follow domains.
    #[serde(default)]
    pub xenstore: bool,
}

/// What the agent drives.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DriverMode {
    /// The shims, the domain command: [`crate::drivers`].
    #[default]
    Real,
    /// The recording stand-ins (tests, simulations); must be said explicitly.
    Record,
}

/// The validated driver choice.
#[derive(Clone, Debug)]
pub enum Drivers {
    /// Recording stand-ins.
    Record,
    /// Real components, per VM.
    Real(BTreeMap<VmId, VmDriversFile>),
}

/// The agent's configuration file: the pool settings ([`ConfigFile`]) plus what drives the
/// components (`drivers`, `vm_drivers`).
#[derive(Clone, Debug)]
pub struct AgentFile {
    /// Pool, peers, timing, VMs, status API.
    pub config: ConfigFile,
    /// What drives the components.
    pub drivers: DriverMode,
    /// Each VM's components (`drivers: real`).
    pub vm_drivers: BTreeMap<VmId, VmDriversFile>,
    /// The pool's xapi, when the agent follows the registry (`xapi`).
    pub xapi: Option<XapiFile>,
    /// The availability console (`console`), served when present.
    pub console: Option<crate::console::ConsoleFile>,
}

/// Where the agent reaches the pool's xapi (`"xapi": {...}` in its config): the registry is
/// then the source of the VMs to protect (`crate::xapi`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XapiFile {
    /// `unix:/var/lib/xcp/xapi` in dom0, or `https://<pool master or member>`.
    pub url: String,
    /// The user on the first line, the password on the second (created by the install,
    /// mode 0600); never on the command line.
    pub credential_file: PathBuf,
    /// HTTPS: PEM file of the pool's CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// HTTPS: the server certificate's SHA-256 fingerprint.
    #[serde(default)]
    pub pin_sha256: Option<String>,
    /// How long one `event.from` waits (milliseconds, default 30 000).
    #[serde(default = "default_event_ms")]
    pub event_timeout_ms: u64,
    /// Who starts, pauses and stops the VMs: `"xapi"` (xapi hosts: `VM.start_on`, the
    /// default) or `{"command": {...}}` (xl hosts: the agent runs one host-wide command
    /// template per VM, `crate::xapi::domain_command`).
    #[serde(default)]
    pub domains: DomainsVia,
    /// The agent starts and supervises the VMs' components itself (`crate::xapi::components`).
    #[serde(default)]
    pub components: Option<ComponentsFile>,
    /// How to pause and unpause a VM on this host when xapi cannot be reached (an isolated
    /// host fences its copy without the pool master: `crate::xapi::domain`).
    #[serde(default)]
    pub local_fence: Option<crate::xapi::domain::LocalFence>,
    /// UDP port of the management-network heartbeat path when the peers come from the
    /// registry (`peers` left out: `crate::xapi::membership`).
    #[serde(default = "default_mgmt_port")]
    pub mgmt_port: u16,
}

fn default_mgmt_port() -> u16 {
    crate::xapi::membership::DEFAULT_MGMT_PORT
}

/// Where the supervised components live on this host.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentsFile {
    /// The per-VM runtime directories' parent (default `/run/xenft`).
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// Where the disk copies are kept.
    pub disk_dir: PathBuf,
    /// `xenft-blkback` (default: beside the agent's own binary).
    #[serde(default)]
    pub blkback: Option<PathBuf>,
    /// Size of a disk copy when xapi names no disk for the VM, bytes (otherwise the copy has
    /// the size of the VM's disk, its VDI's `virtual_size`).
    #[serde(default)]
    pub disk_size_bytes: Option<u64>,
    /// The relay (`xenft-netback`) of each protected VM; absent: the agent starts none.
    #[serde(default)]
    pub relay: Option<crate::xapi::relay_plan::RelayFile>,
    /// The checkpoint engine of level-3 VMs (`crate::xapi::engine_plan`): without it a
    /// level-3 VM's plan reports the engine missing.
    #[serde(default)]
    pub checkpoint: Option<crate::xapi::engine_plan::EngineFile>,
    /// How long an A-link path may stay silent before the disk mirror and the checkpoint
    /// engine call it down (milliseconds; default the A-link's own, 500). Slow or heavily
    /// loaded hosts (a nested lab under emulation) need more.
    #[serde(default)]
    pub alink_path_timeout_ms: Option<u64>,
}

fn default_run_dir() -> PathBuf {
    PathBuf::from("/run/xenft")
}

/// Who drives the VMs' domains when the agent follows xapi.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DomainsVia {
    /// XenAPI (`VM.start_on`, `VM.pause`, ...).
    #[default]
    Xapi,
    /// The agent runs the domains from one template (`xl create -F ...`), and records in
    /// xapi where each runs.
    Command(crate::xapi::domain_command::DomainCommands),
}

fn default_event_ms() -> u64 {
    30_000
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DriversPart {
    #[serde(default)]
    drivers: DriverMode,
    #[serde(default)]
    vm_drivers: BTreeMap<VmId, VmDriversFile>,
    #[serde(default)]
    xapi: Option<XapiFile>,
}

impl AgentFile {
    /// Reads and parses an agent config file.
    ///
    /// # Errors
    /// [`ConfigError`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let bytes = read_bounded(path)?;
        Self::parse(&bytes).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses the JSON text of an agent config file.
    ///
    /// # Errors
    /// Not a JSON object, or a field the schema does not know or cannot read.
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let mut top: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes)?;
        let mut part = serde_json::Map::new();
        for key in ["drivers", "vm_drivers", "xapi"] {
            if let Some(v) = top.remove(key) {
                part.insert(key.to_string(), v);
            }
        }
        let d: DriversPart = serde_json::from_value(serde_json::Value::Object(part))?;
        let console = top
            .remove("console")
            .map(serde_json::from_value)
            .transpose()?;
        let config: ConfigFile = serde_json::from_value(serde_json::Value::Object(top))?;
        Ok(Self {
            config,
            drivers: d.drivers,
            vm_drivers: d.vm_drivers,
            xapi: d.xapi,
            console,
        })
    }

    /// The XenAPI follower's settings, if the config has an `xapi` section: the URL parsed,
    /// HTTPS trust required (a CA file or a pin), the credential file read.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the problem.
    pub fn xapi_follower(
        &self,
    ) -> Result<Option<crate::xapi::follower::FollowerConfig>, ConfigError> {
        let Some(x) = &self.xapi else {
            return Ok(None);
        };
        let bad = |s: String| ConfigError::Invalid(format!("xapi: {s}"));
        let endpoint = xenft_xapi::transport::Endpoint::parse(&x.url)
            .map_err(|e| bad(format!("url {:?}: {e}", x.url)))?;
        if x.url.starts_with("https://") && x.ca_file.is_none() && x.pin_sha256.is_none() {
            return Err(bad(
                "an https url needs ca_file or pin_sha256 (the pool's certificate)".into(),
            ));
        }
        if x.url.starts_with("http://") {
            tracing::warn!(url = %x.url, "xapi over plain HTTP: the credentials cross the network unencrypted (tests only)");
        }
        if !(100..=600_000).contains(&x.event_timeout_ms) {
            return Err(bad(format!(
                "event_timeout_ms must be 100..=600000, not {}",
                x.event_timeout_ms
            )));
        }
        if let Some(c) = &x.components {
            if c.disk_size_bytes == Some(0) {
                return Err(bad(
                    "components.disk_size_bytes: 0 is no disk size (leave it out to size every copy from the VM's VDI)".into(),
                ));
            }
            if let Some(r) = &c.relay {
                r.check().map_err(|e| bad(format!("components.{e}")))?;
            }
            if c.alink_path_timeout_ms
                .is_some_and(|ms| !(50..=600_000).contains(&ms))
            {
                return Err(bad(format!(
                    "components.alink_path_timeout_ms must be 50..=600000, not {}",
                    c.alink_path_timeout_ms.unwrap_or_default()
                )));
            }
        }
        if let DomainsVia::Command(t) = &x.domains {
            t.check(x.components.is_some()).map_err(bad)?;
        }
        let credentials = crate::xapi::follower::read_credentials(&x.credential_file)
            .map_err(|e| bad(e.to_string()))?;
        Ok(Some(crate::xapi::follower::FollowerConfig {
            endpoint,
            tls: xenft_xapi::transport::TlsOptions {
                ca_file: x.ca_file.clone(),
                pin_sha256: x.pin_sha256.clone(),
                insecure: false,
            },
            credentials,
            event_timeout: std::time::Duration::from_millis(x.event_timeout_ms),
        }))
    }

    /// Checks the pool settings ([`ConfigFile::validate`]) and the driver sections: with
    /// `"real"` drivers every VM needs an entry with each component its level uses.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first problem.
    pub fn validate(self) -> Result<(ValidConfig, Drivers), ConfigError> {
        let bad = |s: String| Err(ConfigError::Invalid(s));
        let vms = self.config.vms.clone();
        let cfg = self.config.validate()?;
        let vm_names: BTreeSet<&VmId> = vms.iter().map(|v| &v.vm).collect();
        let drivers = match self.drivers {
            DriverMode::Record if !self.vm_drivers.is_empty() => {
                return bad(
                    "vm_drivers is set but drivers is \"record\": the sections would be ignored"
                        .into(),
                )
            }
            DriverMode::Record => Drivers::Record,
            DriverMode::Real => {
                for vm in self.vm_drivers.keys() {
                    if !vm_names.contains(vm) {
                        return bad(format!("vm_drivers.{vm}: not a protected VM"));
                    }
                }
                for v in &vms {
                    let d = self.vm_drivers.get(&v.vm).ok_or_else(|| {
                        ConfigError::Invalid(format!(
                            "VM {}: no vm_drivers entry (drivers are \"real\"; say \"drivers\": \"record\" for stand-ins)",
                            v.vm
                        ))
                    })?;
                    d.check(&v.vm, v.level).map_err(ConfigError::Invalid)?;
                }
                Drivers::Real(self.vm_drivers)
            }
        };
        Ok((cfg, drivers))
    }
}

fn default_log() -> usize {
    1000
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file is too large.
    #[error("{0} is larger than {MAX_CONFIG_FILE} bytes")]
    TooLarge(PathBuf),
    /// Not valid JSON for the schema.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The error.
        source: serde_json::Error,
    },
    /// The secret is too short.
    #[error("the pool secret in {0} is shorter than 16 bytes")]
    WeakSecret(PathBuf),
    /// Bad timing.
    #[error("timing: {0}")]
    Timing(#[from] TimingError),
    /// Anything else, in words.
    #[error("{0}")]
    Invalid(String),
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let io = |source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.len() > MAX_CONFIG_FILE {
        return Err(ConfigError::TooLarge(path.to_path_buf()));
    }
    std::fs::read(path).map_err(io)
}

/// Reads a secret file (trailing whitespace removed, at least 16 bytes).
///
/// # Errors
/// [`ConfigError`].
pub fn read_secret(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let mut s = read_bounded(path)?;
    while s.last().is_some_and(u8::is_ascii_whitespace) {
        s.pop();
    }
    if s.len() < 16 {
        return Err(ConfigError::WeakSecret(path.to_path_buf()));
    }
    Ok(s)
}

/// A checked configuration, ready to run.
#[derive(Clone, Debug)]
pub struct ValidConfig {
    /// The core's settings.
    pub core: CoreConfig,
    /// Pool secret.
    pub secret: Vec<u8>,
    /// State file path.
    pub state_file: PathBuf,
    /// Heartbeat paths: (peer, path, addresses).
    pub paths: Vec<(HostId, PathId, PathAddrs)>,
    /// Storage heartbeat directory.
    pub storage_dir: Option<PathBuf>,
    /// Quorum servers in order.
    pub quorum: Vec<SocketAddr>,
    /// Status listen address.
    pub status_listen: SocketAddr,
    /// Status token (required off loopback).
    pub status_token: Option<String>,
    /// VMs to protect.
    pub vms: Vec<VmSpec>,
    /// Free memory, if configured.
    pub free_memory_mb: Option<u64>,
    /// Event log length.
    pub event_log: usize,
    /// A-link heartbeat transport.
    pub alink_transport: AlinkTransport,
    /// Use xenstore.
    pub xenstore: bool,
}

impl ConfigFile {
    /// Reads and parses a config file.
    ///
    /// # Errors
    /// [`ConfigError`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let bytes = read_bounded(path)?;
        serde_json::from_slice(&bytes).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Checks everything and reads the secret and token files.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first problem.
    pub fn validate(self) -> Result<ValidConfig, ConfigError> {
        let bad = |s: String| Err(ConfigError::Invalid(s));
        self.timing.validate()?;
        if self.peers.is_empty() {
            return bad(
                "at least one peer is needed (or an xapi section: the peers then come from the pool's registry)"
                    .into(),
            );
        }
        if self.quorum.len() > 2 {
            return bad(format!(
                "{} quorum servers configured, at most 2 (preferred, alternate)",
                self.quorum.len()
            ));
        }
        let mut names = BTreeSet::new();
        let alinks = self.peers[0].alink.len();
        let mut paths = Vec::new();
        for p in &self.peers {
            if p.host == self.host || !names.insert(p.host.clone()) {
                return bad(format!("peer {} is this host or listed twice", p.host));
            }
            if p.alink.len() != alinks || alinks > MAX_ALINK_PATHS {
                return bad(format!(
                    "every peer needs the same number of A-link paths (1 to {MAX_ALINK_PATHS}); {} has {}",
                    p.host,
                    p.alink.len()
                ));
            }
            for (i, a) in p.alink.iter().enumerate() {
                let i =
                    u8::try_from(i).map_err(|_| ConfigError::Invalid("too many paths".into()))?;
                paths.push((p.host.clone(), PathId::Alink(i), a.clone()));
            }
            if let Some(m) = &p.mgmt {
                paths.push((p.host.clone(), PathId::Mgmt, m.clone()));
            }
        }
        if alinks == 0 && self.peers.iter().all(|p| p.mgmt.is_none()) {
            return bad("no heartbeat path configured".into());
        }
        let mgmt = self.peers.iter().any(|p| p.mgmt.is_some());
        if self.vms.len() > MAX_VMS {
            return bad(format!("{} VMs, at most {MAX_VMS}", self.vms.len()));
        }
        let mut vm_names = BTreeSet::new();
        for v in &self.vms {
            if !vm_names.insert(v.vm.clone()) {
                return bad(format!("VM {} listed twice", v.vm));
            }
            if v.primary == v.secondary {
                return bad(format!(
                    "VM {}: primary and secondary are the same host",
                    v.vm
                ));
            }
            for h in [&v.primary, &v.secondary] {
                if *h != self.host && !names.contains(h) {
                    return bad(format!("VM {}: host {h} is not in the pool", v.vm));
                }
            }
            if v.memory_mb == 0 {
                return bad(format!("VM {}: memory_mb is 0", v.vm));
            }
        }
        let status_token = match &self.status.token_file {
            Some(p) => Some(
                String::from_utf8(read_secret(p)?)
                    .map_err(|_| ConfigError::Invalid("status token is not UTF-8".into()))?,
            ),
            None => None,
        };
        if !self.status.listen.ip().is_loopback() && status_token.is_none() {
            return bad(format!(
                "status API on {} is not loopback: a token_file is required",
                self.status.listen
            ));
        }
        let secret = read_secret(&self.secret_file)?;
        let mut peers: Vec<HostId> = self.peers.iter().map(|p| p.host.clone()).collect();
        peers.push(self.host.clone());
        Ok(ValidConfig {
            core: CoreConfig {
                me: self.host,
                peers,
                alink_paths: u8::try_from(alinks).unwrap_or(0),
                mgmt_heartbeat: mgmt,
                storage_heartbeat: self.storage_heartbeat_dir.is_some(),
                quorum_servers: self.quorum.len(),
                timing: self.timing,
            },
            secret,
            state_file: self.state_file,
            paths,
            storage_dir: self.storage_heartbeat_dir,
            quorum: self.quorum,
            status_listen: self.status.listen,
            status_token,
            vms: self.vms,
            free_memory_mb: self.free_memory_mb,
            event_log: self.event_log.clamp(1, 100_000),
            alink_transport: self.alink_transport,
            xenstore: self.xenstore,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, json: &str) -> PathBuf {
        let secret = dir.join("secret");
        std::fs::write(&secret, "0123456789abcdef0123\n").unwrap();
        let p = dir.join("agent.json");
        std::fs::write(&p, json.replace("SECRET", secret.to_str().unwrap())).unwrap();
        p
    }

    const GOOD: &str = r#"{
        "host": "h1", "secret_file": "SECRET", "state_file": "/tmp/x.json",
        "peers": [{"host": "h2", "alink": [{"local": "127.0.0.1:1", "peer": "127.0.0.1:2"}]}],
        "vms": [{"vm": "web", "level": 3, "primary": "h1", "secondary": "h2", "memory_mb": 512}],
        "xenstore": false
    }"#;

    #[test]
    fn a_good_config_validates() {
        let d = tempfile::tempdir().unwrap();
        let c = ConfigFile::load(&write(d.path(), GOOD))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.core.alink_paths, 1);
        assert_eq!(c.secret.len(), 20);
        assert!(c.status_listen.ip().is_loopback());
    }

    #[test]
    fn status_off_loopback_without_token_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let json = GOOD.replace(r#""vms""#, r#""status": {"listen": "0.0.0.0:7481"}, "vms""#);
        let e = ConfigFile::load(&write(d.path(), &json))
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("token_file"), "{e}");
    }

    #[test]
    fn an_xapi_section_is_checked_and_its_credentials_read() {
        let d = tempfile::tempdir().unwrap();
        let cred = d.path().join("cred");
        std::fs::write(&cred, "root\nxenroot\n").unwrap();
        let with = |x: &str| {
            GOOD.replace(
                r#""host": "h1","#,
                &format!(r#""host": "h1", "xapi": {x},"#),
            )
        };
        let follower = |x: &str| {
            AgentFile::parse(with(x).as_bytes())
                .unwrap()
                .xapi_follower()
        };
        let c = follower(&format!(
            r#"{{"url": "unix:/var/lib/xcp/xapi", "credential_file": {:?}}}"#,
            cred
        ))
        .unwrap()
        .unwrap();
        assert_eq!(c.credentials.user, "root");
        let e = follower(&format!(
            r#"{{"url": "https://192.0.2.1", "credential_file": {cred:?}}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("ca_file or pin_sha256"), "{e}");
        let e = follower(&format!(
            r#"{{"url": "ftp://x", "credential_file": {cred:?}}}"#
        ))
        .unwrap_err();
        assert!(e.to_string().contains("ftp://x"), "{e}");
        let e =
            follower(r#"{"url": "unix:/x", "credential_file": "/nonexistent/cred"}"#).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/cred"), "{e}");
        assert!(AgentFile::parse(with(r#"{"url": "unix:/x"}"#).as_bytes()).is_err());
        // Domains run by the agent from a template: checked before anything starts.
        let domains = |d: &str, extra: &str| {
            follower(&format!(
                r#"{{"url": "unix:/x", "credential_file": {cred:?}, "domains": {d}{extra}}}"#
            ))
        };
        let xl = r#"{"command": {"start": ["xl", "create", "-F", "/etc/xen/{name}.cfg"], "pause": ["xl", "pause", "{name}"]}}"#;
        domains(xl, "").unwrap().unwrap();
        domains(r#""xapi""#, "").unwrap().unwrap();
        let e = domains(r#"{"command": {"start": ["x", "{domid}"]}}"#, "").unwrap_err();
        assert!(e.to_string().contains("unknown placeholder"), "{e}");
        let e = domains(r#"{"command": {"start": ["attach", "{nbd}"]}}"#, "").unwrap_err();
        assert!(e.to_string().contains("need xapi.components"), "{e}");
        domains(
            r#"{"command": {"start": ["attach", "{nbd}"]}}"#,
            r#", "components": {"disk_dir": "/d", "alink_path_timeout_ms": 8000}"#,
        )
        .unwrap()
        .unwrap();
        let e = domains(
            xl,
            r#", "components": {"disk_dir": "/d", "alink_path_timeout_ms": 0}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("alink_path_timeout_ms"), "{e}");
        assert!(AgentFile::parse(
            with(r#"{"url": "unix:/x", "credential_file": "/c", "domains": "command"}"#).as_bytes()
        )
        .is_err());
        assert!(AgentFile::parse(GOOD.as_bytes())
            .unwrap()
            .xapi_follower()
            .unwrap()
            .is_none());
    }

    #[test]
    fn vm_on_unknown_host_and_unknown_fields_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let e = ConfigFile::load(&write(
            d.path(),
            &GOOD.replace(r#""secondary": "h2""#, r#""secondary": "h9""#),
        ))
        .unwrap()
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("h9"), "{e}");
        let e = ConfigFile::load(&write(
            d.path(),
            &GOOD.replace(r#""host": "h1","#, r#""host": "h1", "bogus": 1,"#),
        ))
        .unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }));
    }

    #[test]
    fn the_documented_example_parses_and_validates() {
        let src = include_str!("config.rs");
        let start = src.find("//! ```json").unwrap();
        let end = start + src[start..].find("//! ```\n").unwrap();
        let json: String = src[start..end]
            .lines()
            .skip(1)
            .map(|l| l.trim_start_matches("//!").trim_start())
            .collect::<Vec<_>>()
            .join("\n");
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, "0123456789abcdef0123").unwrap();
        let json = json.replace("/etc/xenft/pool-secret", secret.to_str().unwrap());
        let (v, drivers) = AgentFile::parse(json.as_bytes())
            .unwrap()
            .validate()
            .unwrap();
        assert!(matches!(drivers, Drivers::Real(m) if m.len() == 1));
        assert_eq!(v.quorum.len(), 2);
        assert!(v.xenstore && v.core.storage_heartbeat);
    }

    fn validate(json: &str) -> Result<(ValidConfig, Drivers), ConfigError> {
        let d = tempfile::tempdir().map_err(|source| ConfigError::Io {
            path: PathBuf::from("tempdir"),
            source,
        })?;
        AgentFile::load(&write(d.path(), json))?.validate()
    }

    const REAL: &str = r#""drivers": "real", "vm_drivers": {"web": {
        "domain": {"command": ["/bin/sleep", "1000"]},
        "blkback": {"control": "/run/xenft/web-blk.sock"},
        "netback": {"control": "/run/xenft/web-net.sock", "addresses": ["10.0.0.5"]}}}"#;

    #[test]
    fn a_config_without_drivers_needs_real_driver_sections() {
        let l2 = GOOD.replace(r#""level": 3"#, r#""level": 2"#);
        let e = validate(&l2).unwrap_err();
        assert!(e.to_string().contains("no vm_drivers entry"), "{e}");
        let real = l2.replace(r#""xenstore": false"#, REAL);
        let (_, drivers) = validate(&real).unwrap();
        assert!(matches!(&drivers, Drivers::Real(m) if m.len() == 1));
        let record = l2.replace(r#""xenstore": false"#, r#""drivers": "record""#);
        assert!(matches!(validate(&record).unwrap().1, Drivers::Record));
    }

    #[test]
    fn driver_sections_are_checked() {
        let l2 = GOOD.replace(r#""level": 3"#, r#""level": 2"#);
        let cases = [
            (REAL.replace(r#""netback": {"control": "/run/xenft/web-net.sock", "addresses": ["10.0.0.5"]}"#, r#""netback": null"#), "netback"),
            (REAL.replace("/run/xenft/web-blk.sock", "relative.sock"), "absolute"),
            (REAL.replace(r#"["/bin/sleep", "1000"]"#, "[]"), "command is empty"),
            (REAL.replace(r#""vm_drivers": {"web""#, r#""vm_drivers": {"other""#), "not a protected VM"),
        ];
        for (drivers, want) in cases {
            let e = validate(&l2.replace(r#""xenstore": false"#, &drivers)).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
        let typo = l2.replace(
            r#""xenstore": false"#,
            &REAL.replace(
                r#""control": "/run/xenft/web-blk.sock""#,
                r#""contrl": "/x""#,
            ),
        );
        assert!(matches!(
            validate(&typo).unwrap_err(),
            ConfigError::Parse { .. }
        ));
    }

    #[test]
    fn level_3_with_real_drivers_needs_the_checkpoint_engine() {
        let e = validate(&GOOD.replace(r#""xenstore": false"#, REAL)).unwrap_err();
        assert!(
            e.to_string().contains("level 3 needs a \"checkpoint\""),
            "{e}"
        );
        let with = REAL.replace(
            r#""domain""#,
            r#""checkpoint": {"control": "/run/xenft/web-ckpt.sock"}, "domain""#,
        );
        let e = validate(&GOOD.replace(r#""xenstore": false"#, &with)).unwrap_err();
        assert!(e.to_string().contains("after_resume is required"), "{e}");
        let real3 = REAL.replace(
            r#""command": ["/bin/sleep", "1000"]"#,
            r#""command": ["/bin/sleep", "1000"], "after_resume": "start""#,
        );
        let with = real3.replace(
            r#""domain""#,
            r#""checkpoint": {"control": "/run/xenft/web-ckpt.sock"}, "domain""#,
        );
        validate(&GOOD.replace(r#""xenstore": false"#, &with)).unwrap();
        let peer = |p: &str| {
            real3.replace(
                r#""domain""#,
                &format!(
                    r#""checkpoint": {{"control": "/run/xenft/web-ckpt.sock", "peer_listen": "{p}"}}, "domain""#
                ),
            )
        };
        validate(&GOOD.replace(r#""xenstore": false"#, &peer("/run/xenft/peer-ck.sock"))).unwrap();
        validate(&GOOD.replace(r#""xenstore": false"#, &peer("alink"))).unwrap();
        for bad in [
            "relative.sock".to_string(),
            format!("/{}", "x".repeat(200)),
            "ALINK".to_string(),
            "alink ".to_string(),
        ] {
            let e = validate(&GOOD.replace(r#""xenstore": false"#, &peer(&bad))).unwrap_err();
            assert!(e.to_string().contains("peer_listen"), "{bad}: {e}");
        }
    }

    #[test]
    fn driver_sections_with_recording_stand_ins_are_refused() {
        let both = GOOD.replace(
            r#""xenstore": false"#,
            &REAL.replace(r#""drivers": "real""#, r#""drivers": "record""#),
        );
        let e = validate(&both).unwrap_err();
        assert!(e.to_string().contains("ignored"), "{e}");
    }

    #[test]
    fn three_quorum_servers_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let json = GOOD.replace(
            r#""vms""#,
            r#""quorum": ["127.0.0.1:1","127.0.0.1:2","127.0.0.1:3"], "vms""#,
        );
        let e = ConfigFile::load(&write(d.path(), &json))
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("at most 2"), "{e}");
    }
}
