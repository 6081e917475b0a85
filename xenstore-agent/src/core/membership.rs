//! Membership: the peers, their liveness on each path, and the heartbeats that carry it.
//!
//! Every interval a heartbeat goes to every peer on every configured path (A-links, the
//! management network, the storage heartbeat), carrying an acknowledgement of the highest
//! sequence heard from the receiver and the sender's view of the VMs the two share. A path is
//! down when silent past `path_down_ms` (class (a): log only); every A-link down while the
//! peer is heard elsewhere is class (b) (degrade, never fail over); silence on every path past
//! `peer_dead_ms` makes the peer silent, which the take-over logic acts on. An acknowledged
//! sequence is the peer's *promise* not to claim the VMs before its send time plus
//! `peer_dead_ms` (see the safety argument in the parent module).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{HostCore, LocalCopy, Output};
use crate::decision::{Action, FaultClass};
use crate::ids::{HostId, Millis, PathId, VmId};
use crate::lifecycle::Phase;

/// Most VM reports in one heartbeat.
pub const MAX_VM_REPORTS: usize = 1024;

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

#[derive(Clone, Copy, Debug, Default)]
pub(super) struct PathState {
    pub(super) last: Millis,
    pub(super) up: bool,
    /// Highest sequence accepted on this path (replayed or reordered datagrams are dropped).
    last_seq: Option<u64>,
}

#[derive(Clone, Debug)]
pub(super) struct PeerState {
    pub(super) paths: BTreeMap<PathId, PathState>,
    pub(super) last_any: Millis,
    pub(super) silent: bool,
    alinks_down_reported: bool,
    incarnation: Option<u64>,
    max_seq: Option<u64>,
    pub(super) promise_until: Millis,
    pub(super) reports: BTreeMap<VmId, VmReport>,
}

/// A decision to log: class, path, reason.
type Noted = (FaultClass, Option<PathId>, String);

impl PeerState {
    /// A peer not heard yet, at `now`, on `paths`.
    pub(super) fn new(paths: &[PathId], now: Millis) -> Self {
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
        }
    }

    pub(super) fn alink_up(&self) -> bool {
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

impl HostCore {
    pub(super) fn send_heartbeats(&mut self) {
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

    pub(super) fn update_liveness(&mut self) {
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

    pub(super) fn on_heartbeat(&mut self, path: PathId, hb: Heartbeat) {
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

    pub(super) fn on_path_seen(&mut self, peer: &HostId, path: PathId) {
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
}

#[cfg(test)]
mod tests {
    use super::super::test_rig::{cfg, h, rec, secondary_report, vm, Rig, ALL};
    use super::*;
    use crate::core::{Command, Input};

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
