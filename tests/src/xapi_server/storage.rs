//! Storage: `VDI.pool_migrate`, xapi's move of a VM's disk to another SR; `VDI.copy` and
//! `VBD.create` / `VBD.destroy`, the copy-and-reattach way to move a halted VM's disk.
//!
//! As xen-api does it: `ocaml/xapi/message_forwarding.ml` (`VDI.pool_migrate`: the VM is the
//! one a VBD of the VDI belongs to, `VDI_NEEDS_VM_FOR_MIGRATE [vdi]` when none does; the VM
//! operation `migrate_send`, whose power states are halted, suspended and running,
//! `ocaml/xapi/xapi_vm_lifecycle.ml`: `VM_BAD_POWER_STATE [vm, "halted, suspended, running",
//! actual]`), `ocaml/xapi/xapi_vm_migrate.ml` (`vdi_pool_migrate`: `VDI_INCOMPATIBLE_TYPE`
//! for a `cbt_metadata` VDI, `VDI_CBT_ENABLED`, `VBD_MISSING`; `assert_can_migrate`: a VDI
//! that changes SR needs `VDI_SNAPSHOT` and `VDI_MIRROR` on its SR and `VDI_SNAPSHOT` and
//! `VDI_MIRROR_IN` (or `VDI_MIRROR`, `ocaml/xapi/smint.ml`) on the destination, else
//! `SR_DOES_NOT_SUPPORT_MIGRATION [sr, missing features joined by ';']`; `migrate_send`: the
//! disk is copied to a new VDI on the destination SR, the VBD re-pointed to it, the old VDI
//! destroyed; the new VDI's ref is returned). The copy is instantaneous here.

use xenft_xapi::xmlrpc::Value;

use super::calls::arg_str;
use super::objects::{self, Db};
use super::{fail, ApiResult, Failure, Shared};

/// Features of the SR `sr`, as its driver (`SM` object) lists them.
fn features(db: &Db, sr: &str) -> Vec<String> {
    db.sr_features.get(sr).cloned().unwrap_or_default()
}

/// The `ops` that `sr` lacks (`VDI_MIRROR` stands in for `VDI_MIRROR_IN`, as in smint.ml).
fn missing(db: &Db, sr: &str, ops: &[&str]) -> Vec<String> {
    let have = features(db, sr);
    ops.iter()
        .filter(|op| {
            !have.iter().any(|f| {
                f == *op
                    || f.split('/').next() == Some(**op)
                    || (**op == "VDI_MIRROR_IN" && f.split('/').next() == Some("VDI_MIRROR"))
            })
        })
        .map(|s| (*s).to_string())
        .collect()
}

fn str_of<'a>(o: &'a objects::Obj, f: &str) -> &'a str {
    o.fields.get(f).and_then(Value::as_str).unwrap_or("")
}

fn check_sr(db: &Db, sr: &str, ops: &[&str]) -> Result<(), Failure> {
    let m = missing(db, sr, ops);
    if m.is_empty() {
        Ok(())
    } else {
        Err(fail("SR_DOES_NOT_SUPPORT_MIGRATION", &[sr, &m.join(";")]))
    }
}

