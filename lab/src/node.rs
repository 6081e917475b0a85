//! The per-host node process (started by `up` inside a host namespace).
//!
//! Host 1 runs the VM: a synthetic guest protected at level 3 (checkpoints over the A-link's
//! `Checkpoint` channel), its disk served by a blkback [`Primary`] mirrored over the `Disk`
//! channel, and the [`Service`] on the service address. Host 2 holds the replica memory and
//! the disk copy and watches the A-link; when no path has been up for
//! [`LOST_GRACE`] and the peer does not answer on the production network either, it takes
//! over: resumes the guest from the last applied checkpoint, serves its disk copy, recovers
//! the service's counter from it, claims the service address and announces it.
//!
//! The main thread owns the guest (its process dies with the thread that spawned it), the
//! tokio runtime runs the A-link, the disk mirror and the service. SIGUSR1 makes host 1's
//! store fail with EIO (the disk drill).

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use xenft_alink::{Link, LinkConfig, PathConfig};
use xenft_blkback::mirror::alink::{AlinkAcceptor, AlinkConnector};
use xenft_blkback::mirror::bitmap::{DirtyBitmap, DEFAULT_CHUNK};
use xenft_blkback::mirror::primary::{MirrorConfig, PeerLink, Primary};
use xenft_blkback::mirror::secondary::Secondary;
use xenft_blkback::store::{FaultyStore, FileStore, Store};
use xenft_blkback::volume::Volume;
use xenft_checkpoint::engine::commit::CommitSink;
use xenft_checkpoint::engine::primary::{start_protection, EpochPolicy, Phase, PrimaryConfig};
use xenft_checkpoint::engine::secondary::{start_secondary, SecondaryConfig};
use xenft_checkpoint::local::{LocalDomain, LocalGuestConfig};
use xenft_checkpoint::workload::{Pattern, WorkloadSpec, WorkloadState};

use crate::service::Service;
use crate::state::{
    CheckpointView, Event, LinkView, NodeRole, NodeStatus, PathView, StateDir, Takeover,
};
use crate::topology::{Host, ALIVE_PORT, PROD_IF, SERVICE_IP, SERVICE_PORT};
use crate::{now_ms, LabError};

/// How long host 2 waits with no A-link path up before probing the peer (on top of the
/// A-link's own [`PATH_TIMEOUT`]).
pub const LOST_GRACE: Duration = Duration::from_millis(300);
/// A-link path timeout used in the lab.
pub const PATH_TIMEOUT: Duration = Duration::from_millis(1000);
/// Timeout of one production-network probe of the peer.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

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
}

struct LastCommit(AtomicU64);

impl CommitSink for LastCommit {
    fn checkpoint(&self, _epoch: u64) {}
    fn commit(&self, epoch: u64) {
        self.0.fetch_max(epoch, Ordering::SeqCst);
    }
}

struct Node {
    cfg: NodeConfig,
    rt: Runtime,
    link: Link,
    disk_failed_ms: Arc<Mutex<Option<u64>>>,
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

