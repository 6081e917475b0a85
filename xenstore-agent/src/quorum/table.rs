//! The quorum server's decision core: a table of per-VM leases (pure, no I/O).
//!
//! A host claims a VM; the server grants the claim when nobody else holds a live lease on it,
//! and records the owner, an epoch (bumped on every change of owner) and an expiry `lease_ms`
//! after it *received* the claim. The owner renews by claiming again. The host counts its lease
//! from the moment it *sent* the claim, minus a margin, so the host always believes its lease
//! has expired before the server does: when the server grants the VM to another host, the old
//! owner has already stopped relying on its lease. That is what makes "at most one side wins
//! per VM" hold on one server; how several servers combine is in [`crate::quorum`].
//!
//! After a restart the server has forgotten its grants, so it refuses every claim during a
//! grace period of one lease length: whatever it granted before has then expired at the hosts.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::ids::{HostId, Millis, VmId};

/// Most claims in one request.
pub const MAX_CLAIMS_PER_REQUEST: usize = 1024;

/// One claim: "let me own this VM".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    /// The VM.
    pub vm: VmId,
    /// The epoch the host believes it holds (from an earlier grant of this server boot).
    pub epoch_hint: Option<u64>,
}

/// A request from a host to a quorum server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuorumRequest {
    /// The claiming host.
    pub host: HostId,
    /// The host agent's incarnation (increases across restarts).
    pub incarnation: u64,
    /// Request number, increasing within an incarnation (replays are refused).
    pub req_id: u64,
    /// The claims.
    pub claims: Vec<Claim>,
}

/// The answer to one claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "result", rename_all = "snake_case")]
pub enum ClaimResult {
    /// The host owns the VM for one lease length from when it sent the claim.
    Granted {
        /// The VM.
        vm: VmId,
        /// The owner epoch (changes whenever the owner changes).
        epoch: u64,
        /// True when the host already owned the VM at exactly `epoch_hint`: nobody else was
        /// granted the VM in between.
        continued: bool,
    },
    /// Another host holds a live lease, or the server is in its grace period.
    Denied {
        /// The VM.
        vm: VmId,
        /// The holder, if any.
        holder: Option<HostId>,
        /// How long the current lease (or grace period) still runs at the server.
        remaining_ms: Millis,
    },
    /// The server's table is full.
    TableFull {
        /// The VM.
        vm: VmId,
    },
}

/// A reply from a quorum server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuorumResponse {
    /// Echo of the request number.
    pub req_id: u64,
    /// Random number drawn at server start: epochs of different boots never compare equal.
    pub server_boot: u64,
    /// One result per claim, in order.
    pub results: Vec<ClaimResult>,
}

/// Why a request was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The request number is not newer than the last one seen from this host incarnation.
    #[error("replayed or reordered request {req_id} from {host} (last {last})")]
    Replay {
        /// The host.
        host: HostId,
        /// The refused number.
        req_id: u64,
        /// The last accepted number.
        last: u64,
    },
    /// The request is from an older incarnation than one already seen.
    #[error("request from old incarnation {got} of {host} (current {current})")]
    OldIncarnation {
        /// The host.
        host: HostId,
        /// The request's incarnation.
        got: u64,
        /// The newest seen.
        current: u64,
    },
    /// Too many claims in one request.
    #[error("{0} claims in one request (max {MAX_CLAIMS_PER_REQUEST})")]
    TooManyClaims(usize),
    /// Too many distinct hosts.
    #[error("too many hosts")]
    TooManyHosts,
}

#[derive(Clone, Debug)]
struct Lease {
    owner: HostId,
    epoch: u64,
    expires_at: Millis,
}

/// The lease table of one quorum server.
#[derive(Debug)]
pub struct QuorumTable {
    lease_ms: Millis,
    grace_until: Millis,
    max_vms: usize,
    boot: u64,
    next_epoch: u64,
    leases: HashMap<VmId, Lease>,
    hosts: HashMap<HostId, (u64, u64)>,
}

impl QuorumTable {
    /// A table started at `now`, refusing claims for one lease length (grace period).
    #[must_use]
    pub fn new(now: Millis, lease_ms: Millis, max_vms: usize, boot: u64) -> Self {
        Self {
            lease_ms,
            grace_until: now + lease_ms,
            max_vms,
            boot,
            next_epoch: 1,
            leases: HashMap::new(),
            hosts: HashMap::new(),
        }
    }

    /// The lease length.
    #[must_use]
    pub fn lease_ms(&self) -> Millis {
        self.lease_ms
    }

    /// Current holder of a VM with the remaining lease time, if live at `now`.
    #[must_use]
    pub fn holder(&self, vm: &VmId, now: Millis) -> Option<(HostId, Millis)> {
        self.leases
            .get(vm)
            .filter(|l| l.expires_at > now)
            .map(|l| (l.owner.clone(), l.expires_at - now))
    }

    /// Handles one request at `now`.
    ///
    /// # Errors
    /// [`TableError`] when the request is a replay, from an old incarnation or too large.
    pub fn handle(
        &mut self,
        now: Millis,
        req: &QuorumRequest,
    ) -> Result<QuorumResponse, TableError> {
        if req.claims.len() > MAX_CLAIMS_PER_REQUEST {
            return Err(TableError::TooManyClaims(req.claims.len()));
        }
        match self.hosts.get(&req.host) {
            Some(&(inc, last)) if req.incarnation == inc && req.req_id <= last => {
                return Err(TableError::Replay {
                    host: req.host.clone(),
                    req_id: req.req_id,
                    last,
                });
            }
            Some(&(inc, _)) if req.incarnation < inc => {
                return Err(TableError::OldIncarnation {
                    host: req.host.clone(),
                    got: req.incarnation,
                    current: inc,
                });
            }
            None if self.hosts.len() >= self.max_vms.max(16) => {
                return Err(TableError::TooManyHosts);
            }
            _ => {}
        }
        self.hosts
            .insert(req.host.clone(), (req.incarnation, req.req_id));
        let results = req
            .claims
            .iter()
            .map(|c| self.claim(now, &req.host, c))
            .collect();
        Ok(QuorumResponse {
            req_id: req.req_id,
            server_boot: self.boot,
            results,
        })
    }

