//! Quorum leases and fencing.
//!
//! With quorum servers configured, every VM this host runs (or wants to run) is claimed from
//! each server every heartbeat interval; a grant is a lease counted from the request's send
//! time minus a margin. A secondary acquires the servers in order of preference, so two
//! claimants never hold one server each. A running primary without a live lease and without
//! the peer's live promise pauses its copy (fences); the copy resumes only with proof that
//! nobody else took the VM over in between (see the safety argument in the parent module).

use super::{Command, HostCore, LocalCopy, Output, VmReport, VmRuntime};
use crate::decision::{Action, FaultClass};
use crate::ids::{HostId, Millis, VmId};
use crate::lifecycle::{Level, Phase};
use crate::quorum::table::{Claim, ClaimResult, QuorumRequest, QuorumResponse};

#[derive(Clone, Copy, Debug, Default)]
pub(super) struct LeaseView {
    /// (server boot, epoch) of the last grant.
    pub(super) epoch: Option<(u64, u64)>,
    pub(super) valid_until: Millis,
}

#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ServerConn {
    pending: Option<(u64, Millis)>,
    next_at: Millis,
}

impl HostCore {
    pub(super) fn quorum_tick(&mut self) {
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

    pub(super) fn all_grants(&self, v: &VmRuntime) -> bool {
        (0..self.cfg.quorum_servers).all(|s| self.lease_valid(v, s))
    }

    pub(super) fn any_grant(&self, v: &VmRuntime) -> bool {
        (0..self.cfg.quorum_servers).any(|s| self.lease_valid(v, s))
    }

    pub(super) fn wants_lease(&self, v: &VmRuntime, s: usize) -> bool {
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

    pub(super) fn on_quorum(&mut self, s: usize, reply: &QuorumResponse) {
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

    /// Whether the running primary must pause its copy now: quorum servers are configured, the
    /// secondary could take over, and this host holds neither a live lease nor a live promise
    /// from the peer.
    pub(super) fn must_fence(&self, v: &VmRuntime, promise: bool) -> bool {
        // Before the first sync completes the secondary holds no consistent replica and
        // never takes over, so there is nothing to fence against yet.
        let takeover_possible =
            v.rec.level == Level::L1 || !matches!(v.rec.phase, Phase::Unprotected | Phase::Syncing);
        self.cfg.quorum_servers > 0 && takeover_possible && !self.any_grant(v) && !promise
    }

    /// Whether this host holds authority over the VM: no quorum server to ask, a live lease,
    /// or a live promise from the peer.
    pub(super) fn has_authority(&self, v: &VmRuntime, promise: bool) -> bool {
        self.cfg.quorum_servers == 0 || self.any_grant(v) || promise
    }

    pub(super) fn fence(&mut self, vm: &VmId, reason: &str) {
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

    /// Resumes a fenced copy once it is proven that nobody else took the VM over: a quorum
    /// server's grant (same or next epoch), or the peer's live promise together with its
    /// report that it does not run the VM.
    pub(super) fn unfence_if_proven(
        &mut self,
        vm: &VmId,
        peer: &HostId,
        promise: bool,
        report: Option<&VmReport>,
    ) {
        let v = &self.vms[vm];
        let peer_idle = report.is_some_and(|r| {
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
                Some(peer),
                None,
                Some(vm),
                FaultClass::QuorumLost,
                Action::Unfence,
                why.into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_rig::{cfg, rec, vm, Rig};
    use super::*;
    use crate::core::Input;

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
        grant(&mut r, 9, 5, true);
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
}
