//! The real implementations of the [`crate::seams`] traits, and their per-VM configuration.
//!
//! - [`blkback::BlkbackDriver`] ([`DiskMirror`]): one VM's `xenft-blkback` control socket —
//!   wait for sync with progress, suspend, remote-mode redirect, promote the secondary copy on
//!   take-over (level 3: commit the held disk epochs up to the memory replica's checkpoint,
//!   discard the rest);
//! - [`netback::NetbackDriver`] ([`NetRelay`]): one VM's `xenft-netback` control socket —
//!   uplink redirect through the A-link tunnel, take-over announcement (GARP / NA) with
//!   buffered output dropped and pass-through from then on, isolation of a fenced copy;
//! - [`checkpoint::CheckpointDriver`] ([`Checkpointer`]): the level-3 engine's control socket
//!   — on the secondary, freeze the replica at its last committed checkpoint, then resume it;
//!   where the VM runs (a resumed replica, or a controlled primary whose secondary went away),
//!   after the disk resync, `protect` the guest toward the peer's fresh secondary
//!   (`checkpoint.peer_listen`: a socket, or `"alink"` for the engine's own A-link); with a
//!   runtime directory, supervised engines by convention ([`supervised_checkpoints`]);
//! - [`events`]: each VM's blkback and netback events followed and turned into the core's
//!   component-fault inputs (class (d): disk or uplink redirected through the peer, no
//!   failover);
//! - [`domain::CommandDomain`] ([`crate::seams::DomainStarter`]): the local pool's VM as a
//!   process (started again after a level-3 take-over when `after_resume` says so);
//! - [`control`]: the drivers speak to the components only through the control contract's
//!   client (`xenft_control::Client`: typed requests and replies, bounded, timed out).
//!
//! [`publish_reports`] puts what the shims report (disk role, link, dirty bytes, resync
//! progress; relay mode and epochs) into the status API every second.
//!
//! Not here: the XenAPI domain starter (`VM.start_on`, not written yet), and the primary-side
//! wiring of the checkpoint engine's commit hook to the shims, which the engine's primary does
//! itself (`xenft-checkpoint primary --blkback-control --netback-control`). Components are
//! started either by the host (this module's per-VM config) or by the agent's supervisor
//! (`crate::xapi::components`, sockets by [`Convention`]). Every component a VM's
//! level needs must be configured ([`VmDriversFile::check`]), so a production config never
//! runs a stand-in silently.

pub mod blkback;
pub mod checkpoint;
pub mod control;
pub mod domain;
pub mod events;
pub mod netback;
pub mod supervised;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::ids::{HostId, VmId};
use crate::lifecycle::Level;
use crate::seams::{Checkpointer, DiskMirror, NetRelay, SeamError, Seams};
use blkback::BlkbackDriver;
use checkpoint::CheckpointDriver;
use control::Client;
pub use domain::AfterResume;
use domain::CommandDomain;
use netback::NetbackDriver;

/// Longest accepted timeout (one day).
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;
/// Most arguments of a domain command.
pub const MAX_COMMAND_ARGS: usize = 256;

fn default_request_timeout() -> u64 {
    5000
}

fn default_sync_timeout() -> u64 {
    3_600_000
}

/// Domain control of one VM.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainFile {
    /// The local pool's VM: program and arguments (e.g. the synthetic guest).
    pub command: Vec<String>,
    /// After a level-3 take-over (memory resumed here): `"start"` the command unless it runs
    /// (the local pool), or `"nothing"` (xl hosts: the resumed replica is the domain).
    /// Required at level 3.
    #[serde(default)]
    pub after_resume: Option<AfterResume>,
}

/// One VM's `xenft-blkback`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlkbackFile {
    /// Its control socket.
    pub control: PathBuf,
    /// One control request at most this long (milliseconds).
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    /// A sync (full or dirty-only) at most this long (milliseconds).
    #[serde(default = "default_sync_timeout")]
    pub sync_timeout_ms: u64,
}

