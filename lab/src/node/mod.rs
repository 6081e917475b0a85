//! The per-host node process (started by `up` inside a host namespace): the product's agent
//! ([`xenft_agent::runtime::Agent`]), the production disk and network drivers over this host's
//! `xenft-blkback` and `xenft-netback` processes, and lab implementations of the domain and
//! checkpoint seams.
//!
//! The agent decides — membership over the A-link (heartbeat channel of a
//! [`xenft_alink::Link`]) and the management network (UDP through the quorum namespace),
//! quorum leases from `xenft-quorum`, fencing, take-over, re-protection — and its commands
//! are carried out:
//!
//! | agent seam | what runs |
//! |---|---|
//! | `DiskMirror` (sync, suspend, redirect, promote) | production: [`xenft_agent::drivers::blkback::BlkbackDriver`] on this host's `xenft-blkback` (primary serving the VM's disk over NBD and mirroring it over its own A-link, or the secondary holding the copy; promoted on take-over); blkback's events reach the agent through [`xenft_agent::drivers::events::follow`] |
//! | `Checkpointer::resume_last_epoch` | lab: checkpoint secondary failover (guest resumed from the last committed epoch), the service reconnects to the promoted blkback's NBD export, recovers its counter from it and claims the service address |
//! | `Checkpointer::protect` | lab: starts the checkpoint stream to the peer on this host's replication link and returns once a checkpoint is committed |
//! | `NetRelay` (announce, redirect) | production: [`xenft_agent::drivers::netback::NetbackDriver`] on this host's `xenft-netback` (relay between the VM's vif `vif0` — its far end `vm0` in the VM's namespace holds the service address — and the uplink `prod0`; pass-through where the VM runs, standby on the other host; take-over announcement; the uplink redirect tunnels the VM's frames to the peer's relay over their own A-link); netback's events reach the agent through the same follower |
//! | `DomainStarter::pause` / `resume` | lab: fence: the service stops answering and the VM's interface drops the address, the guest gets SIGSTOP (and back) |
//! | `DomainStarter::destroy` | lab: the peer owns the VM: drop the copy, stop blkback and netback and restart this node process, which then follows the agent as the secondary |
//!
//! Replication links: one per direction ([`Host::replication_port`]), so a node that took the
//! VM over replicates back to its peer on a link its process never used (a link's channels
//! can be taken once). A node that stops running the VM restarts itself (`exec`) instead of
//! reusing a link. A restarted node reads the agent's persisted state and waits as `standby`
//! until its agent knows who runs the VM; when the peer does, it becomes the secondary (fresh
//! replica memory, disk copy marked fresh: the new primary runs a full disk sync — blkback's
//! dirty-only resync needs the failed primary's bitmap, which a dead host does not hand over).
//!
//! The disk drill truncates the running copy's disk file under its `xenft-blkback`, which
//! then serves the disk from the peer's copy (remote mode) and tells the agent.
//!
//! # Files
//! - `mod.rs`: configuration, the agent's configuration and timing, the process's main loop;
//! - `seams.rs`: `LabSeams`, the lab's implementation of the agent's domain, network and
//!   checkpoint seams;
//! - `disk.rs`: this host's `xenft-blkback` process, its driver and the NBD disk;
//! - `vm.rs`: the VM's in-process components (guest, checkpoint engine, service) and what the
//!   seams do with them;
//! - `net.rs`: this host's `xenft-netback` process;
//! - `network.rs`: the service address in the VM's namespace and the service's listener there;
//! - `process.rs`: starting and stopping the component processes;
//! - `protection.rs`: protect / unprotect from the console;
//! - `status.rs`: the node's status file.

mod disk;
mod net;
mod network;
mod process;
mod protection;
mod seams;
mod status;
mod vm;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};
use xenft_agent::config::{AlinkTransport, ConfigFile, PathAddrs, PeerFile, StatusFile};
use xenft_agent::core::VmSpec;
use xenft_agent::decision::Action;
use xenft_agent::drivers::{NetbackFile, VmDriversFile};
use xenft_agent::ids::{HostId, VmId};
use xenft_agent::lifecycle::{Level, StateFile};
use xenft_agent::protection_api::ProtectionApi;
use xenft_agent::runtime::Agent;
use xenft_agent::seams::{SeamError, Seams};
use xenft_agent::status::{StatusHub, StatusServer};
use xenft_agent::timing::Timing;
use xenft_alink::{Link, LinkConfig, PathConfig};

