//! The agent daemon: the [`HostCore`] wrapped in sockets, files and the component seams.
//!
//! - heartbeats: one HMAC-authenticated UDP datagram per path per interval (each A-link path
//!   and the management network have their own local and peer address, so per-path liveness is
//!   real); the storage heartbeat is a small authenticated file per (sender, receiver) in a
//!   shared directory, replaced atomically and polled;
//! - quorum: one task per server with a [`QuorumClient`];
//! - commands: run on blocking threads through [`Seams`] (domain control, disk mirror, network
//!   relay, checkpoint engine); a long sync never delays a fence;
//! - persistence: the latest records are written by one task (coalescing, in order);
//! - status: a [`StatusHub`] refreshed every 100 ms and fed every decision.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use xenft_alink::{Channel, Link};

use crate::config::ValidConfig;
use crate::core::{Command, Heartbeat, HostCore, Input, Output};
use crate::ids::{HostId, PathId};
use crate::lifecycle::{StateError, StateFile, VmRecord};
use crate::quorum::client::QuorumClient;
use crate::quorum::table::QuorumRequest;
use crate::quorum::wire::{decode, encode, HEARTBEAT_MAGIC};
use crate::seams::Seams;
use crate::status::{Counters, StatusHub};

/// The agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The state file is unreadable.
    #[error(transparent)]
    State(#[from] StateError),
    /// A heartbeat socket could not be bound.
    #[error("cannot bind heartbeat socket {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

#[derive(Default)]
struct Stats {
    hb_sent: AtomicU64,
    hb_received: AtomicU64,
    hb_rejected: AtomicU64,
    q_requests: AtomicU64,
    q_errors: AtomicU64,
    cmd_errors: AtomicU64,
    persist_errors: AtomicU64,
}

impl Stats {
    fn counters(&self) -> Counters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            heartbeats_sent: g(&self.hb_sent),
            heartbeats_received: g(&self.hb_received),
            heartbeats_rejected: g(&self.hb_rejected),
            quorum_requests: g(&self.q_requests),
            quorum_errors: g(&self.q_errors),
            command_errors: g(&self.cmd_errors),
            persist_errors: g(&self.persist_errors),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// A running agent.
pub struct Agent {
    hub: Arc<StatusHub>,
    inputs: mpsc::Sender<Input>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    /// The status hub (for the status server and tests).
    #[must_use]
    pub fn hub(&self) -> Arc<StatusHub> {
        self.hub.clone()
    }

    /// A sender for external observations (shim component reports, mirror consistency,
    /// resources, new protections from the registry).
    #[must_use]
    pub fn inputs(&self) -> mpsc::Sender<Input> {
        self.inputs.clone()
    }

    /// Stops every task of the agent.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Starts the agent with UDP heartbeats on every path.
    ///
    /// # Errors
    /// [`RuntimeError`] when the state file is unreadable or a socket cannot be bound.
    pub async fn start(cfg: ValidConfig, seams: Seams) -> Result<Self, RuntimeError> {
        Self::start_with_links(cfg, seams, BTreeMap::new()).await
    }

    /// Starts the agent; for the peers in `links`, the A-link heartbeats travel on the link's
    /// `Heartbeat` channel and per-path liveness comes from the link's own per-path status
    /// (the UDP A-link paths of those peers are not used). Management and storage heartbeats
    /// are unchanged.
    ///
    /// # Errors
    /// [`RuntimeError`] when the state file is unreadable or a socket cannot be bound.
    pub async fn start_with_links(
        cfg: ValidConfig,
        seams: Seams,
        links: BTreeMap<HostId, Link>,
    ) -> Result<Self, RuntimeError> {
        let state = StateFile::new(&cfg.state_file);
        let records = state.load()?;
        let hub = StatusHub::new(cfg.event_log);
        let stats = Arc::new(Stats::default());
        let (shutdown, stop) = watch::channel(false);
        let (in_tx, in_rx) = mpsc::channel::<Input>(4096);
        let epoch = Instant::now();
        let incarnation = u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
        )
        .unwrap_or(0);

        // Heartbeat sockets, one per distinct local address.
        let mut sockets: BTreeMap<SocketAddr, Arc<UdpSocket>> = BTreeMap::new();
        for (peer, path, a) in &cfg.paths {
            let via_link = matches!(path, PathId::Alink(_)) && links.contains_key(peer);
            if via_link || sockets.contains_key(&a.local) {
                continue;
            }
            let s = UdpSocket::bind(a.local)
                .await
                .map_err(|source| RuntimeError::Bind {
                    addr: a.local,
                    source,
                })?;
            sockets.insert(a.local, Arc::new(s));
        }
        let paths = Arc::new(cfg.paths.clone());
        let secret = Arc::new(cfg.secret.clone());
        for (local, sock) in &sockets {
            tokio::spawn(recv_heartbeats(
                *local,
                sock.clone(),
                paths.clone(),
                secret.clone(),
                cfg.core.me.clone(),
                in_tx.clone(),
                stats.clone(),
                stop.clone(),
            ));
        }
        if let Some(dir) = &cfg.storage_dir {
            tokio::spawn(poll_storage(
                dir.clone(),
                cfg.core.me.clone(),
                cfg.core.peers.clone(),
                secret.clone(),
                Duration::from_millis(cfg.core.timing.heartbeat_ms),
                in_tx.clone(),
                stats.clone(),
                stop.clone(),
            ));
        }
        // Storage heartbeat writers: one per peer file, the latest heartbeat wins.
        let mut storage_tx = BTreeMap::new();
        if let Some(dir) = &cfg.storage_dir {
            for peer in cfg.core.peers.iter().filter(|p| **p != cfg.core.me) {
                let (tx, rx) = watch::channel(None);
                let file = dir.join(format!("{}--{peer}.hb", cfg.core.me));
                tokio::spawn(storage_writer(file, rx, stats.clone()));
                storage_tx.insert(peer.clone(), tx);
            }
        }
        // A-links.
        let mut link_tx = BTreeMap::new();
        for (peer, link) in links {
            let (tx, rx) = mpsc::channel::<Bytes>(8);
            tokio::spawn(link_sender(link.clone(), rx, stop.clone()));
            tokio::spawn(link_receiver(
                peer.clone(),
                link,
                secret.clone(),
                cfg.core.timing,
                in_tx.clone(),
                stats.clone(),
                stop.clone(),
            ));
            link_tx.insert(peer, tx);
        }
        // Quorum clients.
        let mut quorum_tx = Vec::new();
        for (i, addr) in cfg.quorum.iter().enumerate() {
            let (tx, rx) = mpsc::channel::<QuorumRequest>(4);
            let client = QuorumClient::new(
                *addr,
                cfg.secret.clone(),
                Duration::from_millis(cfg.core.timing.quorum_request_timeout_ms),
            );
            tokio::spawn(quorum_task(
                i,
                client,
                rx,
                in_tx.clone(),
                stats.clone(),
                hub.clone(),
            ));
            quorum_tx.push(tx);
        }
        hub.update(|s| {
            s.quorum = cfg.quorum.iter().map(|a| (a.to_string(), false)).collect();
        });
        // Persistence.
        let (persist_tx, persist_rx) = watch::channel::<Option<Vec<VmRecord>>>(None);
        tokio::spawn(persist_task(state, persist_rx, stats.clone()));

        let ms = move || u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1;
        let running = seams.domains.running();
        let (mut core, out) = HostCore::new(cfg.core.clone(), incarnation, ms(), records, &running);
        let io = Io {
            links: link_tx,
            sockets,
            paths,
            secret,
            storage_tx,
            quorum_tx,
            seams,
            inputs: in_tx.clone(),
            persist: persist_tx,
            hub: hub.clone(),
            stats: stats.clone(),
        };
        io.dispatch(out).await;
        if let Some(free_memory_mb) = cfg.free_memory_mb {
            let out = core.step(ms(), Input::Resources { free_memory_mb });
            io.dispatch(out).await;
        }
        for spec in cfg.vms.clone() {
            let out = core.step(ms(), Input::Protect(spec));
            io.dispatch(out).await;
        }
        let me = cfg.core.me.clone();
        let task = tokio::spawn(run_loop(core, io, in_rx, stop, ms, me, incarnation));
        Ok(Self {
            hub,
            inputs: in_tx,
            shutdown,
            task,
        })
    }
}

struct Io {
    links: BTreeMap<HostId, mpsc::Sender<Bytes>>,
    sockets: BTreeMap<SocketAddr, Arc<UdpSocket>>,
    paths: Arc<Vec<(HostId, PathId, crate::config::PathAddrs)>>,
    secret: Arc<Vec<u8>>,
    storage_tx: BTreeMap<HostId, watch::Sender<Option<Vec<u8>>>>,
    quorum_tx: Vec<mpsc::Sender<QuorumRequest>>,
    seams: Seams,
    inputs: mpsc::Sender<Input>,
    persist: watch::Sender<Option<Vec<VmRecord>>>,
    hub: Arc<StatusHub>,
    stats: Arc<Stats>,
}

impl Io {
    async fn dispatch(&self, out: Vec<Output>) {
        for o in out {
            match o {
                Output::Heartbeat { path, hb } => self.send_heartbeat(path, &hb).await,
                Output::Quorum { server, req } => {
                    if let Some(tx) = self.quorum_tx.get(server) {
                        bump(&self.stats.q_requests);
                        // A full queue means the server is slow: the core retries anyway.
                        let _ = tx.try_send(req);
                    }
                }
                Output::Command(c) => self.command(c),
                Output::Decision(d) => self.hub.push(d),
                Output::Persist(recs) => {
                    let _ = self.persist.send(Some(recs));
                }
            }
        }
    }

    async fn send_heartbeat(&self, path: PathId, hb: &Heartbeat) {
        let Ok(bytes) = encode(HEARTBEAT_MAGIC, &self.secret, hb) else {
            return;
        };
        if path == PathId::Storage {
            // Shared storage can hang (NFS): the writer runs apart and always writes the
            // latest heartbeat, so the decision loop never waits on it.
            if let Some(tx) = self.storage_tx.get(&hb.to) {
                let _ = tx.send(Some(bytes));
            }
            return;
        }
        if let (PathId::Alink(i), Some(tx)) = (path, self.links.get(&hb.to)) {
            // One message per round: the link picks the path and keeps its own per-path
            // heartbeats. A full queue means the link is stalled: drop, the next round follows.
            if i == 0 && tx.try_send(Bytes::from(bytes)).is_ok() {
                bump(&self.stats.hb_sent);
            }
            return;
        }
        let Some((_, _, addrs)) = self
            .paths
            .iter()
            .find(|(peer, p, _)| *peer == hb.to && *p == path)
        else {
            return;
        };
        if let Some(sock) = self.sockets.get(&addrs.local) {
            // Send errors (link down, no route) are what heartbeats detect: ignore them.
            if sock.send_to(&bytes, addrs.peer).await.is_ok() {
                bump(&self.stats.hb_sent);
            }
        }
    }

    fn command(&self, c: Command) {
        let seams = self.seams.clone();
        let inputs = self.inputs.clone();
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let r = tokio::task::spawn_blocking(move || run_command(&seams, c)).await;
            match r {
                Ok(Some(input)) => {
                    let _ = inputs.send(input).await;
                }
                Ok(None) => {}
                Err(_) => bump(&stats.cmd_errors),
            }
        });
    }
}

