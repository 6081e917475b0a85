//! The per-host node process (started by `up` inside a host namespace): the product's agent
//! ([`xenft_agent::runtime::Agent`]) with lab implementations of its component seams.
//!
//! The agent decides — membership over the A-link (heartbeat channel of a
//! [`xenft_alink::Link`]) and the management network (UDP through the quorum namespace),
//! quorum leases from `xenft-quorum`, fencing, take-over, re-protection — and the node carries
//! its commands out on real in-process components:
//!
//! | agent seam | what the node does |
//! |---|---|
//! | `Checkpointer::resume_last_epoch` | checkpoint secondary failover (guest resumed from the last committed epoch), the disk copy becomes a blkback [`Primary`], the service recovers its counter from it and claims the service address |
//! | `NetRelay::announce` | gratuitous ARPs for the service address ([`xenft_netback::frame`]) |
//! | `DiskMirror::sync` | starts the blkback mirror and the checkpoint stream to the peer on this host's replication link, and returns once the disk is in sync and checkpoints are committed |
//! | `DiskMirror::suspend` / `redirect` | nothing to do: the mirror tracks dirty regions and switches to remote mode by itself |
//! | `DomainStarter::pause` / `resume` | fence: the service stops answering and drops the address, the guest gets SIGSTOP (and back) |
//! | `DomainStarter::destroy` | the peer owns the VM: drop the copy and restart this node process, which then follows the agent as the secondary |
//!
//! Replication links: one per direction ([`Host::replication_port`]), so a node that took the
//! VM over replicates back to its peer on a link its process never used (a link's channels
//! can be taken once). A node that stops running the VM restarts itself (`exec`) instead of
//! reusing a link. A restarted node reads the agent's persisted state and waits as `standby`
//! until its agent knows who runs the VM; when the peer does, it becomes the secondary (fresh
//! replica memory, disk copy marked fresh: the new primary runs a full disk sync — blkback's
//! dirty-only resync needs the failed primary's bitmap, which a dead host does not hand over).
//!
//! SIGUSR1 makes the running copy's store fail with EIO (the disk drill).

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::mpsc;
use xenft_agent::config::{AlinkTransport, ConfigFile, PathAddrs, PeerFile, StatusFile};
use xenft_agent::core::{Input, VmSpec};
use xenft_agent::decision::{Action, Component};
use xenft_agent::ids::{HostId, VmId};
use xenft_agent::lifecycle::{Level, StateFile};
use xenft_agent::runtime::Agent;
use xenft_agent::seams::{Checkpointer, DiskMirror, DomainStarter, NetRelay, SeamError, Seams};
use xenft_agent::status::{StatusHub, StatusServer};
use xenft_agent::timing::Timing;
use xenft_alink::{Channel, Link, LinkConfig, PathConfig};
use xenft_blkback::mirror::alink::{AlinkAcceptor, AlinkConnector};
use xenft_blkback::mirror::bitmap::{DirtyBitmap, DEFAULT_CHUNK};
use xenft_blkback::mirror::primary::{MirrorConfig, PeerLink, Primary};
use xenft_blkback::mirror::secondary::Secondary;
use xenft_blkback::store::{FaultyStore, FileStore, Store};
use xenft_blkback::volume::Volume;
use xenft_checkpoint::engine::commit::CommitSink;
use xenft_checkpoint::engine::primary::{
    start_protection, EpochPolicy, Phase as CkptPhase, PrimaryConfig, Protection,
};
use xenft_checkpoint::engine::secondary::{start_secondary, SecondaryConfig, SecondaryHandle};
use xenft_checkpoint::local::{LocalDomain, LocalGuestConfig};
use xenft_checkpoint::workload::{Pattern, WorkloadSpec, WorkloadState};

use crate::service::Service;
use crate::state::{
    AgentView, CheckpointView, Event, LinkView, NodeRole, NodeStatus, PathView, StateDir, Takeover,
};
use crate::topology::{
    Host, ALINK_IFS, ALINK_PORT, MGMT_HB_PORT, PROD_IF, SERVICE_IP, SERVICE_PORT, STATUS_PORT,
};
use crate::{now_ms, LabError};

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
    /// Agent timing: the product's defaults rather than [`lab_timing`].
    pub product_timing: bool,
}

struct LastCommit(AtomicU64);

impl CommitSink for LastCommit {
    fn checkpoint(&self, _epoch: u64) {}
    fn commit(&self, epoch: u64) {
        self.0.fetch_max(epoch, Ordering::SeqCst);
    }
}

/// The guest of a running copy: bare (unprotected) or under checkpoint protection.
enum Guest {
    Bare(LocalDomain),
    Protected(Protection<LocalDomain>),
    Gone,
}

struct Running {
    guest: Guest,
    guest_pid: Option<u32>,
    faulty: Arc<FaultyStore<FileStore>>,
    mirror: Arc<Primary>,
    svc: Arc<Service>,
    svc_task: tokio::task::JoinHandle<()>,
    paused: bool,
    out_link: Option<Link>,
    mirror_task: Option<tokio::task::JoinHandle<()>>,
    takeover: Option<Takeover>,
}