/// One VM's `xenft-netback`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetbackFile {
    /// Its control socket.
    pub control: PathBuf,
    /// The VM's addresses to announce on take-over.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// One control request at most this long (milliseconds).
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
}

/// One VM's checkpoint-engine secondary (level 3).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointFile {
    /// Its control socket (`xenft-checkpoint secondary --control`).
    pub control: PathBuf,
    /// One control request at most this long (milliseconds; `stop` joins the receiver).
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    /// The peer host's `xenft-checkpoint secondary --listen` socket, or `"alink"`: the peer
    /// is reached over the engine's own A-link (plain `protect`). After a take-over the
    /// guest runs in this host's resumed replica; when the peer returns (a fresh secondary
    /// listening there) and the disk is resynced, the agent asks the engine to `protect`
    /// toward it. Without it a level-3 VM cannot be re-protected after a take-over here.
    #[serde(default)]
    pub peer_listen: Option<PathBuf>,
    /// Re-protection at most this long (milliseconds): until the peer's secondary listens and
    /// holds the first checkpoint (pre-copy of the whole memory included).
    #[serde(default = "default_protect_timeout")]
    pub protect_timeout_ms: u64,
}

fn default_protect_timeout() -> u64 {
    120_000
}

/// The components of one VM (`vm_drivers.<vm>` in the agent's config).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDriversFile {
    /// Domain control (every level).
    pub domain: Option<DomainFile>,
    /// Disk mirror (level 2 and 3).
    pub blkback: Option<BlkbackFile>,
    /// Network relay (level 2 and 3).
    pub netback: Option<NetbackFile>,
    /// Checkpoint engine (level 3).
    pub checkpoint: Option<CheckpointFile>,
}

fn check_timeout(vm: &VmId, what: &str, ms: u64) -> Result<(), String> {
    if ms == 0 || ms > MAX_TIMEOUT_MS {
        return Err(format!(
            "vm_drivers.{vm}.{what}: must be 1..={MAX_TIMEOUT_MS} ms, not {ms}"
        ));
    }
    Ok(())
}

fn check_socket(vm: &VmId, what: &str, p: &std::path::Path) -> Result<(), String> {
    if !p.is_absolute() {
        return Err(format!(
            "vm_drivers.{vm}.{what}.control: {} is not an absolute path",
            p.display()
        ));
    }
    Ok(())
}

/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

fn check_peer_listen(vm: &VmId, p: &std::path::Path) -> Result<(), String> {
    let s = p.to_str().unwrap_or_default();
    if s == checkpoint::PEER_ALINK {
        return Ok(());
    }
    if !p.is_absolute()
        || s.is_empty()
        || s.len() > MAX_SOCKET_PATH
        || s.chars().any(char::is_control)
    {
        return Err(format!(
            "vm_drivers.{vm}.checkpoint.peer_listen: {} must be \"{}\" (the engine's own \
             A-link) or an absolute path of at most {MAX_SOCKET_PATH} bytes",
            p.display(),
            checkpoint::PEER_ALINK
        ));
    }
    Ok(())
}