fn run_command(seams: &Seams, c: Command) -> Option<Input> {
    let log = |r: Result<(), crate::seams::SeamError>| {
        if let Err(e) = r {
            tracing::error!(error = %e, "component command failed");
        }
    };
    match c {
        Command::StartVm { vm, mode } => {
            let r = seams.start(&vm, mode);
            Some(Input::VmStarted {
                ok: r.is_ok(),
                detail: r.err().map(|e| e.to_string()).unwrap_or_default(),
                vm,
            })
        }
        Command::PauseVm { vm } => {
            log(seams.fence(&vm));
            None
        }
        Command::ResumeVm { vm } => {
            log(seams.unfence(&vm));
            None
        }
        Command::DestroyVm { vm } => {
            log(seams.domains.destroy(&vm));
            None
        }
        Command::StartSync {
            vm,
            peer,
            sync_id,
            full,
        } => match seams
            .disk
            .sync(&vm, &peer, full)
            .and_then(|()| seams.checkpoint.protect(&vm, &peer))
        {
            Ok(()) => Some(Input::SyncDone { vm, sync_id }),
            Err(e) => {
                tracing::warn!(error = %e, "sync failed; the core retries after a backoff");
                Some(Input::SyncFailed {
                    vm,
                    sync_id,
                    reason: e.to_string(),
                })
            }
        },
        Command::SuspendReplication { vm } => {
            log(seams.disk.suspend(&vm));
            None
        }
        Command::Redirect { vm, component } => {
            log(seams.redirect(&vm, component, true));
            None
        }
        Command::Restore { vm, component } => {
            log(seams.redirect(&vm, component, false));
            None
        }
    }
}