struct Replica {
    link: Link,
    copy: Arc<Secondary>,
    sec: SecondaryHandle<LocalDomain>,
}

enum Vm {
    Standby,
    Replica(Replica),
    Running(Running),
}

struct Node {
    cfg: NodeConfig,
    handle: Handle,
    secret: Vec<u8>,
    agent_link: Link,
    vm: Mutex<Vm>,
    hub: OnceLock<Arc<StatusHub>>,
    inputs: Arc<OnceLock<mpsc::Sender<Input>>>,
    restart: AtomicBool,
    /// Protection removed from the console: do not become the secondary until protected.
    unprotected: AtomicBool,
    disk_failed_ms: Mutex<Option<u64>>,
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

    fn guest_workload(&self) -> Result<WorkloadState, LabError> {
        WorkloadState::new(
            WorkloadSpec {
                pattern: Pattern::Random,
                write_len: 256,
                rate_bytes_per_s: self.cfg.dirty_rate,
            },
            1,
        )
        .map_err(|e| LabError::component("guest workload", e))
    }

    /// A replication link: `primary` sends (the VM runs there), the other host receives.
    fn replication_link(&self, primary: Host) -> Result<Link, LabError> {
        let (me, peer) = (self.me(), self.me().peer());
        let port = primary.replication_port();
        let mut lc = LinkConfig::new(
            me.name(),
            peer.name(),
            self.secret.clone(),
            (0..2)
                .map(|p| PathConfig {
                    local: with_port(me.alink_addr(p), port),
                    peer: with_port(peer.alink_addr(p), port),
                })
                .collect(),
        );
        lc.path_timeout = PATH_TIMEOUT;
        lc.heartbeat_interval = PATH_HEARTBEAT;
        self.handle
            .block_on(Link::start(lc))
            .map_err(|e| LabError::component("replication link", e))
    }

    /// The disk file as a store that the disk drill can make fail.
    fn open_store(&self) -> Result<Arc<FaultyStore<FileStore>>, LabError> {
        let file = FileStore::open(&self.file("disk"), Some(self.cfg.disk_bytes))
            .map_err(|e| LabError::component("disk", e))?;
        Ok(Arc::new(FaultyStore::new(file)))
    }

    /// A mirror on `store` with a fresh dirty bitmap (never synced: the first session with
    /// a peer is a full sync).
    fn fresh_mirror(&self, store: Arc<dyn Store>) -> Result<Arc<Primary>, LabError> {
        let path = self.file("bitmap");
        let _ = std::fs::remove_file(&path);
        let bitmap = DirtyBitmap::open(&path, store.size(), DEFAULT_CHUNK)
            .map_err(|e| LabError::component("dirty bitmap", e))?;
        let mirror = Primary::new(
            store,
            bitmap,
            MirrorConfig {
                ack_timeout: Duration::from_millis(3000),
                ..MirrorConfig::default()
            },
        );
        // Local store failures go to the agent (class (d)).
        let mut failures = mirror.subscribe_failures();
        let inputs = Arc::clone(&self.inputs);
        self.handle.spawn(async move {
            while let Ok(detail) = failures.recv().await {
                if let Some(tx) = inputs.get() {
                    let _ = tx
                        .send(Input::Component {
                            vm: Some(vm_id()),
                            component: Component::Disk,
                            ok: false,
                            detail,
                        })
                        .await;
                }
            }
        });
        Ok(mirror)
    }

    /// Adds the service address to this host and starts the service on `volume`.
    fn start_service(
        &self,
        volume: Arc<Volume>,
    ) -> Result<(Arc<Service>, tokio::task::JoinHandle<()>), LabError> {
        claim_address()?;
        let svc = self
            .handle
            .block_on(Service::recover(volume, self.me().name()));
        self.serve(svc)
    }

    fn serve(
        &self,
        svc: Arc<Service>,
    ) -> Result<(Arc<Service>, tokio::task::JoinHandle<()>), LabError> {
        let listener = self
            .handle
            .block_on(bind_service())
            .map_err(|e| LabError::component("service listener", e))?;
        let task = self.handle.spawn(Arc::clone(&svc).serve(listener));
        Ok((svc, task))
    }

    /// Boots the guest and the service here (fresh pool, or the agent's restart).
    fn boot(&self) -> Result<Running, LabError> {
        let faulty = self.open_store()?;
        let store: Arc<dyn Store> = faulty.clone();
        let mirror = self.fresh_mirror(Arc::clone(&store))?;
        let volume = Volume::mirrored(store, Arc::clone(&mirror));
        let domain = LocalDomain::spawn(&LocalGuestConfig {
            binary: self.cfg.guest_binary.clone(),
            memory_bytes: self.cfg.memory_bytes,
            workload: self.guest_workload()?,
            tracking: xenft_checkpoint::local::guest::Tracking::Auto,
        })
        .map_err(|e| LabError::component("synthetic guest", e))?;
        let guest_pid = domain.guest_pid();
        let (svc, svc_task) = self.start_service(volume)?;
        if let Err(e) = announce() {
            self.event("announce failed", &e.to_string());
        }
        self.event(
            &format!("{VM} runs here; service up on {SERVICE_IP}:{SERVICE_PORT}"),
            "guest booted, disk served by blkback (mirror waits for the agent's sync)",
        );
        Ok(Running {
            guest: Guest::Bare(domain),
            guest_pid,
            faulty,
            mirror,
            svc,
            svc_task,
            paused: false,
            out_link: None,
            mirror_task: None,
            takeover: None,
        })
    }