/// `VDI.pool_migrate(session, vdi, sr, options)`.
pub(super) fn vdi_pool_migrate(
    sh: &Shared,
    db: &mut Db,
    method: &str,
    args: &[Value],
) -> ApiResult {
    let vdi = arg_str(args, 0, method)?.to_string();
    let sr = arg_str(args, 1, method)?.to_string();
    if args.get(2).and_then(Value::as_struct).is_none() {
        return Err(fail("FIELD_TYPE_ERROR", &["options"]));
    }
    let o = db.obj("VDI", &vdi)?.clone();
    db.obj("SR", &sr)?;
    let vbd = db
        .objects
        .iter()
        .find(|(_, b)| b.class == "VBD" && str_of(b, "VDI") == vdi)
        .map(|(r, b)| (r.clone(), str_of(b, "VM").to_string()));
    let Some((vbd, vm)) = vbd else {
        return Err(fail("VDI_NEEDS_VM_FOR_MIGRATE", &[&vdi]));
    };
    let state = db
        .obj("VM", &vm)
        .map_err(|_| fail("VBD_MISSING", &[]))?
        .fields
        .get("power_state")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_lowercase();
    if !["halted", "suspended", "running"].contains(&state.as_str()) {
        return Err(fail(
            "VM_BAD_POWER_STATE",
            &[&vm, "halted, suspended, running", &state],
        ));
    }
    if str_of(&o, "type") == "cbt_metadata" {
        return Err(fail("VDI_INCOMPATIBLE_TYPE", &[&vdi, "cbt_metadata"]));
    }
    if o.fields.get("cbt_enabled").and_then(Value::as_bool) == Some(true) {
        return Err(fail("VDI_CBT_ENABLED", &[&vdi]));
    }
    let from = str_of(&o, "SR").to_string();
    if from == sr {
        // Not mirrored (`is_sr_matching`): the disk stays where it is.
        return Ok(Value::str(&vdi));
    }
    check_sr(db, &from, &["VDI_SNAPSHOT", "VDI_MIRROR"])?;
    check_sr(db, &sr, &["VDI_SNAPSHOT", "VDI_MIRROR_IN"])?;
    // The copy: a new VDI on `sr` with the same contents' description.
    let size = o
        .fields
        .get("virtual_size")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let mut f = objects::vdi_record(size, &sr, str_of(&o, "name_label"));
    f.insert("VBDs".into(), Value::Array(vec![Value::str(&vbd)]));
    let new = db.insert("VDI", f);
    objects::push_ref(db, &sr, "VDIs", &new);
    sh.emit(db, &new, "add");
    sh.emit(db, &sr, "mod");
    if let Some(b) = db.objects.get_mut(&vbd) {
        b.fields.insert("VDI".into(), Value::str(&new));
    }
    sh.emit(db, &vbd, "mod");
    // The old VDI is destroyed.
    objects::remove_ref(db, &from, "VDIs", &vdi);
    sh.emit(db, &vdi, "del");
    db.objects.remove(&vdi);
    if db.objects.contains_key(&from) {
        sh.emit(db, &from, "mod");
    }
    Ok(Value::String(new))
}

fn map_or_empty(v: Option<&Value>) -> Value {
    match v {
        Some(Value::Struct(m)) => Value::Struct(m.clone()),
        _ => Value::Struct(std::collections::BTreeMap::new()),
    }
}

/// `VDI.copy(session, vdi, sr, base_vdi, into_vdi)` (xen-api `ocaml/xapi/xapi_vdi.ml`
/// `copy`): a new VDI on `sr` (`VDI.create`, so the SR needs `VDI_CREATE`, else
/// `SR_OPERATION_NOT_SUPPORTED [sr]`) with the source's name and size, or `into_vdi` when it
/// is a VDI (`VDI_TOO_SMALL [into, size]` when smaller); returns its ref. The source stays.
pub(super) fn vdi_copy(sh: &Shared, db: &mut Db, method: &str, args: &[Value]) -> ApiResult {
    let vdi = arg_str(args, 0, method)?.to_string();
    let sr = arg_str(args, 1, method)?.to_string();
    let into = arg_str(args, 3, method)?.to_string();
    let o = db.obj("VDI", &vdi)?.clone();
    let size = o
        .fields
        .get("virtual_size")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if let Ok(dst) = db.obj("VDI", &into) {
        let have = dst
            .fields
            .get("virtual_size")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if have < size {
            return Err(fail("VDI_TOO_SMALL", &[&into, &size.to_string()]));
        }
        return Ok(Value::str(&into));
    }
    db.obj("SR", &sr)?;
    if !missing(db, &sr, &["VDI_CREATE"]).is_empty() {
        return Err(fail("SR_OPERATION_NOT_SUPPORTED", &[&sr]));
    }
    let new = db.insert(
        "VDI",
        objects::vdi_record(size, &sr, str_of(&o, "name_label")),
    );
    objects::push_ref(db, &sr, "VDIs", &new);
    sh.emit(db, &new, "add");
    sh.emit(db, &sr, "mod");
    Ok(Value::String(new))
}

