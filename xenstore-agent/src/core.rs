//! The per-host decision core: membership, failure detection, quorum client, fencing and the
//! per-VM protection lifecycle, as one pure state machine.
//!
//! Like raft-rs, [`HostCore`] does no I/O and reads no clock: the caller feeds it [`Input`]s
//! (ticks, heartbeats received on a path, quorum replies, shim reports) with the current time,
//! and carries out the [`Output`]s it returns (send a heartbeat on a path, send a quorum
//! request, run a [`Command`] on a VM, record a [`Decision`], persist the records). The same
//! core runs in the agent daemon (`crate::runtime`) and in the deterministic simulator
//! (`crate::sim`).
//!
//! ## Safety argument (at most one running copy per VM)
//! Only a VM's secondary ever promotes, and only when (1) it has heard nothing from the primary
//! on any path for `peer_dead_ms` and (2) with quorum servers configured, it holds grants from
//! all of them (acquired in order). The primary keeps running only while it holds (a) a live
//! lease from at least one server, or (b) a live *promise* from the secondary: every heartbeat
//! acknowledges the highest heartbeat sequence heard from the peer, and the primary keeps the
//! send time `t` of each sequence; since the secondary received it at or after `t`, it will not
//! claim before `t + peer_dead_ms`, so the promise holds until `t + peer_dead_ms - margin`.
//! A server grants the VM to the secondary only after the primary's lease expired at the server,
//! which is after it expired at the primary (leases are counted from the send time, minus a
//! margin). Hence when the secondary promotes, the primary has neither lease nor promise and has
//! paused its copy (fenced). A fenced copy resumes only with proof that nobody else took over:
//! a server (epochs count owners per VM) renewing the epoch it held when it fenced or granting
//! it the very next one (epoch 1 if it held none since the server started), or a live promise
//! from the peer together with the peer's report that it does not run the VM.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::decision::{Action, Component, Decision, FaultClass};
use crate::ids::{HostId, Millis, PathId, VmId};
use crate::lifecycle::{Level, Phase, VmRecord};
use crate::quorum::table::{Claim, ClaimResult, QuorumRequest, QuorumResponse};
use crate::timing::Timing;

/// Most VM reports in one heartbeat.
pub const MAX_VM_REPORTS: usize = 1024;

/// Static configuration of one host's core.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// This host.
    pub me: HostId,
    /// The other hosts of the pool.
    pub peers: Vec<HostId>,
    /// A-link paths to each peer.
    pub alink_paths: u8,
    /// Whether heartbeats also go over the management network.
    pub mgmt_heartbeat: bool,
    /// Whether a storage heartbeat is configured.
    pub storage_heartbeat: bool,
    /// How many quorum servers are configured (0, 1 or 2; in order of preference).
    pub quorum_servers: usize,
    /// Timeouts.
    pub timing: Timing,
}

impl CoreConfig {
    fn paths(&self) -> Vec<PathId> {
        let mut p: Vec<PathId> = (0..self.alink_paths).map(PathId::Alink).collect();
        if self.mgmt_heartbeat {
            p.push(PathId::Mgmt);
        }
        if self.storage_heartbeat {
            p.push(PathId::Storage);
        }
        p
    }
}

/// Acknowledgement carried by a heartbeat: the highest sequence heard from the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// The receiver's incarnation the sequence belongs to.
    pub incarnation: u64,
    /// The sequence.
    pub seq: u64,
}

/// What a host says about one VM it shares with the receiver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmReport {
    /// The VM.
    pub vm: VmId,
    /// The sender's role generation for it.
    pub generation: u64,
    /// Who the sender believes is primary.
    pub primary: HostId,
    /// Whether the sender's copy is running (not paused, not stopped).
    pub running: bool,
    /// The sender's phase.
    pub phase: Phase,
}

/// A heartbeat, sent every interval on every path to every peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Sender.
    pub from: HostId,
    /// Receiver.
    pub to: HostId,
    /// Sender's incarnation (changes when its agent restarts).
    pub incarnation: u64,
    /// Sequence of this round (the same on every path).
    pub seq: u64,
    /// Highest sequence the sender heard from the receiver.
    pub ack: Option<Ack>,
    /// The VMs the two hosts share.
    pub vms: Vec<VmReport>,
}

/// A VM the agent is asked to protect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The VM.
    pub vm: VmId,
    /// Level.
    pub level: Level,
    /// Host running it now.
    pub primary: HostId,
    /// Host protecting it.
    pub secondary: HostId,
    /// Memory it needs (MiB).
    pub memory_mb: u64,
}

/// How a VM is started on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartMode {
    /// Boot from the (mirrored or shared) disk: level 1 and 2, or a restart after both copies
    /// were lost.
    Boot,
    /// Resume from the last committed checkpoint (level 3 take-over).
    ResumeCheckpoint,
}

/// Something the caller must do to a VM or its shims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Start the VM here; answer with [`Input::VmStarted`].
    StartVm {
        /// The VM.
        vm: VmId,
        /// How.
        mode: StartMode,
    },
    /// Pause the local copy (fence).
    PauseVm {
        /// The VM.
        vm: VmId,
    },
    /// Unpause the local copy.
    ResumeVm {
        /// The VM.
        vm: VmId,
    },
    /// Destroy the local copy (the peer owns the VM).
    DestroyVm {
        /// The VM.
        vm: VmId,
    },
    /// Start replication to the peer: full sync or resync of dirty regions; answer with
    /// [`Input::SyncDone`] carrying `sync_id`.
    StartSync {
        /// The VM.
        vm: VmId,
        /// The secondary.
        peer: HostId,
        /// Token to match the completion.
        sync_id: u64,
        /// Full copy (first protection) rather than dirty regions only.
        full: bool,
    },
    /// Stop replicating (peer lost): track dirty regions from now on.
    SuspendReplication {
        /// The VM.
        vm: VmId,
    },
    /// Send the component's I/O through the peer.
    Redirect {
        /// The VM.
        vm: VmId,
        /// Which component.
        component: Component,
    },
    /// Use the local component again.
    Restore {
        /// The VM.
        vm: VmId,
        /// Which component.
        component: Component,
    },
}

/// What the core is told.
#[derive(Clone, Debug)]
pub enum Input {
    /// Time passes (call every 10–20 ms).
    Tick,
    /// A heartbeat arrived on a path.
    Heartbeat {
        /// The path.
        path: PathId,
        /// The heartbeat.
        hb: Heartbeat,
    },
    /// A quorum server answered.
    Quorum {
        /// Index of the server (order of preference).
        server: usize,
        /// The reply.
        reply: QuorumResponse,
    },
    /// A shim reports a component fault or recovery (for one VM, or all when `vm` is None).
    Component {
        /// The VM, or None for every VM on this host.
        vm: Option<VmId>,
        /// Which component.
        component: Component,
        /// True when it works again.
        ok: bool,
        /// The shim's words.
        detail: String,
    },
    /// Free memory for VMs on this host (MiB).
    Resources {
        /// Free memory.
        free_memory_mb: u64,
    },
    /// A sync started by [`Command::StartSync`] finished.
    SyncDone {
        /// The VM.
        vm: VmId,
        /// The token.
        sync_id: u64,
    },
    /// The local replica's consistency changed (reported by the disk mirror on the secondary).
    MirrorConsistent {
        /// The VM.
        vm: VmId,
        /// Consistent now.
        consistent: bool,
    },
    /// A [`Command::StartVm`] finished.
    VmStarted {
        /// The VM.
        vm: VmId,
        /// It runs.
        ok: bool,
        /// Error text when not.
        detail: String,
    },
    /// Protect a VM (from the registry).
    Protect(VmSpec),
    /// Stop protecting a VM (from the registry): replication stops, the record is dropped,
    /// the local copy is left as it is (a running primary keeps running).
    Unprotect(VmId),
    /// A transport with its own per-path liveness (the A-link crate) saw the peer on a path
    /// just now. Liveness only: the heartbeat content (acknowledgements, VM reports) still
    /// comes in [`Input::Heartbeat`].
    PathSeen {
        /// The peer.
        peer: HostId,
        /// The path.
        path: PathId,
    },
}