    /// Becomes the secondary of the VM running on `primary`.
    fn replica(&self, primary: Host) -> Result<Replica, LabError> {
        // The copy is stale: declare it fresh so that the primary copies everything.
        let _ = std::fs::remove_file(self.file("disk-state"));
        let store: Arc<dyn Store> = Arc::new(
            FileStore::open(&self.file("disk"), Some(self.cfg.disk_bytes))
                .map_err(|e| LabError::component("disk copy", e))?,
        );
        let copy = Secondary::new(store, self.file("disk-state"));
        let link = self.replication_link(primary)?;
        let acceptor = AlinkAcceptor::new(&link)
            .ok_or_else(|| LabError::component("disk mirror", "disk channel already taken"))?;
        self.handle.spawn(Arc::clone(&copy).serve(acceptor));
        let replica = LocalDomain::replica(self.cfg.guest_binary.clone(), self.cfg.memory_bytes)
            .map_err(|e| LabError::component("replica memory", e))?;
        let endpoint = xenft_checkpoint::alink::endpoint(&link, self.handle.clone())
            .map_err(|e| LabError::component("checkpoint channel", e))?;
        let sec = start_secondary(replica, endpoint, SecondaryConfig::default())
            .map_err(|e| LabError::component("checkpoint secondary", e))?;
        self.event(
            &format!("secondary of {VM} (runs on {})", primary.name()),
            "replica memory and disk copy wait for the primary's sync",
        );
        Ok(Replica { link, copy, sec })
    }

    /// The agent's latest `fail_over` decision, if any.
    fn failover_reason(&self) -> Option<String> {
        let hub = self.hub.get()?;
        let (log, _) = hub.decisions();
        log.iter()
            .rev()
            .find(|d| d.action == Action::FailOver)
            .map(|d| d.reason.clone())
    }

    fn resume_last_epoch(&self) -> Result<(), LabError> {
        let decided_ms = now_ms();
        let mut vm = lock(&self.vm);
        if !matches!(*vm, Vm::Replica(_)) {
            return Err(LabError::WrongState("no replica to resume here".into()));
        }
        let Vm::Replica(rep) = std::mem::replace(&mut *vm, Vm::Standby) else {
            return Err(LabError::WrongState("no replica to resume here".into()));
        };
        let Replica { link, copy, sec } = rep;
        let (domain, epoch) = sec
            .failover()
            .map_err(|e| LabError::component("checkpoint failover", e))?;
        link.shutdown();
        drop(copy);
        self.event(
            &format!("guest resumed from checkpoint {epoch}"),
            "the last checkpoint applied whole on this host",
        );
        let faulty = self.open_store()?;
        let store: Arc<dyn Store> = faulty.clone();
        let mirror = self.fresh_mirror(Arc::clone(&store))?;
        let volume = Volume::mirrored(store, Arc::clone(&mirror));
        let guest_pid = domain.guest_pid();
        let (svc, svc_task) = self.start_service(volume)?;
        let serving_ms = now_ms();
        let reason = self
            .failover_reason()
            .unwrap_or_else(|| "the agent decided to take over".into());
        self.event(
            &format!(
                "service up on {} with {} records recovered from the disk copy",
                self.me().name(),
                svc.count()
            ),
            "service address moved here",
        );
        let takeover = Takeover {
            decided_ms,
            serving_ms,
            failover_epoch: epoch,
            recovered_count: svc.count(),
            reason,
        };
        *vm = Vm::Running(Running {
            guest: Guest::Bare(domain),
            guest_pid,
            faulty,
            mirror,
            svc,
            svc_task,
            paused: false,
            out_link: None,
            mirror_task: None,
            takeover: Some(takeover),
        });
        Ok(())
    }