use crate::state::{Event, StateDir};
use crate::topology::{Host, ALINK_PORT, MGMT_HB_PORT, STATUS_PORT};
use crate::{now_ms, LabError};

use protection::LabControl;
use seams::LabSeams;
use vm::Vm;

/// The protected VM's name.
pub const VM: &str = "vm1";
/// A-link path timeout of the replication links: how long client writes in flight on a cut
/// cable wait before they are sent again on the other one (and, with both cut, part of the
/// stall before the disk mirror goes degraded). Heartbeats go every
/// [`PATH_HEARTBEAT`], so a path is declared down after 8 missed heartbeats.
pub const PATH_TIMEOUT: Duration = Duration::from_millis(400);
/// A-link heartbeat interval of the replication links.
pub const PATH_HEARTBEAT: Duration = Duration::from_millis(50);
/// Longest a sync command waits for the disk and the checkpoint stream.
const SYNC_TIMEOUT: Duration = Duration::from_secs(300);

/// The agent timing used in the lab.
///
/// The product defaults (`heartbeat 100, path_down 350, peer_dead 500, lease 600, margin
/// 200`) fit a take-over within 1 s; this machine is shared by several builds on two cores,
/// where a process regularly stalls for a few hundred ms, so the lab runs 3× slower
/// detection and a wider safety margin: expect a take-over 1.5–2 s after a host dies.
#[must_use]
pub fn lab_timing() -> Timing {
    Timing {
        heartbeat_ms: 100,
        path_down_ms: 1000,
        peer_dead_ms: 1500,
        lease_ms: 1500,
        margin_ms: 500,
        quorum_request_timeout_ms: 400,
    }
}

/// The agent timing: the product's defaults, or [`lab_timing`].
#[must_use]
pub fn agent_timing(product: bool) -> Timing {
    if product {
        Timing::default()
    } else {
        lab_timing()
    }
}

/// Node settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Which host this node is.
    pub host: Host,
    /// The state directory.
    pub dir: StateDir,
    /// `xenft-synthetic-guest`.
    pub guest_binary: PathBuf,
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// Disk size, bytes.
    pub disk_bytes: u64,
    /// Checkpoint epoch, ms.
    pub epoch_ms: u64,
    /// Guest dirtying rate, bytes/s.
    pub dirty_rate: u64,
    /// `xenft-blkback`.
    pub blkback_binary: PathBuf,
    /// `xenft-netback`.
    pub netback_binary: PathBuf,
    /// Agent timing: the product's defaults rather than [`lab_timing`].
    pub product_timing: bool,
}

struct Node {
    cfg: NodeConfig,
    handle: Handle,
    secret: Vec<u8>,
    agent_link: Link,
    vm: Mutex<Vm>,
    hub: OnceLock<Arc<StatusHub>>,
    restart: AtomicBool,
    /// Protection removed from the console: do not become the secondary until protected.
    unprotected: AtomicBool,
    /// This host's `xenft-blkback` process.
    blk: Mutex<Option<std::process::Child>>,
    /// This host's `xenft-netback` process.
    net: Mutex<Option<std::process::Child>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn seam_err(operation: &'static str, reason: impl std::fmt::Display) -> SeamError {
    SeamError {
        component: "lab node",
        operation,
        vm: vm_id(),
        reason: reason.to_string(),
    }
}

fn vm_id() -> VmId {
    VmId::new(VM).expect("a valid VM name")
}

fn host_id(h: Host) -> HostId {
    HostId::new(h.name()).expect("a valid host name")
}

impl Node {
    fn event(&self, what: &str, why: &str) {
        tracing::info!(what, why, "event");
        self.cfg.dir.log_event(&Event {
            t_ms: now_ms(),
            host: self.cfg.host.name().into(),
            what: what.into(),
            why: why.into(),
        });
    }

