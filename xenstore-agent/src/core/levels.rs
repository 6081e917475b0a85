//! A protected VM's level changed in the registry while it runs (`xenft vm-protect` again with
//! another level, roles unchanged).
//!
//! - **Raised** (1→2, 2→3, 1→3): the VM stays protected at the level it has
//!   ([`VmRecord::level`], what a take-over uses) and syncs toward the new one
//!   ([`VmRecord::raising_to`]): the primary goes `syncing` (a full disk copy from level 1,
//!   else a resync of dirty regions, then the memory stream the plan runs for level 3) and
//!   `protected` at the new level once that sync finished. A primary lost meanwhile is
//!   handled with what is protected: a level-2 take-over during 2→3, a level-1 restart during
//!   1→2 (the half-copied replica is not needed for it). A VM not protected yet (`unprotected`,
//!   its first `syncing`) simply takes the new level: a first sync that finishes for a lower
//!   level protects it there and the raise goes on from it.
//! - **Lowered** (3→2, 3→1, 2→1): protected at the lower level at once. What is no longer
//!   wanted stops: the disk mirror going to level 1 (`SuspendReplication`, as on unprotect;
//!   the memory stream is the checkpoint engine, stopped by the component plan); a raise's
//!   sync in flight is dropped. Never a take-over, a pause or a stop of the running VM.
//! - A Protect whose primary/secondary differ from the record (the registry swapped the roles
//!   after a take-over) changes nothing here: roles are settled between the hosts.
//!
//! The secondary does not hear the primary's level (heartbeats carry its phase only, and a
//! new heartbeat field would be refused by an older peer): it takes the raised level as in
//! sync when it has seen the primary syncing since the raise and then `protected`. If the
//! primary finished the raise's sync before this host read the registry, the secondary keeps
//! the lower level (a take-over then uses it) until the next resync. Conversely, a level
//! raised during the VM's first sync, whose primary is seen `protected` at the lower level
//! before it starts syncing toward the new one (its retry backoff), is taken by the secondary
//! as the new level: a level-3 take-over then finds no checkpoint and fails before touching
//! the disk (`Seams::start`).

use super::{HostCore, VmSpec};
use crate::decision::{Action, FaultClass};
use crate::ids::VmId;
use crate::lifecycle::{Level, Phase, VmRecord};

use super::Command;

/// What a finished sync did to a record whose level was raised.
pub(super) enum Credit {
    /// Protected at the level asked for now.
    Raised,
    /// Protected at a higher level, but not yet at the one asked for: another sync follows.
    Partly,
}

/// A sync started for `sync_level` finished: `rec` is protected at that level, or at the one
/// asked for since if lower. `None` when no level change was involved.
pub(super) fn credit_sync(rec: &mut VmRecord, sync_level: Level) -> Option<Credit> {
    let wanted = rec.raising_to.unwrap_or(rec.level);
    let reached = sync_level.min(wanted);
    if reached >= wanted {
        rec.level = wanted;
        return rec.raising_to.take().map(|_| Credit::Raised);
    }
    // Raised before the first sync finished, or during a raise's sync.
    rec.level = if rec.raising_to.is_some() {
        rec.level.max(reached)
    } else {
        reached
    };
    rec.raising_to = Some(wanted);
    Some(Credit::Partly)
}

impl HostCore {
    /// A Protect for a VM this host already has.
    pub(super) fn change_level(&mut self, spec: &VmSpec) {
        let me = self.cfg.me.clone();
        let Some(v) = self.vms.get(&spec.vm) else {
            return;
        };
        if spec.primary != v.rec.primary || spec.secondary != v.rec.secondary {
            return;
        }
        let wanted = v.rec.raising_to.unwrap_or(v.rec.level);
        if spec.level == wanted {
            return;
        }
        let is_primary = v.rec.primary == me;
        if spec.level > wanted {
            self.raise(&spec.vm, spec.level, is_primary);
        } else {
            self.lower(&spec.vm, spec.level, is_primary);
        }
    }