/// What the core asks the caller to do.
#[derive(Clone, Debug)]
pub enum Output {
    /// Send a heartbeat on a path.
    Heartbeat {
        /// The path.
        path: PathId,
        /// The heartbeat.
        hb: Heartbeat,
    },
    /// Send a request to a quorum server.
    Quorum {
        /// Index of the server.
        server: usize,
        /// The request.
        req: QuorumRequest,
    },
    /// Act on a VM or its shims.
    Command(Command),
    /// A decision with its reason.
    Decision(Decision),
    /// Persist these records (state changed).
    Persist(Vec<VmRecord>),
}

/// State of the local copy of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalCopy {
    /// Not running here.
    Stopped,
    /// Being started.
    Starting,
    /// Running here.
    Running,
    /// Paused by a fence.
    Paused,
}

#[derive(Clone, Copy, Debug, Default)]
struct PathState {
    last: Millis,
    up: bool,
    /// Highest sequence accepted on this path (replayed or reordered datagrams are dropped).
    last_seq: Option<u64>,
}

#[derive(Clone, Debug)]
struct PeerState {
    paths: BTreeMap<PathId, PathState>,
    last_any: Millis,
    silent: bool,
    alinks_down_reported: bool,
    incarnation: Option<u64>,
    max_seq: Option<u64>,
    promise_until: Millis,
    reports: BTreeMap<VmId, VmReport>,
}

/// A decision to log: class, path, reason.
type Noted = (FaultClass, Option<PathId>, String);

impl PeerState {
    fn alink_up(&self) -> bool {
        self.paths
            .iter()
            .any(|(p, s)| matches!(p, PathId::Alink(_)) && s.up)
    }