    /// Starts replication to the peer if it is not running, then waits until the disk is in
    /// sync and a checkpoint is committed.
    fn sync(&self) -> Result<(), LabError> {
        {
            let mut vm = lock(&self.vm);
            let Vm::Running(r) = &mut *vm else {
                return Err(LabError::WrongState("the VM does not run here".into()));
            };
            if r.out_link.is_none() {
                // A link of an earlier protection may still hold the port for a moment.
                let mut tries = 0;
                let link = loop {
                    match self.replication_link(self.me()) {
                        Ok(l) => break l,
                        Err(e) if tries >= 30 => return Err(e),
                        Err(_) => {
                            tries += 1;
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                };
                let connector = AlinkConnector::new(link.clone()).ok_or_else(|| {
                    LabError::component("disk mirror", "disk channel already taken")
                })?;
                r.mirror_task = Some(self.handle.spawn(Arc::clone(&r.mirror).run(connector)));
                let endpoint = xenft_checkpoint::alink::endpoint(&link, self.handle.clone())
                    .map_err(|e| LabError::component("checkpoint channel", e))?;
                r.out_link = Some(link);
                if let Guest::Bare(domain) = std::mem::replace(&mut r.guest, Guest::Gone) {
                    let p = start_protection(
                        domain,
                        endpoint,
                        Arc::new(LastCommit(AtomicU64::new(0))),
                        PrimaryConfig {
                            epoch: EpochPolicy::Fixed(Duration::from_millis(self.cfg.epoch_ms)),
                            ..PrimaryConfig::default()
                        },
                    )
                    .map_err(|e| LabError::component("checkpoint primary", e))?;
                    r.guest = Guest::Protected(p);
                }
                self.event(
                    &format!("replicating {VM} to {}", self.me().peer().name()),
                    "the agent asked for a sync: disk mirror and checkpoint stream started",
                );
            }
        }
        let start = Instant::now();
        loop {
            {
                let vm = lock(&self.vm);
                let Vm::Running(r) = &*vm else {
                    return Err(LabError::WrongState("the VM stopped running here".into()));
                };
                let disk_ok = r.mirror.status().peer == PeerLink::InSync;
                let ckpt = match &r.guest {
                    Guest::Protected(p) => {
                        let s = p.status();
                        if let CkptPhase::Failed(e) = &s.phase {
                            return Err(LabError::component("checkpoint primary", e));
                        }
                        s.phase == CkptPhase::Protected && s.committed_epoch > 0
                    }
                    _ => false,
                };
                if disk_ok && ckpt {
                    return Ok(());
                }
            }
            if start.elapsed() > SYNC_TIMEOUT {
                return Err(LabError::Timeout("sync to the peer".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pause(&self) -> Result<(), LabError> {
        let mut vm = lock(&self.vm);
        let Vm::Running(r) = &mut *vm else {
            return Ok(());
        };
        r.svc.set_fenced(true);
        r.svc_task.abort();
        release_address();
        if let Some(pid) = r.guest_pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGSTOP,
            );
        }
        r.paused = true;
        Ok(())
    }

    fn resume(&self) -> Result<(), LabError> {
        let mut vm = lock(&self.vm);
        let Vm::Running(r) = &mut *vm else {
            return Err(LabError::WrongState("the VM does not run here".into()));
        };
        if !r.paused {
            return Ok(());
        }
        if let Some(pid) = r.guest_pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
        claim_address()?;
        r.svc.set_fenced(false);
        let (_, task) = self.serve(Arc::clone(&r.svc))?;
        r.svc_task = task;
        r.paused = false;
        drop(vm);
        announce()
    }

    fn destroy(&self) {
        let mut vm = lock(&self.vm);
        if let Vm::Running(r) = &*vm {
            r.svc.set_fenced(true);
            r.svc_task.abort();
            release_address();
            if let Some(l) = &r.out_link {
                l.shutdown();
            }
        }
        *vm = Vm::Standby; // drops the guest (killed) and the replication link
        self.restart.store(true, Ordering::SeqCst);
    }

    fn agent_view(&self) -> AgentView {
        let Some(hub) = self.hub.get() else {
            return AgentView::default();
        };
        let s = hub.snapshot();
        let mut v = AgentView {
            quorum_ok: s.quorum.iter().any(|q| q.1),
            quorum_requests: s.counters.quorum_requests,
            expected_failover_ms: {
                let t = agent_timing(self.cfg.product_timing);
                t.peer_dead_ms.max(t.lease_ms) + t.heartbeat_ms
            },
            ..AgentView::default()
        };
        if let Some(p) = s.peers.first() {
            v.peer_silent = p.silent;
            v.paths = p
                .paths
                .iter()
                .map(|(id, up, _)| (id.to_string(), *up))
                .collect();
        }
        if let Some(vm) = s.vms.iter().find(|v| v.record.vm.as_str() == VM) {
            v.phase = json_word(&vm.record.phase);
            v.primary = vm.record.primary.to_string();
            v.generation = vm.record.generation;
            v.local = json_word(&vm.local);
            v.lease_valid = vm.lease_valid;
        }
        v
    }

    fn link_view(&self) -> LinkView {
        let st = self.agent_link.status();
        LinkView {
            connected: st.connected,
            paths: st
                .paths
                .iter()
                .map(|p| PathView {
                    up: p.up,
                    rtt_ms: p.rtt_ms,
                    connects: p.connects,
                })
                .collect(),
        }
    }

    fn status(&self) -> NodeStatus {
        let mut st = NodeStatus {
            host: self.me(),
            pid: std::process::id(),
            updated_ms: now_ms(),
            role: NodeRole::Standby,
            serving: false,
            service_count: 0,
            guest_pid: None,
            link: self.link_view(),
            checkpoint: CheckpointView::default(),
            disk_state: String::new(),
            disk: serde_json::Value::Null,
            disk_failed_ms: *lock(&self.disk_failed_ms),
            takeover: None,
            agent: self.agent_view(),
        };
        let vm = lock(&self.vm);
        match &*vm {
            Vm::Standby => {}
            Vm::Replica(rep) => {
                st.role = NodeRole::Secondary;
                let s = rep.sec.status();
                st.checkpoint = CheckpointView {
                    phase: "receiving".into(),
                    committed_epoch: s.committed_epoch.unwrap_or(0),
                    ..CheckpointView::default()
                };
                st.disk_state = "copy".into();
                st.disk = serde_json::to_value(rep.copy.status()).unwrap_or_default();
            }
            Vm::Running(r) => {
                st.role = if r.paused {
                    NodeRole::Fenced
                } else {
                    NodeRole::Primary
                };
                st.serving = !r.paused;
                st.service_count = r.svc.count();
                st.guest_pid = r.guest_pid;
                st.takeover.clone_from(&r.takeover);
                st.checkpoint = match &r.guest {
                    Guest::Protected(p) => {
                        let p = p.status();
                        CheckpointView {
                            phase: match &p.phase {
                                CkptPhase::Failed(e) => format!("failed: {e}"),
                                other => format!("{other:?}").to_lowercase(),
                            },
                            epoch: p.epoch,
                            committed_epoch: p.committed_epoch,
                            lag_bytes: p.lag_bytes,
                            last_commit_age_ms: p
                                .last_commit_age
                                .map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX)),
                        }
                    }
                    _ => CheckpointView {
                        phase: "unprotected".into(),
                        ..CheckpointView::default()
                    },
                };
                let d = r.mirror.status();
                st.disk_state = if d.local_failure.is_some() {
                    "remote".into()
                } else if r.out_link.is_none() {
                    "local".into()
                } else {
                    match d.peer {
                        PeerLink::InSync => "in_sync",
                        PeerLink::Resyncing => "resyncing",
                        PeerLink::Degraded => "degraded",
                    }
                    .into()
                };
                st.disk = serde_json::to_value(&d).unwrap_or_default();
            }
        }
        st
    }

    fn write_status(&self) {
        let st = self.status();
        if let Err(e) = self
            .cfg
            .dir
            .write_json(&self.cfg.dir.status_file(self.me()), &st)
        {
            tracing::warn!(error = %e, "cannot write status");
        }
    }

    /// Follows the agent: a standby node becomes the secondary once its agent knows the
    /// peer runs the VM.
    fn follow_agent(&self) {
        // A node about to restart must not become the secondary: the primary would sync to a
        // process that is going away.
        if self.unprotected.load(Ordering::SeqCst)
            || self.restart.load(Ordering::SeqCst)
            || !matches!(*lock(&self.vm), Vm::Standby)
        {
            return;
        }
        let a = self.agent_view();
        let peer = self.me().peer();
        if a.primary != peer.name() || a.peer_silent {
            return;
        }
        match self.replica(peer) {
            Ok(rep) => *lock(&self.vm) = Vm::Replica(rep),
            Err(e) => self.event("cannot become the secondary", &e.to_string()),
        }
    }

    /// Stops replicating (protection removed): the running copy stops its checkpoint stream
    /// and disk mirror (the guest keeps running, writes are tracked in the dirty bitmap);
    /// a secondary drops its replica.
    fn stop_replication(&self) {
        self.unprotected.store(true, Ordering::SeqCst);
        let mut vm = lock(&self.vm);
        match &mut *vm {
            Vm::Running(r) => {
                if let Guest::Protected(p) = std::mem::replace(&mut r.guest, Guest::Gone) {
                    // Stop while the peer still answers: the last epoch completes.
                    match p.stop() {
                        Ok(d) => r.guest = Guest::Bare(d),
                        Err(e) => {
                            self.event("checkpoint stream ended with an error", &e.to_string());
                        }
                    }
                }
                if let Some(t) = r.mirror_task.take() {
                    t.abort();
                }
                if let Some(l) = r.out_link.take() {
                    l.shutdown();
                }
            }
            Vm::Replica(rep) => {
                rep.link.shutdown();
                *vm = Vm::Standby;
            }
            Vm::Standby => {}
        }
    }

    /// Protect (`on`) or unprotect the VM on this host: the agent gets the input, the
    /// components follow. Unless `forwarded`, the peer is told too (over the production
    /// network, its console's API), the running copy's host first.
    fn set_protection(&self, on: bool, forwarded: bool) -> Result<String, String> {
        let inputs = self
            .inputs
            .get()
            .ok_or_else(|| "the agent is not running yet".to_string())?;
        let (me, peer) = (self.me(), self.me().peer());
        let running = matches!(*lock(&self.vm), Vm::Running(_));
        let mut said = Vec::new();
        let tell_peer = |said: &mut Vec<String>| {
            if !forwarded {
                said.push(match forward(peer, on) {
                    Ok(m) => m,
                    Err(e) => format!("{}: not reached ({e})", peer.name()),
                });
            }
        };
        if !running {
            tell_peer(&mut said);
        }
        if on {
            let primary = if running { me } else { peer };
            self.unprotected.store(false, Ordering::SeqCst);
            inputs
                .blocking_send(Input::Protect(VmSpec {
                    vm: vm_id(),
                    level: Level::L3,
                    primary: host_id(primary),
                    secondary: host_id(primary.peer()),
                    memory_mb: (self.cfg.memory_bytes >> 20).max(1),
                }))
                .map_err(|e| e.to_string())?;
            self.event(
                &format!("protect {VM} requested (console)"),
                &format!("agent told: level 3, primary {}", primary.name()),
            );
            said.push(format!("{}: protecting {VM}", me.name()));
        } else {
            inputs
                .blocking_send(Input::Unprotect(vm_id()))
                .map_err(|e| e.to_string())?;
            self.stop_replication();
            self.event(
                &format!("unprotect {VM} requested (console)"),
                if running {
                    "agent record dropped; checkpoint stream and disk mirror stopped, the VM keeps running"
                } else {
                    "agent record dropped; replica discarded"
                },
            );
            said.push(format!("{}: {VM} unprotected", me.name()));
        }
        if running {
            tell_peer(&mut said);
        }
        Ok(said.join("; "))
    }

    /// Uplink redirect (`on`) or restore, on the host running the VM: its replies to the
    /// production network go over `alink1` to the peer, and the peer relays the client's
    /// traffic for the service address back (proxy ARP + a host route), asked over the
    /// A-link's control channel.
    fn uplink_redirect(&self, on: bool) -> Result<(), LabError> {
        let via = self.me().peer().alink_ip(0).to_string();
        let prod_net = "10.200.0.0/24";
        if on {
            match crate::topology::run(
                "ip",
                &[
                    "route",
                    "add",
                    prod_net,
                    "via",
                    &via,
                    "dev",
                    ALINK_IFS[0],
                    "metric",
                    "50",
                ],
            ) {
                Ok(_) => {}
                Err(LabError::Command { stderr, .. }) if stderr.contains("exists") => {}
                Err(e) => return Err(e),
            }
            self.control(RELAY_ON)?;
            self.event(
                "uplink redirected through the peer",
                "replies leave over alink1; the peer relays the client's traffic (proxy ARP)",
            );
        } else {
            announce()?;
            self.control(RELAY_OFF)?;
            let _ = crate::topology::run(
                "ip",
                &[
                    "route",
                    "del",
                    prod_net,
                    "via",
                    &via,
                    "dev",
                    ALINK_IFS[0],
                    "metric",
                    "50",
                ],
            );
            self.event(
                "uplink restored",
                "service address announced from this host's own uplink again",
            );
        }
        Ok(())
    }

    fn control(&self, msg: &'static [u8]) -> Result<(), LabError> {
        self.handle
            .block_on(
                self.agent_link
                    .send(Channel::Control, bytes::Bytes::from_static(msg)),
            )
            .map_err(|e| LabError::component("A-link control channel", e))
    }

    /// On the peer of a host whose uplink failed: relay the service address to it.
    fn relay(&self, on: bool) {
        let target = self.me().peer().alink_ip(0).to_string();
        let vip = SERVICE_IP.to_string();
        let run = |args: &[&str]| crate::topology::run(args[0], &args[1..]);
        let r = if on {
            run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
                .and_then(|_| {
                    run(&[
                        "ip",
                        "route",
                        "replace",
                        &vip,
                        "via",
                        &target,
                        "dev",
                        ALINK_IFS[0],
                    ])
                })
                .and_then(
                    |_| match run(&["ip", "neigh", "add", "proxy", &vip, "dev", PROD_IF]) {
                        Err(LabError::Command { stderr, .. }) if stderr.contains("exists") => {
                            Ok(String::new())
                        }
                        other => other,
                    },
                )
                .and_then(|_| announce().map(|()| String::new()))
        } else {
            let _ = run(&["ip", "neigh", "del", "proxy", &vip, "dev", PROD_IF]);
            let _ = run(&["ip", "route", "del", &vip, "via", &target]);
            run(&["sysctl", "-qw", "net.ipv4.ip_forward=0"])
        };
        match r {
            Ok(_) => self.event(
                if on {
                    "relaying the service address for the peer"
                } else {
                    "relay of the service address stopped"
                },
                if on {
                    "the peer's uplink failed: proxy ARP on prod0, routed over alink1"
                } else {
                    "the peer's uplink works again"
                },
            ),
            Err(e) => self.event("relay failed", &e.to_string()),
        }
    }

    /// Reports the production port's state changes to the agent while the VM runs here.
    fn watch_uplink(&self, last: &mut Option<bool>) {
        let up = std::fs::read_to_string(format!("/sys/class/net/{PROD_IF}/operstate"))
            .map(|s| s.trim() != "down")
            .unwrap_or(false);
        let runs_here = matches!(&*lock(&self.vm), Vm::Running(r) if !r.paused);
        if !runs_here {
            *last = None;
            return;
        }
        if *last == Some(up) {
            return;
        }
        let first = last.is_none();
        *last = Some(up);
        if first && up {
            return;
        }
        if let Some(tx) = self.inputs.get() {
            let _ = tx.try_send(Input::Component {
                vm: Some(vm_id()),
                component: Component::Uplink,
                ok: up,
                detail: format!("{PROD_IF} is {}", if up { "up" } else { "down" }),
            });
        }
    }

    fn fail_store(&self) {
        let vm = lock(&self.vm);
        if let Vm::Running(r) = &*vm {
            r.faulty.fail();
            let t = now_ms();
            *lock(&self.disk_failed_ms) = Some(t);
            self.event("local store fails (EIO)", "fault injected by the drill");
        }
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

async fn bind_service() -> std::io::Result<TcpListener> {
    // The address was just added; a restarted service may find the old socket lingering.
    let mut last = None;
    for _ in 0..20 {
        match TcpListener::bind((SERVICE_IP, SERVICE_PORT)).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("bind failed")))
}

/// Adds the service address to this host's production port (no error if it is there).
fn claim_address() -> Result<(), LabError> {
    let ip = format!("{SERVICE_IP}/24");
    match crate::topology::run("ip", &["addr", "add", &ip, "dev", PROD_IF]) {
        Ok(_) => Ok(()),
        Err(LabError::Command { stderr, .. }) if stderr.contains("exists") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the service address from this host (no error if it is not there).
fn release_address() {
    let ip = format!("{SERVICE_IP}/24");
    let _ = crate::topology::run("ip", &["addr", "del", &ip, "dev", PROD_IF]);
}

/// Sends gratuitous ARPs for the service address from this host's production port.
fn announce() -> Result<(), LabError> {
    let mac_text = std::fs::read_to_string(format!("/sys/class/net/{PROD_IF}/address"))
        .map_err(|e| LabError::component("reading prod0 MAC", e))?;
    let bytes: Vec<u8> = mac_text
        .trim()
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    let mac = xenft_netback::frame::MacAddr::from_slice(&bytes)
        .ok_or_else(|| LabError::component("prod0 MAC", mac_text.trim()))?;
    let sock = xenft_netback::sys::PacketSocket::open(PROD_IF)
        .map_err(|e| LabError::component("packet socket", e))?;
    let garp = xenft_netback::frame::gratuitous_arp(mac, SERVICE_IP);
    for pause in [0, 50, 200] {
        std::thread::sleep(Duration::from_millis(pause));
        sock.send(&garp)
            .map_err(|e| LabError::component("sending gratuitous ARP", e))?;
    }
    Ok(())
}

const RELAY_ON: &[u8] = b"uplink-relay on";
const RELAY_OFF: &[u8] = b"uplink-relay off";

/// Tells `peer`'s node to protect or unprotect (POST to its console, marked forwarded).
fn forward(peer: Host, on: bool) -> Result<String, String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from((peer.prod_ip(), crate::console::CONSOLE_PORT));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let path = format!(
        "/api/vm/{VM}/{}?forwarded=1",
        if on { "protect" } else { "unprotect" }
    );
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.take(64 * 1024)
        .read_to_string(&mut out)
        .map_err(|e| e.to_string())?;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim();
    if out.starts_with("HTTP/1.1 200") {
        Ok(body.to_string())
    } else {
        Err(body.to_string())
    }
}

/// The console's protect/unprotect buttons, on this node.
struct LabControl(Arc<Node>);

impl crate::console::Control for LabControl {
    fn set_protection(&self, on: bool, forwarded: bool) -> Result<String, String> {
        self.0.set_protection(on, forwarded)
    }
}

/// The lab's implementation of every agent seam, on the node's components.
struct LabSeams(Arc<Node>);

impl LabSeams {
    fn check(vm: &VmId, op: &'static str) -> Result<(), SeamError> {
        if vm.as_str() == VM {
            Ok(())
        } else {
            Err(seam_err(op, format!("unknown VM {vm}")))
        }
    }
}

impl DomainStarter for LabSeams {
    fn start(&self, vm: &VmId) -> Result<(), SeamError> {
        Self::check(vm, "start")?;
        let mut g = lock(&self.0.vm);
        if matches!(*g, Vm::Running(_)) {
            return Ok(()); // already runs here
        }
        *g = Vm::Standby;
        let r = self.0.boot().map_err(|e| seam_err("start", e))?;
        *g = Vm::Running(r);
        Ok(())
    }
    fn pause(&self, vm: &VmId) -> Result<(), SeamError> {
        Self::check(vm, "pause")?;
        self.0.event(
            &format!("{VM} paused (fenced)"),
            "the agent fenced its copy: service closed, address released, guest stopped",
        );
        self.0.pause().map_err(|e| seam_err("pause", e))
    }
    fn resume(&self, vm: &VmId) -> Result<(), SeamError> {
        Self::check(vm, "resume")?;
        self.0.resume().map_err(|e| seam_err("resume", e))
    }
    fn destroy(&self, vm: &VmId) -> Result<(), SeamError> {
        Self::check(vm, "destroy")?;
        self.0.event(
            &format!("{VM} copy dropped"),
            "the peer owns the VM: this node restarts as its secondary",
        );
        self.0.destroy();
        Ok(())
    }
}

impl DiskMirror for LabSeams {
    fn sync(&self, vm: &VmId, _peer: &HostId, full: bool) -> Result<(), SeamError> {
        Self::check(vm, "sync")?;
        let t = Instant::now();
        self.0.sync().map_err(|e| seam_err("sync", e))?;
        self.0.event(
            &format!(
                "{VM} in sync with {} ({} ms)",
                self.0.me().peer().name(),
                t.elapsed().as_millis()
            ),
            if full {
                "initial sync: disk copied, memory checkpoints committed"
            } else {
                "resync: disk in sync, memory checkpoints committed"
            },
        );
        Ok(())
    }
    fn suspend(&self, vm: &VmId) -> Result<(), SeamError> {
        Self::check(vm, "suspend")
        // The mirror tracks the writes in its dirty bitmap by itself while no session
        // exists, and the checkpoint stream waits on the link: nothing to stop.
    }
    fn redirect(&self, vm: &VmId, on: bool) -> Result<(), SeamError> {
        Self::check(vm, "disk redirect")?;
        let vm = lock(&self.0.vm);
        match &*vm {
            // blkback switched to the peer's copy (remote mode) at the first EIO.
            Vm::Running(r) if !on || r.mirror.status().local_failure.is_some() => Ok(()),
            _ => Err(seam_err(
                "disk redirect",
                "the mirror is not in remote mode",
            )),
        }
    }
}

impl NetRelay for LabSeams {
    fn redirect(&self, vm: &VmId, on: bool) -> Result<(), SeamError> {
        Self::check(vm, "uplink redirect")?;
        self.0
            .uplink_redirect(on)
            .map_err(|e| seam_err("uplink redirect", e))
    }
    fn announce(&self, vm: &VmId) -> Result<(), SeamError> {
        Self::check(vm, "announce")?;
        announce().map_err(|e| seam_err("announce", e))
    }
}

impl Checkpointer for LabSeams {
    fn resume_last_epoch(&self, vm: &VmId) -> Result<(), SeamError> {
        Self::check(vm, "resume")?;
        self.0
            .resume_last_epoch()
            .map_err(|e| seam_err("resume last epoch", e))
    }
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
            token_file: None,
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
    let agent_cfg = agent_config(cfg)?;
    let timing = agent_cfg.core.timing;
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
    // A host (re)starting never holds the service address.
    release_address();
    let node = Arc::new(Node {
        cfg: cfg.clone(),
        handle: rt.handle().clone(),
        secret,
        agent_link: agent_link.clone(),
        vm: Mutex::new(Vm::Standby),
        hub: OnceLock::new(),
        inputs: Arc::new(OnceLock::new()),
        restart: AtomicBool::new(false),
        unprotected: AtomicBool::new(false),
        disk_failed_ms: Mutex::new(None),
    });

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
    let seams = Seams {
        domains: Arc::new(LabSeams(Arc::clone(&node))),
        disk: Arc::new(LabSeams(Arc::clone(&node))),
        net: Arc::new(LabSeams(Arc::clone(&node))),
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
    let _ = node.inputs.set(agent.inputs());
    let _status = rt
        .block_on(StatusServer::start(listen, None, agent.hub()))
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

    // The peer's requests on the A-link's control channel (uplink relay).
    if let Some(mut rx) = node.agent_link.receiver(Channel::Control) {
        let n = Arc::clone(&node);
        rt.spawn(async move {
            while let Some(m) = rx.recv().await {
                let on = match &m[..] {
                    RELAY_ON => true,
                    RELAY_OFF => false,
                    _ => continue,
                };
                let n = Arc::clone(&n);
                let _ = tokio::task::spawn_blocking(move || n.relay(on)).await;
            }
        });
    }

    let mut sig = rt
        .block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        })
        .map_err(|e| LabError::component("signal handler", e))?;
    let n = Arc::clone(&node);
    rt.spawn(async move {
        while sig.recv().await.is_some() {
            let n = Arc::clone(&n);
            let _ = tokio::task::spawn_blocking(move || n.fail_store()).await;
        }
    });

    let mut uplink = None;
    loop {
        node.watch_uplink(&mut uplink);
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
            product_timing,
        }
    }

    #[test]
    fn the_agent_accepts_the_lab_configuration_of_both_hosts() {
        let root = std::env::temp_dir().join(format!("xenft-lab-agentcfg-{}", std::process::id()));
        let dir = StateDir::new(&root);
        dir.create().unwrap();
        std::fs::write(dir.file("secret"), [7u8; 32]).unwrap();
        for product in [false, true] {
            for h in [Host::Host1, Host::Host2] {
                let c = agent_config(&cfg(h, &dir, product)).unwrap();
                assert_eq!(c.core.me.as_str(), h.name());
                assert_eq!(c.quorum, vec![h.quorum_addr()]);
                assert!(c.core.mgmt_heartbeat);
                assert_eq!(c.core.alink_paths, 2);
                assert_eq!(c.core.timing, agent_timing(product));
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