    fn link_view(&self) -> LinkView {
        let st = self.link.status();
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

    fn status_base(&self, role: NodeRole) -> NodeStatus {
        NodeStatus {
            host: self.cfg.host,
            pid: std::process::id(),
            updated_ms: now_ms(),
            role,
            serving: false,
            service_count: 0,
            guest_pid: None,
            link: self.link_view(),
            checkpoint: CheckpointView::default(),
            disk_state: String::new(),
            disk: serde_json::Value::Null,
            disk_failed_ms: *self
                .disk_failed_ms
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            link_lost_ms: None,
            peer_alive_on_prod: None,
            takeover: None,
        }
    }

    fn write_status(&self, st: &NodeStatus) {
        if let Err(e) = self
            .cfg
            .dir
            .write_json(&self.cfg.dir.status_file(self.cfg.host), st)
        {
            tracing::warn!(error = %e, "cannot write status");
        }
    }

    fn disk_path(&self) -> PathBuf {
        self.cfg.dir.file(&format!("{}.disk", self.cfg.host.name()))
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

    /// Adds the service address to this host and announces it (gratuitous ARP, netback's
    /// announcement frame), then starts the service on `volume`.
    fn start_service(&self, volume: Arc<Volume>) -> Result<Arc<Service>, LabError> {
        let ip = format!("{SERVICE_IP}/24");
        crate::topology::run("ip", &["addr", "add", &ip, "dev", PROD_IF])?;
        let svc = self
            .rt
            .block_on(Service::recover(volume, self.cfg.host.name()));
        let listener = self
            .rt
            .block_on(TcpListener::bind((SERVICE_IP, SERVICE_PORT)))
            .map_err(|e| LabError::component("service listener", e))?;
        self.rt.spawn(Arc::clone(&svc).serve(listener));
        if let Err(e) = announce() {
            self.event("announce failed", &e.to_string());
        }
        Ok(svc)
    }
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

async fn answer_alive(host: Host) {
    let Ok(l) = TcpListener::bind((host.prod_ip(), ALIVE_PORT)).await else {
        tracing::warn!("cannot bind the alive port");
        return;
    };
    while let Ok((s, _)) = l.accept().await {
        drop(s);
    }
}

fn peer_alive(peer: Host) -> bool {
    let addr = SocketAddr::from((peer.prod_ip(), ALIVE_PORT));
    TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).is_ok()
}

/// Runs the node until killed.
pub fn run(cfg: NodeConfig) -> Result<(), LabError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| LabError::component("tokio runtime", e))?;
    let secret_path = cfg.dir.file("secret");
    let secret = std::fs::read(&secret_path).map_err(|source| LabError::Io {
        path: secret_path,
        source,
    })?;
    let (me, peer) = (cfg.host, cfg.host.peer());
    let mut link_cfg = LinkConfig::new(
        me.name(),
        peer.name(),
        secret,
        (0..2)
            .map(|p| PathConfig {
                local: me.alink_addr(p),
                peer: peer.alink_addr(p),
            })
            .collect(),
    );
    // Shared, loaded machines stall processes for hundreds of ms: a 1 s path timeout keeps
    // the lab from flapping while still detecting a cut cable quickly.
    link_cfg.path_timeout = PATH_TIMEOUT;
    let link = rt
        .block_on(Link::start(link_cfg))
        .map_err(|e| LabError::component("a-link", e))?;
    rt.spawn(answer_alive(me));
    rt.spawn(crate::console::serve(cfg.dir.clone(), me));
    let node = Node {
        cfg,
        rt,
        link,
        disk_failed_ms: Arc::new(Mutex::new(None)),
    };
    match me {
        Host::Host1 => primary(&node),
        Host::Host2 => secondary(&node),
    }
}