    fn claim(&mut self, now: Millis, host: &HostId, c: &Claim) -> ClaimResult {
        if now < self.grace_until {
            return ClaimResult::Denied {
                vm: c.vm.clone(),
                holder: None,
                remaining_ms: self.grace_until - now,
            };
        }
        let expires_at = now + self.lease_ms;
        match self.leases.get_mut(&c.vm) {
            Some(l) if &l.owner == host => {
                l.expires_at = expires_at;
                ClaimResult::Granted {
                    vm: c.vm.clone(),
                    epoch: l.epoch,
                    continued: c.epoch_hint == Some(l.epoch),
                }
            }
            Some(l) if l.expires_at > now => ClaimResult::Denied {
                vm: c.vm.clone(),
                holder: Some(l.owner.clone()),
                remaining_ms: l.expires_at - now,
            },
            existing => {
                if existing.is_none() && self.leases.len() >= self.max_vms {
                    // Make room from expired leases before refusing.
                    self.leases.retain(|_, l| l.expires_at > now);
                    if self.leases.len() >= self.max_vms {
                        return ClaimResult::TableFull { vm: c.vm.clone() };
                    }
                }
                let epoch = self.next_epoch;
                self.next_epoch += 1;
                self.leases.insert(
                    c.vm.clone(),
                    Lease {
                        owner: host.clone(),
                        epoch,
                        expires_at,
                    },
                );
                ClaimResult::Granted {
                    vm: c.vm.clone(),
                    epoch,
                    continued: false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str, id: u64, vm: &str, hint: Option<u64>) -> QuorumRequest {
        QuorumRequest {
            host: HostId::new(host).unwrap(),
            incarnation: 1,
            req_id: id,
            claims: vec![Claim {
                vm: VmId::new(vm).unwrap(),
                epoch_hint: hint,
            }],
        }
    }

    #[test]
    fn second_claimant_is_denied_until_the_lease_expires() {
        let mut t = QuorumTable::new(0, 600, 10, 7);
        let r = t.handle(1000, &req("a", 1, "vm", None)).unwrap();
        let ClaimResult::Granted {
            epoch, continued, ..
        } = r.results[0].clone()
        else {
            panic!("{r:?}")
        };
        assert!(!continued);
        let r = t.handle(1500, &req("b", 1, "vm", None)).unwrap();
        assert!(matches!(
            r.results[0],
            ClaimResult::Denied {
                remaining_ms: 100,
                ..
            }
        ));
        let r = t.handle(1600, &req("b", 2, "vm", None)).unwrap();
        let ClaimResult::Granted { epoch: e2, .. } = r.results[0].clone() else {
            panic!("{r:?}")
        };
        assert!(e2 > epoch);
        // The old owner can no longer renew with its epoch.
        let r = t.handle(1700, &req("a", 2, "vm", Some(epoch))).unwrap();
        assert!(matches!(r.results[0], ClaimResult::Denied { .. }));
    }

    #[test]
    fn renewal_by_the_owner_reports_continuity() {
        let mut t = QuorumTable::new(0, 600, 10, 7);
        t.handle(700, &req("a", 1, "vm", None)).unwrap();
        // Expired but nobody else claimed: continuity holds.
        let r = t.handle(5000, &req("a", 2, "vm", Some(1))).unwrap();
        assert!(matches!(
            r.results[0],
            ClaimResult::Granted {
                epoch: 1,
                continued: true,
                ..
            }
        ));
    }

    #[test]
    fn claims_in_the_grace_period_after_start_are_denied() {
        let mut t = QuorumTable::new(100, 600, 10, 7);
        let r = t.handle(600, &req("a", 1, "vm", None)).unwrap();
        assert!(matches!(
            r.results[0],
            ClaimResult::Denied {
                holder: None,
                remaining_ms: 100,
                ..
            }
        ));
    }

    #[test]
    fn replayed_requests_are_refused() {
        let mut t = QuorumTable::new(0, 600, 10, 7);
        t.handle(700, &req("a", 5, "vm", None)).unwrap();
        assert!(matches!(
            t.handle(800, &req("a", 5, "vm", None)),
            Err(TableError::Replay { .. })
        ));
        let mut old = req("a", 9, "vm", None);
        old.incarnation = 0;
        assert!(matches!(
            t.handle(800, &old),
            Err(TableError::OldIncarnation { .. })
        ));
    }

    #[test]
    fn full_table_refuses_new_vms_but_reuses_expired_slots() {
        let mut t = QuorumTable::new(0, 600, 1, 7);
        t.handle(700, &req("a", 1, "vm1", None)).unwrap();
        let r = t.handle(800, &req("a", 2, "vm2", None)).unwrap();
        assert!(matches!(r.results[0], ClaimResult::TableFull { .. }));
        let r = t.handle(2000, &req("a", 3, "vm2", None)).unwrap();
        assert!(matches!(r.results[0], ClaimResult::Granted { .. }));
    }
}
