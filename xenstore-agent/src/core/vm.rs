//! A VM's protection lifecycle on this host: protection added and removed, the primary's
//! sync, degrade and resync, start results, and component faults redirected through the peer
//! (class (d)).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::lease::LeaseView;
use super::levels::Credit;
use super::membership::PeerState;
use super::{Command, HostCore, VmReport, VmSpec};
use crate::decision::{Action, Component, FaultClass};
use crate::ids::{Millis, VmId};
use crate::lifecycle::{Level, Phase, VmRecord};

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

#[derive(Clone, Debug)]
pub(super) struct VmRuntime {
    pub(super) rec: VmRecord,
    pub(super) local: LocalCopy,
    pub(super) leases: Vec<LeaseView>,
    pub(super) fence_epochs: Vec<Option<(u64, u64)>>,
    pub(super) unfence_proof: bool,
    pub(super) never_synced: bool,
    pub(super) refused: Option<String>,
    pub(super) sync_id: u64,
    pub(super) redirected: BTreeSet<Component>,
    /// After a failed sync: not before this time, and the delay before the next try.
    pub(super) sync_retry: Option<(Millis, Millis)>,
    /// The level the last sync started was for: its success protects the VM at that level
    /// (or the level asked for since, if lower).
    pub(super) sync_level: Level,
    /// On the secondary while the level is raised: the primary was seen syncing since, so its
    /// next `protected` means the raised level is in sync.
    pub(super) raise_sync_seen: bool,
}

/// First delay before a failed sync is tried again; doubled up to [`SYNC_RETRY_MAX_MS`].
pub(super) const SYNC_RETRY_MS: Millis = 1_000;
/// Longest delay between two tries of a failing sync.
pub(super) const SYNC_RETRY_MAX_MS: Millis = 60_000;

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

