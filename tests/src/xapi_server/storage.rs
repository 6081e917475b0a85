//! Storage: `VDI.pool_migrate`, xapi's move of a VM's disk to another SR.
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