    /// Records that `path` (a configured path) was heard at `now`; notes a path coming up
    /// (described by `how`) and the peer coming back.
    fn heard(&mut self, path: PathId, now: Millis, how: impl FnOnce() -> String) -> Vec<Noted> {
        let mut events = Vec::new();
        if let Some(pst) = self.paths.get_mut(&path) {
            pst.last = now;
            if !pst.up {
                pst.up = true;
                events.push((FaultClass::PathUp, Some(path), how()));
            }
        }
        self.last_any = now;
        if self.silent {
            self.silent = false;
            events.push((FaultClass::PeerBack, None, "peer heard again".to_string()));
        }
        if self.alinks_down_reported && self.alink_up() {
            self.alinks_down_reported = false;
        }
        events
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct LeaseView {
    /// (server boot, epoch) of the last grant.
    epoch: Option<(u64, u64)>,
    valid_until: Millis,
}

#[derive(Clone, Debug)]
struct VmRuntime {
    rec: VmRecord,
    local: LocalCopy,
    leases: Vec<LeaseView>,
    fence_epochs: Vec<Option<(u64, u64)>>,
    unfence_proof: bool,
    never_synced: bool,
    refused: Option<String>,
    sync_id: u64,
    redirected: BTreeSet<Component>,
}

#[derive(Clone, Copy, Debug, Default)]
struct ServerConn {
    pending: Option<(u64, Millis)>,
    next_at: Millis,
}

/// Read-only view of one peer for status pages.
#[derive(Clone, Debug, Serialize)]
pub struct PeerView {
    /// The peer.
    pub host: HostId,
    /// Per path: up, and ms since last heard.
    pub paths: Vec<(PathId, bool, Millis)>,
    /// Silent on every path past the timeout.
    pub silent: bool,
    /// ms since heard on any path.
    pub last_heard_ms_ago: Millis,
}

/// Read-only view of one VM for status pages.
#[derive(Clone, Debug, Serialize)]
pub struct VmView {
    /// Persisted record.
    pub record: VmRecord,
    /// Local copy state.
    pub local: LocalCopy,
    /// Holds a live lease from some quorum server.
    pub lease_valid: bool,
    /// Components redirected through the peer.
    pub redirected: Vec<Component>,
}

/// The decision core of one host.
#[derive(Debug)]
pub struct HostCore {
    cfg: CoreConfig,
    incarnation: u64,
    now: Millis,
    peers: BTreeMap<HostId, PeerState>,
    vms: BTreeMap<VmId, VmRuntime>,
    servers: Vec<ServerConn>,
    next_hb_at: Millis,
    hb_seq: u64,
    sent_seqs: VecDeque<(u64, Millis)>,
    free_memory_mb: Option<u64>,
    next_req_id: u64,
    out: Vec<Output>,
    dirty: bool,
}

impl HostCore {
    /// A core starting at `now` with persisted `records`; `running` lists the VMs whose
    /// domain runs here already (agent restart). With quorum servers configured, such VMs are
    /// paused at once until this host proves it still owns them.
    #[must_use]
    pub fn new(
        cfg: CoreConfig,
        incarnation: u64,
        now: Millis,
        records: Vec<VmRecord>,
        running: &[VmId],
    ) -> (Self, Vec<Output>) {
        let paths = cfg.paths();
        let peers = cfg
            .peers
            .iter()
            .filter(|p| **p != cfg.me)
            .map(|p| {
                (
                    p.clone(),
                    PeerState {
                        paths: paths
                            .iter()
                            .map(|&id| {
                                (
                                    id,
                                    // Paths start presumed up: a restarted agent does
                                    // not degrade its VMs before the detection timeout.
                                    PathState {
                                        last: now,
                                        up: true,
                                        last_seq: None,
                                    },
                                )
                            })
                            .collect(),
                        last_any: now,
                        silent: false,
                        alinks_down_reported: false,
                        incarnation: None,
                        max_seq: None,
                        promise_until: 0,
                        reports: BTreeMap::new(),
                    },
                )
            })
            .collect();
        let n = cfg.quorum_servers;
        let mut core = Self {
            servers: vec![ServerConn::default(); n],
            cfg,
            incarnation,
            now,
            peers,
            vms: BTreeMap::new(),
            next_hb_at: now,
            hb_seq: 0,
            sent_seqs: VecDeque::new(),
            free_memory_mb: None,
            next_req_id: 1,
            out: Vec::new(),
            dirty: false,
        };
        for mut rec in records {
            // A sync in flight died with the previous agent: restart it (the mirror's
            // persistent dirty bitmap makes the restart copy only what is still dirty).
            if rec.primary == core.cfg.me {
                match rec.phase {
                    Phase::Syncing => rec.phase = Phase::Unprotected,
                    Phase::Resyncing => rec.phase = Phase::Degraded,
                    _ => {}
                }
            }
            let local = if running.contains(&rec.vm) {
                LocalCopy::Running
            } else {
                LocalCopy::Stopped
            };
            core.insert_vm(rec, local);
        }
        let names: Vec<VmId> = core.vms.keys().cloned().collect();
        for vm in names {
            let fence = core.cfg.quorum_servers > 0
                && core
                    .vms
                    .get(&vm)
                    .is_some_and(|v| v.local == LocalCopy::Running);
            if fence {
                core.fence(
                    &vm,
                    "agent restarted with the VM running: pause until ownership is proven",
                );
            }
        }
        let out = core.finish();
        (core, out)
    }

    fn insert_vm(&mut self, rec: VmRecord, local: LocalCopy) {
        let n = self.cfg.quorum_servers;
        self.vms.insert(
            rec.vm.clone(),
            VmRuntime {
                rec,
                local,
                leases: vec![LeaseView::default(); n],
                fence_epochs: vec![None; n],
                unfence_proof: false,
                never_synced: false,
                refused: None,
                sync_id: 0,
                redirected: BTreeSet::new(),
            },
        );
    }

    /// This host.
    #[must_use]
    pub fn me(&self) -> &HostId {
        &self.cfg.me
    }

    /// The persisted records.
    #[must_use]
    pub fn records(&self) -> Vec<VmRecord> {
        self.vms.values().map(|v| v.rec.clone()).collect()
    }

    /// Status of the peers.
    #[must_use]
    pub fn peer_views(&self) -> Vec<PeerView> {
        self.peers
            .iter()
            .map(|(h, p)| PeerView {
                host: h.clone(),
                paths: p
                    .paths
                    .iter()
                    .map(|(id, s)| (*id, s.up, self.now.saturating_sub(s.last)))
                    .collect(),
                silent: p.silent,
                last_heard_ms_ago: self.now.saturating_sub(p.last_any),
            })
            .collect()
    }

    /// Status of the VMs.
    #[must_use]
    pub fn vm_views(&self) -> Vec<VmView> {
        self.vms
            .values()
            .map(|v| VmView {
                record: v.rec.clone(),
                local: v.local,
                lease_valid: v.leases.iter().any(|l| l.valid_until > self.now),
                redirected: v.redirected.iter().copied().collect(),
            })
            .collect()
    }

    /// The local copy state of a VM.
    #[must_use]
    pub fn local_copy(&self, vm: &VmId) -> Option<LocalCopy> {
        self.vms.get(vm).map(|v| v.local)
    }

    /// Feeds one input at time `now` (monotonic ms; never goes backwards) and returns what to
    /// do.
    pub fn step(&mut self, now: Millis, input: Input) -> Vec<Output> {
        self.now = self.now.max(now);
        match input {
            Input::Tick => self.on_tick(),
            Input::Heartbeat { path, hb } => self.on_heartbeat(path, hb),
            Input::Quorum { server, reply } => self.on_quorum(server, &reply),
            Input::Component {
                vm,
                component,
                ok,
                detail,
            } => self.on_component(vm.as_ref(), component, ok, &detail),
            Input::Resources { free_memory_mb } => self.free_memory_mb = Some(free_memory_mb),
            Input::SyncDone { vm, sync_id } => self.on_sync_done(&vm, sync_id),
            Input::MirrorConsistent { vm, consistent } => {
                if let Some(v) = self.vms.get_mut(&vm) {
                    if v.rec.consistent != consistent {
                        v.rec.consistent = consistent;
                        self.dirty = true;
                    }
                }
            }
            Input::VmStarted { vm, ok, detail } => self.on_started(&vm, ok, &detail),
            Input::Protect(spec) => self.on_protect(spec),
            Input::PathSeen { peer, path } => self.on_path_seen(&peer, path),
            Input::Unprotect(vm) => self.on_unprotect(&vm),
        }
        self.reconcile_all();
        self.finish()
    }

    fn finish(&mut self) -> Vec<Output> {
        if self.dirty {
            self.dirty = false;
            let recs = self.records();
            self.out.push(Output::Persist(recs));
        }
        std::mem::take(&mut self.out)
    }

    #[allow(clippy::too_many_arguments)]
    fn decide(
        &mut self,
        peer: Option<&HostId>,
        path: Option<PathId>,
        vm: Option<&VmId>,
        class: FaultClass,
        action: Action,
        reason: String,
    ) {
        tracing::info!(host = %self.cfg.me, peer = ?peer.map(HostId::as_str), vm = ?vm.map(VmId::as_str), ?path, ?class, ?action, %reason, "decision");
        self.out.push(Output::Decision(Decision {
            at_ms: self.now,
            host: self.cfg.me.clone(),
            peer: peer.cloned(),
            path,
            vm: vm.cloned(),
            class,
            action,
            reason,
        }));
    }

    fn cmd(&mut self, c: Command) {
        self.out.push(Output::Command(c));
    }

    // ----- membership -----

    fn on_tick(&mut self) {
        if self.now >= self.next_hb_at {
            self.send_heartbeats();
            self.next_hb_at = self.now + self.cfg.timing.heartbeat_ms;
        }
        self.update_liveness();
        self.quorum_tick();
    }

    fn send_heartbeats(&mut self) {
        self.hb_seq += 1;
        let seq = self.hb_seq;
        self.sent_seqs.push_back((seq, self.now));
        let keep = usize::try_from(self.cfg.timing.peer_dead_ms / self.cfg.timing.heartbeat_ms)
            .unwrap_or(64)
            .saturating_add(4)
            .min(4096);
        while self.sent_seqs.len() > keep {
            self.sent_seqs.pop_front();
        }
        let paths = self.cfg.paths();
        let peers: Vec<HostId> = self.peers.keys().cloned().collect();
        for peer in peers {
            let ps = &self.peers[&peer];
            let ack = match (ps.incarnation, ps.max_seq) {
                (Some(incarnation), Some(seq)) => Some(Ack { incarnation, seq }),
                _ => None,
            };
            let vms: Vec<VmReport> = self
                .vms
                .values()
                .filter(|v| v.rec.other(&self.cfg.me) == &peer)
                .take(MAX_VM_REPORTS)
                .map(|v| VmReport {
                    vm: v.rec.vm.clone(),
                    generation: v.rec.generation,
                    primary: v.rec.primary.clone(),
                    running: matches!(v.local, LocalCopy::Running | LocalCopy::Starting),
                    phase: v.rec.phase,
                })
                .collect();
            let hb = Heartbeat {
                from: self.cfg.me.clone(),
                to: peer.clone(),
                incarnation: self.incarnation,
                seq,
                ack,
                vms,
            };
            for &path in &paths {
                self.out.push(Output::Heartbeat {
                    path,
                    hb: hb.clone(),
                });
            }
        }
    }

    fn update_liveness(&mut self) {
        let t = self.cfg.timing;
        let now = self.now;
        let peers: Vec<HostId> = self.peers.keys().cloned().collect();
        for peer in peers {
            let mut downs = Vec::new();
            let (all_alinks_down, other_alive, newly_silent) = {
                let ps = self.peers.get_mut(&peer).expect("peer exists");
                for (id, s) in &mut ps.paths {
                    if s.up && now.saturating_sub(s.last) > t.path_down_ms {
                        s.up = false;
                        downs.push((*id, now - s.last));
                    }
                }
                let newly_silent = !ps.silent && now.saturating_sub(ps.last_any) >= t.peer_dead_ms;
                if newly_silent {
                    ps.silent = true;
                }
                let all_alinks_down = !ps.alink_up();
                let other_alive = ps
                    .paths
                    .iter()
                    .any(|(p, s)| !matches!(p, PathId::Alink(_)) && s.up);
                (all_alinks_down, other_alive, newly_silent)
            };
            for (path, silent_for) in downs {
                self.decide(
                    Some(&peer),
                    Some(path),
                    None,
                    FaultClass::PathDown,
                    Action::LogOnly,
                    format!("no heartbeat on {path} for {silent_for} ms"),
                );
            }
            let ps = self.peers.get_mut(&peer).expect("peer exists");
            if all_alinks_down
                && other_alive
                && !ps.alinks_down_reported
                && self.cfg.alink_paths > 0
            {
                ps.alinks_down_reported = true;
                self.decide(
                    Some(&peer),
                    None,
                    None,
                    FaultClass::AllAlinksDown,
                    Action::Degrade,
                    "every A-link path is down but the peer is alive on the management network or storage heartbeat: replication suspended, no failover".into(),
                );
            }
            if newly_silent {
                self.decide(
                    Some(&peer),
                    None,
                    None,
                    FaultClass::PeerSilent,
                    Action::LogOnly,
                    format!(
                        "no heartbeat on any path for {} ms: the peer's VMs are taken over once quorum agrees",
                        t.peer_dead_ms
                    ),
                );
            }
        }
    }

    fn on_heartbeat(&mut self, path: PathId, hb: Heartbeat) {
        if hb.to != self.cfg.me || hb.vms.len() > MAX_VM_REPORTS {
            return;
        }
        let Some(ps) = self.peers.get_mut(&hb.from) else {
            return;
        };
        if !ps.paths.contains_key(&path) {
            return;
        }
        let now = self.now;
        let mut events: Vec<Noted> = Vec::new();
        if ps.incarnation != Some(hb.incarnation) {
            if ps.incarnation.is_some_and(|i| hb.incarnation < i) {
                return; // a stale heartbeat of an old incarnation
            }
            if ps.incarnation.is_some() {
                events.push((
                    FaultClass::PeerRestarted,
                    None,
                    format!("agent incarnation changed to {}", hb.incarnation),
                ));
            }
            ps.incarnation = Some(hb.incarnation);
            ps.max_seq = None;
            ps.promise_until = 0;
            ps.reports.clear();
            ps.paths.values_mut().for_each(|p| p.last_seq = None);
        }
        let Some(pst) = ps.paths.get_mut(&path) else {
            return;
        };
        if pst.last_seq.is_some_and(|l| hb.seq <= l) {
            return; // replayed or reordered on this path
        }
        pst.last_seq = Some(hb.seq);
        let newest = ps.max_seq.is_none_or(|m| hb.seq >= m);
        events.extend(ps.heard(path, now, || format!("heartbeat heard on {path}")));
        if newest {
            ps.max_seq = Some(hb.seq);
            for r in hb.vms {
                ps.reports.insert(r.vm.clone(), r);
            }
        }
        if let Some(ack) = hb.ack {
            if ack.incarnation == self.incarnation {
                if let Some(&(_, sent)) = self.sent_seqs.iter().find(|(s, _)| *s == ack.seq) {
                    let until = (sent + self.cfg.timing.peer_dead_ms)
                        .saturating_sub(self.cfg.timing.margin_ms);
                    let ps = self.peers.get_mut(&hb.from).expect("peer exists");
                    ps.promise_until = ps.promise_until.max(until);
                }
            }
        }
        for (class, p, reason) in events {
            self.decide(Some(&hb.from), p, None, class, Action::LogOnly, reason);
        }
    }

    fn on_path_seen(&mut self, peer: &HostId, path: PathId) {
        let now = self.now;
        let Some(ps) = self.peers.get_mut(peer) else {
            return;
        };
        if !ps.paths.contains_key(&path) {
            return;
        }
        let events = ps.heard(path, now, || format!("link reports {path} alive"));
        for (class, p, reason) in events {
            self.decide(Some(peer), p, None, class, Action::LogOnly, reason);
        }
    }

    // ----- quorum client -----

    fn quorum_tick(&mut self) {
        let t = self.cfg.timing;
        for s in 0..self.servers.len() {
            let conn = self.servers[s];
            if let Some((_, sent)) = conn.pending {
                if self.now.saturating_sub(sent) < t.quorum_request_timeout_ms {
                    continue;
                }
                self.servers[s].pending = None;
            }
            if self.now < conn.next_at {
                continue;
            }
            let claims: Vec<Claim> = self
                .vms
                .values()
                .filter(|v| self.wants_lease(v, s))
                .take(crate::quorum::table::MAX_CLAIMS_PER_REQUEST)
                .map(|v| Claim {
                    vm: v.rec.vm.clone(),
                    epoch_hint: v.leases[s].epoch.map(|(_, e)| e),
                })
                .collect();
            if claims.is_empty() {
                continue;
            }
            let req_id = self.next_req_id;
            self.next_req_id += 1;
            self.servers[s] = ServerConn {
                pending: Some((req_id, self.now)),
                next_at: self.now + t.heartbeat_ms,
            };
            self.out.push(Output::Quorum {
                server: s,
                req: QuorumRequest {
                    host: self.cfg.me.clone(),
                    incarnation: self.incarnation,
                    req_id,
                    claims,
                },
            });
        }
    }

    fn lease_valid(&self, v: &VmRuntime, s: usize) -> bool {
        v.leases.get(s).is_some_and(|l| l.valid_until > self.now)
    }

    fn all_grants(&self, v: &VmRuntime) -> bool {
        (0..self.cfg.quorum_servers).all(|s| self.lease_valid(v, s))
    }

    fn any_grant(&self, v: &VmRuntime) -> bool {
        (0..self.cfg.quorum_servers).any(|s| self.lease_valid(v, s))
    }

    fn wants_lease(&self, v: &VmRuntime, s: usize) -> bool {
        let me_primary = v.rec.primary == self.cfg.me;
        let holding = matches!(
            v.local,
            LocalCopy::Running | LocalCopy::Paused | LocalCopy::Starting
        );
        if me_primary && holding {
            return true;
        }
        let acquiring = if me_primary {
            self.wants_restart(v).is_some()
        } else {
            self.wants_promotion(v)
        };
        // Servers are acquired in order of preference, so two claimants never hold one
        // server each.
        acquiring && (0..s).all(|j| self.lease_valid(v, j))
    }

    fn on_quorum(&mut self, s: usize, reply: &QuorumResponse) {
        let Some(conn) = self.servers.get(s).copied() else {
            return;
        };
        let Some((req_id, sent)) = conn.pending else {
            return;
        };
        if reply.req_id != req_id {
            tracing::debug!(
                server = s,
                got = reply.req_id,
                want = req_id,
                "stale quorum reply ignored"
            );
            return;
        }
        tracing::debug!(server = s, req_id, results = ?reply.results, "quorum reply");
        self.servers[s].pending = None;
        let t = self.cfg.timing;
        let valid_until = (sent + t.lease_ms).saturating_sub(t.margin_ms);
        for r in &reply.results {
            match r {
                ClaimResult::Granted {
                    vm,
                    epoch,
                    continued,
                } => {
                    if let Some(v) = self.vms.get_mut(vm) {
                        let e = Some((reply.server_boot, *epoch));
                        v.leases[s] = LeaseView {
                            epoch: e,
                            valid_until,
                        };
                        // Proof that nobody else held the VM on this server since the fence:
                        // the server still lists us as owner (`continued`), or grants the very
                        // next epoch (our own re-claim), or epoch 1 when we held none (nobody
                        // held it since the server started; older server boots are not
                        // covered, see `quorum`).
                        let proof = *continued
                            || match v.fence_epochs[s] {
                                Some((boot, f)) => boot == reply.server_boot && *epoch == f + 1,
                                None => *epoch == 1,
                            };
                        if proof && v.local == LocalCopy::Paused {
                            v.unfence_proof = true;
                        }
                    }
                }
                ClaimResult::Denied {
                    vm, remaining_ms, ..
                } => {
                    if let Some(v) = self.vms.get_mut(vm) {
                        v.leases[s].valid_until = 0;
                        // Ask again the moment the holder's lease runs out (take-over latency).
                        let at = self.now + remaining_ms + 1;
                        self.servers[s].next_at = self.servers[s].next_at.min(at);
                    }
                }
                ClaimResult::TableFull { vm } => {
                    if let Some(v) = self.vms.get_mut(vm) {
                        v.leases[s].valid_until = 0;
                    }
                }
            }
        }
        // A grant may unlock the next server of an ordered acquisition: ask it at once rather
        // than at the next interval (this is on the take-over's critical path).
        for conn in &mut self.servers[s + 1..] {
            conn.next_at = conn.next_at.min(self.now);
        }
        self.quorum_tick();
    }

    // ----- VM lifecycle -----

    fn on_protect(&mut self, spec: VmSpec) {
        if spec.primary != self.cfg.me && spec.secondary != self.cfg.me {
            return;
        }
        if self.vms.contains_key(&spec.vm) {
            return;
        }
        let rec = VmRecord {
            vm: spec.vm,
            level: spec.level,
            primary: spec.primary,
            secondary: spec.secondary,
            generation: 1,
            phase: Phase::Unprotected,
            consistent: spec.level == Level::L1,
            memory_mb: spec.memory_mb,
        };
        let local = if rec.primary == self.cfg.me {
            LocalCopy::Running
        } else {
            LocalCopy::Stopped
        };
        self.insert_vm(rec, local);
        self.dirty = true;
    }

    fn on_unprotect(&mut self, vm: &VmId) {
        let Some(v) = self.vms.remove(vm) else {
            return;
        };
        self.dirty = true;
        if v.rec.primary == self.cfg.me {
            self.cmd(Command::SuspendReplication { vm: vm.clone() });
        }
        self.decide(
            None,
            None,
            Some(vm),
            FaultClass::Protection,
            Action::LogOnly,
            "protection removed: the VM is no longer replicated nor taken over".into(),
        );
    }

    fn on_sync_done(&mut self, vm: &VmId, sync_id: u64) {
        let Some(v) = self.vms.get_mut(vm) else {
            return;
        };
        if v.sync_id != sync_id || !matches!(v.rec.phase, Phase::Syncing | Phase::Resyncing) {
            return;
        }
        v.rec.phase = Phase::Protected;
        self.dirty = true;
        self.decide(
            None,
            None,
            Some(vm),
            FaultClass::Protection,
            Action::Protected,
            "sync finished: both copies identical".into(),
        );
    }

    fn on_started(&mut self, vm: &VmId, ok: bool, detail: &str) {
        let Some(v) = self.vms.get_mut(vm) else {
            return;
        };
        if v.local != LocalCopy::Starting {
            return;
        }
        if ok {
            v.local = LocalCopy::Running;
            if v.rec.phase == Phase::FailingOver {
                v.rec.phase = Phase::FailedOver;
                self.dirty = true;
            }
        } else {
            v.local = LocalCopy::Stopped;
            v.rec.phase = Phase::Degraded;
            self.dirty = true;
            self.decide(
                None,
                None,
                Some(vm),
                FaultClass::LackOfResources,
                Action::Refuse,
                format!("start failed: {detail}"),
            );
        }
    }

    fn on_component(&mut self, vm: Option<&VmId>, component: Component, ok: bool, detail: &str) {
        let names: Vec<VmId> = match vm {
            Some(vm) => vec![vm.clone()],
            None => self.vms.keys().cloned().collect(),
        };
        for name in names {
            let Some(v) = self.vms.get(&name) else {
                continue;
            };
            let peer = v.rec.other(&self.cfg.me).clone();
            let peer_alink = self.peers.get(&peer).is_some_and(PeerState::alink_up);
            let is_primary = v.rec.primary == self.cfg.me;
            let level = v.rec.level;
            let redirected = v.redirected.contains(&component);
            if ok {
                if redirected {
                    self.vms
                        .get_mut(&name)
                        .expect("vm")
                        .redirected
                        .remove(&component);
                    self.cmd(Command::Restore {
                        vm: name.clone(),
                        component,
                    });
                    self.decide(
                        Some(&peer),
                        None,
                        Some(&name),
                        FaultClass::ComponentRecovered,
                        Action::Restore(component),
                        format!("local {component:?} works again: {detail}"),
                    );
                }
                continue;
            }
            if !is_primary {
                // A broken replica cannot be taken over from.
                let v = self.vms.get_mut(&name).expect("vm");
                if component == Component::Disk && v.rec.consistent {
                    v.rec.consistent = false;
                    self.dirty = true;
                }
                self.decide(
                    Some(&peer),
                    None,
                    Some(&name),
                    FaultClass::ComponentFault,
                    Action::Degrade,
                    format!("replica {component:?} fault on the secondary: {detail}"),
                );
                continue;
            }
            if redirected {
                continue;
            }
            if level >= Level::L2 && peer_alink {
                self.vms
                    .get_mut(&name)
                    .expect("vm")
                    .redirected
                    .insert(component);
                self.cmd(Command::Redirect {
                    vm: name.clone(),
                    component,
                });
                self.decide(
                    Some(&peer),
                    None,
                    Some(&name),
                    FaultClass::ComponentFault,
                    Action::Redirect(component),
                    format!("local {component:?} failed ({detail}): I/O goes through the peer over the A-links"),
                );
            } else {
                let why = if level < Level::L2 {
                    "level 1 has no replica to redirect to"
                } else {
                    "no A-link path to the peer"
                };
                self.decide(
                    Some(&peer),
                    None,
                    Some(&name),
                    FaultClass::ComponentFault,
                    Action::LogOnly,
                    format!("local {component:?} failed ({detail}); cannot redirect: {why}"),
                );
            }
        }
    }

    fn peer_of(&self, v: &VmRuntime) -> Option<&PeerState> {
        self.peers.get(v.rec.other(&self.cfg.me))
    }

    /// Whether this (secondary) host should try to take the VM over now.
    fn wants_promotion(&self, v: &VmRuntime) -> bool {
        v.rec.primary != self.cfg.me
            && v.local == LocalCopy::Stopped
            && self.peer_of(v).is_some_and(|p| p.silent)
            && v.rec.consistent
            && self.memory_ok(v)
    }

    /// Whether this host, primary without a running copy, may (re)start the VM: returns why.
    fn wants_restart(&self, v: &VmRuntime) -> Option<&'static str> {
        if v.rec.primary != self.cfg.me || v.local != LocalCopy::Stopped || !self.memory_ok(v) {
            return None;
        }
        let p = self.peer_of(v)?;
        if p.silent {
            return Some("the peer is silent on every path");
        }
        let report = p.reports.get(&v.rec.vm)?;
        let agrees = !report.running
            && report.primary == self.cfg.me
            && report.generation <= v.rec.generation
            && p.promise_until > self.now;
        agrees.then_some("the peer confirms it does not run the VM")
    }

    fn memory_ok(&self, v: &VmRuntime) -> bool {
        self.free_memory_mb
            .is_none_or(|free| free >= v.rec.memory_mb)
    }

    fn reconcile_all(&mut self) {
        let names: Vec<VmId> = self.vms.keys().cloned().collect();
        for vm in names {
            self.adopt_peer_view(&vm);
            if self.vms[&vm].rec.primary == self.cfg.me {
                self.reconcile_primary(&vm);
            } else {
                self.reconcile_secondary(&vm);
            }
        }
    }

    /// Resolves disagreement on roles with the peer's report.
    fn adopt_peer_view(&mut self, vm: &VmId) {
        let v = &self.vms[vm];
        let peer = v.rec.other(&self.cfg.me).clone();
        // A silent peer's last report is stale (after a take-over it still says the dead
        // primary runs the VM): nothing to adopt until the peer speaks again.
        let Some(r) = self
            .peers
            .get(&peer)
            .filter(|p| !p.silent)
            .and_then(|p| p.reports.get(vm))
            .cloned()
        else {
            return;
        };
        if r.generation == v.rec.generation && r.primary == v.rec.primary {
            return;
        }
        let i_run = v.local == LocalCopy::Running || v.local == LocalCopy::Starting;
        let peer_wins = match (i_run, r.running) {
            (true, false) => false,
            (false, true) => true,
            (true, true) => {
                // Must not happen; the older generation yields.
                tracing::error!(vm = %vm, "both hosts run the VM");
                (r.generation, r.primary.as_str()) > (v.rec.generation, v.rec.primary.as_str())
            }
            (false, false) => {
                (r.generation, r.primary.as_str()) > (v.rec.generation, v.rec.primary.as_str())
            }
        };
        let v = self.vms.get_mut(vm).expect("vm");
        if !peer_wins {
            if r.generation >= v.rec.generation {
                // Make our view win at the peer.
                v.rec.generation = r.generation + 1;
                self.dirty = true;
            }
            return;
        }
        let old_primary = v.rec.primary.clone();
        v.rec.generation = r.generation;
        if r.primary != v.rec.primary {
            v.rec.secondary = v.rec.primary.clone();
            v.rec.primary = r.primary.clone();
        }
        self.dirty = true;
        if v.rec.primary != self.cfg.me {
            let had_copy = v.local != LocalCopy::Stopped;
            v.local = LocalCopy::Stopped;
            v.rec.consistent = false;
            v.rec.phase = Phase::Degraded;
            v.leases.iter_mut().for_each(|l| l.valid_until = 0);
            if had_copy {
                self.cmd(Command::DestroyVm { vm: vm.clone() });
            }
            self.decide(
                Some(&peer),
                None,
                Some(vm),
                FaultClass::RoleChange,
                if had_copy { Action::StepDown } else { Action::LogOnly },
                format!(
                    "peer {peer} owns the VM at generation {} (was {old_primary}): this host is now the secondary",
                    r.generation
                ),
            );
        }
    }

    fn fence(&mut self, vm: &VmId, reason: &str) {
        let v = self.vms.get_mut(vm).expect("vm");
        v.never_synced = matches!(v.rec.phase, Phase::Unprotected | Phase::Syncing);
        v.local = LocalCopy::Paused;
        v.fence_epochs = v.leases.iter().map(|l| l.epoch).collect();
        v.unfence_proof = false;
        v.rec.phase = Phase::Fenced;
        self.dirty = true;
        let peer = v.rec.other(&self.cfg.me).clone();
        self.cmd(Command::PauseVm { vm: vm.clone() });
        self.decide(
            Some(&peer),
            None,
            Some(vm),
            FaultClass::QuorumLost,
            Action::Fence,
            reason.to_string(),
        );
    }

    fn reconcile_primary(&mut self, vm: &VmId) {
        let now = self.now;
        let v = &self.vms[vm];
        let peer = v.rec.other(&self.cfg.me).clone();
        let Some(ps) = self.peers.get(&peer) else {
            return;
        };
        let promise = ps.promise_until > now;
        let peer_alink = ps.alink_up();
        let report = ps.reports.get(vm).cloned();
        match v.local {
            LocalCopy::Running => {
                // Before the first sync completes the secondary holds no consistent replica and
                // never takes over, so there is nothing to fence against yet.
                let takeover_possible = v.rec.level == Level::L1
                    || !matches!(v.rec.phase, Phase::Unprotected | Phase::Syncing);
                if self.cfg.quorum_servers > 0
                    && takeover_possible
                    && !self.any_grant(v)
                    && !promise
                {
                    self.fence(
                        vm,
                        "no live quorum lease and no live promise from the peer: this side may be the isolated one",
                    );
                    return;
                }
                // Protect only while holding authority (lease or promise): a replica made
                // consistent without it would expose this copy to a fence the moment the
                // sync ends.
                let authority = self.cfg.quorum_servers == 0 || self.any_grant(v) || promise;
                self.drive_protection(vm, peer_alink && authority, peer_alink, report.as_ref());
            }
            LocalCopy::Starting => {}
            LocalCopy::Paused => {
                let peer_idle = report.as_ref().is_some_and(|r| {
                    !r.running && r.generation <= v.rec.generation && r.primary == self.cfg.me
                });
                let why = if v.unfence_proof {
                    Some("a quorum server proved nobody held the VM since the fence (same or next epoch)")
                } else if promise && peer_idle {
                    Some("the peer confirms it does not run the VM and promised not to claim it")
                } else {
                    None
                };
                if let Some(why) = why {
                    let v = self.vms.get_mut(vm).expect("vm");
                    v.local = LocalCopy::Running;
                    v.unfence_proof = false;
                    v.rec.phase = if v.never_synced {
                        Phase::Unprotected
                    } else {
                        Phase::Degraded
                    };
                    self.dirty = true;
                    self.cmd(Command::ResumeVm { vm: vm.clone() });
                    self.decide(
                        Some(&peer),
                        None,
                        Some(vm),
                        FaultClass::QuorumLost,
                        Action::Unfence,
                        why.into(),
                    );
                }
            }
            LocalCopy::Stopped => {
                let Some(why) = self.wants_restart(v) else {
                    return;
                };
                // With the peer's confirmation and promise this host holds the same authority
                // a running primary keeps running on; a silent peer needs every grant.
                let confirmed = !self.peer_of(v).is_some_and(|p| p.silent);
                if self.cfg.quorum_servers > 0 && !confirmed && !self.all_grants(v) {
                    return;
                }
                let why = why.to_string();
                let v = self.vms.get_mut(vm).expect("vm");
                v.local = LocalCopy::Starting;
                v.rec.generation += 1;
                v.rec.phase = Phase::Degraded;
                self.dirty = true;
                self.cmd(Command::StartVm {
                    vm: vm.clone(),
                    mode: StartMode::Boot,
                });
                self.decide(
                    Some(&peer),
                    None,
                    Some(vm),
                    FaultClass::PeerSilent,
                    Action::Restart,
                    format!(
                        "this host is the VM's primary and no copy runs: restart from disk ({why})"
                    ),
                );
            }
        }
    }

    /// Sync, degrade and resync on the running primary.
    fn drive_protection(
        &mut self,
        vm: &VmId,
        may_sync: bool,
        peer_alink: bool,
        report: Option<&VmReport>,
    ) {
        let v = &self.vms[vm];
        let peer = v.rec.other(&self.cfg.me).clone();
        let phase = v.rec.phase;
        let level = v.rec.level;
        let peer_agrees = report.is_some_and(|r| {
            r.generation == v.rec.generation && r.primary == v.rec.primary && !r.running
        });
        match phase {
            Phase::Syncing | Phase::Resyncing | Phase::Protected if !peer_alink => {
                let v = self.vms.get_mut(vm).expect("vm");
                v.rec.phase = Phase::Degraded;
                self.dirty = true;
                self.cmd(Command::SuspendReplication { vm: vm.clone() });
                self.decide(
                    Some(&peer),
                    None,
                    Some(vm),
                    FaultClass::AllAlinksDown,
                    Action::Degrade,
                    "no A-link path to the secondary: the VM runs unprotected, changes are tracked"
                        .into(),
                );
            }
            Phase::Unprotected
            | Phase::Degraded
            | Phase::FailedOver
            | Phase::Fenced
            | Phase::FailingOver
                if may_sync && peer_agrees =>
            {
                let full = phase == Phase::Unprotected;
                let v = self.vms.get_mut(vm).expect("vm");
                v.sync_id += 1;
                let sync_id = v.sync_id;
                self.dirty = true;
                if level == Level::L1 {
                    v.rec.phase = Phase::Protected;
                    self.decide(
                        Some(&peer),
                        None,
                        Some(vm),
                        FaultClass::Protection,
                        Action::Protected,
                        "reserved host reachable: restart is guaranteed".into(),
                    );
                    return;
                }
                v.rec.phase = if full {
                    Phase::Syncing
                } else {
                    Phase::Resyncing
                };
                self.cmd(Command::StartSync {
                    vm: vm.clone(),
                    peer: peer.clone(),
                    sync_id,
                    full,
                });
                self.decide(
                    Some(&peer),
                    None,
                    Some(vm),
                    FaultClass::Protection,
                    Action::Resync,
                    if full {
                        "initial sync to the secondary".into()
                    } else {
                        "secondary reachable again: resync of dirty regions, VM keeps running"
                            .into()
                    },
                );
            }
            _ => {}
        }
    }

    fn reconcile_secondary(&mut self, vm: &VmId) {
        let v = &self.vms[vm];
        let peer = v.rec.other(&self.cfg.me).clone();
        let Some(ps) = self.peers.get(&peer) else {
            return;
        };
        // Follow the primary's phase while it is heard.
        if !ps.silent {
            if let Some(r) = ps.reports.get(vm) {
                if r.generation == v.rec.generation && r.primary == v.rec.primary {
                    // The primary reaches `protected` only after the mirror confirmed both
                    // copies identical, and stays there only while writes are synchronous; a
                    // (re)sync in progress leaves the replica inconsistent. The disk mirror
                    // also reports inconsistency directly (`Input::MirrorConsistent`) the
                    // moment resync data starts to flow, closing the gap until this report.
                    let consistent = match r.phase {
                        Phase::Protected => Some(true),
                        Phase::Syncing | Phase::Resyncing => Some(false),
                        _ => None,
                    };
                    let phase = r.phase;
                    let v = self.vms.get_mut(vm).expect("vm");
                    if v.rec.phase != phase {
                        v.rec.phase = phase;
                        self.dirty = true;
                    }
                    if let Some(c) = consistent {
                        if v.rec.consistent != c {
                            v.rec.consistent = c;
                            self.dirty = true;
                        }
                    }
                }
            }
            self.vms.get_mut(vm).expect("vm").refused = None;
            return;
        }
        if v.local != LocalCopy::Stopped {
            return;
        }
        let refusal = if !v.rec.consistent {
            Some((
                FaultClass::PeerSilent,
                "the local replica is not consistent (sync was not complete)".to_string(),
            ))
        } else if v.rec.phase == Phase::Unprotected {
            // Level 1 has no replica to be inconsistent, but a primary never heard reporting
            // the VM protected may simply not run its agent yet (both hosts booting, the
            // agent installed on this host first): restarting here could run a second copy.
            Some((
                FaultClass::PeerSilent,
                "protection was never established: the primary was never heard reporting the \
                 VM protected"
                    .to_string(),
            ))
        } else if !self.memory_ok(v) {
            Some((
                FaultClass::LackOfResources,
                format!(
                    "needs {} MiB, {} MiB free",
                    v.rec.memory_mb,
                    self.free_memory_mb.unwrap_or(0)
                ),
            ))
        } else {
            None
        };
        if let Some((class, why)) = refusal {
            if v.refused.as_deref() != Some(why.as_str()) {
                self.vms.get_mut(vm).expect("vm").refused = Some(why.clone());
                self.decide(
                    Some(&peer),
                    None,
                    Some(vm),
                    class,
                    Action::Refuse,
                    format!("cannot take over: {why}"),
                );
            }
            return;
        }
        if self.cfg.quorum_servers > 0 && !self.all_grants(v) {
            return;
        }
        let level = v.rec.level;
        let quorum = if self.cfg.quorum_servers > 0 {
            let epochs: Vec<String> = v
                .leases
                .iter()
                .map(|l| l.epoch.map_or("-".into(), |(_, e)| e.to_string()))
                .collect();
            format!("quorum granted (epochs {})", epochs.join(","))
        } else {
            "no quorum server: two-host rule (primary absent from A-links, management network and storage heartbeat)".into()
        };
        let v = self.vms.get_mut(vm).expect("vm");
        v.rec.generation += 1;
        v.rec.secondary = v.rec.primary.clone();
        v.rec.primary = self.cfg.me.clone();
        v.rec.phase = Phase::FailingOver;
        v.local = LocalCopy::Starting;
        self.dirty = true;
        let mode = if level == Level::L3 {
            StartMode::ResumeCheckpoint
        } else {
            StartMode::Boot
        };
        self.cmd(Command::StartVm {
            vm: vm.clone(),
            mode,
        });
        self.decide(
            Some(&peer),
            None,
            Some(vm),
            FaultClass::PeerSilent,
            Action::FailOver,
            format!(
                "primary {peer} silent on every path for {} ms and {quorum}: taking over",
                self.cfg.timing.peer_dead_ms
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> HostId {
        HostId::new(s).unwrap()
    }
    fn vm() -> VmId {
        VmId::new("vm1").unwrap()
    }

    fn cfg(me: &str, servers: usize) -> CoreConfig {
        CoreConfig {
            me: h(me),
            peers: vec![h("h1"), h("h2")],
            alink_paths: 2,
            mgmt_heartbeat: true,
            storage_heartbeat: false,
            quorum_servers: servers,
            timing: Timing::default(),
        }
    }

    fn rec(phase: Phase, consistent: bool) -> VmRecord {
        VmRecord {
            vm: vm(),
            level: Level::L3,
            primary: h("h1"),
            secondary: h("h2"),
            generation: 3,
            phase,
            consistent,
            memory_mb: 512,
        }
    }

    /// Drives one core against a scripted peer.
    struct Rig {
        core: HostCore,
        now: Millis,
        peer_seq: u64,
        out: Vec<Output>,
    }

    impl Rig {
        fn new(cfg: CoreConfig, recs: Vec<VmRecord>, running: &[VmId]) -> Self {
            let (core, out) = HostCore::new(cfg, 1, 0, recs, running);
            Self {
                core,
                now: 0,
                peer_seq: 0,
                out,
            }
        }

        fn peer(&self) -> HostId {
            if self.core.me() == &h("h1") {
                h("h2")
            } else {
                h("h1")
            }
        }

        fn last_own_seq(&self) -> Option<u64> {
            self.core.sent_seqs.back().map(|(s, _)| *s)
        }

        /// Advances `ms`, with the peer's heartbeats arriving every 100 ms on `paths`.
        fn run(&mut self, ms: Millis, paths: &[PathId], report: Option<&VmReport>) {
            let end = self.now + ms;
            while self.now < end {
                self.now += 10;
                let out = self.core.step(self.now, Input::Tick);
                self.out.extend(out);
                if self.now.is_multiple_of(100) && !paths.is_empty() {
                    self.peer_seq += 1;
                    let ack = self.last_own_seq().map(|seq| Ack {
                        incarnation: 1,
                        seq,
                    });
                    let hb = Heartbeat {
                        from: self.peer(),
                        to: self.core.me().clone(),
                        incarnation: 7,
                        seq: self.peer_seq,
                        ack,
                        vms: report.cloned().into_iter().collect(),
                    };
                    for &path in paths {
                        let out = self.core.step(
                            self.now,
                            Input::Heartbeat {
                                path,
                                hb: hb.clone(),
                            },
                        );
                        self.out.extend(out);
                    }
                }
            }
        }

        fn input(&mut self, i: Input) {
            let out = self.core.step(self.now, i);
            self.out.extend(out);
        }

        fn decisions(&self) -> Vec<(FaultClass, Action)> {
            self.out
                .iter()
                .filter_map(|o| match o {
                    Output::Decision(d) => Some((d.class, d.action)),
                    _ => None,
                })
                .collect()
        }

        fn commands(&self) -> Vec<Command> {
            self.out
                .iter()
                .filter_map(|o| match o {
                    Output::Command(c) => Some(c.clone()),
                    _ => None,
                })
                .collect()
        }
    }

    const ALL: [PathId; 3] = [PathId::Alink(0), PathId::Alink(1), PathId::Mgmt];

    fn secondary_report(phase: Phase) -> VmReport {
        VmReport {
            vm: vm(),
            generation: 3,
            primary: h("h1"),
            running: false,
            phase,
        }
    }

    #[test]
    fn one_alink_path_down_is_only_logged() {
        let mut r = Rig::new(cfg("h1", 0), vec![rec(Phase::Protected, true)], &[vm()]);
        let report = Some(secondary_report(Phase::Protected));
        r.run(1000, &ALL, report.as_ref());
        r.out.clear();
        r.run(1000, &[PathId::Alink(1), PathId::Mgmt], report.as_ref());
        let d = r.decisions();
        assert!(
            d.contains(&(FaultClass::PathDown, Action::LogOnly)),
            "{d:?}"
        );
        assert!(
            !d.iter().any(|(c, _)| *c == FaultClass::AllAlinksDown),
            "{d:?}"
        );
        assert_eq!(r.core.records()[0].phase, Phase::Protected);
    }

    #[test]
    fn all_alinks_down_with_peer_alive_on_mgmt_degrades_without_failover() {
        let mut r = Rig::new(cfg("h1", 0), vec![rec(Phase::Protected, true)], &[vm()]);
        let report = Some(secondary_report(Phase::Protected));
        r.run(1000, &ALL, report.as_ref());
        r.out.clear();
        r.run(2000, &[PathId::Mgmt], report.as_ref());
        let d = r.decisions();
        assert!(
            d.contains(&(FaultClass::AllAlinksDown, Action::Degrade)),
            "{d:?}"
        );
        assert!(
            !d.iter()
                .any(|(_, a)| matches!(a, Action::FailOver | Action::Fence)),
            "{d:?}"
        );
        assert_eq!(r.core.records()[0].phase, Phase::Degraded);
        assert!(r
            .commands()
            .contains(&Command::SuspendReplication { vm: vm() }));
    }

    #[test]
    fn secondary_takes_over_a_silent_primary_without_quorum_server() {
        let mut r = Rig::new(cfg("h2", 0), vec![rec(Phase::Protected, true)], &[]);
        let report = Some(VmReport {
            running: true,
            ..secondary_report(Phase::Protected)
        });
        r.run(1000, &ALL, report.as_ref());
        r.out.clear();
        r.run(400, &[], None);
        assert!(r.commands().is_empty(), "took over before the timeout");
        r.run(200, &[], None);
        assert!(r.commands().contains(&Command::StartVm {
            vm: vm(),
            mode: StartMode::ResumeCheckpoint
        }));
        let rec = &r.core.records()[0];
        assert_eq!((rec.primary.as_str(), rec.generation), ("h2", 4));
    }

    #[test]
    fn a_failed_take_over_start_does_not_hand_the_vm_back_to_the_dead_primary() {
        let mut r = Rig::new(cfg("h2", 0), vec![rec(Phase::Protected, true)], &[]);
        let report = Some(VmReport {
            running: true,
            ..secondary_report(Phase::Protected)
        });
        r.run(1000, &ALL, report.as_ref());
        r.run(600, &[], None);
        assert_eq!(r.core.records()[0].primary.as_str(), "h2");
        r.input(Input::VmStarted {
            vm: vm(),
            ok: false,
            detail: "blkback: promote refused".into(),
        });
        r.run(500, &[], None);
        // The silent peer's last report (it ran the VM, older generation) is stale: this host
        // stays the primary (and retries), the generation never goes back.
        let rec = &r.core.records()[0];
        assert_eq!(rec.primary.as_str(), "h2");
        assert!(
            rec.generation >= 4,
            "generation went back to {}",
            rec.generation
        );
    }

    #[test]
    fn level_one_vm_is_restarted_from_disk_on_the_reserved_host() {
        let mut rec = rec(Phase::Protected, true);
        rec.level = Level::L1;
        let mut r = Rig::new(cfg("h2", 0), vec![rec], &[]);
        r.run(1000, &[], None);
        assert!(r.commands().contains(&Command::StartVm {
            vm: vm(),
            mode: StartMode::Boot
        }));
        assert!(r
            .decisions()
            .contains(&(FaultClass::PeerSilent, Action::FailOver)));
    }

    /// Found in the nested Xen lab: host 2's agent came up first, never heard host 1's
    /// agent (still starting) and restarted a level-1 VM that was running on host 1.
    #[test]
    fn level_one_vm_never_reported_protected_is_not_restarted_by_the_reserved_host() {
        let mut rec = rec(Phase::Unprotected, true);
        rec.level = Level::L1;
        let mut r = Rig::new(cfg("h2", 0), vec![rec], &[]);
        r.run(1000, &[], None);
        assert!(
            !r.commands()
                .iter()
                .any(|c| matches!(c, Command::StartVm { .. })),
            "restarted a VM whose primary was never heard: {:?}",
            r.commands()
        );
        assert!(r
            .decisions()
            .contains(&(FaultClass::PeerSilent, Action::Refuse)));
    }

    #[test]
    fn unprotected_vm_is_forgotten_and_never_taken_over() {
        let mut r = Rig::new(cfg("h2", 0), vec![rec(Phase::Protected, true)], &[]);
        r.input(Input::Unprotect(vm()));
        assert!(r.core.records().is_empty());
        assert!(r
            .out
            .iter()
            .any(|o| matches!(o, Output::Persist(p) if p.is_empty())));
        r.run(1000, &[], None);
        assert!(r.commands().is_empty());
    }

    #[test]
    fn lack_of_memory_refuses_the_take_over() {
        let mut r = Rig::new(cfg("h2", 0), vec![rec(Phase::Protected, true)], &[]);
        r.input(Input::Resources {
            free_memory_mb: 100,
        });
        r.run(1000, &[], None);
        let d = r.decisions();
        assert!(
            d.contains(&(FaultClass::LackOfResources, Action::Refuse)),
            "{d:?}"
        );
        assert!(r.commands().is_empty());
    }

    #[test]
    fn inconsistent_replica_refuses_the_take_over() {
        let mut r = Rig::new(cfg("h2", 0), vec![rec(Phase::Resyncing, false)], &[]);
        r.run(1000, &[], None);
        assert!(r
            .decisions()
            .contains(&(FaultClass::PeerSilent, Action::Refuse)));
        assert!(r.commands().is_empty());
    }

    #[test]
    fn disk_fault_on_the_primary_is_redirected_through_the_peer() {
        let mut r = Rig::new(cfg("h1", 0), vec![rec(Phase::Protected, true)], &[vm()]);
        r.run(500, &ALL, Some(&secondary_report(Phase::Protected)));
        r.input(Input::Component {
            vm: Some(vm()),
            component: Component::Disk,
            ok: false,
            detail: "EIO".into(),
        });
        assert!(r.decisions().contains(&(
            FaultClass::ComponentFault,
            Action::Redirect(Component::Disk)
        )));
        assert!(r.commands().contains(&Command::Redirect {
            vm: vm(),
            component: Component::Disk
        }));
        r.input(Input::Component {
            vm: None,
            component: Component::Disk,
            ok: true,
            detail: String::new(),
        });
        assert!(r.commands().contains(&Command::Restore {
            vm: vm(),
            component: Component::Disk
        }));
    }

    #[test]
    fn restart_mid_resync_resumes_the_resync_of_dirty_regions() {
        let mut r = Rig::new(cfg("h1", 0), vec![rec(Phase::Resyncing, true)], &[vm()]);
        r.run(300, &ALL, Some(&secondary_report(Phase::Resyncing)));
        let syncs: Vec<Command> = r
            .commands()
            .into_iter()
            .filter(|c| matches!(c, Command::StartSync { .. }))
            .collect();
        assert!(
            matches!(syncs.as_slice(), [Command::StartSync { full: false, .. }]),
            "{syncs:?}"
        );
        assert_eq!(r.core.records()[0].phase, Phase::Resyncing);
    }

    #[test]
    fn primary_without_lease_or_promise_fences_and_unfences_on_continued_epoch() {
        let mut r = Rig::new(cfg("h1", 1), vec![rec(Phase::Degraded, true)], &[]);
        // Pretend the VM runs and holds a lease of epoch 5 (boot 9).
        {
            let v = r.core.vms.get_mut(&vm()).unwrap();
            v.local = LocalCopy::Running;
            v.leases[0] = LeaseView {
                epoch: Some((9, 5)),
                valid_until: 500,
            };
        }
        r.run(1000, &[], None);
        assert!(r.commands().contains(&Command::PauseVm { vm: vm() }));
        assert_eq!(r.core.local_copy(&vm()), Some(LocalCopy::Paused));
        // The server renews the very same epoch: nobody else was granted the VM.
        let req_id = r
            .out
            .iter()
            .rev()
            .find_map(|o| match o {
                Output::Quorum { req, .. } => Some(req.req_id),
                _ => None,
            })
            .unwrap();
        r.input(Input::Quorum {
            server: 0,
            reply: QuorumResponse {
                req_id,
                server_boot: 9,
                results: vec![ClaimResult::Granted {
                    vm: vm(),
                    epoch: 5,
                    continued: true,
                }],
            },
        });
        assert!(r.commands().contains(&Command::ResumeVm { vm: vm() }));
        assert_eq!(r.core.local_copy(&vm()), Some(LocalCopy::Running));
    }

    fn fenced_rig(epoch: Option<(u64, u64)>) -> Rig {
        let mut r = Rig::new(cfg("h1", 1), vec![rec(Phase::Degraded, true)], &[]);
        {
            let v = r.core.vms.get_mut(&vm()).unwrap();
            v.local = LocalCopy::Running;
            v.leases[0] = LeaseView {
                epoch,
                valid_until: 0,
            };
        }
        r.run(100, &[], None);
        assert_eq!(r.core.local_copy(&vm()), Some(LocalCopy::Paused));
        r
    }

    fn grant(r: &mut Rig, boot: u64, epoch: u64, continued: bool) {
        let req_id = r
            .out
            .iter()
            .rev()
            .find_map(|o| match o {
                Output::Quorum { req, .. } => Some(req.req_id),
                _ => None,
            })
            .unwrap();
        r.input(Input::Quorum {
            server: 0,
            reply: QuorumResponse {
                req_id,
                server_boot: boot,
                results: vec![ClaimResult::Granted {
                    vm: vm(),
                    epoch,
                    continued,
                }],
            },
        });
    }

    #[test]
    fn fenced_copy_resumes_on_the_next_epoch_but_not_after_another_owner() {
        // Never held a lease (server in its grace period): epoch 1 proves nobody held it.
        let mut r = fenced_rig(None);
        grant(&mut r, 9, 1, false);
        assert_eq!(r.core.local_copy(&vm()), Some(LocalCopy::Running));
        // Held epoch 5; granted 6: our own re-claim, nobody in between.
        let mut r = fenced_rig(Some((9, 5)));
        grant(&mut r, 9, 6, false);
        assert_eq!(r.core.local_copy(&vm()), Some(LocalCopy::Running));
        // Held epoch 5; granted 7: someone else owned the VM in between.
        let mut r = fenced_rig(Some((9, 5)));
        grant(&mut r, 9, 7, false);
        assert_eq!(r.core.local_copy(&vm()), Some(LocalCopy::Paused));
        // Another server boot: epochs prove nothing.
        let mut r = fenced_rig(Some((9, 5)));
        grant(&mut r, 10, 6, false);
        assert_eq!(r.core.local_copy(&vm()), Some(LocalCopy::Paused));
    }

    #[test]
    fn replayed_heartbeats_do_not_keep_a_dead_peer_alive() {
        let mut r = Rig::new(cfg("h2", 0), vec![rec(Phase::Protected, true)], &[]);
        r.run(1000, &ALL, None);
        let old = Heartbeat {
            from: h("h1"),
            to: h("h2"),
            incarnation: 7,
            seq: 3,
            ack: None,
            vms: vec![],
        };
        // The peer dies; an attacker replays an old heartbeat every 100 ms.
        for _ in 0..10 {
            r.run(100, &[], None);
            r.input(Input::Heartbeat {
                path: PathId::Mgmt,
                hb: old.clone(),
            });
        }
        assert!(r
            .decisions()
            .contains(&(FaultClass::PeerSilent, Action::FailOver)));
    }
}