impl VmDriversFile {
    /// Checks that every component `level` needs is configured, and sane.
    ///
    /// # Errors
    /// The problem, in words.
    pub fn check(&self, vm: &VmId, level: Level) -> Result<(), String> {
        let d = self
            .domain
            .as_ref()
            .ok_or_else(|| format!("vm_drivers.{vm}: a \"domain\" section is required"))?;
        if d.command.is_empty() || d.command[0].is_empty() {
            return Err(format!("vm_drivers.{vm}.domain.command is empty"));
        }
        if d.command.len() > MAX_COMMAND_ARGS {
            return Err(format!(
                "vm_drivers.{vm}.domain.command has more than {MAX_COMMAND_ARGS} arguments"
            ));
        }
        match (&self.checkpoint, level == Level::L3) {
            (None, true) => {
                return Err(format!(
                    "vm_drivers.{vm}: level 3 needs a \"checkpoint\" section"
                ))
            }
            (Some(c), _) => {
                check_socket(vm, "checkpoint", &c.control)?;
                check_timeout(vm, "checkpoint.request_timeout_ms", c.request_timeout_ms)?;
                check_timeout(vm, "checkpoint.protect_timeout_ms", c.protect_timeout_ms)?;
                if let Some(p) = &c.peer_listen {
                    check_peer_listen(vm, p)?;
                }
            }
            (None, false) => {}
        }
        if level == Level::L3 && d.after_resume.is_none() {
            return Err(format!(
                "vm_drivers.{vm}.domain.after_resume is required at level 3: \"start\" (the \
                 VM's process runs beside the resumed memory replica) or \"nothing\" (the \
                 resumed replica is the domain, xl hosts)"
            ));
        }
        let needs_shims = level != Level::L1;
        match (&self.blkback, needs_shims) {
            (None, true) => {
                return Err(format!(
                    "vm_drivers.{vm}: level 2 needs a \"blkback\" section"
                ))
            }
            (Some(b), _) => {
                check_socket(vm, "blkback", &b.control)?;
                check_timeout(vm, "blkback.request_timeout_ms", b.request_timeout_ms)?;
                check_timeout(vm, "blkback.sync_timeout_ms", b.sync_timeout_ms)?;
            }
            (None, false) => {}
        }
        match (&self.netback, needs_shims) {
            (None, true) => {
                return Err(format!(
                    "vm_drivers.{vm}: level 2 needs a \"netback\" section"
                ))
            }
            (Some(n), _) => {
                check_socket(vm, "netback", &n.control)?;
                check_timeout(vm, "netback.request_timeout_ms", n.request_timeout_ms)?;
                if n.addresses.len() > 64 {
                    return Err(format!("vm_drivers.{vm}.netback.addresses: at most 64"));
                }
            }
            (None, false) => {}
        }
        Ok(())
    }
}

/// The disk mirror of each VM that has one.
/// The disk mirror of each VM: the configured ones, and — with a runtime directory (the
/// agent supervises the components, `crate::xapi::components`) — any VM whose blkback serves
/// `<run_dir>/<vm>/blkback.sock`.
struct DiskByVm {
    configured: BTreeMap<VmId, BlkbackDriver>,
    convention: Option<Convention>,
}

/// Where supervised components' control sockets are, and the drivers' timeouts.
#[derive(Debug, Clone)]
pub struct Convention {
    /// The per-VM runtime directories' parent.
    pub run_dir: PathBuf,
    /// One control request at most this long.
    pub request_timeout: Duration,
    /// A sync at most this long.
    pub sync_timeout: Duration,
}

impl DiskByVm {
    /// The VM's driver: configured, or by convention when its socket exists.
    fn get(&self, vm: &VmId) -> Option<BlkbackDriver> {
        self.get_or_expected(vm, false)
    }

    /// With `expected`, a supervised VM's driver even before its blkback is up (a sync waits
    /// for the socket: the supervisor may start the component just after the core asks).
    fn get_or_expected(&self, vm: &VmId, expected: bool) -> Option<BlkbackDriver> {
        if let Some(d) = self.configured.get(vm) {
            return Some(d.clone());
        }
        let c = self.convention.as_ref()?;
        let sock = c.run_dir.join(vm.as_str()).join("blkback.sock");
        (expected || sock.exists())
            .then(|| BlkbackDriver::new(Client::new(sock, c.request_timeout), c.sync_timeout))
    }
}

/// The disk mirrors of VMs whose components the agent supervises (sockets by `convention`).
#[must_use]
pub fn supervised_disks(convention: Convention) -> Arc<dyn DiskMirror> {
    Arc::new(DiskByVm {
        configured: BTreeMap::new(),
        convention: Some(convention),
    })
}

fn missing(component: &'static str, op: &'static str, vm: &VmId) -> SeamError {
    SeamError {
        component,
        operation: op,
        vm: vm.clone(),
        reason: format!("no {component} configured for this VM"),
    }
}