impl HostCore {
    pub(super) fn insert_vm(&mut self, rec: VmRecord, local: LocalCopy) {
        let n = self.cfg.quorum_servers;
        let sync_level = rec.raising_to.unwrap_or(rec.level);
        let raise_sync_seen = matches!(rec.phase, Phase::Syncing | Phase::Resyncing);
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
                sync_retry: None,
                sync_level,
                raise_sync_seen,
                redirected: BTreeSet::new(),
            },
        );
    }

    pub(super) fn on_protect(&mut self, spec: VmSpec) {
        if spec.primary != self.cfg.me && spec.secondary != self.cfg.me {
            return;
        }
        if self.vms.contains_key(&spec.vm) {
            self.change_level(&spec);
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
            raising_to: None,
        };
        let local = if rec.primary == self.cfg.me {
            LocalCopy::Running
        } else {
            LocalCopy::Stopped
        };
        self.insert_vm(rec, local);
        self.dirty = true;
    }

    pub(super) fn on_unprotect(&mut self, vm: &VmId) {
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

    pub(super) fn on_sync_done(&mut self, vm: &VmId, sync_id: u64) {
        let Some(v) = self.vms.get_mut(vm) else {
            return;
        };
        if v.sync_id != sync_id || !matches!(v.rec.phase, Phase::Syncing | Phase::Resyncing) {
            return;
        }
        v.rec.phase = Phase::Protected;
        v.sync_retry = None;
        let reason = match super::levels::credit_sync(&mut v.rec, v.sync_level) {
            Some(Credit::Raised) => format!(
                "sync finished: both copies identical, protected at level {}",
                u8::from(v.rec.level)
            ),
            Some(Credit::Partly) => format!(
                "sync finished: protected at level {}, level {} still to sync",
                u8::from(v.rec.level),
                v.rec.raising_to.map_or(0, u8::from)
            ),
            None => "sync finished: both copies identical".into(),
        };
        self.dirty = true;
        self.decide(
            None,
            None,
            Some(vm),
            FaultClass::Protection,
            Action::Protected,
            reason,
        );
    }

    /// A sync failed (a component not up yet, refused, timed out): the VM goes back to where
    /// it was (unprotected for a first sync, degraded for a resync) and the sync is tried
    /// again after a backoff, doubling up to [`SYNC_RETRY_MAX_MS`].
    pub(super) fn on_sync_failed(&mut self, vm: &VmId, sync_id: u64, reason: &str) {
        let now = self.now;
        let Some(v) = self.vms.get_mut(vm) else {
            return;
        };
        if v.sync_id != sync_id || !matches!(v.rec.phase, Phase::Syncing | Phase::Resyncing) {
            return;
        }
        // A raise's sync leaves the VM protected at the level it had; a first sync leaves it
        // unprotected, a resync degraded.
        v.rec.phase = match v.rec.phase {
            Phase::Syncing if v.rec.raising_to.is_some() => Phase::Protected,
            Phase::Syncing => Phase::Unprotected,
            _ => Phase::Degraded,
        };
        let delay = v.sync_retry.map_or(SYNC_RETRY_MS, |(_, d)| {
            d.saturating_mul(2).min(SYNC_RETRY_MAX_MS)
        });
        v.sync_retry = Some((now + delay, delay));
        let peer = v.rec.other(&self.cfg.me).clone();
        self.dirty = true;
        self.decide(
            Some(&peer),
            None,
            Some(vm),
            FaultClass::Protection,
            Action::Degrade,
            format!("sync failed ({reason}); trying again in {delay} ms"),
        );
    }

    pub(super) fn on_started(&mut self, vm: &VmId, ok: bool, detail: &str) {
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

    pub(super) fn on_mirror_consistent(&mut self, vm: &VmId, consistent: bool) {
        if let Some(v) = self.vms.get_mut(vm) {
            if v.rec.consistent != consistent {
                v.rec.consistent = consistent;
                self.dirty = true;
            }
        }
    }

    pub(super) fn on_component(
        &mut self,
        vm: Option<&VmId>,
        component: Component,
        ok: bool,
        detail: &str,
    ) {
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

    /// Sync, degrade and resync on the running primary.
    pub(super) fn drive_protection(
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
        let raising_to = v.rec.raising_to;
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
                if may_sync && peer_agrees && v.sync_retry.is_none_or(|(at, _)| self.now >= at) =>
            {
                let full = phase == Phase::Unprotected;
                let v = self.vms.get_mut(vm).expect("vm");
                v.sync_id += 1;
                let sync_id = v.sync_id;
                v.sync_level = raising_to.unwrap_or(level);
                self.dirty = true;
                if v.sync_level == Level::L1 {
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
            // The level was raised: sync toward it while protected at the current one (a full
            // disk copy from level 1, where the secondary holds no replica).
            Phase::Protected
                if may_sync && peer_agrees && v.sync_retry.is_none_or(|(at, _)| self.now >= at) =>
            {
                let Some(to) = raising_to else {
                    return;
                };
                let full = level == Level::L1;
                let v = self.vms.get_mut(vm).expect("vm");
                v.sync_id += 1;
                let sync_id = v.sync_id;
                v.sync_level = to;
                v.rec.phase = Phase::Syncing;
                self.dirty = true;
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
                    format!(
                        "level raised from {} to {}: syncing toward it, protected at level {} meanwhile",
                        u8::from(level),
                        u8::from(to),
                        u8::from(level)
                    ),
                );
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_rig::{cfg, rec, secondary_report, vm, Rig, ALL};
    use super::*;
    use crate::core::{Input, Output};

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
    fn a_failed_sync_is_tried_again_after_a_growing_backoff() {
        let mut r = Rig::new(cfg("h1", 0), vec![rec(Phase::Resyncing, true)], &[vm()]);
        let report = secondary_report(Phase::Resyncing);
        r.run(300, &ALL, Some(&report));
        let sync_ids = |r: &Rig| -> Vec<u64> {
            r.commands()
                .into_iter()
                .filter_map(|c| match c {
                    Command::StartSync { sync_id, .. } => Some(sync_id),
                    _ => None,
                })
                .collect()
        };
        let first = *sync_ids(&r).last().expect("a resync started");
        r.input(Input::SyncFailed {
            vm: vm(),
            sync_id: first,
            reason: "blkback not up yet".into(),
        });
        assert_eq!(r.core.records()[0].phase, Phase::Degraded);
        assert!(r
            .decisions()
            .contains(&(FaultClass::Protection, Action::Degrade)));
        // Not at once: after the first backoff (1 s) only.
        r.run(500, &ALL, Some(&report));
        assert_eq!(sync_ids(&r).len(), 1, "retried before the backoff");
        r.run(800, &ALL, Some(&report));
        let ids = sync_ids(&r);
        assert_eq!(ids.len(), 2, "{ids:?}");
        // Fails again: the next try waits twice as long.
        r.input(Input::SyncFailed {
            vm: vm(),
            sync_id: ids[1],
            reason: "still not up".into(),
        });
        r.run(1500, &ALL, Some(&report));
        assert_eq!(sync_ids(&r).len(), 2, "second backoff is 2 s");
        r.run(800, &ALL, Some(&report));
        let ids = sync_ids(&r);
        assert_eq!(ids.len(), 3);
        // A stale failure (an older sync) changes nothing; success clears the backoff.
        r.input(Input::SyncFailed {
            vm: vm(),
            sync_id: first,
            reason: "old".into(),
        });
        assert_eq!(r.core.records()[0].phase, Phase::Resyncing);
        r.input(Input::SyncDone {
            vm: vm(),
            sync_id: ids[2],
        });
        assert_eq!(r.core.records()[0].phase, Phase::Protected);
    }
}
