//! Desired state, from the pool's registry alone: what the pool's xapi database says should be
//! protected, where, at which level — derived purely from a snapshot of the `pool`, `host` and
//! `VM` records (no I/O here, so every hostile value is a unit test).
//!
//! The registry (see `xenft_xapi::registry`): pool `other_config["xenft.pool"]` (hosts and
//! their A-links, quorum servers, policy, the uuid of the secret holding the A-link key); VM
//! `other_config["xenft.level"]` and `["xenft.secondary"]` (a host uuid). A VM that cannot be
//! protected as asked is not dropped silently: it is listed in [`Desired::refused`] with the
//! reason, which the agent reports in the VM's `xenft.state` and its log. A VM with a
//! `xenft.secondary` but no `xenft.level` is refused too, without a state line: it is a level
//! being rewritten (a map edit is a remove then an add), during which a VM already protected
//! keeps its protection.

use std::collections::BTreeMap;

use serde::Serialize;
use xenft_xapi::api::{HostRecord, PoolRecord, Ref, VmRecord};
use xenft_xapi::devices::{SrRecord, VbdRecord, VdiRecord, VifRecord};

use super::devices::VmDevices;
use xenft_xapi::registry::{
    self, Level, PoolConfig, VmProtection, POOL_KEY, VM_LEVEL, VM_SECONDARY,
};

/// The records the desired state is derived from, by opaque ref.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The pool (one per xapi database).
    pub pool: Option<(Ref, PoolRecord)>,
    /// The hosts.
    pub hosts: BTreeMap<Ref, HostRecord>,
    /// Every VM record, templates and control domains included.
    pub vms: BTreeMap<Ref, VmRecord>,
    /// Network interfaces.
    pub vifs: BTreeMap<Ref, VifRecord>,
    /// Disk attachments.
    pub vbds: BTreeMap<Ref, VbdRecord>,
    /// Disks.
    pub vdis: BTreeMap<Ref, VdiRecord>,
    /// Storage repositories (which disks the xenft SR holds).
    pub srs: BTreeMap<Ref, SrRecord>,
}

/// A host of the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostInfo {
    /// `name_label`.
    pub name: String,
    /// Management address.
    pub address: String,
}

/// One VM the registry asks to protect, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmDesired {
    /// The VM's uuid (refs are not permanent).
    pub uuid: String,
    /// Its current ref (for calls).
    pub vm_ref: Ref,
    /// `name_label`.
    pub name: String,
    /// Protection level.
    pub level: u8,
    /// Secondary host (uuid).
    pub secondary: String,
    /// Where it runs now (host uuid), if it runs.
    pub resident_on: Option<String>,
    /// `power_state`.
    pub power_state: String,
    /// `memory_static_max` in bytes (what a restart needs on the secondary).
    pub memory_bytes: u64,
    /// Its domain id, network interfaces and disk.
    pub devices: VmDevices,
}

/// This host's part in a VM's protection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The VM runs here; its copy is on `secondary`.
    Primary {
        /// The secondary host (uuid).
        secondary: String,
    },
    /// This host holds the copy; the VM runs on `primary` (if it runs).
    Secondary {
        /// The host the VM runs on (uuid).
        primary: Option<String>,
    },
}

/// What the registry asks for, checked.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Desired {
    /// The pool's xenft configuration, or why there is none usable.
    pub pool: Option<PoolConfig>,
    /// Why [`Desired::pool`] is absent (never run `pool-init`, malformed, newer format).
    pub pool_problem: Option<String>,
    /// The pool master's uuid.
    pub master: Option<String>,
    /// Hosts by uuid.
    pub hosts: BTreeMap<String, HostInfo>,
    /// Host refs by uuid (for calls).
    pub host_refs: BTreeMap<String, Ref>,
    /// VMs to protect, by uuid.
    pub vms: BTreeMap<String, VmDesired>,
    /// VMs whose protection cannot be carried out, by uuid, with the reason.
    pub refused: BTreeMap<String, String>,
    /// The current ref of every VM with a protection request (protected or refused), by uuid.
    pub refs: BTreeMap<String, Ref>,
    /// Memory of the VMs running on each host (bytes, by host uuid): when it changes — a VM
    /// started, stopped or grew anywhere — the take-over reservations are checked again.
    pub resident_memory: BTreeMap<String, u64>,
}

impl Desired {
    /// The uuid of the host named `name`.
    #[must_use]
    pub fn host_uuid(&self, name: &str) -> Option<&str> {
        self.hosts
            .iter()
            .find(|(_, h)| h.name == name)
            .map(|(u, _)| u.as_str())
    }