impl DiskMirror for DiskByVm {
    fn sync(&self, vm: &VmId, peer: &HostId, full: bool) -> Result<(), SeamError> {
        self.get_or_expected(vm, true)
            .ok_or_else(|| missing("blkback", "sync", vm))?
            .sync(vm, peer, full)
    }
    fn suspend(&self, vm: &VmId) -> Result<(), SeamError> {
        // Level 1: nothing replicates.
        self.get(vm).map_or(Ok(()), |d| d.suspend(vm))
    }
    fn redirect(&self, vm: &VmId, on: bool) -> Result<(), SeamError> {
        self.get(vm)
            .ok_or_else(|| missing("blkback", "redirect", vm))?
            .redirect(vm, on)
    }
    fn promote(&self, vm: &VmId, commit_epoch: Option<u64>) -> Result<(), SeamError> {
        // Level 1: the VM boots from its (shared) disk; nothing to promote.
        self.get(vm).map_or(Ok(()), |d| d.promote(vm, commit_epoch))
    }
    fn report(&self, vm: &VmId) -> Option<serde_json::Value> {
        self.get(vm).and_then(|d| d.report(vm))
    }
}

/// The network relay of each VM that has one.
struct NetByVm(BTreeMap<VmId, NetbackDriver>);

impl NetRelay for NetByVm {
    fn redirect(&self, vm: &VmId, on: bool) -> Result<(), SeamError> {
        self.0
            .get(vm)
            .ok_or_else(|| missing("netback", "redirect", vm))?
            .redirect(vm, on)
    }
    fn announce(&self, vm: &VmId) -> Result<(), SeamError> {
        // Level 1: the rebooted VM announces itself.
        self.0.get(vm).map_or(Ok(()), |d| d.announce(vm))
    }
    fn isolate(&self, vm: &VmId, on: bool) -> Result<(), SeamError> {
        // Level 1: no relay; the domain's pause is the fence.
        self.0.get(vm).map_or(Ok(()), |d| d.isolate(vm, on))
    }
    fn report(&self, vm: &VmId) -> Option<serde_json::Value> {
        self.0.get(vm).and_then(|d| d.report(vm))
    }
}

/// The checkpoint engine of each level-3 VM: the configured ones, and — with a runtime
/// directory (the agent supervises the components) — any VM whose engine serves, or was
/// started to serve, `<run_dir>/<vm>/checkpoint.sock`.
struct CheckpointByVm {
    configured: BTreeMap<VmId, CheckpointDriver>,
    convention: Option<Convention>,
}

impl CheckpointByVm {
    /// The VM's driver: configured, or by convention when its engine runs here (its socket or
    /// the supervisor's pid file exists). A supervised engine protects over its own A-link
    /// (the plan starts it so), and its socket is expected.
    fn get(&self, vm: &VmId) -> Option<CheckpointDriver> {
        if let Some(d) = self.configured.get(vm) {
            return Some(d.clone());
        }
        let c = self.convention.as_ref()?;
        let dir = c.run_dir.join(vm.as_str());
        let sock = dir.join("checkpoint.sock");
        (sock.exists() || dir.join("checkpoint.pid").exists()).then(|| {
            CheckpointDriver::new(Client::new(sock, c.request_timeout))
                .with_peer_listen(Some(checkpoint::PEER_ALINK.into()))
                .expecting_socket()
        })
    }
}

/// The checkpoint engines of VMs whose components the agent supervises (sockets by
/// `convention`): the agent's [`Checkpointer`] is then each VM's [`CheckpointDriver`].
#[must_use]
pub fn supervised_checkpoints(convention: Convention) -> Arc<dyn Checkpointer> {
    Arc::new(CheckpointByVm {
        configured: BTreeMap::new(),
        convention: Some(convention),
    })
}

