//! Between the registry and the decision core, both ways:
//!
//! - in: the [`Desired`] state becomes the core's `Protect` / `Unprotect` inputs for the VMs
//!   this host runs or protects ([`changes`]: pure, so every case is a unit test). Hosts are
//!   named by their xapi `name_label` (the agent's `host` and its peers' names in its config),
//!   VMs by their uuid. A halted VM is not protected until it runs (its primary is unknown).
//! - out: each VM's phase as the core sees it becomes its `xenft.state` ([`state_of`]),
//!   written back through [`super::state`] — by the VM's primary, or by its secondary once it
//!   took the VM over, never by both.

use std::collections::BTreeMap;

use super::desired::{Desired, VmDesired};
use super::state::VmState;
use crate::core::{Input, LocalCopy, VmSpec, VmView};
use crate::ids::{HostId, VmId};
use crate::lifecycle::{Level, Phase};

/// The core's spec of a VM the registry protects, if it can be expressed.
///
/// # Errors
/// Why not (a host or VM name the agent cannot use as an id, the VM not running).
pub fn spec_of(v: &VmDesired, d: &Desired) -> Result<VmSpec, String> {
    let name = |uuid: &str| {
        let n = d.hosts.get(uuid).map_or(uuid, |h| h.name.as_str());
        HostId::new(n).map_err(|e| format!("host {uuid} ({n:?}): {e}"))
    };
    let Some(primary) = &v.resident_on else {
        return Err(format!(
            "the VM is {}: protection starts when it runs",
            v.power_state.to_lowercase()
        ));
    };
    Ok(VmSpec {
        vm: VmId::new(v.uuid.as_str()).map_err(|e| format!("VM uuid {:?}: {e}", v.uuid))?,
        level: match v.level {
            1 => Level::L1,
            2 => Level::L2,
            _ => Level::L3,
        },
        primary: name(primary)?,
        secondary: name(&v.secondary)?,
        memory_mb: v.memory_bytes >> 20,
    })
}

/// What the core must be told to go from `current` (what it was told so far) to `d`, for the
/// host `me`: `Protect` for a VM new or changed here, `Unprotect` for one gone (unprotected,
/// deleted, or no longer involving this host). Returns the new current set and, per VM the
/// registry asks for but the core cannot be given, the reason.
#[must_use]
pub fn changes(
    current: &BTreeMap<VmId, VmSpec>,
    d: &Desired,
    me: &HostId,
) -> (BTreeMap<VmId, VmSpec>, Vec<Input>, BTreeMap<String, String>) {
    let mut next = BTreeMap::new();
    let mut problems = BTreeMap::new();
    for v in d.vms.values() {
        match spec_of(v, d) {
            Ok(spec) if spec.primary == *me || spec.secondary == *me => {
                next.insert(spec.vm.clone(), spec);
            }
            Ok(_) => {}
            Err(why) => {
                problems.insert(v.uuid.clone(), why);
            }
        }
    }
    let mut inputs = Vec::new();
    for vm in current.keys() {
        if !next.contains_key(vm) {
            inputs.push(Input::Unprotect(vm.clone()));
        }
    }
    for (vm, spec) in &next {
        if current.get(vm) != Some(spec) {
            inputs.push(Input::Protect(spec.clone()));
        }
    }
    (next, inputs, problems)
}

/// The state line for a VM as this host's core sees it, if this host is the one to report
/// it (the VM runs here).
#[must_use]
pub fn state_of(v: &VmView) -> Option<VmState> {
    if v.local != LocalCopy::Running && v.record.phase != Phase::FailingOver {
        return None;
    }
    Some(match v.record.phase {
        Phase::Unprotected => VmState::Pending,
        Phase::Syncing | Phase::Resyncing => VmState::Syncing { percent: 0 },
        Phase::Protected if v.redirected.is_empty() => VmState::Protected,
        Phase::Protected => VmState::Degraded {
            cause: format!("redirected through the peer: {:?}", v.redirected),
        },
        Phase::Degraded => VmState::Degraded {
            cause: format!("the peer {} or a component is lost", v.record.secondary),
        },
        Phase::FailingOver | Phase::FailedOver => VmState::Degraded {
            cause: format!(
                "failed over to {}; waiting for the other host to return",
                v.record.primary
            ),
        },
        Phase::Fenced => VmState::Error {
            reason: "fenced: this host could not prove it may run the VM".into(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xapi::desired::HostInfo;

    fn desired(resident: Option<&str>, level: u8) -> Desired {
        let mut d = Desired::default();
        for (u, n) in [("u1", "h1"), ("u2", "h2"), ("u3", "h3")] {
            d.hosts.insert(
                u.into(),
                HostInfo {
                    name: n.into(),
                    address: String::new(),
                },
            );
        }
        d.vms.insert(
            "3f6e-vm".into(),
            VmDesired {
                uuid: "3f6e-vm".into(),
                vm_ref: "OpaqueRef:v".into(),
                name: "web01".into(),
                level,
                secondary: "u2".into(),
                resident_on: resident.map(str::to_string),
                power_state: if resident.is_some() {
                    "Running"
                } else {
                    "Halted"
                }
                .into(),
                memory_bytes: 2 << 30,
                domid: None,
            },
        );
        d
    }

    fn h(n: &str) -> HostId {
        HostId::new(n).unwrap()
    }

    #[test]
    fn both_hosts_of_a_protected_vm_are_told_and_a_third_is_not() {
        let d = desired(Some("u1"), 2);
        for me in ["h1", "h2"] {
            let (cur, inputs, problems) = changes(&BTreeMap::new(), &d, &h(me));
            assert!(problems.is_empty());
            assert_eq!(cur.len(), 1);
            assert!(matches!(&inputs[..], [Input::Protect(s)]
                if s.primary == h("h1") && s.secondary == h("h2") && s.memory_mb == 2048 && s.level == Level::L2));
        }
        let (cur, inputs, _) = changes(&BTreeMap::new(), &d, &h("h3"));
        assert!(cur.is_empty() && inputs.is_empty());
    }

    #[test]
    fn a_change_is_protected_again_and_a_removal_unprotects() {
        let me = h("h1");
        let (cur, _, _) = changes(&BTreeMap::new(), &desired(Some("u1"), 2), &me);
        let (cur2, inputs, _) = changes(&cur, &desired(Some("u1"), 2), &me);
        assert!(inputs.is_empty(), "nothing changed");
        let (cur3, inputs, _) = changes(&cur2, &desired(Some("u1"), 3), &me);
        assert!(matches!(&inputs[..], [Input::Protect(s)] if s.level == Level::L3));
        let (cur4, inputs, _) = changes(&cur3, &Desired::default(), &me);
        assert!(cur4.is_empty());
        assert!(matches!(&inputs[..], [Input::Unprotect(v)] if v.as_str() == "3f6e-vm"));
    }

    #[test]
    fn a_halted_vm_waits_with_its_reason() {
        let (cur, inputs, problems) = changes(&BTreeMap::new(), &desired(None, 1), &h("h1"));
        assert!(cur.is_empty() && inputs.is_empty());
        assert!(problems["3f6e-vm"].contains("halted"), "{problems:?}");
    }
}