async fn run_loop(
    mut core: HostCore,
    io: Io,
    mut inputs: mpsc::Receiver<Input>,
    mut stop: watch::Receiver<bool>,
    ms: impl Fn() -> u64,
    me: HostId,
    incarnation: u64,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = 0;
    loop {
        let out = tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => core.step(ms(), Input::Tick),
            i = inputs.recv() => match i {
                Some(i) => core.step(ms(), i),
                None => break,
            },
        };
        // Status readers (console, tests) must see a fence or a take-over at once.
        let changed = out
            .iter()
            .any(|o| matches!(o, Output::Command(_) | Output::Decision(_)));
        io.dispatch(out).await;
        let now = ms();
        if changed || now >= last_status + 100 {
            last_status = now;
            let counters = io.stats.counters();
            let (peers, vms) = (core.peer_views(), core.vm_views());
            let me = me.clone();
            io.hub.update(|s| {
                s.host = Some(me);
                s.incarnation = incarnation;
                s.peers = peers;
                s.vms = vms;
                s.counters = counters;
            });
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn recv_heartbeats(
    local: SocketAddr,
    sock: Arc<UdpSocket>,
    paths: Arc<Vec<(HostId, PathId, crate::config::PathAddrs)>>,
    secret: Arc<Vec<u8>>,
    me: HostId,
    inputs: mpsc::Sender<Input>,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let r = tokio::select! {
            _ = stop.changed() => return,
            r = sock.recv_from(&mut buf) => r,
        };
        let Ok((n, src)) = r else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(hb) = decode::<Heartbeat>(HEARTBEAT_MAGIC, &secret, &buf[..n]) else {
            bump(&stats.hb_rejected);
            continue;
        };
        let path = paths
            .iter()
            .find(|(peer, _, a)| *peer == hb.from && a.local == local && a.peer == src)
            .map(|(_, p, _)| *p);
        match path {
            Some(path) if hb.to == me => {
                bump(&stats.hb_received);
                let _ = inputs.try_send(Input::Heartbeat { path, hb });
            }
            _ => bump(&stats.hb_rejected),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn poll_storage(
    dir: PathBuf,
    me: HostId,
    peers: Vec<HostId>,
    secret: Arc<Vec<u8>>,
    every: Duration,
    inputs: mpsc::Sender<Input>,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen: BTreeMap<HostId, (u64, u64)> = BTreeMap::new();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        for peer in peers.iter().filter(|p| **p != me) {
            let file = dir.join(format!("{peer}--{me}.hb"));
            let Ok(meta) = tokio::fs::metadata(&file).await else {
                continue;
            };
            if meta.len() > 300_000 {
                bump(&stats.hb_rejected);
                continue;
            }
            let Ok(bytes) = tokio::fs::read(&file).await else {
                continue;
            };
            let Ok(hb) = decode::<Heartbeat>(HEARTBEAT_MAGIC, &secret, &bytes) else {
                bump(&stats.hb_rejected);
                continue;
            };
            if hb.from != *peer || hb.to != me {
                bump(&stats.hb_rejected);
                continue;
            }
            let key = (hb.incarnation, hb.seq);
            if seen.get(peer) == Some(&key) {
                continue; // not rewritten since: the peer may be dead
            }
            seen.insert(peer.clone(), key);
            bump(&stats.hb_received);
            let _ = inputs.try_send(Input::Heartbeat {
                path: PathId::Storage,
                hb,
            });
        }
    }
}

async fn quorum_task(
    server: usize,
    mut client: QuorumClient,
    mut rx: mpsc::Receiver<QuorumRequest>,
    inputs: mpsc::Sender<Input>,
    stats: Arc<Stats>,
    hub: Arc<StatusHub>,
) {
    while let Some(req) = rx.recv().await {
        let ok = match client.request(&req).await {
            Ok(reply) => {
                let _ = inputs.send(Input::Quorum { server, reply }).await;
                true
            }
            Err(e) => {
                bump(&stats.q_errors);
                tracing::debug!(error = %e, "quorum request failed");
                false
            }
        };
        hub.update(|s| {
            if let Some(q) = s.quorum.get_mut(server) {
                q.1 = ok;
            }
        });
    }
}

async fn persist_task(
    state: StateFile,
    mut rx: watch::Receiver<Option<Vec<VmRecord>>>,
    stats: Arc<Stats>,
) {
    while rx.changed().await.is_ok() {
        let recs = rx.borrow_and_update().clone();
        let Some(recs) = recs else { continue };
        let st = state.clone();
        let r = tokio::task::spawn_blocking(move || st.save(&recs)).await;
        if !matches!(r, Ok(Ok(()))) {
            bump(&stats.persist_errors);
            tracing::error!(path = %state.path().display(), "cannot persist the agent state");
        }
    }
}

async fn link_sender(link: Link, mut rx: mpsc::Receiver<Bytes>, mut stop: watch::Receiver<bool>) {
    loop {
        let msg = tokio::select! {
            _ = stop.changed() => return,
            m = rx.recv() => match m { Some(m) => m, None => return },
        };
        if let Err(e) = link.send(Channel::Heartbeat, msg).await {
            tracing::debug!(error = %e, "heartbeat not queued on the A-link");
        }
    }
}

async fn link_receiver(
    peer: HostId,
    link: Link,
    secret: Arc<Vec<u8>>,
    timing: crate::timing::Timing,
    inputs: mpsc::Sender<Input>,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(mut rx) = link.receiver(Channel::Heartbeat) else {
        tracing::error!(%peer, "the A-link's heartbeat channel is already taken");
        return;
    };
    let mut events = link.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis((timing.heartbeat_ms / 2).max(10)));
    let fresh = timing.heartbeat_ms.saturating_mul(2);
    let path_of = |i: usize| u8::try_from(i).ok().map(PathId::Alink);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            m = rx.recv() => {
                let Some(m) = m else { return };
                let Ok(hb) = decode::<Heartbeat>(HEARTBEAT_MAGIC, &secret, &m) else {
                    bump(&stats.hb_rejected);
                    continue;
                };
                if hb.from != peer {
                    bump(&stats.hb_rejected);
                    continue;
                }
                let active = link.status().active_path.unwrap_or(0);
                if let Some(path) = path_of(active) {
                    bump(&stats.hb_received);
                    let _ = inputs.try_send(Input::Heartbeat { path, hb });
                }
            }
            _ = tick.tick() => {
                for p in link.status().paths {
                    let alive = p.up && p.last_seen_ms_ago.is_some_and(|a| a <= fresh);
                    if let (true, Some(path)) = (alive, path_of(p.index)) {
                        let _ = inputs.try_send(Input::PathSeen { peer: peer.clone(), path });
                    }
                }
            }
            ev = events.recv() => match ev {
                Ok(ev) => tracing::info!(%peer, ?ev, "A-link event"),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

async fn storage_writer(
    file: PathBuf,
    mut rx: watch::Receiver<Option<Vec<u8>>>,
    stats: Arc<Stats>,
) {
    let mut tmp = file.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    while rx.changed().await.is_ok() {
        let Some(bytes) = rx.borrow_and_update().clone() else {
            continue;
        };
        let ok = tokio::fs::write(&tmp, &bytes).await.is_ok()
            && tokio::fs::rename(&tmp, &file).await.is_ok();
        if ok {
            bump(&stats.hb_sent);
        }
    }
}
