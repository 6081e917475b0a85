//! A deterministic simulated pool for the decision core: hosts, A-link paths, a management
//! network, shared storage and quorum servers, with seeded random faults and a checker.
//!
//! Every host runs a real [`HostCore`]; every quorum server a real [`QuorumTable`]. Time is
//! virtual (1 ms steps); messages get a random latency and a small random loss. Faults: cut one
//! A-link path, cut all A-links of a pair, cut a host's management network, kill a host (its VMs
//! die with it; it restarts from its persisted records on the next heal), isolate a host
//! (A-links and management network; its storage heartbeat continues), heal.
//!
//! The checker watches the *world* (which host really runs which VM), not what cores believe:
//! - split brain: two running copies of one VM at any instant;
//! - false failover: a take-over while the old primary was alive and reachable from the new one
//!   through some path for the whole detection window;
//! - missed failover: the host running a VM was killed, its peer held a consistent replica and
//!   kept the connectivity it needs (its management network when quorum servers are used), yet
//!   no copy ran again within the deadline.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt::Write as _;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::core::{Command, CoreConfig, HostCore, Input, Output, VmSpec};
use crate::decision::{Action, Decision};
use crate::ids::{HostId, Millis, PathId, VmId};
use crate::lifecycle::{Phase, VmRecord};
use crate::quorum::table::{QuorumRequest, QuorumTable};
use crate::timing::Timing;

/// Shape of a simulated pool and its run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Number of hosts (named h1, h2, ...).
    pub hosts: usize,
    /// A-link paths between every pair.
    pub alink_paths: u8,
    /// Quorum servers (0, 1 or 2).
    pub quorum_servers: usize,
    /// Storage heartbeat configured.
    pub storage_heartbeat: bool,
    /// Protected VMs.
    pub vms: Vec<VmSpec>,
    /// Seed of every random choice.
    pub seed: u64,
    /// Faults to inject.
    pub faults: usize,
    /// Gap between faults: uniform in this range (ms).
    pub fault_gap_ms: (Millis, Millis),
    /// Timeouts.
    pub timing: Timing,
    /// Message loss per thousand on networks.
    pub loss_per_mille: u32,
    /// Deadline for a take-over after the primary died (ms).
    pub failover_deadline_ms: Millis,
    /// Time a resync takes (ms).
    pub resync_ms: Millis,
}

impl SimConfig {
    /// A pool of `hosts` hosts with one VM per host (vmK primary on hK, secondary on the next
    /// host), two A-link paths and default timing.
    #[must_use]
    pub fn pool(hosts: usize, quorum_servers: usize, storage_heartbeat: bool, seed: u64) -> Self {
        let name = |i: usize| HostId::new(format!("h{}", i + 1)).expect("valid name");
        let vms = (0..hosts)
            .map(|i| VmSpec {
                vm: VmId::new(format!("vm{}", i + 1)).expect("valid name"),
                level: crate::lifecycle::Level::L3,
                primary: name(i),
                secondary: name((i + 1) % hosts),
                memory_mb: 512,
            })
            .collect();
        Self {
            hosts,
            alink_paths: 2,
            quorum_servers,
            storage_heartbeat,
            vms,
            seed,
            faults: 200,
            fault_gap_ms: (50, 1500),
            timing: Timing::default(),
            loss_per_mille: 10,
            failover_deadline_ms: 2000,
            resync_ms: 150,
        }
    }
}

/// One injected fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Cut one A-link path between two hosts.
    CutAlink(usize, usize, u8),
    /// Cut every A-link path between two hosts.
    CutAllAlinks(usize, usize),
    /// Cut a host's management network (also its access to the quorum servers).
    CutMgmt(usize),
    /// Kill a host (agent, shims and VMs).
    Kill(usize),
    /// Cut all of a host's networks (storage heartbeat continues).
    Isolate(usize),
    /// Cut one host's access to one quorum server.
    CutQuorum(usize, usize),
    /// Restart a quorum server (it forgets its leases and starts with a grace period).
    RestartQuorum(usize),
    /// Restore everything and restart killed hosts.
    Heal,
}

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Faults injected.
    pub faults: usize,
    /// Simulated time (ms).
    pub sim_ms: Millis,
    /// Split-brain violations.
    pub split_brain: Vec<String>,
    /// False failovers.
    pub false_failovers: Vec<String>,
    /// Missed failovers.
    pub missed_failovers: Vec<String>,
    /// Take-overs (fail over and restart) that happened.
    pub takeovers: usize,
    /// Fences that happened.
    pub fences: usize,
    /// Time from a primary's death to a copy running again, per checked death (ms).
    pub failover_latencies_ms: Vec<Millis>,
    /// VMs that were not running exactly once, or not protected, after the final heal.
    pub not_recovered: Vec<String>,
    /// The last decisions (for diagnosis).
    pub tail: Vec<String>,
    /// Injected faults by kind.
    pub fault_kinds: BTreeMap<String, usize>,
}

