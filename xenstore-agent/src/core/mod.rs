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
//!
//! ## Where each concern lives
//! - this file: [`HostCore`] itself, its configuration ([`CoreConfig`]), its entry points
//!   ([`HostCore::new`], [`HostCore::step`]) and read-only views;
//! - `messages`: what the core is told ([`Input`], [`VmSpec`]) and what it asks
//!   ([`Output`], [`Command`], [`StartMode`]);
//! - `membership`: peers, per-path liveness and heartbeats ([`Heartbeat`], [`Ack`],
//!   [`VmReport`]), failure classes (a) and (b);
//! - `lease`: the quorum client (leases acquired in order), fencing and the proof needed to
//!   unfence;
//! - `vm`: a VM's protection lifecycle on this host: protect and unprotect, sync, resync and
//!   degrade, component faults and redirects ([`LocalCopy`]);
//! - `levels`: a protected VM's level changed while it runs: raised (synced toward while
//!   protected at the old level), lowered (protected at once at the lower one);
//! - `takeover`: who runs each VM: the peer's view adopted, the primary's restart, the
//!   secondary's take-over or refusal.

mod lease;
mod levels;
mod membership;
mod messages;
mod takeover;
#[cfg(test)]
mod test_rig;
mod vm;

use std::collections::{BTreeMap, VecDeque};

use crate::decision::{Action, Decision, FaultClass};
use crate::ids::{HostId, Millis, PathId, VmId};
use crate::lifecycle::{Phase, VmRecord};
use crate::timing::Timing;

use lease::ServerConn;
use membership::PeerState;
pub use membership::{Ack, Heartbeat, PeerView, VmReport, MAX_VM_REPORTS};
pub use messages::{Command, Input, Output, StartMode, VmSpec};
use vm::VmRuntime;
pub use vm::{LocalCopy, VmView};

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
            .map(|p| (p.clone(), PeerState::new(&paths, now)))
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
                    // A raise's sync: still protected at the level it had.
                    Phase::Syncing if rec.raising_to.is_some() => rec.phase = Phase::Protected,
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
            Input::SyncFailed {
                vm,
                sync_id,
                reason,
            } => self.on_sync_failed(&vm, sync_id, &reason),
            Input::MirrorConsistent { vm, consistent } => {
                self.on_mirror_consistent(&vm, consistent);
            }
            Input::VmStarted { vm, ok, detail } => self.on_started(&vm, ok, &detail),
            Input::Protect(spec) => self.on_protect(spec),
            Input::PathSeen { peer, path } => self.on_path_seen(&peer, path),
            Input::Unprotect(vm) => self.on_unprotect(&vm),
        }
        self.reconcile_all();
        self.follow_raises();
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

    fn on_tick(&mut self) {
        if self.now >= self.next_hb_at {
            self.send_heartbeats();
            self.next_hb_at = self.now + self.cfg.timing.heartbeat_ms;
        }
        self.update_liveness();
        self.quorum_tick();
    }
}