    /// This host's role for VM `uuid`, if it has one.
    #[must_use]
    pub fn role(&self, uuid: &str, me: &str) -> Option<Role> {
        let v = self.vms.get(uuid)?;
        if v.resident_on.as_deref() == Some(me) {
            Some(Role::Primary {
                secondary: v.secondary.clone(),
            })
        } else if v.secondary == me {
            Some(Role::Secondary {
                primary: v.resident_on.clone(),
            })
        } else {
            None
        }
    }
}

/// Derives the desired state from `s`.
#[must_use]
pub fn derive(s: &Snapshot) -> Desired {
    let mut d = Desired::default();
    let host_uuid = |r: &str| s.hosts.get(r).map(|h| h.uuid.clone());
    for (r, h) in &s.hosts {
        d.host_refs.insert(h.uuid.clone(), r.clone());
        d.hosts.insert(
            h.uuid.clone(),
            HostInfo {
                name: h.name_label.clone(),
                address: h.address.clone(),
            },
        );
    }
    match &s.pool {
        None => d.pool_problem = Some("xapi reports no pool object".into()),
        Some((_, p)) => {
            d.master = host_uuid(&p.master);
            match p.other_config.get(POOL_KEY) {
                None => {
                    d.pool_problem = Some(format!(
                        "no {POOL_KEY} on the pool: run `xenft pool-init` first"
                    ));
                }
                Some(raw) => match registry::parse_pool_config(raw, &p.name_label) {
                    Ok(c) => d.pool = Some(c),
                    Err(e) => d.pool_problem = Some(e.to_string()),
                },
            }
        }
    }
    for vm in s.vms.values() {
        if let Some(h) = host_uuid(&vm.resident_on) {
            *d.resident_memory.entry(h).or_default() +=
                u64::try_from(vm.memory_static_max).unwrap_or(0);
        }
    }
    // A VM protected twice (a copy with the same uuid cannot exist; two VMs naming each
    // other's hosts can) is fine; what is checked is each VM on its own.
    for (r, vm) in &s.vms {
        if vm
            .other_config
            .get(VM_LEVEL)
            .is_none_or(|l| l.trim().is_empty())
        {
            // `xenft vm-protect` changing a level (a map edit is a remove then an add) or
            // `vm-unprotect` half-way: the secondary without a level. Refused, so that a VM
            // already protected keeps its protection through the edit (the plane ends it if
            // this lasts), not unprotected and protected again from scratch.
            if vm
                .other_config
                .get(VM_SECONDARY)
                .is_some_and(|s| !s.trim().is_empty())
            {
                tracing::debug!(vm = %vm.name_label, "xenft.secondary without xenft.level: an edit in progress?");
                d.refused.insert(
                    vm.uuid.clone(),
                    "xenft.secondary is set without xenft.level".into(),
                );
            }
            continue;
        }
        d.refs.insert(vm.uuid.clone(), r.clone());
        match check(vm, r, &d, &host_uuid) {
            Ok(mut v) => {
                v.devices = super::devices::of(s, r);
                d.vms.insert(v.uuid.clone(), v);
            }
            Err(why) => {
                tracing::warn!(vm = %vm.name_label, uuid = %vm.uuid, reason = %why, "protection refused");
                d.refused.insert(vm.uuid.clone(), why);
            }
        }
    }
    d
}