impl SimReport {
    /// True when no safety or liveness violation was found.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.split_brain.is_empty()
            && self.false_failovers.is_empty()
            && self.missed_failovers.is_empty()
            && self.not_recovered.is_empty()
    }

    /// Percentile (0..=100) of the take-over latencies, if any.
    #[must_use]
    pub fn failover_percentile(&self, pct: usize) -> Option<Millis> {
        let mut v = self.failover_latencies_ms.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let idx = (v.len() * pct.min(100)).div_ceil(100).saturating_sub(1);
        v.get(idx).copied()
    }

    /// A readable summary.
    #[must_use]
    pub fn summary(&self) -> String {
        let mut s = format!(
            "seed={} faults={} sim_ms={} takeovers={} fences={} split_brain={} false_failover={} missed_failover={} not_recovered={} failover_ms p50={:?} p99={:?} max={:?} (n={})",
            self.seed,
            self.faults,
            self.sim_ms,
            self.takeovers,
            self.fences,
            self.split_brain.len(),
            self.false_failovers.len(),
            self.missed_failovers.len(),
            self.not_recovered.len(),
            self.failover_percentile(50),
            self.failover_percentile(99),
            self.failover_latencies_ms.iter().max(),
            self.failover_latencies_ms.len()
        );
        let _ = write!(s, " kinds={:?}", self.fault_kinds);
        for v in self
            .split_brain
            .iter()
            .chain(&self.false_failovers)
            .chain(&self.missed_failovers)
            .chain(&self.not_recovered)
        {
            let _ = write!(s, "\n  {v}");
        }
        if !self.ok() {
            s.push_str("\n  last decisions:");
            for t in &self.tail {
                let _ = write!(s, "\n    {t}");
            }
        }
        s
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Copy {
    Running,
    Paused,
}

struct SimHost {
    name: HostId,
    alive: bool,
    core: Option<HostCore>,
    incarnation: u64,
    persisted: Vec<VmRecord>,
    mgmt_up: bool,
    vms: BTreeMap<VmId, Copy>,
}

enum Ev {
    ToHost {
        host: usize,
        incarnation: u64,
        input: Input,
    },
    ToServer {
        server: usize,
        from: usize,
        req: QuorumRequest,
    },
    SyncCheck {
        primary: usize,
        vm: VmId,
        sync_id: u64,
        peer: usize,
    },
}

struct Expectation {
    vm: VmId,
    dead: usize,
    peer: usize,
    killed_at: Millis,
    void: Option<String>,
    back_at: Option<Millis>,
}

/// The simulated world.
pub struct Sim {
    cfg: SimConfig,
    rng: StdRng,
    now: Millis,
    hosts: Vec<SimHost>,
    index: BTreeMap<HostId, usize>,
    servers: Vec<QuorumTable>,
    alink_cut: BTreeSet<(usize, usize, u8)>,
    quorum_cut: BTreeSet<(usize, usize)>,
    queue: BinaryHeap<Reverse<(Millis, u64)>>,
    events: BTreeMap<u64, Ev>,
    next_ev: u64,
    last_unreachable: BTreeMap<(usize, usize), Millis>,
    syncs: BTreeMap<VmId, u64>,
    expectations: Vec<Expectation>,
    report: SimReport,
    tail: std::collections::VecDeque<String>,
    split_now: BTreeSet<VmId>,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Sim {
    /// Builds the pool; every VM starts running on its primary.
    #[must_use]
    pub fn new(cfg: SimConfig) -> Self {
        let rng = StdRng::seed_from_u64(cfg.seed);
        let names: Vec<HostId> = (0..cfg.hosts)
            .map(|i| HostId::new(format!("h{}", i + 1)).expect("valid name"))
            .collect();
        let index = names
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, n)| (n, i))
            .collect();
        let servers = (0..cfg.quorum_servers)
            .map(|i| QuorumTable::new(0, cfg.timing.lease_ms, 1024, 1000 + i as u64))
            .collect();
        let mut sim = Self {
            rng,
            now: 0,
            hosts: Vec::new(),
            index,
            servers,
            alink_cut: BTreeSet::new(),
            quorum_cut: BTreeSet::new(),
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_ev: 0,
            last_unreachable: BTreeMap::new(),
            syncs: BTreeMap::new(),
            expectations: Vec::new(),
            report: SimReport {
                seed: cfg.seed,
                ..SimReport::default()
            },
            tail: std::collections::VecDeque::new(),
            split_now: BTreeSet::new(),
            cfg,
        };
        for name in names {
            sim.hosts.push(SimHost {
                name,
                alive: true,
                core: None,
                incarnation: 0,
                persisted: Vec::new(),
                mgmt_up: true,
                vms: BTreeMap::new(),
            });
        }
        for h in 0..sim.hosts.len() {
            sim.boot(h);
        }
        let specs = sim.cfg.vms.clone();
        for spec in specs {
            if let Some(&p) = sim.index.get(&spec.primary) {
                sim.hosts[p].vms.insert(spec.vm.clone(), Copy::Running);
            }
            for h in 0..sim.hosts.len() {
                sim.step_host(h, Input::Protect(spec.clone()));
            }
        }
        sim
    }

    fn core_config(&self, h: usize) -> CoreConfig {
        CoreConfig {
            me: self.hosts[h].name.clone(),
            peers: self.hosts.iter().map(|x| x.name.clone()).collect(),
            alink_paths: self.cfg.alink_paths,
            mgmt_heartbeat: true,
            storage_heartbeat: self.cfg.storage_heartbeat,
            quorum_servers: self.cfg.quorum_servers,
            timing: self.cfg.timing,
        }
    }

    fn boot(&mut self, h: usize) {
        let cfg = self.core_config(h);
        let host = &mut self.hosts[h];
        host.incarnation += 1;
        host.alive = true;
        let running: Vec<VmId> = host.vms.keys().cloned().collect();
        let (core, out) = HostCore::new(
            cfg,
            host.incarnation,
            self.now,
            host.persisted.clone(),
            &running,
        );
        host.core = Some(core);
        self.apply(h, out);
    }

    fn schedule(&mut self, at: Millis, ev: Ev) {
        let id = self.next_ev;
        self.next_ev += 1;
        self.events.insert(id, ev);
        self.queue.push(Reverse((at, id)));
    }

    fn latency(&mut self) -> Millis {
        self.rng.gen_range(0..=3)
    }

    fn lost(&mut self) -> bool {
        self.rng.gen_range(0..1000) < self.cfg.loss_per_mille
    }

    fn path_open(&self, a: usize, b: usize, path: PathId) -> bool {
        if !self.hosts[a].alive || !self.hosts[b].alive {
            return false;
        }
        let (x, y) = pair(a, b);
        match path {
            PathId::Alink(i) => !self.alink_cut.contains(&(x, y, i)),
            PathId::Mgmt => self.hosts[a].mgmt_up && self.hosts[b].mgmt_up,
            PathId::Storage => true,
        }
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        let mut paths: Vec<PathId> = (0..self.cfg.alink_paths).map(PathId::Alink).collect();
        paths.push(PathId::Mgmt);
        if self.cfg.storage_heartbeat {
            paths.push(PathId::Storage);
        }
        paths.into_iter().any(|p| self.path_open(a, b, p))
    }

    fn step_host(&mut self, h: usize, input: Input) {
        if !self.hosts[h].alive {
            return;
        }
        let now = self.now;
        let Some(core) = self.hosts[h].core.as_mut() else {
            return;
        };
        let out = core.step(now, input);
        self.apply(h, out);
    }

    fn apply(&mut self, h: usize, out: Vec<Output>) {
        for o in out {
            match o {
                Output::Heartbeat { path, hb } => {
                    let Some(&to) = self.index.get(&hb.to) else {
                        continue;
                    };
                    if !self.path_open(h, to, path) {
                        continue;
                    }
                    let lat = if path == PathId::Storage {
                        self.rng.gen_range(1..=30)
                    } else {
                        if self.lost() {
                            continue;
                        }
                        self.latency()
                    };
                    let inc = self.hosts[to].incarnation;
                    self.schedule(
                        self.now + lat,
                        Ev::ToHost {
                            host: to,
                            incarnation: inc,
                            input: Input::Heartbeat { path, hb },
                        },
                    );
                }
                Output::Quorum { server, req } => {
                    if !self.quorum_open(h, server) || self.lost() {
                        continue;
                    }
                    let at = self.now + self.latency();
                    self.schedule(
                        at,
                        Ev::ToServer {
                            server,
                            from: h,
                            req,
                        },
                    );
                }
                Output::Command(c) => self.command(h, c),
                Output::Decision(d) => self.decision(&d),
                Output::Persist(recs) => self.hosts[h].persisted = recs,
            }
        }
    }

    fn decision(&mut self, d: &Decision) {
        let line = format!(
            "t={} {} {:?} {:?} vm={} peer={} {}",
            d.at_ms,
            d.host,
            d.class,
            d.action,
            d.vm.as_ref().map_or("-", VmId::as_str),
            d.peer.as_ref().map_or("-", HostId::as_str),
            d.reason
        );
        self.tail.push_back(line);
        if self.tail.len() > 60 {
            self.tail.pop_front();
        }
        match d.action {
            Action::FailOver | Action::Restart => {
                self.report.takeovers += 1;
                if d.action == Action::FailOver {
                    self.check_false_failover(d);
                }
            }
            Action::Fence => self.report.fences += 1,
            _ => {}
        }
    }

    fn check_false_failover(&mut self, d: &Decision) {
        let (Some(&s), Some(&p)) = (
            self.index.get(&d.host),
            d.peer.as_ref().and_then(|p| self.index.get(p)),
        ) else {
            return;
        };
        let window = self.cfg.timing.peer_dead_ms;
        let last = self.last_unreachable.get(&pair(s, p)).copied();
        let reachable_throughout =
            self.hosts[p].alive && last.is_none_or(|t| t + window < self.now);
        if reachable_throughout {
            self.report.false_failovers.push(format!(
                "t={} {} took over {} from {} although {} was alive and reachable for the last {window} ms",
                self.now,
                d.host,
                d.vm.as_ref().map_or("-", VmId::as_str),
                self.hosts[p].name,
                self.hosts[p].name
            ));
        }
    }

    fn command(&mut self, h: usize, c: Command) {
        match c {
            Command::StartVm { vm, .. } => {
                self.hosts[h].vms.insert(vm.clone(), Copy::Running);
                let inc = self.hosts[h].incarnation;
                self.schedule(
                    self.now + 20,
                    Ev::ToHost {
                        host: h,
                        incarnation: inc,
                        input: Input::VmStarted {
                            vm,
                            ok: true,
                            detail: String::new(),
                        },
                    },
                );
            }
            Command::PauseVm { vm } => {
                if let Some(c) = self.hosts[h].vms.get_mut(&vm) {
                    *c = Copy::Paused;
                }
            }
            Command::ResumeVm { vm } => {
                if let Some(c) = self.hosts[h].vms.get_mut(&vm) {
                    *c = Copy::Running;
                }
            }
            Command::DestroyVm { vm } => {
                self.hosts[h].vms.remove(&vm);
            }
            Command::StartSync {
                vm, peer, sync_id, ..
            } => {
                let Some(&p) = self.index.get(&peer) else {
                    return;
                };
                self.syncs.insert(vm.clone(), sync_id);
                // The replica becomes inconsistent as soon as resync data flows.
                let inc = self.hosts[p].incarnation;
                self.schedule(
                    self.now + 1,
                    Ev::ToHost {
                        host: p,
                        incarnation: inc,
                        input: Input::MirrorConsistent {
                            vm: vm.clone(),
                            consistent: false,
                        },
                    },
                );
                self.schedule(
                    self.now + self.cfg.resync_ms,
                    Ev::SyncCheck {
                        primary: h,
                        vm,
                        sync_id,
                        peer: p,
                    },
                );
            }
            Command::SuspendReplication { .. }
            | Command::Redirect { .. }
            | Command::Restore { .. } => {}
        }
    }

    fn alink_up(&self, a: usize, b: usize) -> bool {
        (0..self.cfg.alink_paths).any(|i| self.path_open(a, b, PathId::Alink(i)))
    }

    fn run_event(&mut self, ev: Ev) {
        match ev {
            Ev::ToHost {
                host,
                incarnation,
                input,
            } => {
                if self.hosts[host].incarnation != incarnation {
                    return;
                }
                if let Input::Heartbeat { path, hb } = &input {
                    let Some(&from) = self.index.get(&hb.from) else {
                        return;
                    };
                    if !self.path_open(from, host, *path) {
                        return; // cut while in flight
                    }
                }
                self.step_host(host, input);
            }
            Ev::ToServer { server, from, req } => {
                let now = self.now;
                let Some(table) = self.servers.get_mut(server) else {
                    return;
                };
                let Ok(reply) = table.handle(now, &req) else {
                    return;
                };
                if !self.quorum_open(from, server) || self.lost() {
                    return;
                }
                let inc = self.hosts[from].incarnation;
                let at = self.now + self.latency();
                self.schedule(
                    at,
                    Ev::ToHost {
                        host: from,
                        incarnation: inc,
                        input: Input::Quorum { server, reply },
                    },
                );
            }
            Ev::SyncCheck {
                primary,
                vm,
                sync_id,
                peer,
            } => {
                if self.syncs.get(&vm) != Some(&sync_id) || !self.hosts[primary].alive {
                    return;
                }
                if !self.hosts[peer].alive || !self.alink_up(primary, peer) {
                    // Resync waits while the link is down.
                    self.schedule(
                        self.now + 100,
                        Ev::SyncCheck {
                            primary,
                            vm,
                            sync_id,
                            peer,
                        },
                    );
                    return;
                }
                self.syncs.remove(&vm);
                self.step_host(
                    peer,
                    Input::MirrorConsistent {
                        vm: vm.clone(),
                        consistent: true,
                    },
                );
                self.step_host(primary, Input::SyncDone { vm, sync_id });
            }
        }
    }

    fn inject(&mut self, f: &Fault) {
        self.tail.push_back(format!("t={} FAULT {f:?}", self.now));
        match *f {
            Fault::CutAlink(a, b, i) => {
                let (x, y) = pair(a, b);
                self.alink_cut.insert((x, y, i));
            }
            Fault::CutAllAlinks(a, b) => {
                let (x, y) = pair(a, b);
                for i in 0..self.cfg.alink_paths {
                    self.alink_cut.insert((x, y, i));
                }
            }
            Fault::CutMgmt(h) => self.hosts[h].mgmt_up = false,
            Fault::Isolate(h) => {
                self.hosts[h].mgmt_up = false;
                for o in 0..self.hosts.len() {
                    if o != h {
                        let (x, y) = pair(h, o);
                        for i in 0..self.cfg.alink_paths {
                            self.alink_cut.insert((x, y, i));
                        }
                    }
                }
            }
            Fault::Kill(h) => {
                if !self.hosts[h].alive {
                    return;
                }
                self.expect_takeover(h);
                let host = &mut self.hosts[h];
                host.alive = false;
                host.core = None;
                host.vms.clear();
            }
            Fault::CutQuorum(h, s) => {
                self.quorum_cut.insert((h, s));
            }
            Fault::RestartQuorum(s) => {
                let boot = self.rng.gen();
                if let Some(t) = self.servers.get_mut(s) {
                    *t = QuorumTable::new(self.now, self.cfg.timing.lease_ms, 1024, boot);
                }
            }
            Fault::Heal => {
                self.alink_cut.clear();
                self.quorum_cut.clear();
                for h in 0..self.hosts.len() {
                    self.hosts[h].mgmt_up = true;
                    if !self.hosts[h].alive {
                        self.boot(h);
                    }
                }
            }
        }
    }

    fn expect_takeover(&mut self, dead: usize) {
        let vms: Vec<VmId> = self.hosts[dead].vms.keys().cloned().collect();
        for vm in vms {
            let Some(core) = self.hosts[dead].core.as_ref() else {
                continue;
            };
            let Some(rec) = core.records().into_iter().find(|r| r.vm == vm) else {
                continue;
            };
            let other = rec.other(&self.hosts[dead].name).clone();
            let Some(&peer) = self.index.get(&other) else {
                continue;
            };
            let peer_rec = self.hosts[peer]
                .core
                .as_ref()
                .and_then(|c| c.records().into_iter().find(|r| r.vm == vm));
            let void = if !self.hosts[peer].alive {
                Some("peer dead too".to_string())
            } else if !peer_rec.as_ref().is_some_and(|r| r.consistent)
                || self.syncs.contains_key(&vm)
            {
                // A resync in flight makes the replica inconsistent (the notice may still be
                // on its way to the peer).
                Some("peer replica not consistent".to_string())
            } else {
                None
            };
            self.expectations.push(Expectation {
                vm,
                dead,
                peer,
                killed_at: self.now,
                void,
                back_at: None,
            });
        }
    }

    fn quorum_open(&self, h: usize, server: usize) -> bool {
        self.hosts[h].mgmt_up && !self.quorum_cut.contains(&(h, server))
    }

    fn random_fault(&mut self) -> Fault {
        let n = self.hosts.len();
        let a = self.rng.gen_range(0..n);
        let mut b = self.rng.gen_range(0..n - 1);
        if b >= a {
            b += 1;
        }
        let servers = self.cfg.quorum_servers;
        if servers > 0 && self.rng.gen_range(0..100) < 12 {
            let s = self.rng.gen_range(0..servers);
            return if self.rng.gen_bool(0.6) {
                Fault::CutQuorum(a, s)
            } else {
                Fault::RestartQuorum(s)
            };
        }
        match self.rng.gen_range(0..100) {
            0..=19 => Fault::CutAlink(a, b, self.rng.gen_range(0..self.cfg.alink_paths)),
            20..=34 => Fault::CutAllAlinks(a, b),
            35..=49 => Fault::CutMgmt(a),
            50..=64 => Fault::Kill(a),
            65..=74 => Fault::Isolate(a),
            _ => Fault::Heal,
        }
    }

    fn observe(&mut self) {
        // Reachability history for the false-failover check.
        for a in 0..self.hosts.len() {
            for b in (a + 1)..self.hosts.len() {
                if !self.reachable(a, b) {
                    self.last_unreachable.insert((a, b), self.now);
                }
            }
        }
        // Split brain: two running copies.
        let vms: Vec<VmId> = self.cfg.vms.iter().map(|s| s.vm.clone()).collect();
        for vm in &vms {
            let running: Vec<&str> = self
                .hosts
                .iter()
                .filter(|h| h.alive && h.vms.get(vm) == Some(&Copy::Running))
                .map(|h| h.name.as_str())
                .collect();
            if running.len() > 1 {
                if self.split_now.insert(vm.clone()) {
                    self.report.split_brain.push(format!(
                        "t={} {vm} runs on {}",
                        self.now,
                        running.join(" and ")
                    ));
                }
            } else {
                self.split_now.remove(vm);
            }
        }
        // Take-over expectations.
        let now = self.now;
        let deadline = self.cfg.failover_deadline_ms;
        let quorum = self.cfg.quorum_servers > 0;
        for i in 0..self.expectations.len() {
            let e = &self.expectations[i];
            if e.void.is_some() || e.back_at.is_some() || now > e.killed_at + deadline {
                continue;
            }
            let peer = &self.hosts[e.peer];
            let void = if !peer.alive {
                Some("peer died".to_string())
            } else if quorum && (0..self.cfg.quorum_servers).any(|s| !self.quorum_open(e.peer, s)) {
                Some("peer lost its access to a quorum server".to_string())
            } else {
                None
            };
            let running = self
                .hosts
                .iter()
                .any(|h| h.alive && h.vms.get(&e.vm) == Some(&Copy::Running));
            let e = &mut self.expectations[i];
            if void.is_some() {
                e.void = void;
            } else if running {
                e.back_at = Some(now);
            }
        }
        let mut done = Vec::new();
        for (i, e) in self.expectations.iter().enumerate() {
            if now >= e.killed_at + deadline {
                done.push(i);
            }
        }
        for i in done.into_iter().rev() {
            let e = self.expectations.remove(i);
            match (e.void, e.back_at) {
                (Some(_), _) => {}
                (None, Some(t)) => self.report.failover_latencies_ms.push(t - e.killed_at),
                (None, None) => {
                    let recent: Vec<String> =
                        self.tail.iter().rev().take(40).rev().cloned().collect();
                    self.report.missed_failovers.push(format!(
                        "t={} {} died at t={} and {} never took {} over; recent:\n      {}",
                        now,
                        self.hosts[e.dead].name,
                        e.killed_at,
                        self.hosts[e.peer].name,
                        e.vm,
                        recent.join("\n      ")
                    ));
                }
            }
        }
    }

    fn advance_to(&mut self, end: Millis) {
        while self.now < end {
            self.now += 1;
            while let Some(&Reverse((t, id))) = self.queue.peek() {
                if t > self.now {
                    break;
                }
                self.queue.pop();
                if let Some(ev) = self.events.remove(&id) {
                    self.run_event(ev);
                }
            }
            for h in 0..self.hosts.len() {
                if (self.now + 3 * h as u64).is_multiple_of(10) {
                    self.step_host(h, Input::Tick);
                }
            }
            self.observe();
        }
    }

    /// Injects a scripted fault now.
    pub fn fault(&mut self, f: &Fault) {
        self.inject(f);
    }

    /// Runs `ms` of simulated time.
    pub fn run_for(&mut self, ms: Millis) {
        let end = self.now + ms;
        self.advance_to(end);
    }

    /// Which hosts run (not paused) a VM now.
    #[must_use]
    pub fn running_on(&self, vm: &VmId) -> Vec<HostId> {
        self.hosts
            .iter()
            .filter(|h| h.alive && h.vms.get(vm) == Some(&Copy::Running))
            .map(|h| h.name.clone())
            .collect()
    }

    /// The phase a host's core gives a VM.
    #[must_use]
    pub fn phase(&self, host: &HostId, vm: &VmId) -> Option<Phase> {
        let h = *self.index.get(host)?;
        self.hosts[h]
            .core
            .as_ref()?
            .records()
            .into_iter()
            .find(|r| &r.vm == vm)
            .map(|r| r.phase)
    }

    /// The report so far.
    #[must_use]
    pub fn report(&self) -> SimReport {
        let mut r = self.report.clone();
        r.sim_ms = self.now;
        r.tail = self.tail.iter().cloned().collect();
        r
    }

    /// Runs the configured number of random faults, then heals, lets the pool settle and
    /// checks that every VM runs exactly once and is protected again.
    pub fn run_random(&mut self) -> SimReport {
        self.run_for(2000);
        for _ in 0..self.cfg.faults {
            let (lo, hi) = self.cfg.fault_gap_ms;
            let gap = self.rng.gen_range(lo..=hi);
            self.run_for(gap);
            let f = self.random_fault();
            self.inject(&f);
            self.report.faults += 1;
            let kind = format!("{f:?}");
            let kind = kind.split('(').next().unwrap_or("?").to_string();
            *self.report.fault_kinds.entry(kind).or_default() += 1;
        }
        self.run_for(500);
        self.inject(&Fault::Heal);
        self.run_for(self.cfg.failover_deadline_ms + 5000);
        for spec in self.cfg.vms.clone() {
            let running = self.running_on(&spec.vm);
            if running.len() != 1 {
                self.report.not_recovered.push(format!(
                    "{} runs on {} hosts after the final heal",
                    spec.vm,
                    running.len()
                ));
                continue;
            }
            for h in 0..self.hosts.len() {
                let name = self.hosts[h].name.clone();
                if let Some(p) = self.phase(&name, &spec.vm) {
                    if p != Phase::Protected {
                        self.report.not_recovered.push(format!(
                            "{} is {p:?} on {name} after the final heal",
                            spec.vm
                        ));
                    }
                }
            }
        }
        self.report()
    }
}