/// `VBD.create(session, record)` (xen-api `ocaml/xapi/xapi_vbd.ml` `create`): the VM and, for
/// a non-empty VBD, the VDI must exist; a `userdevice` the VM uses already is
/// `DEVICE_ALREADY_EXISTS [userdevice]`. Listed in the VM's and the VDI's `VBDs`.
pub(super) fn vbd_create(sh: &Shared, db: &mut Db, args: &[Value]) -> ApiResult {
    let rec = args
        .first()
        .and_then(Value::as_struct)
        .ok_or_else(|| fail("FIELD_TYPE_ERROR", &["args"]))?
        .clone();
    let field = |k: &str| rec.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let (vm, vdi, userdevice) = (field("VM"), field("VDI"), field("userdevice"));
    db.obj("VM", &vm)?;
    let empty = rec.get("empty").and_then(Value::as_bool) == Some(true);
    if !empty {
        db.obj("VDI", &vdi)?;
    }
    let taken = db.objects.values().any(|b| {
        b.class == "VBD" && str_of(b, "VM") == vm && str_of(b, "userdevice") == userdevice
    });
    if taken {
        return Err(fail("DEVICE_ALREADY_EXISTS", &[&userdevice]));
    }
    let n: u32 = userdevice.parse().unwrap_or(0);
    let mut f = objects::vbd_record(&vm, &vdi, n);
    f.insert("userdevice".into(), Value::str(&userdevice));
    for k in ["bootable", "empty", "unpluggable"] {
        if let Some(b) = rec.get(k).and_then(Value::as_bool) {
            f.insert(k.into(), Value::Bool(b));
        }
    }
    for k in ["mode", "type"] {
        if let Some(s) = rec.get(k).and_then(Value::as_str) {
            f.insert(k.into(), Value::str(s));
        }
    }
    f.insert("other_config".into(), map_or_empty(rec.get("other_config")));
    let vbd = db.insert("VBD", f);
    objects::push_ref(db, &vm, "VBDs", &vbd);
    if !empty {
        objects::push_ref(db, &vdi, "VBDs", &vbd);
        sh.emit(db, &vdi, "mod");
    }
    sh.emit(db, &vbd, "add");
    sh.emit(db, &vm, "mod");
    Ok(Value::String(vbd))
}

/// `VBD.destroy(session, vbd)`: refused while the VM runs (its VBD is attached:
/// `OPERATION_NOT_ALLOWED`); the VM's and VDI's `VBDs` lose it.
pub(super) fn vbd_destroy(sh: &Shared, db: &mut Db, method: &str, args: &[Value]) -> ApiResult {
    let vbd = arg_str(args, 0, method)?.to_string();
    let o = db.obj("VBD", &vbd)?.clone();
    let (vm, vdi) = (str_of(&o, "VM").to_string(), str_of(&o, "VDI").to_string());
    let running = db.obj("VM", &vm).is_ok_and(|v| {
        matches!(
            v.fields.get("power_state").and_then(Value::as_str),
            Some("Running" | "Paused")
        )
    });
    if running {
        return Err(fail(
            "OPERATION_NOT_ALLOWED",
            &["VBD is currently attached to a running VM"],
        ));
    }
    objects::remove_ref(db, &vm, "VBDs", &vbd);
    objects::remove_ref(db, &vdi, "VBDs", &vbd);
    sh.emit(db, &vbd, "del");
    db.objects.remove(&vbd);
    sh.emit(db, &vm, "mod");
    if db.objects.contains_key(&vdi) {
        sh.emit(db, &vdi, "mod");
    }
    Ok(Value::str(""))
}