fn primary(node: &Node) -> Result<(), LabError> {
    let _rt = node.rt.enter();
    let size = node.cfg.disk_bytes;
    let file = FileStore::open(&node.disk_path(), Some(size))
        .map_err(|e| LabError::component("disk", e))?;
    let faulty = Arc::new(FaultyStore::new(file));
    let store: Arc<dyn Store> = faulty.clone();
    let bitmap = DirtyBitmap::open(
        &node.cfg.dir.file("host1.bitmap"),
        store.size(),
        DEFAULT_CHUNK,
    )
    .map_err(|e| LabError::component("dirty bitmap", e))?;
    let mirror = Primary::new(
        Arc::clone(&store),
        bitmap,
        MirrorConfig {
            ack_timeout: Duration::from_millis(3000),
            ..MirrorConfig::default()
        },
    );
    let connector = AlinkConnector::new(node.link.clone())
        .ok_or_else(|| LabError::component("disk mirror", "disk channel already taken"))?;
    node.rt.spawn(Arc::clone(&mirror).run(connector));
    let volume = Volume::mirrored(store, Arc::clone(&mirror));

    if !node
        .rt
        .block_on(node.link.wait_connected(Duration::from_secs(20)))
    {
        return Err(LabError::Timeout(
            "the A-link to host2 did not connect".into(),
        ));
    }
    let domain = LocalDomain::spawn(&LocalGuestConfig {
        binary: node.cfg.guest_binary.clone(),
        memory_bytes: node.cfg.memory_bytes,
        workload: node.guest_workload()?,
        tracking: xenft_checkpoint::local::guest::Tracking::Auto,
    })
    .map_err(|e| LabError::component("synthetic guest", e))?;
    let guest_pid = domain.guest_pid();
    let endpoint = xenft_checkpoint::alink::endpoint(&node.link, node.rt.handle().clone())
        .map_err(|e| LabError::component("checkpoint channel", e))?;
    let sink = Arc::new(LastCommit(AtomicU64::new(0)));
    let protection = start_protection(
        domain,
        endpoint,
        sink,
        PrimaryConfig {
            epoch: EpochPolicy::Fixed(Duration::from_millis(node.cfg.epoch_ms)),
            ..PrimaryConfig::default()
        },
    )
    .map_err(|e| LabError::component("checkpoint primary", e))?;
    node.event(
        "protecting vm1 at level 3",
        "guest memory checkpointed to host2 over the A-link; disk mirrored synchronously",
    );
    let svc = node.start_service(volume)?;
    node.event(
        "service up on 10.200.0.10:7000",
        "host1 runs the VM; announced with gratuitous ARP",
    );

    let failed = Arc::clone(&node.disk_failed_ms);
    let dir = node.cfg.dir.clone();
    let mut sig = node
        .rt
        .block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        })
        .map_err(|e| LabError::component("signal handler", e))?;
    node.rt.spawn(async move {
        while sig.recv().await.is_some() {
            faulty.fail();
            let t = now_ms();
            *failed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(t);
            dir.log_event(&Event {
                t_ms: t,
                host: "host1".into(),
                what: "local store fails (EIO)".into(),
                why: "fault injected by the drill".into(),
            });
        }
    });

    let mut last_phase = String::new();
    let mut last_peer = None;
    loop {
        let p = protection.status();
        let d = mirror.status();
        let mut st = node.status_base(NodeRole::Primary);
        st.serving = true;
        st.service_count = svc.count();
        st.guest_pid = guest_pid;
        let phase = match &p.phase {
            Phase::Failed(r) => format!("failed: {r}"),
            other => format!("{other:?}").to_lowercase(),
        };
        if phase != last_phase {
            node.event(
                &format!("checkpoint {phase}"),
                "memory replication state changed",
            );
            last_phase.clone_from(&phase);
        }
        st.checkpoint = CheckpointView {
            phase,
            epoch: p.epoch,
            committed_epoch: p.committed_epoch,
            lag_bytes: p.lag_bytes,
            last_commit_age_ms: p
                .last_commit_age
                .map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX)),
        };
        st.disk_state = if d.local_failure.is_some() {
            "remote".into()
        } else {
            match d.peer {
                PeerLink::InSync => "in_sync",
                PeerLink::Resyncing => "resyncing",
                PeerLink::Degraded => "degraded",
            }
            .into()
        };
        if last_peer != Some(d.peer) {
            if let Some(prev) = last_peer {
                node.event(
                    &format!("disk mirror {}", st.disk_state),
                    &format!("was {prev:?}"),
                );
            }
            last_peer = Some(d.peer);
        }
        st.disk = serde_json::to_value(&d).unwrap_or_default();
        node.write_status(&st);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn secondary(node: &Node) -> Result<(), LabError> {
    let _rt = node.rt.enter();
    let store: Arc<dyn Store> = Arc::new(
        FileStore::open(&node.disk_path(), Some(node.cfg.disk_bytes))
            .map_err(|e| LabError::component("disk copy", e))?,
    );
    let copy = Secondary::new(Arc::clone(&store), node.cfg.dir.file("host2.disk-state"));
    let acceptor = AlinkAcceptor::new(&node.link)
        .ok_or_else(|| LabError::component("disk mirror", "disk channel already taken"))?;
    node.rt.spawn(Arc::clone(&copy).serve(acceptor));
    let replica = LocalDomain::replica(node.cfg.guest_binary.clone(), node.cfg.memory_bytes)
        .map_err(|e| LabError::component("replica memory", e))?;
    let endpoint = xenft_checkpoint::alink::endpoint(&node.link, node.rt.handle().clone())
        .map_err(|e| LabError::component("checkpoint channel", e))?;
    let sec = start_secondary(replica, endpoint, SecondaryConfig::default())
        .map_err(|e| LabError::component("checkpoint secondary", e))?;

    let mut lost_since: Option<(Instant, u64)> = None;
    let mut failed_probes = 0u32;
    let mut said_alive = false;
    let takeover_from = loop {
        let mut st = node.status_base(NodeRole::Secondary);
        let s = sec.status();
        st.checkpoint = CheckpointView {
            phase: "receiving".into(),
            committed_epoch: s.committed_epoch.unwrap_or(0),
            ..CheckpointView::default()
        };
        let c = copy.status();
        st.disk_state = "copy".into();
        st.disk = serde_json::to_value(&c).unwrap_or_default();
        if s.committed_epoch.is_none() {
            // Nothing to fail over to yet: not armed.
        } else if st.link.connected {
            if lost_since.take().is_some() {
                node.event("A-link back", "a path to host1 is up again");
            }
            failed_probes = 0;
            said_alive = false;
        } else {
            let (since, since_ms) = *lost_since.get_or_insert_with(|| {
                node.event("A-link lost", "no path to host1 is up");
                (Instant::now(), now_ms())
            });
            st.link_lost_ms = Some(since_ms);
            if since.elapsed() >= LOST_GRACE {
                if peer_alive(Host::Host1) {
                    failed_probes = 0;
                    st.peer_alive_on_prod = Some(true);
                    if !said_alive {
                        node.event(
                            "no failover",
                            "both A-links are down but host1 answers on the production \
                             network: it is alive, taking over would split the brain",
                        );
                        said_alive = true;
                    }
                } else {
                    failed_probes += 1;
                    st.peer_alive_on_prod = Some(false);
                    if failed_probes >= 2 {
                        break since_ms;
                    }
                }
            }
        }
        node.write_status(&st);
        std::thread::sleep(Duration::from_millis(50));
    };

    let decided_ms = now_ms();
    let reason = format!(
        "no A-link path for {} ms and host1 silent on the production network \
         (2 probes of {} ms): host1 is dead",
        decided_ms.saturating_sub(takeover_from),
        PROBE_TIMEOUT.as_millis()
    );
    node.event("host1 declared dead: failover", &reason);
    let (domain, epoch) = sec
        .failover()
        .map_err(|e| LabError::component("checkpoint failover", e))?;
    node.event(
        &format!("guest resumed from checkpoint {epoch}"),
        "the last checkpoint applied whole on host2",
    );
    let volume = Volume::local(Arc::clone(&store));
    let svc = node.start_service(volume)?;
    let serving_ms = now_ms();
    node.event(
        &format!(
            "service up on host2 with {} records recovered from the disk copy",
            svc.count()
        ),
        "service address moved to host2 and announced (gratuitous ARP)",
    );
    let takeover = Takeover {
        link_lost_ms: takeover_from,
        decided_ms,
        serving_ms,
        failover_epoch: epoch,
        recovered_count: svc.count(),
        reason,
    };
    loop {
        let mut st = node.status_base(NodeRole::TookOver);
        st.serving = true;
        st.service_count = svc.count();
        st.guest_pid = domain.guest_pid();
        st.checkpoint = CheckpointView {
            phase: "failed over (unprotected)".into(),
            committed_epoch: epoch,
            ..CheckpointView::default()
        };
        st.disk_state = "local".into();
        st.takeover = Some(takeover.clone());
        node.write_status(&st);
        std::thread::sleep(Duration::from_millis(100));
    }
}
