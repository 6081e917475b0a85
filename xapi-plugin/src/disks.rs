//! Where a VM's disks are, and moving them into the xenft SR.
//!
//! On an XCP-ng / XenServer pool a level-2/3 VM's disks are mirrored by the xenft SR (crate
//! `xenft-sr`): one mirrored blkback per volume, its primary following the VM. A disk on any
//! other SR reaches no mirror, so when the pool has a xenft SR, [`check_for_level`] refuses
//! levels 2 and 3 for a VM with a disk elsewhere, naming each disk, its SR and the command
//! that moves it; with `move=true` [`move_into`] moves each such disk with xapi's
//! `VDI.pool_migrate` first. A pool without a xenft SR (upstream Xen, the local pool) keeps the
//! agent's own per-VM mirror and is not checked.
//!
//! What xapi does, from its source (xen-api `ocaml/xapi/message_forwarding.ml`
//! `VDI.pool_migrate`, `ocaml/xapi/xapi_vm_migrate.ml` `vdi_pool_migrate`, `migrate_send`,
//! `assert_can_migrate`, `ocaml/xapi/xapi_vm_lifecycle.ml`):
//! - `VDI.pool_migrate(vdi, sr, options)` moves a VDI of a VM (`VDI_NEEDS_VM_FOR_MIGRATE
//!   [vdi]` when no VBD attaches it) as a `VM.migrate_send` of that VM whose `vdi_map` sends
//!   this VDI to `sr` and every other disk to its own SR; the VM's power state must allow
//!   `migrate_send` (halted, suspended or running: a running VM's disk is mirrored live,
//!   others copied), so a paused VM is refused (`VM_BAD_POWER_STATE`);
//! - the copy is a new VDI (new ref and uuid) on `sr`, the VM's VBD now points to it, the old
//!   VDI is destroyed; the call returns the new VDI's ref;
//! - within a pool, the source SR needs the features `VDI_SNAPSHOT` and `VDI_MIRROR`, the
//!   destination `VDI_SNAPSHOT` and `VDI_MIRROR_IN`, else `SR_DOES_NOT_SUPPORT_MIGRATION [sr,
//!   missing]`. xapi-storage-script gives an SMAPIv3 SR `VDI_SNAPSHOT` only with a
//!   `Volume.snapshot` script, which the xenft SR does not install yet: on a real pool a
//!   running VM's move is refused so until the SR offers both (see the README);
//! - `VDI.copy(vdi, sr, base, into)` (`ocaml/xapi/xapi_vdi.ml`) creates a VDI on `sr`
//!   (`VDI.create`) and copies the data into it, the source untouched: a halted VM's disks
//!   are moved that way here (copy, then the VM's VBD replaced by one of the copy), which the
//!   xenft SR supports today.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::api::{Ref, VmRecord};
use crate::client::XenApi;
use crate::devices::{SrRecord, VbdRecord, VdiRecord, XENFT_SR_TYPE};
use crate::error::XapiError;
use crate::ops::OpError;
use crate::registry::Level;
use crate::xmlrpc::Value;

/// How long one `VDI.pool_migrate` may take (a full copy of the disk; xapi answers when the
/// VM runs on the copy).
pub const MOVE_TIMEOUT: Duration = Duration::from_secs(12 * 3600);

/// One disk of a VM and where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskPlace {
    /// The VBD's `userdevice`.
    pub userdevice: String,
    /// The VBD's ref.
    #[serde(skip)]
    pub vbd: Ref,
    /// The VDI's ref.
    #[serde(skip)]
    pub vdi: Ref,
    /// The VDI's uuid.
    pub vdi_uuid: String,
    /// The VDI's `name_label`.
    pub vdi_name: String,
    /// Its SR's ref.
    #[serde(skip)]
    pub sr: Ref,
    /// Its SR's uuid (empty when xapi does not know the SR).
    pub sr_uuid: String,
    /// Its SR's `name_label`.
    pub sr_name: String,
    /// Its SR's `type`.
    pub sr_type: String,
}

