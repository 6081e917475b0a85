//! A scripted peer that drives one core through ticks and heartbeats, shared by the unit
//! tests of each concern.

use super::{Ack, Command, CoreConfig, Heartbeat, HostCore, Input, Output, VmReport};
use crate::decision::{Action, FaultClass};
use crate::ids::{HostId, Millis, PathId, VmId};
use crate::lifecycle::{Level, Phase, VmRecord};
use crate::timing::Timing;

pub(super) fn h(s: &str) -> HostId {
    HostId::new(s).unwrap()
}
pub(super) fn vm() -> VmId {
    VmId::new("vm1").unwrap()
}

pub(super) fn cfg(me: &str, servers: usize) -> CoreConfig {
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

pub(super) fn rec(phase: Phase, consistent: bool) -> VmRecord {
    VmRecord {
        vm: vm(),
        level: Level::L3,
        primary: h("h1"),
        secondary: h("h2"),
        generation: 3,
        phase,
        consistent,
        memory_mb: 512,
        raising_to: None,
    }
}

/// Drives one core against a scripted peer.
pub(super) struct Rig {
    pub(super) core: HostCore,
    now: Millis,
    peer_seq: u64,
    pub(super) out: Vec<Output>,
}

impl Rig {
    pub(super) fn new(cfg: CoreConfig, recs: Vec<VmRecord>, running: &[VmId]) -> Self {
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
    pub(super) fn run(&mut self, ms: Millis, paths: &[PathId], report: Option<&VmReport>) {
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

    pub(super) fn input(&mut self, i: Input) {
        let out = self.core.step(self.now, i);
        self.out.extend(out);
    }

    pub(super) fn decisions(&self) -> Vec<(FaultClass, Action)> {
        self.out
            .iter()
            .filter_map(|o| match o {
                Output::Decision(d) => Some((d.class, d.action)),
                _ => None,
            })
            .collect()
    }

    pub(super) fn commands(&self) -> Vec<Command> {
        self.out
            .iter()
            .filter_map(|o| match o {
                Output::Command(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }
}

pub(super) const ALL: [PathId; 3] = [PathId::Alink(0), PathId::Alink(1), PathId::Mgmt];

pub(super) fn secondary_report(phase: Phase) -> VmReport {
    VmReport {
        vm: vm(),
        generation: 3,
        primary: h("h1"),
        running: false,
        phase,
    }
}