fn check(
    vm: &VmRecord,
    r: &str,
    d: &Desired,
    host_uuid: &impl Fn(&str) -> Option<String>,
) -> Result<VmDesired, String> {
    if vm.is_control_domain {
        return Err("a control domain (dom0) cannot be protected".into());
    }
    if vm.is_a_snapshot {
        return Err("a snapshot cannot be protected".into());
    }
    if vm.is_a_template {
        return Err("a template cannot be protected".into());
    }
    if vm.uuid.is_empty() {
        return Err("the VM record has no uuid".into());
    }
    let p = VmProtection::from_other_config(&vm.other_config, &vm.name_label)
        .map_err(|e| e.to_string())?;
    let Some(level) = p.level else {
        return Err("no protection level".into());
    };
    let Some(secondary) = p.secondary else {
        return Err("xenft.secondary is not set: which host holds the copy?".into());
    };
    if !d.hosts.contains_key(&secondary) {
        return Err(format!(
            "secondary host {secondary} is not a host of this pool"
        ));
    }
    let resident_on = host_uuid(&vm.resident_on);
    if resident_on.as_deref() == Some(secondary.as_str()) {
        return Err(format!(
            "the VM runs on its own secondary host {}: choose another secondary",
            d.hosts
                .get(&secondary)
                .map_or(secondary.as_str(), |h| h.name.as_str())
        ));
    }
    if level != Level::Restart {
        let Some(pool) = &d.pool else {
            return Err(format!(
                "level {} needs the pool's A-links: {}",
                level.as_str(),
                d.pool_problem.as_deref().unwrap_or("no xenft.pool")
            ));
        };
        if !pool.hosts.contains_key(&secondary) {
            return Err(format!(
                "secondary host {secondary} has no A-link in {POOL_KEY}: add it with `xenft pool-init`"
            ));
        }
    }
    Ok(VmDesired {
        uuid: vm.uuid.clone(),
        vm_ref: r.to_string(),
        name: vm.name_label.clone(),
        level: u8::from(level),
        secondary,
        resident_on,
        power_state: vm.power_state.clone(),
        memory_bytes: u64::try_from(vm.memory_static_max).unwrap_or(0),
        devices: VmDevices::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(uuid: &str, name: &str) -> HostRecord {
        HostRecord {
            uuid: uuid.into(),
            name_label: name.into(),
            address: format!("192.0.2.{}", name.len()),
            enabled: true,
            ..HostRecord::default()
        }
    }

    fn vm(uuid: &str, resident: &str, oc: &[(&str, &str)]) -> VmRecord {
        VmRecord {
            uuid: uuid.into(),
            name_label: format!("vm-{uuid}"),
            power_state: "Running".into(),
            resident_on: resident.into(),
            memory_static_max: 1 << 30,
            other_config: oc
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            ..VmRecord::default()
        }
    }

    fn pool_json(hosts: &[&str]) -> String {
        let hosts: serde_json::Map<String, serde_json::Value> = hosts
            .iter()
            .map(|h| {
                (
                    (*h).to_string(),
                    serde_json::json!({"alinks": ["10.0.0.1:7500"], "management": "192.0.2.1"}),
                )
            })
            .collect();
        serde_json::json!({"format_version": 1, "hosts": hosts}).to_string()
    }

    fn snapshot(pool_cfg: Option<String>, vms: Vec<(&str, VmRecord)>) -> Snapshot {
        let mut oc = BTreeMap::new();
        if let Some(c) = pool_cfg {
            oc.insert(POOL_KEY.to_string(), c);
        }
        Snapshot {
            pool: Some((
                "OpaqueRef:pool".into(),
                PoolRecord {
                    uuid: "pool-uuid".into(),
                    name_label: "pool".into(),
                    master: "OpaqueRef:h1".into(),
                    other_config: oc,
                    gui_config: BTreeMap::new(),
                },
            )),
            hosts: [
                ("OpaqueRef:h1".to_string(), host("u-h1", "host1")),
                ("OpaqueRef:h2".to_string(), host("u-h2", "host2")),
            ]
            .into(),
            vms: vms.into_iter().map(|(r, v)| (r.to_string(), v)).collect(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn a_protected_vm_gets_a_role_on_each_of_its_hosts() {
        let s = snapshot(
            Some(pool_json(&["u-h1", "u-h2"])),
            vec![(
                "OpaqueRef:v1",
                vm(
                    "v1",
                    "OpaqueRef:h1",
                    &[("xenft.level", "2"), ("xenft.secondary", "u-h2")],
                ),
            )],
        );
        let d = derive(&s);
        assert_eq!(d.master.as_deref(), Some("u-h1"));
        assert!(d.refused.is_empty(), "{:?}", d.refused);
        let v = &d.vms["v1"];
        assert_eq!((v.level, v.resident_on.as_deref()), (2, Some("u-h1")));
        assert_eq!(
            d.role("v1", "u-h1"),
            Some(Role::Primary {
                secondary: "u-h2".into()
            })
        );
        assert_eq!(
            d.role("v1", "u-h2"),
            Some(Role::Secondary {
                primary: Some("u-h1".into())
            })
        );
        assert_eq!(d.role("v1", "u-h3"), None);
    }

    /// `xenft vm-protect` changing a level removes `xenft.level` and adds it back: in between
    /// the VM is refused (kept by a host already protecting it), not gone (unprotected, then
    /// protected again from scratch).
    #[test]
    fn a_level_being_rewritten_is_refused_for_the_moment_not_gone() {
        let s = snapshot(
            Some(pool_json(&["u-h1", "u-h2"])),
            vec![(
                "OpaqueRef:v",
                vm("v1", "OpaqueRef:h1", &[("xenft.secondary", "u-h2")]),
            )],
        );
        let d = derive(&s);
        assert!(d.vms.is_empty());
        assert!(d.refused["v1"].contains("without xenft.level"), "{d:?}");
        assert!(d.refs.is_empty(), "no error line written for it");
    }

    #[test]
    fn each_bad_request_is_refused_with_its_reason_and_the_others_go_on() {
        let ok = [("xenft.level", "1"), ("xenft.secondary", "u-h2")];
        let mut dom0 = vm("d0", "OpaqueRef:h1", &ok);
        dom0.is_control_domain = true;
        let mut tmpl = vm("t1", "OpaqueRef:NULL", &ok);
        tmpl.is_a_template = true;
        let s = snapshot(
            Some(pool_json(&["u-h1"])),
            vec![
                ("OpaqueRef:d0", dom0),
                ("OpaqueRef:t1", tmpl),
                (
                    "OpaqueRef:a",
                    vm("a", "OpaqueRef:h1", &[("xenft.level", "7")]),
                ),
                (
                    "OpaqueRef:b",
                    vm("b", "OpaqueRef:h1", &[("xenft.level", "1")]),
                ),
                (
                    "OpaqueRef:c",
                    vm(
                        "c",
                        "OpaqueRef:h1",
                        &[("xenft.level", "1"), ("xenft.secondary", "u-elsewhere")],
                    ),
                ),
                (
                    "OpaqueRef:d",
                    vm(
                        "d",
                        "OpaqueRef:h2",
                        &[("xenft.level", "1"), ("xenft.secondary", "u-h2")],
                    ),
                ),
                (
                    "OpaqueRef:e",
                    vm(
                        "e",
                        "OpaqueRef:h1",
                        &[("xenft.level", "2"), ("xenft.secondary", "u-h2")],
                    ),
                ),
                ("OpaqueRef:ok", vm("ok", "OpaqueRef:h1", &ok)),
                (
                    "OpaqueRef:none",
                    vm("none", "OpaqueRef:h1", &[("xenft.level", "")]),
                ),
            ],
        );
        let d = derive(&s);
        let why = |u: &str| d.refused.get(u).cloned().unwrap_or_default();
        assert!(why("d0").contains("control domain"), "{}", why("d0"));
        assert!(why("t1").contains("template"), "{}", why("t1"));
        assert!(why("a").contains("1, 2 or 3"), "{}", why("a"));
        assert!(why("b").contains("secondary"), "{}", why("b"));
        assert!(why("c").contains("not a host of this pool"), "{}", why("c"));
        assert!(why("d").contains("own secondary"), "{}", why("d"));
        assert!(why("e").contains("no A-link"), "{}", why("e"));
        assert_eq!(d.vms.keys().collect::<Vec<_>>(), vec!["ok"]);
        assert!(
            !d.refused.contains_key("none"),
            "an empty level is no request"
        );
    }

    #[test]
    fn a_registry_of_a_newer_format_or_malformed_is_reported_and_level_1_goes_on() {
        let vms = || {
            vec![
                (
                    "OpaqueRef:l1",
                    vm(
                        "l1",
                        "OpaqueRef:h1",
                        &[("xenft.level", "1"), ("xenft.secondary", "u-h2")],
                    ),
                ),
                (
                    "OpaqueRef:l3",
                    vm(
                        "l3",
                        "OpaqueRef:h1",
                        &[("xenft.level", "3"), ("xenft.secondary", "u-h2")],
                    ),
                ),
            ]
        };
        let newer = derive(&snapshot(
            Some(r#"{"format_version": 9, "hosts": {}}"#.into()),
            vms(),
        ));
        assert!(newer.pool.is_none());
        assert!(
            newer
                .pool_problem
                .as_deref()
                .unwrap()
                .contains("format_version 9"),
            "{:?}",
            newer.pool_problem
        );
        assert!(newer.vms.contains_key("l1"), "level 1 needs no A-link");
        assert!(newer.refused["l3"].contains("format_version 9"));
        let garbage = derive(&snapshot(Some("{not json".into()), vms()));
        assert!(garbage
            .pool_problem
            .as_deref()
            .unwrap()
            .contains("malformed"));
        let none = derive(&snapshot(None, vms()));
        assert!(none.pool_problem.as_deref().unwrap().contains("pool-init"));
    }
}