impl DiskPlace {
    /// On a xenft SR.
    #[must_use]
    pub fn on_xenft(&self) -> bool {
        self.sr_type == XENFT_SR_TYPE
    }

    fn describe(&self) -> String {
        format!(
            "disk {} (VDI {:?}, {}) on SR {:?} (type {}, {})",
            self.userdevice,
            self.vdi_name,
            self.vdi_uuid,
            self.sr_name,
            if self.sr_type.is_empty() {
                "unknown"
            } else {
                &self.sr_type
            },
            if self.sr_uuid.is_empty() {
                &self.sr
            } else {
                &self.sr_uuid
            }
        )
    }
}

/// A VM's disks and the pool's xenft SRs.
#[derive(Debug, Clone, Default)]
pub struct Storage {
    /// The VM's disks (VBDs of type `Disk` with a VDI), by `userdevice`.
    pub disks: Vec<DiskPlace>,
    /// Every SR of the pool.
    pub srs: BTreeMap<Ref, SrRecord>,
}

impl Storage {
    /// The pool's xenft SRs.
    pub fn xenft_srs(&self) -> impl Iterator<Item = (&Ref, &SrRecord)> {
        self.srs.iter().filter(|(_, s)| s.is_xenft())
    }

    /// The disks outside any xenft SR.
    #[must_use]
    pub fn outside(&self) -> Vec<&DiskPlace> {
        self.disks.iter().filter(|d| !d.on_xenft()).collect()
    }
}

/// Reads the disks of VM `vm_ref` and the pool's SRs (`VBD`, `VDI`, `SR.get_all_records`).
///
/// # Errors
/// A failed call or a reply that is not a record map.
pub async fn storage_of(api: &XenApi, vm_ref: &str) -> Result<Storage, XapiError> {
    let vbds = crate::api::records(
        &api.call("VBD.get_all_records", vec![]).await?,
        "VBD records",
        VbdRecord::from_value,
    )?;
    let vdis = crate::api::records(
        &api.call("VDI.get_all_records", vec![]).await?,
        "VDI records",
        VdiRecord::from_value,
    )?;
    let srs = crate::api::records(
        &api.call("SR.get_all_records", vec![]).await?,
        "SR records",
        SrRecord::from_value,
    )?;
    Ok(place(vm_ref, &vbds, &vdis, srs))
}

/// The disks of `vm_ref` from the records (pure).
#[must_use]
pub fn place(
    vm_ref: &str,
    vbds: &BTreeMap<Ref, VbdRecord>,
    vdis: &BTreeMap<Ref, VdiRecord>,
    srs: BTreeMap<Ref, SrRecord>,
) -> Storage {
    let mut disks: Vec<DiskPlace> = vbds
        .iter()
        .filter(|(_, b)| b.vm == vm_ref && b.is_disk())
        .filter_map(|(vbd, b)| {
            let vdi = vdis.get(&b.vdi)?;
            let sr = srs.get(&vdi.sr);
            Some(DiskPlace {
                userdevice: b.userdevice.clone(),
                vbd: vbd.clone(),
                vdi: b.vdi.clone(),
                vdi_uuid: vdi.uuid.clone(),
                vdi_name: vdi.name_label.clone(),
                sr: vdi.sr.clone(),
                sr_uuid: sr.map(|s| s.uuid.clone()).unwrap_or_default(),
                sr_name: sr.map(|s| s.name_label.clone()).unwrap_or_default(),
                sr_type: sr.map(|s| s.kind.clone()).unwrap_or_default(),
            })
        })
        .collect();
    disks.sort_by_key(|d| {
        (
            d.userdevice.parse::<u64>().unwrap_or(u64::MAX),
            d.userdevice.clone(),
        )
    });
    Storage { disks, srs }
}

/// The command that moves the disks and protects.
fn move_command(vm: &VmRecord, level: Level, secondary: &str) -> String {
    format!(
        "xenft vm-protect vm={} level={} secondary={secondary} move=true",
        vm.uuid,
        level.as_str()
    )
}

