//! Who runs each VM: disagreement on roles settled with the peer's report, the primary's
//! keep-running, fence or restart, and the secondary's take-over of a silent primary or its
//! refusal (inconsistent replica, protection never established, lack of memory: class (e)).

use super::membership::PeerState;
use super::{Command, HostCore, LocalCopy, StartMode, VmRuntime};
use crate::decision::{Action, FaultClass};
use crate::ids::VmId;
use crate::lifecycle::{Level, Phase};

impl HostCore {
    pub(super) fn peer_of(&self, v: &VmRuntime) -> Option<&PeerState> {
        self.peers.get(v.rec.other(&self.cfg.me))
    }

    /// Whether this (secondary) host should try to take the VM over now.
    pub(super) fn wants_promotion(&self, v: &VmRuntime) -> bool {
        v.rec.primary != self.cfg.me
            && v.local == LocalCopy::Stopped
            && self.peer_of(v).is_some_and(|p| p.silent)
            && v.rec.consistent
            && self.memory_ok(v)
    }

    /// Whether this host, primary without a running copy, may (re)start the VM: returns why.
    pub(super) fn wants_restart(&self, v: &VmRuntime) -> Option<&'static str> {
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

    pub(super) fn memory_ok(&self, v: &VmRuntime) -> bool {
        self.free_memory_mb
            .is_none_or(|free| free >= v.rec.memory_mb)
    }

    pub(super) fn reconcile_all(&mut self) {
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
                if self.must_fence(v, promise) {
                    self.fence(
                        vm,
                        "no live quorum lease and no live promise from the peer: this side may be the isolated one",
                    );
                    return;
                }
                // Protect only while holding authority (lease or promise): a replica made
                // consistent without it would expose this copy to a fence the moment the
                // sync ends.
                let authority = self.has_authority(v, promise);
                self.drive_protection(vm, peer_alink && authority, peer_alink, report.as_ref());
            }
            LocalCopy::Starting => {}
            LocalCopy::Paused => self.unfence_if_proven(vm, &peer, promise, report.as_ref()),
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
                    // A raise's sync from level 2 or 3 leaves the mirrored disk as it is (still
                    // written synchronously): the replica stays what it was (`levels`).
                    let raise_sync = r.phase == Phase::Syncing
                        && v.rec.raising_to.is_some()
                        && v.rec.level >= Level::L2;
                    let consistent = match r.phase {
                        Phase::Protected => Some(true),
                        Phase::Syncing | Phase::Resyncing if !raise_sync => Some(false),
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
        // Level 1 (also while its level is raised) restarts from the VM's own disk: the
        // replica's state does not matter.
        let refusal = if v.rec.level >= Level::L2 && !v.rec.consistent {
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
        let mode = match level {
            Level::L3 => StartMode::ResumeCheckpoint,
            Level::L2 => StartMode::Boot,
            Level::L1 => StartMode::Restart,
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
    use super::super::test_rig::{cfg, rec, secondary_report, vm, Rig, ALL};
    use super::*;
    use crate::core::{Input, VmReport};

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
            mode: StartMode::Restart
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
}