    fn raise(&mut self, vm: &VmId, to: Level, is_primary: bool) {
        let v = self.vms.get_mut(vm).expect("vm");
        let from = v.rec.level;
        let phase = v.rec.phase;
        self.dirty = true;
        let first_sync =
            phase == Phase::Unprotected || (phase == Phase::Syncing && v.rec.raising_to.is_none());
        let reason = if is_primary && first_sync {
            // Nothing is protected yet: the first sync protects at the new level (one in
            // flight for the old level protects there, and the raise goes on from it).
            v.rec.level = to;
            v.rec.raising_to = None;
            format!(
                "level raised from {} to {} before the first sync finished: protecting at {}",
                u8::from(from),
                u8::from(to),
                u8::from(to)
            )
        } else {
            v.rec.raising_to = Some(to);
            v.raise_sync_seen = matches!(phase, Phase::Syncing | Phase::Resyncing);
            format!(
                "level raised from {} to {}: protected at level {} until level {} is in sync",
                u8::from(from),
                u8::from(to),
                u8::from(from),
                u8::from(to)
            )
        };
        self.decide(
            None,
            None,
            Some(vm),
            FaultClass::Protection,
            Action::LogOnly,
            reason,
        );
    }

    fn lower(&mut self, vm: &VmId, to: Level, is_primary: bool) {
        let v = self.vms.get_mut(vm).expect("vm");
        let from = v.rec.raising_to.unwrap_or(v.rec.level);
        let phase = v.rec.phase;
        let raise_sync = phase == Phase::Syncing && v.rec.raising_to.is_some();
        self.dirty = true;
        if to >= v.rec.level {
            // Only the raise shrinks: still above the protected level, the sync goes on (it
            // protects at `to` at most); down to it, the raise's sync is dropped.
            v.rec.raising_to = (to > v.rec.level).then_some(to);
            if is_primary && raise_sync && v.rec.raising_to.is_none() {
                v.sync_id += 1;
                v.sync_retry = None;
                v.rec.phase = Phase::Protected;
            }
        } else {
            let mirror_stops = v.rec.level >= Level::L2 && to == Level::L1;
            v.rec.level = to;
            v.rec.raising_to = None;
            if to == Level::L1 {
                // No replica at level 1: a restart boots the VM from its own disk.
                v.rec.consistent = true;
            }
            if is_primary {
                let mirror_active =
                    matches!(phase, Phase::Protected | Phase::Syncing | Phase::Resyncing);
                let next = match phase {
                    Phase::Syncing if raise_sync => Phase::Protected,
                    // Level 1 syncs nothing: protected once the peer confirms, as for a new VM.
                    Phase::Syncing if to == Level::L1 => Phase::Unprotected,
                    Phase::Resyncing if to == Level::L1 => Phase::Degraded,
                    p => p,
                };
                if next != phase {
                    v.sync_id += 1;
                    v.sync_retry = None;
                    v.rec.phase = next;
                }
                if mirror_stops && mirror_active {
                    self.cmd(Command::SuspendReplication { vm: vm.clone() });
                }
            }
        }
        let v = &self.vms[vm];
        let protected = v.rec.phase == Phase::Protected;
        self.decide(
            None,
            None,
            Some(vm),
            FaultClass::Protection,
            if protected && is_primary {
                Action::Protected
            } else {
                Action::LogOnly
            },
            format!(
                "level lowered from {} to {}: {}; the VM keeps running",
                u8::from(from),
                u8::from(to),
                if protected {
                    format!("protected at level {}", u8::from(v.rec.level))
                } else {
                    format!("{:?} at level {}", v.rec.phase, u8::from(v.rec.level))
                }
            ),
        );
    }