/// Levels 2 and 3 on a pool with a xenft SR: every disk of the VM must be on one (the SR
/// mirrors them; a disk elsewhere reaches no mirror).
///
/// # Errors
/// [`OpError::Refused`] naming each disk outside, its SR, and the command that moves it.
pub fn check_for_level(
    vm: &VmRecord,
    level: Level,
    secondary: &str,
    s: &Storage,
) -> Result<(), OpError> {
    if u8::from(level) < 2 {
        return Ok(());
    }
    let xenft: Vec<String> = s
        .xenft_srs()
        .map(|(_, sr)| format!("{:?}", sr.name_label))
        .collect();
    let outside = s.outside();
    if xenft.is_empty() || outside.is_empty() {
        return Ok(());
    }
    Err(OpError::Refused(format!(
        "VM {:?} has {} disk(s) outside the xenft SR {}: {}. Level {} mirrors a VM's disks \
         through the xenft SR; move them there (xapi's VDI.pool_migrate, a live storage \
         migration for a running VM) and protect in one step with `{}`",
        vm.name_label,
        outside.len(),
        xenft.join(", "),
        outside
            .iter()
            .map(|d| d.describe())
            .collect::<Vec<_>>()
            .join("; "),
        level.as_str(),
        move_command(vm, level, secondary),
    )))
}