impl Checkpointer for CheckpointByVm {
    fn committed_epoch(&self, vm: &VmId) -> Result<Option<u64>, SeamError> {
        self.get(vm)
            .ok_or_else(|| missing("checkpoint", "committed-epoch", vm))?
            .committed_epoch(vm)
    }
    fn resume_last_epoch(&self, vm: &VmId) -> Result<(), SeamError> {
        self.get(vm)
            .ok_or_else(|| missing("checkpoint", "resume", vm))?
            .resume_last_epoch(vm)
    }
    fn protect(&self, vm: &VmId, peer: &HostId) -> Result<(), SeamError> {
        // Levels 1 and 2: no memory replication.
        self.get(vm).map_or(Ok(()), |d| d.protect(vm, peer))
    }
    fn report(&self, vm: &VmId) -> Option<serde_json::Value> {
        self.get(vm).and_then(|d| d.status_report())
    }
}

/// The seams over the real components of every VM (validated sections). `domain_state`: where
/// the local VM processes' pids are kept across agent restarts.
#[must_use]
pub fn real_seams(
    vms: &BTreeMap<VmId, VmDriversFile>,
    domain_state: Option<std::path::PathBuf>,
) -> Seams {
    let ms = Duration::from_millis;
    let mut disks = BTreeMap::new();
    let mut nets = BTreeMap::new();
    let mut commands = BTreeMap::new();
    let mut after_resume = BTreeMap::new();
    let mut checkpoints = BTreeMap::new();
    for (vm, d) in vms {
        if let Some(c) = &d.checkpoint {
            checkpoints.insert(
                vm.clone(),
                CheckpointDriver::new(Client::new(&c.control, ms(c.request_timeout_ms)))
                    .with_peer_listen(c.peer_listen.clone())
                    .with_protect_wait(ms(c.protect_timeout_ms)),
            );
        }
        if let Some(dom) = &d.domain {
            commands.insert(vm.clone(), dom.command.clone());
            if let Some(a) = dom.after_resume {
                after_resume.insert(vm.clone(), a);
            }
        }
        if let Some(b) = &d.blkback {
            disks.insert(
                vm.clone(),
                BlkbackDriver::new(
                    Client::new(&b.control, ms(b.request_timeout_ms)),
                    ms(b.sync_timeout_ms),
                ),
            );
        }
        if let Some(n) = &d.netback {
            nets.insert(
                vm.clone(),
                NetbackDriver::new(
                    Client::new(&n.control, ms(n.request_timeout_ms)),
                    n.addresses.clone(),
                ),
            );
        }
    }
    Seams {
        domains: Arc::new(
            CommandDomain::new(commands, domain_state).with_after_resume(after_resume),
        ),
        disk: Arc::new(DiskByVm {
            configured: disks,
            convention: None,
        }),
        net: Arc::new(NetByVm(nets)),
        checkpoint: Arc::new(CheckpointByVm {
            configured: checkpoints,
            convention: None,
        }),
    }
}

/// Publishes what each VM's components report into the status API every second, until
/// `stop` turns true: the configured `vms` and every VM the core protects (those of the
/// registry, in xapi mode). (Blocking control-socket requests run on a blocking thread.)
pub async fn publish_reports(
    seams: Seams,
    vms: Vec<VmId>,
    hub: Arc<crate::status::StatusHub>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let mut list = vms.clone();
        for v in hub.snapshot().vms {
            if !list.contains(&v.record.vm) {
                list.push(v.record.vm);
            }
        }
        let s = seams.clone();
        let reports = tokio::task::spawn_blocking(move || {
            list.iter()
                .map(|vm| {
                    let mut v = serde_json::Map::new();
                    if let Some(d) = s.disk.report(vm) {
                        v.insert("disk".into(), d);
                    }
                    if let Some(n) = s.net.report(vm) {
                        v.insert("net".into(), n);
                    }
                    if let Some(c) = s.checkpoint.report(vm) {
                        v.insert("checkpoint".into(), c);
                    }
                    (vm.as_str().to_string(), serde_json::Value::Object(v))
                })
                .collect::<BTreeMap<_, _>>()
        })
        .await;
        if let Ok(r) = reports {
            hub.update(|s| s.components = r);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}