    /// On the secondary of a VM whose level was raised: the raised level counts as in sync
    /// once the primary, seen syncing since the raise, reports the VM protected.
    pub(super) fn follow_raises(&mut self) {
        let me = self.cfg.me.clone();
        let mut done = Vec::new();
        for (name, v) in &mut self.vms {
            let Some(to) = v.rec.raising_to else {
                continue;
            };
            if v.rec.primary == me {
                continue;
            }
            match v.rec.phase {
                Phase::Syncing | Phase::Resyncing => v.raise_sync_seen = true,
                Phase::Protected if v.raise_sync_seen => {
                    v.rec.level = to;
                    v.rec.raising_to = None;
                    v.raise_sync_seen = false;
                    done.push((name.clone(), to));
                }
                _ => {}
            }
        }
        for (vm, to) in done {
            self.dirty = true;
            self.decide(
                None,
                None,
                Some(&vm),
                FaultClass::Protection,
                Action::Protected,
                format!(
                    "the primary finished syncing: the replica is protected at level {}",
                    u8::from(to)
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_rig::{cfg, h, rec, secondary_report, vm, Rig, ALL};
    use super::super::{Input, Output, StartMode, VmReport};
    use super::*;

    fn spec(level: Level) -> VmSpec {
        VmSpec {
            vm: vm(),
            level,
            primary: h("h1"),
            secondary: h("h2"),
            memory_mb: 512,
        }
    }

    fn at(level: Level, phase: Phase) -> VmRecord {
        VmRecord {
            level,
            consistent: true,
            ..rec(phase, true)
        }
    }

    /// h1 running the VM, protected at `level` and heard from h2.
    fn primary(level: Level) -> Rig {
        let mut r = Rig::new(cfg("h1", 0), vec![at(level, Phase::Protected)], &[vm()]);
        r.run(500, &ALL, Some(&secondary_report(Phase::Protected)));
        r.out.clear();
        r
    }

    fn syncs(r: &Rig) -> Vec<(u64, bool)> {
        r.commands()
            .into_iter()
            .filter_map(|c| match c {
                Command::StartSync { sync_id, full, .. } => Some((sync_id, full)),
                _ => None,
            })
            .collect()
    }

    fn record(r: &Rig) -> VmRecord {
        r.core.records().remove(0)
    }

    /// No command that would pause, stop, start or take over the running VM.
    fn vm_untouched(r: &Rig) {
        for c in r.commands() {
            assert!(
                !matches!(
                    c,
                    Command::PauseVm { .. } | Command::DestroyVm { .. } | Command::StartVm { .. }
                ),
                "{c:?}"
            );
        }
    }

    #[test]
    fn raising_2_to_3_syncs_and_is_protected_at_3_only_once_in_sync() {
        let mut r = primary(Level::L2);
        r.input(Input::Protect(spec(Level::L3)));
        let rec = record(&r);
        assert_eq!(
            (rec.level, rec.raising_to, rec.phase),
            (Level::L2, Some(Level::L3), Phase::Syncing)
        );
        // The disk stays mirrored: dirty regions only, then the memory stream.
        let s = syncs(&r);
        assert!(matches!(s.as_slice(), [(_, false)]), "{s:?}");
        r.run(500, &ALL, Some(&secondary_report(Phase::Syncing)));
        assert_eq!(
            record(&r).phase,
            Phase::Syncing,
            "protected before the sync"
        );
        r.input(Input::SyncDone {
            vm: vm(),
            sync_id: s[0].0,
        });
        let rec = record(&r);
        assert_eq!(
            (rec.level, rec.raising_to, rec.phase),
            (Level::L3, None, Phase::Protected)
        );
        assert!(r
            .out
            .iter()
            .any(|o| matches!(o, Output::Persist(p) if p[0].level == Level::L3)));
        vm_untouched(&r);
    }

    #[test]
    fn raising_from_level_1_copies_the_whole_disk_first() {
        for to in [Level::L2, Level::L3] {
            let mut r = primary(Level::L1);
            r.input(Input::Protect(spec(to)));
            let s = syncs(&r);
            assert!(matches!(s.as_slice(), [(_, true)]), "{to:?}: {s:?}");
            assert_eq!(record(&r).level, Level::L1);
            r.input(Input::SyncDone {
                vm: vm(),
                sync_id: s[0].0,
            });
            assert_eq!((record(&r).level, record(&r).phase), (to, Phase::Protected));
            vm_untouched(&r);
        }
    }

    #[test]
    fn a_failed_raise_leaves_the_vm_protected_at_its_level_and_is_tried_again() {
        let mut r = primary(Level::L2);
        r.input(Input::Protect(spec(Level::L3)));
        let first = syncs(&r)[0].0;
        r.input(Input::SyncFailed {
            vm: vm(),
            sync_id: first,
            reason: "engine not up yet".into(),
        });
        let rec = record(&r);
        assert_eq!(
            (rec.level, rec.raising_to, rec.phase),
            (Level::L2, Some(Level::L3), Phase::Protected)
        );
        r.run(1200, &ALL, Some(&secondary_report(Phase::Protected)));
        let s = syncs(&r);
        assert_eq!(s.len(), 2, "tried again after the backoff: {s:?}");
        assert_eq!(record(&r).phase, Phase::Syncing);
    }

    #[test]
    fn a_raise_before_the_first_sync_finished_goes_on_from_the_level_it_reached() {
        let mut r = Rig::new(
            cfg("h1", 0),
            vec![at(Level::L2, Phase::Unprotected)],
            &[vm()],
        );
        r.run(500, &ALL, Some(&secondary_report(Phase::Unprotected)));
        let first = syncs(&r);
        assert!(matches!(first.as_slice(), [(_, true)]), "{first:?}");
        r.input(Input::Protect(spec(Level::L3)));
        assert_eq!(record(&r).level, Level::L3, "nothing protected yet");
        r.out.clear();
        // The first sync was for level 2: protected there, then toward 3.
        r.input(Input::SyncDone {
            vm: vm(),
            sync_id: first[0].0,
        });
        let rec = record(&r);
        assert_eq!(
            (rec.level, rec.raising_to, rec.phase),
            (Level::L2, Some(Level::L3), Phase::Syncing)
        );
        let s = syncs(&r);
        assert!(matches!(s.as_slice(), [(_, false)]), "{s:?}");
        r.input(Input::SyncDone {
            vm: vm(),
            sync_id: s[0].0,
        });
        assert_eq!(record(&r).level, Level::L3);
        assert_eq!(record(&r).phase, Phase::Protected);
    }

    #[test]
    fn lowering_3_to_2_is_protected_at_once_and_keeps_the_disk_mirror() {
        let mut r = primary(Level::L3);
        r.input(Input::Protect(spec(Level::L2)));
        let rec = record(&r);
        assert_eq!((rec.level, rec.phase), (Level::L2, Phase::Protected));
        assert!(r.commands().is_empty(), "{:?}", r.commands());
        r.run(500, &ALL, Some(&secondary_report(Phase::Protected)));
        assert!(syncs(&r).is_empty());
        assert_eq!(record(&r).phase, Phase::Protected);
    }

    #[test]
    fn lowering_to_level_1_stops_the_disk_mirror_and_never_the_vm() {
        for from in [Level::L3, Level::L2] {
            let mut r = primary(from);
            r.input(Input::Protect(spec(Level::L1)));
            assert_eq!(
                r.commands(),
                vec![Command::SuspendReplication { vm: vm() }],
                "{from:?}"
            );
            let rec = record(&r);
            assert_eq!((rec.level, rec.phase), (Level::L1, Phase::Protected));
            r.run(500, &ALL, Some(&secondary_report(Phase::Protected)));
            assert!(syncs(&r).is_empty());
            vm_untouched(&r);
        }
    }

    #[test]
    fn lowering_back_during_a_raise_drops_its_sync() {
        let mut r = primary(Level::L2);
        r.input(Input::Protect(spec(Level::L3)));
        let s = syncs(&r);
        r.input(Input::Protect(spec(Level::L2)));
        let rec = record(&r);
        assert_eq!(
            (rec.level, rec.raising_to, rec.phase),
            (Level::L2, None, Phase::Protected)
        );
        // The dropped sync's late completion does not make it level 3.
        r.input(Input::SyncDone {
            vm: vm(),
            sync_id: s[0].0,
        });
        assert_eq!(record(&r).level, Level::L2);
        vm_untouched(&r);
    }

    #[test]
    fn a_protect_with_the_roles_swapped_changes_nothing() {
        let mut r = primary(Level::L2);
        let before = record(&r);
        r.input(Input::Protect(VmSpec {
            primary: h("h2"),
            secondary: h("h1"),
            ..spec(Level::L3)
        }));
        assert_eq!(record(&r), before);
        assert!(r.commands().is_empty());
    }

    #[test]
    fn an_agent_restart_mid_raise_keeps_the_vm_protected_at_its_level() {
        let mut rec = at(Level::L2, Phase::Syncing);
        rec.raising_to = Some(Level::L3);
        let mut r = Rig::new(cfg("h1", 0), vec![rec], &[vm()]);
        assert_eq!(record(&r).phase, Phase::Protected);
        r.run(300, &ALL, Some(&secondary_report(Phase::Protected)));
        // The raise's sync starts again (dirty regions only).
        assert!(matches!(syncs(&r).as_slice(), [(_, false)]));
        assert_eq!(record(&r).level, Level::L2);
    }

    /// h2 holding the copy of a VM protected at `level`, h1 heard running it.
    fn secondary(level: Level) -> Rig {
        let mut r = Rig::new(cfg("h2", 0), vec![at(level, Phase::Protected)], &[]);
        r.run(500, &ALL, Some(&primary_report(Phase::Protected)));
        r
    }

    fn primary_report(phase: Phase) -> VmReport {
        VmReport {
            running: true,
            ..secondary_report(phase)
        }
    }

    fn take_over(r: &mut Rig) -> Vec<Command> {
        r.out.clear();
        r.run(700, &[], None);
        r.commands()
            .into_iter()
            .filter(|c| matches!(c, Command::StartVm { .. }))
            .collect()
    }

    #[test]
    fn primary_lost_while_2_to_3_syncs_is_a_level_2_take_over() {
        let mut r = secondary(Level::L2);
        r.input(Input::Protect(spec(Level::L3)));
        r.run(500, &ALL, Some(&primary_report(Phase::Syncing)));
        let rec = record(&r);
        assert!(rec.consistent, "the mirrored disk is still in sync");
        assert_eq!(rec.level, Level::L2);
        assert_eq!(
            take_over(&mut r),
            vec![Command::StartVm {
                vm: vm(),
                mode: StartMode::Boot
            }]
        );
    }

    #[test]
    fn primary_lost_while_1_to_2_syncs_is_a_level_1_restart() {
        let mut r = secondary(Level::L1);
        r.input(Input::Protect(spec(Level::L2)));
        r.run(500, &ALL, Some(&primary_report(Phase::Syncing)));
        r.input(Input::MirrorConsistent {
            vm: vm(),
            consistent: false,
        });
        assert_eq!(record(&r).level, Level::L1);
        assert_eq!(
            take_over(&mut r),
            vec![Command::StartVm {
                vm: vm(),
                mode: StartMode::Restart
            }]
        );
    }

    #[test]
    fn the_secondary_takes_the_raised_level_once_the_primary_synced_it() {
        let mut r = secondary(Level::L2);
        r.input(Input::Protect(spec(Level::L3)));
        // Still the old `protected`: the primary has not started the raise.
        r.run(300, &ALL, Some(&primary_report(Phase::Protected)));
        assert_eq!(record(&r).level, Level::L2);
        r.run(300, &ALL, Some(&primary_report(Phase::Syncing)));
        assert_eq!(record(&r).level, Level::L2);
        r.run(300, &ALL, Some(&primary_report(Phase::Protected)));
        let rec = record(&r);
        assert_eq!((rec.level, rec.raising_to), (Level::L3, None));
        assert_eq!(
            take_over(&mut r),
            vec![Command::StartVm {
                vm: vm(),
                mode: StartMode::ResumeCheckpoint
            }]
        );
    }

    #[test]
    fn the_secondary_lowers_at_once() {
        let mut r = secondary(Level::L3);
        r.input(Input::Protect(spec(Level::L1)));
        let rec = record(&r);
        assert_eq!((rec.level, rec.consistent), (Level::L1, true));
        assert!(r.commands().is_empty());
        assert_eq!(
            take_over(&mut r),
            vec![Command::StartVm {
                vm: vm(),
                mode: StartMode::Restart
            }]
        );
    }
}