/// The xenft SR to move into: `wanted` (name or uuid) or the pool's only one.
///
/// # Errors
/// [`OpError::Refused`] when the pool has no xenft SR or `wanted` is another type;
/// [`OpError::NotFound`] / [`OpError::Ambiguous`] for a name that matches none or several;
/// [`OpError::Invalid`] when the pool has several xenft SRs and none is named.
pub fn choose_sr<'a>(s: &'a Storage, wanted: Option<&str>) -> Result<(Ref, &'a SrRecord), OpError> {
    let xenft: Vec<(&Ref, &SrRecord)> = s.xenft_srs().collect();
    if xenft.is_empty() {
        return Err(OpError::Refused(format!(
            "the pool has no xenft SR (an SR of type {XENFT_SR_TYPE}) to move the VM's disks \
             into: create it first (`xe sr-create type={XENFT_SR_TYPE} shared=true \
             name-label=xenft device-config:hosts=... device-config:alink=... \
             device-config:secret-file=...`, see the README's xenft SR section)"
        )));
    }
    match wanted {
        Some(w) => {
            let (r, sr) = crate::ops::resolve("SR", w, &s.srs, |x| &x.uuid, |x| &x.name_label)?;
            if !sr.is_xenft() {
                return Err(OpError::Refused(format!(
                    "SR {:?} is of type {:?}, not a xenft SR (type {XENFT_SR_TYPE})",
                    sr.name_label, sr.kind
                )));
            }
            Ok((r, sr))
        }
        None if xenft.len() == 1 => Ok((xenft[0].0.clone(), xenft[0].1)),
        None => Err(OpError::Invalid(format!(
            "the pool has {} xenft SRs ({}): name the one to move the disks into with sr=NAME|UUID",
            xenft.len(),
            xenft
                .iter()
                .map(|(_, x)| format!("{:?} {}", x.name_label, x.uuid))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// What [`protect_moving`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ProtectedAfterMove {
    /// The disks moved into the xenft SR, in order.
    pub moved: Vec<Moved>,
    /// The protection.
    #[serde(flatten)]
    pub protected: crate::ops::Protected,
}

/// `vm-protect ... move=true`: the request is admitted first (nothing written), then at levels
/// 2 and 3 every disk outside the xenft SR (`sr`, or the pool's only one) is moved into it,
/// then the VM is protected as [`crate::ops::protect`] does (admission checked again under the
/// registry lock: the move took time). Level 1 moves nothing.
///
/// # Errors
/// As [`crate::ops::protect`], [`choose_sr`] and [`move_into`].
pub async fn protect_moving(
    api: &XenApi,
    vm: &str,
    level: Level,
    secondary: &str,
    sr: Option<&str>,
) -> Result<ProtectedAfterMove, OpError> {
    let a = crate::ops::admit(api, vm, level, secondary).await?;
    let mut moved = Vec::new();
    if u8::from(level) >= 2 {
        let s = storage_of(api, &a.vm_ref).await?;
        let (sr_ref, target) = choose_sr(&s, sr)?;
        moved = move_into(api, &a.rec, &s, (&sr_ref, target)).await?;
    }
    let protected = crate::ops::protect(api, &a.rec.uuid, level, secondary).await?;
    Ok(ProtectedAfterMove { moved, protected })
}

/// A halted VM's disk `d` copied into SR `sr` (`VDI.copy`) and the VM's VBD replaced by one
/// of the copy (`VBD.destroy`, `VBD.create` with the old VBD's settings) — what Xen
/// Orchestra does when `VDI.pool_migrate` cannot. The original VDI stays. If the new VBD
/// cannot be made, the old one is made again. Returns the copy's ref.
async fn copy_and_reattach(api: &XenApi, d: &DiskPlace, sr: &str) -> Result<Value, XapiError> {
    let null = "OpaqueRef:NULL";
    let copy = api
        .call_with_timeout(
            "VDI.copy",
            vec![
                Value::str(&d.vdi),
                Value::str(sr),
                Value::str(null),
                Value::str(null),
            ],
            MOVE_TIMEOUT,
        )
        .await?;
    let copy_ref = copy
        .as_str()
        .ok_or_else(|| XapiError::type_err("VDI.copy result", &copy))?
        .to_string();
    let old = api.call("VBD.get_record", vec![Value::str(&d.vbd)]).await?;
    let old = old
        .as_struct()
        .ok_or_else(|| XapiError::type_err("VBD record", &old))?
        .clone();
    let record = |vdi: &str| {
        let mut m = BTreeMap::new();
        for k in [
            "VM",
            "userdevice",
            "bootable",
            "mode",
            "type",
            "unpluggable",
            "other_config",
            "qos_algorithm_type",
            "qos_algorithm_params",
        ] {
            if let Some(v) = old.get(k) {
                m.insert(k.to_string(), v.clone());
            }
        }
        m.insert("VDI".into(), Value::str(vdi));
        m.insert("device".into(), Value::str(""));
        m.insert("empty".into(), Value::Bool(false));
        m.insert("currently_attached".into(), Value::Bool(false));
        Value::Struct(m)
    };
    api.call("VBD.destroy", vec![Value::str(&d.vbd)]).await?;
    if let Err(e) = api.call("VBD.create", vec![record(&copy_ref)]).await {
        tracing::error!(disk = %d.userdevice, error = %e, "the copy's VBD was not made: making the original's again");
        api.call("VBD.create", vec![record(&d.vdi)]).await?;
        return Err(e);
    }
    Ok(Value::String(copy_ref))
}

/// One disk moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Moved {
    /// The VBD's `userdevice`.
    pub userdevice: String,
    /// The VDI's uuid before the move.
    pub from_vdi: String,
    /// The SR it was on.
    pub from_sr: String,
    /// The new VDI's uuid (xapi's copy on the xenft SR).
    pub to_vdi: String,
    /// The xenft SR.
    pub to_sr: String,
    /// A halted VM's disk is copied: its original VDI is kept, detached, on its SR (delete it
    /// once the VM runs from the copy). `None` when xapi moved the disk (and destroyed the
    /// original).
    pub kept: Option<String>,
}

/// What xapi's refusal means here, when we know.
fn hint(e: &XapiError, halted: bool) -> &'static str {
    match e.code() {
        Some("SR_DOES_NOT_SUPPORT_MIGRATION") if !halted => {
            " (xapi moves a running VM's disk only between SRs offering VDI_SNAPSHOT and \
             VDI_MIRROR / VDI_MIRROR_IN, `assert_can_migrate` in xen-api \
             ocaml/xapi/xapi_vm_migrate.ml; the xenft SR does not offer them yet: shut the VM \
             down and run the command again — a halted VM's disks are copied into the SR with \
             VDI.copy, which needs only VDI_CREATE)"
        }
        Some("VM_BAD_POWER_STATE") => {
            " (xapi moves the disks of a running, halted or suspended VM)"
        }
        Some("TOO_MANY_STORAGE_MIGRATES") => {
            " (xapi runs at most 3 storage migrations at once: retry later)"
        }
        _ => "",
    }
}

/// Moves every disk of `vm` outside a xenft SR into `target`, one after another (the boot
/// disk first): a running or suspended VM's with `VDI.pool_migrate`; a halted VM's with
/// [`copy_and_reattach`] (xapi's `VDI.copy` needs only `VDI_CREATE` of the SR, where
/// `VDI.pool_migrate` needs `VDI_SNAPSHOT` and `VDI_MIRROR_IN`, which the xenft SR lacks). A
/// paused VM is refused before any call, as xapi would refuse it.
///
/// # Errors
/// [`OpError::Refused`] when xapi refuses a move, naming the disk, xapi's error and the disks
/// moved before it (they stay on the xenft SR: the VM runs on them); [`OpError::Api`] when
/// xapi cannot be reached.
pub async fn move_into(
    api: &XenApi,
    vm: &VmRecord,
    s: &Storage,
    target: (&Ref, &SrRecord),
) -> Result<Vec<Moved>, OpError> {
    if vm.power_state.eq_ignore_ascii_case("paused") {
        return Err(OpError::Refused(format!(
            "VM {:?} is paused: xapi moves the disks of a running, halted or suspended VM only \
             (VM.migrate_send's power states, xen-api ocaml/xapi/xapi_vm_lifecycle.ml); unpause it first",
            vm.name_label
        )));
    }
    let (sr_ref, sr) = target;
    let mut moved = Vec::new();
    for d in s.outside() {
        tracing::info!(vm = %vm.name_label, disk = %d.userdevice, from = %d.sr_name, to = %sr.name_label, "moving disk into the xenft SR");
        let halted = vm.power_state.eq_ignore_ascii_case("halted");
        let r = if halted {
            copy_and_reattach(api, d, sr_ref).await
        } else {
            api.call_with_timeout(
                "VDI.pool_migrate",
                vec![
                    Value::str(&d.vdi),
                    Value::str(sr_ref),
                    Value::Struct(BTreeMap::new()),
                ],
                MOVE_TIMEOUT,
            )
            .await
        };
        let new_ref = match r {
            Ok(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| OpError::Api(XapiError::type_err("VDI.pool_migrate result", &v)))?,
            Err(e @ XapiError::Api { .. }) => {
                let before = if moved.is_empty() {
                    "no disk was moved".to_string()
                } else {
                    format!(
                        "moved before it (now on the xenft SR): disk(s) {}",
                        moved
                            .iter()
                            .map(|m: &Moved| m.userdevice.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                return Err(OpError::Refused(format!(
                    "xapi did not move {} into SR {:?}: {e}{}; {before}; VM {:?} is not protected",
                    d.describe(),
                    sr.name_label,
                    hint(&e, halted),
                    vm.name_label
                )));
            }
            Err(e) => return Err(OpError::Api(e)),
        };
        let to_vdi = api
            .call("VDI.get_uuid", vec![Value::str(&new_ref)])
            .await?
            .as_str()
            .unwrap_or_default()
            .to_string();
        moved.push(Moved {
            userdevice: d.userdevice.clone(),
            from_vdi: d.vdi_uuid.clone(),
            from_sr: d.sr_name.clone(),
            to_vdi,
            to_sr: sr.name_label.clone(),
            kept: halted.then(|| d.vdi_uuid.clone()),
        });
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(types: &[(&str, &str)]) -> Storage {
        let mut vbds = BTreeMap::new();
        let mut vdis = BTreeMap::new();
        let mut srs = BTreeMap::new();
        for (name, kind) in [("nfs", "nfs"), ("mirrored", "xenft")] {
            srs.insert(
                format!("OpaqueRef:sr-{name}"),
                SrRecord {
                    uuid: format!("sr-{name}"),
                    name_label: name.into(),
                    kind: kind.into(),
                    shared: true,
                },
            );
        }
        for (i, (dev, sr)) in types.iter().enumerate() {
            vbds.insert(
                format!("OpaqueRef:vbd{i}"),
                VbdRecord {
                    vm: "OpaqueRef:vm".into(),
                    vdi: format!("OpaqueRef:vdi{i}"),
                    userdevice: (*dev).into(),
                    kind: "Disk".into(),
                },
            );
            vdis.insert(
                format!("OpaqueRef:vdi{i}"),
                VdiRecord {
                    uuid: format!("vdi-{dev}"),
                    name_label: format!("disk {dev}"),
                    virtual_size: 1 << 30,
                    sr: format!("OpaqueRef:sr-{sr}"),
                    location: String::new(),
                },
            );
        }
        place("OpaqueRef:vm", &vbds, &vdis, srs)
    }

    fn vm() -> VmRecord {
        VmRecord {
            uuid: "vm-uuid".into(),
            name_label: "web01".into(),
            power_state: "Running".into(),
            ..VmRecord::default()
        }
    }

    #[test]
    fn a_disk_outside_the_xenft_sr_refuses_level_2_naming_it_and_the_move() {
        let s = storage(&[("1", "nfs"), ("0", "mirrored")]);
        assert_eq!(s.disks[0].userdevice, "0", "by userdevice");
        let e = check_for_level(&vm(), Level::Component, "host2", &s).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, OpError::Refused(_)), "{m}");
        assert!(
            m.contains("disk 1 (VDI \"disk 1\", vdi-1) on SR \"nfs\" (type nfs"),
            "{m}"
        );
        assert!(!m.contains("disk 0"), "{m}");
        assert!(
            m.contains("xenft vm-protect vm=vm-uuid level=2 secondary=host2 move=true"),
            "{m}"
        );
        // Level 1 needs no mirror.
        check_for_level(&vm(), Level::Restart, "host2", &s).unwrap();
    }

    #[test]
    fn without_a_xenft_sr_or_with_every_disk_on_it_nothing_is_refused() {
        let all_on = storage(&[("0", "mirrored"), ("1", "mirrored")]);
        check_for_level(&vm(), Level::System, "h", &all_on).unwrap();
        let mut no_sr = storage(&[("0", "nfs")]);
        no_sr.srs.retain(|_, s| !s.is_xenft());
        check_for_level(&vm(), Level::System, "h", &no_sr).unwrap();
        let e = choose_sr(&no_sr, None).unwrap_err();
        assert!(matches!(e, OpError::Refused(_)), "{e}");
        assert!(e.to_string().contains("no xenft SR"), "{e}");
    }

    #[test]
    fn the_target_sr_is_the_only_xenft_sr_or_the_one_named() {
        let mut s = storage(&[("0", "nfs")]);
        assert_eq!(choose_sr(&s, None).unwrap().1.name_label, "mirrored");
        let e = choose_sr(&s, Some("nfs")).unwrap_err();
        assert!(e.to_string().contains("not a xenft SR"), "{e}");
        assert!(matches!(
            choose_sr(&s, Some("mirored")).unwrap_err(),
            OpError::NotFound { .. }
        ));
        s.srs.insert(
            "OpaqueRef:sr-2".into(),
            SrRecord {
                uuid: "sr-2".into(),
                name_label: "second".into(),
                kind: "xenft".into(),
                shared: true,
            },
        );
        let e = choose_sr(&s, None).unwrap_err();
        assert!(matches!(e, OpError::Invalid(_)), "{e}");
        assert!(e.to_string().contains("sr=NAME|UUID"), "{e}");
        assert_eq!(choose_sr(&s, Some("sr-2")).unwrap().0, "OpaqueRef:sr-2");
    }
}