    fn me(&self) -> Host {
        self.cfg.host
    }

    fn file(&self, suffix: &str) -> PathBuf {
        self.cfg.dir.file(&format!("{}.{suffix}", self.me().name()))
    }
}

fn json_word<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

fn with_port(a: std::net::SocketAddr, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(a.ip(), port)
}

impl Node {
    /// The agent's driver configuration of this host's components (production drivers).
    fn vm_drivers(&self) -> BTreeMap<VmId, VmDriversFile> {
        BTreeMap::from([(
            vm_id(),
            VmDriversFile {
                domain: None,
                blkback: Some(self.blkback_file()),
                netback: Some(NetbackFile {
                    control: self.net_ctl(),
                    addresses: vec![std::net::IpAddr::V4(crate::topology::SERVICE_IP)],
                    request_timeout_ms: 5000,
                }),
                checkpoint: None,
            },
        )])
    }
}

/// The file holding host `h`'s agent status token (the console's protect / unprotect go
/// through the agent's status API, which changes state only with a token).
#[must_use]
pub fn agent_token_file(dir: &StateDir, h: Host) -> PathBuf {
    dir.file(&format!("{}.agent-token", h.name()))
}

/// Host `h`'s agent status token, if its node wrote one.
#[must_use]
pub fn agent_token(dir: &StateDir, h: Host) -> Option<String> {
    std::fs::read_to_string(agent_token_file(dir, h))
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Writes a fresh random status token for host `h`'s agent (mode 0600).
fn write_agent_token(dir: &StateDir, h: Host) -> Result<(), LabError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = agent_token_file(dir, h);
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let io = |source| LabError::Io {
        path: path.clone(),
        source,
    };
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    f.write_all(token.as_bytes()).map_err(io)
}

/// The agent's configuration for host `me` (validated by the agent's own config code).
fn agent_config(cfg: &NodeConfig) -> Result<xenft_agent::config::ValidConfig, LabError> {
    let me = cfg.host;
    let peer = me.peer();
    let file = ConfigFile {
        host: host_id(me),
        secret_file: cfg.dir.file("secret"),
        state_file: cfg.dir.file(&format!("{}.agent-state.json", me.name())),
        peers: vec![PeerFile {
            host: host_id(peer),
            alink: (0..2)
                .map(|p| PathAddrs {
                    local: me.alink_addr(p),
                    peer: peer.alink_addr(p),
                })
                .collect(),
            mgmt: Some(PathAddrs {
                local: (me.mgmt_ip(), MGMT_HB_PORT).into(),
                peer: (peer.mgmt_ip(), MGMT_HB_PORT).into(),
            }),
        }],
        storage_heartbeat_dir: None,
        quorum: vec![me.quorum_addr()],
        timing: agent_timing(cfg.product_timing),
        status: StatusFile {
            listen: ([127, 0, 0, 1], STATUS_PORT).into(),
            token_file: Some(agent_token_file(&cfg.dir, me)),
        },
        vms: vec![VmSpec {
            vm: vm_id(),
            level: Level::L3,
            primary: host_id(Host::Host1),
            secondary: host_id(Host::Host2),
            memory_mb: (cfg.memory_bytes >> 20).max(1),
        }],
        free_memory_mb: None,
        event_log: 1000,
        alink_transport: AlinkTransport::Link,
        xenstore: false,
    };
    file.validate()
        .map_err(|e| LabError::component("agent configuration", e))
}

/// Runs the node until killed.
pub fn run(cfg: &NodeConfig) -> Result<(), LabError> {
    let rt: Runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| LabError::component("tokio runtime", e))?;
    // Components that spawn tasks when built (blkback's acceptor) need the runtime's context.
    let _guard = rt.enter();
    let secret_path = cfg.dir.file("secret");
    let secret = std::fs::read(&secret_path).map_err(|source| LabError::Io {
        path: secret_path,
        source,
    })?;
    write_agent_token(&cfg.dir, cfg.host)?;
    let agent_cfg = agent_config(cfg)?;
    let timing = agent_cfg.core.timing;
    let (status_token, configured_vms, pool_hosts) = (
        agent_cfg.status_token.clone(),
        agent_cfg.vms.clone(),
        agent_cfg.core.peers.clone(),
    );
    let (me, peer) = (cfg.host, cfg.host.peer());
    // The A-link the agent's heartbeats travel on (its per-path status is the agent's
    // per-path liveness).
    let mut link_cfg = LinkConfig::new(
        me.name(),
        peer.name(),
        secret.clone(),
        (0..2)
            .map(|p| PathConfig {
                local: me.alink_addr(p),
                peer: peer.alink_addr(p),
            })
            .collect(),
    );
    debug_assert_eq!(me.alink_addr(0).port(), ALINK_PORT);
    link_cfg.heartbeat_interval = Duration::from_millis(timing.heartbeat_ms / 2);
    link_cfg.path_timeout = Duration::from_millis(timing.path_down_ms);
    let agent_link = rt
        .block_on(Link::start(link_cfg))
        .map_err(|e| LabError::component("a-link", e))?;
    let node = Arc::new(Node {
        cfg: cfg.clone(),
        handle: rt.handle().clone(),
        secret,
        agent_link: agent_link.clone(),
        vm: Mutex::new(Vm::Standby),
        hub: OnceLock::new(),
        restart: AtomicBool::new(false),
        unprotected: AtomicBool::new(false),
        blk: Mutex::new(None),
        net: Mutex::new(None),
    });
    // A host (re)starting never holds the service address.
    node.release_address();

    // Fresh pool (the agent has no record): the configured primary boots the VM, the other
    // host waits for it as the secondary. Otherwise the node follows the agent.
    let records = StateFile::new(&agent_cfg.state_file)
        .load()
        .map_err(|e| LabError::component("agent state", e))?;
    let fresh = records.is_empty();
    if fresh {
        if me == Host::Host1 {
            let r = node.boot()?;
            *lock(&node.vm) = Vm::Running(r);
        } else {
            let rep = node.replica(peer)?;
            *lock(&node.vm) = Vm::Replica(rep);
        }
    }
    // The disk and the network go through the production drivers of this host's
    // xenft-blkback and xenft-netback.
    let drivers = node.vm_drivers();
    let real = xenft_agent::drivers::real_seams(&drivers, None);
    let seams = Seams {
        domains: Arc::new(LabSeams(Arc::clone(&node))),
        disk: real.disk,
        net: real.net,
        checkpoint: Arc::new(LabSeams(Arc::clone(&node))),
    };
    let listen = agent_cfg.status_listen;
    let agent = rt
        .block_on(Agent::start_with_links(
            agent_cfg,
            seams,
            BTreeMap::from([(host_id(peer), agent_link)]),
        ))
        .map_err(|e| LabError::component("agent", e))?;
    let _ = node.hub.set(agent.hub());
    // What blkback pushes (a failed store) reaches the agent through the production follower.
    let stop_events = Arc::new(AtomicBool::new(false));
    let _followers = xenft_agent::drivers::events::follow(&drivers, &agent.inputs(), &stop_events)
        .map_err(|e| LabError::component("component event followers", e))?;
    // The agent's status API, with protect / unprotect straight into its core (no XenAPI
    // plane in the lab): the console's buttons go through it.
    let protection = ProtectionApi::core(
        agent.inputs(),
        agent.hub(),
        host_id(me),
        pool_hosts,
        &configured_vms,
    );
    let _status = rt
        .block_on(StatusServer::start_with_protection(
            listen,
            status_token,
            agent.hub(),
            Some(protection),
        ))
        .map_err(|e| LabError::component("agent status API", e))?;
    // Every agent decision goes to the lab's event log (console, drill reports).
    let mut decisions = agent.hub().subscribe();
    let dir = cfg.dir.clone();
    rt.spawn(async move {
        loop {
            match decisions.recv().await {
                Ok(d) => dir.log_event(&Event {
                    t_ms: now_ms(),
                    host: d.host.to_string(),
                    what: format!(
                        "agent {}: {}",
                        json_word(&d.class),
                        match d.action {
                            Action::Redirect(c) => format!("redirect {}", json_word(&c)),
                            Action::Restore(c) => format!("restore {}", json_word(&c)),
                            a => json_word(&a)
                                .trim_start_matches("{\"kind\":\"")
                                .trim_end_matches("\"}")
                                .to_string(),
                        }
                    ),
                    why: d.reason,
                }),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    rt.spawn(crate::console::serve(
        cfg.dir.clone(),
        me,
        Arc::new(LabControl(Arc::clone(&node))),
    ));

    loop {
        node.follow_agent();
        node.write_status();
        if node.restart.load(Ordering::SeqCst) {
            // Let the agent persist its new view before the process image is replaced.
            std::thread::sleep(Duration::from_millis(500));
            // argv[0] is the path `up` started (current_exe would name a deleted file after
            // a rebuild).
            let mut argv = std::env::args_os();
            let exe = argv
                .next()
                .ok_or_else(|| LabError::component("restarting the node", "no argv[0]"))?;
            let args: Vec<std::ffi::OsString> = argv.collect();
            // The new image starts its own components: none of this one's may stay behind.
            node.stop_blkback();
            node.stop_netback();
            node.event("node restarts", "to take the secondary role on fresh links");
            let e = std::process::Command::new(exe).args(args).exec();
            return Err(LabError::component("restarting the node", e));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(host: Host, dir: &StateDir, product_timing: bool) -> NodeConfig {
        NodeConfig {
            host,
            dir: dir.clone(),
            guest_binary: PathBuf::from("/nonexistent"),
            memory_bytes: 16 << 20,
            disk_bytes: 64 << 20,
            epoch_ms: 100,
            dirty_rate: 1 << 20,
            blkback_binary: PathBuf::from("/nonexistent"),
            netback_binary: PathBuf::from("/nonexistent"),
            product_timing,
        }
    }

    #[test]
    fn the_agent_accepts_the_lab_configuration_of_both_hosts() {
        let root = std::env::temp_dir().join(format!("xenft-lab-agentcfg-{}", std::process::id()));
        let dir = StateDir::new(&root);
        dir.create().unwrap();
        std::fs::write(dir.file("secret"), [7u8; 32]).unwrap();
        for h in [Host::Host1, Host::Host2] {
            write_agent_token(&dir, h).unwrap();
            assert_eq!(agent_token(&dir, h).map(|t| t.len()), Some(64));
        }
        for product in [false, true] {
            for h in [Host::Host1, Host::Host2] {
                let c = agent_config(&cfg(h, &dir, product)).unwrap();
                assert_eq!(c.core.me.as_str(), h.name());
                assert_eq!(c.quorum, vec![h.quorum_addr()]);
                assert!(c.core.mgmt_heartbeat);
                assert_eq!(c.core.alink_paths, 2);
                assert_eq!(c.core.timing, agent_timing(product));
                assert_eq!(c.status_token, agent_token(&dir, h));
                // The quorum namespace routes both management links: the peer is reached
                // through it, never over an A-link address.
                let mgmt = c
                    .paths
                    .iter()
                    .find(|(_, p, _)| *p == xenft_agent::ids::PathId::Mgmt)
                    .unwrap();
                assert_eq!(mgmt.2.peer.ip(), std::net::IpAddr::V4(h.peer().mgmt_ip()));
            }
        }
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn lab_timing_is_valid_and_slower_than_the_product() {
        let lab = lab_timing();
        lab.validate().unwrap();
        let product = Timing::default();
        assert!(lab.peer_dead_ms > product.peer_dead_ms);
        assert!(lab.margin_ms >= product.margin_ms);
    }

    #[test]
    fn replication_links_of_the_two_directions_differ() {
        assert_ne!(
            Host::Host1.replication_port(),
            Host::Host2.replication_port()
        );
        assert_ne!(Host::Host1.replication_port(), ALINK_PORT);
    }
}
