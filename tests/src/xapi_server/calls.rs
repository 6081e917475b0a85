//! Dispatch, in xapi's order (xen-api `ocaml/idl/ocaml_backend/gen_server.ml`): method name and
//! parameter count from the datamodel list, then the session, then the call. Then the calls:
//! the generic field accessors every class has, and the few class messages xenft uses.
//!
//! A datamodel method this server does not model answers `NOT_IMPLEMENTED [name]`
//! (`api_errors.ml`), so a test never mistakes a gap of the test server for xapi's behaviour.

use std::collections::BTreeMap;
use std::sync::Arc;

use xenft_xapi::xmlrpc::Value;

use super::objects::{new_uuid, Db};
use super::{events, fail, methods, plugin, sessions, ApiResult, Failure, Shared};

pub(super) fn arg_str<'a>(params: &'a [Value], i: usize, method: &str) -> Result<&'a str, Failure> {
    params.get(i).and_then(Value::as_str).ok_or_else(|| {
        fail(
            "FIELD_TYPE_ERROR",
            &[method, &format!("parameter {i} must be a string")],
        )
    })
}

fn not_implemented(method: &str) -> Failure {
    fail("NOT_IMPLEMENTED", &[method])
}

/// Map fields a record always has (read as `{}` when the server keeps nothing there).
const MAP_FIELDS: &[&str] = &["other_config", "gui_config", "software_version"];
const WRITABLE_MAPS: &[&str] = &["other_config", "gui_config"];
const WRITABLE_STRINGS: &[&str] = &["name_label", "name_description"];

pub(super) async fn dispatch(sh: &Arc<Shared>, method: &str, params: Vec<Value>) -> ApiResult {
    {
        let mut db = sh.lock();
        *db.calls.entry(method.to_string()).or_default() += 1;
        if let Some(i) = db.deny_next.iter().position(|(m, _, _)| m == method) {
            let (_, code, p) = db.deny_next.remove(i);
            return Err((code, p));
        }
    }
    let sig = methods::check(method, params.len())?;
    match method {
        "system.listMethods" => return Ok(methods::list_methods()),
        "session.login_with_password" => return sessions::login(sh, method, &params),
        _ if !sig.session => return Err(not_implemented(method)),
        _ => {}
    }
    let session = sessions::check(sh, &params)?.to_string();
    let args = &params[1..];
    let (class, verb) = method.split_once('.').unwrap_or(("", method));
    match (class, verb) {
        ("session", "logout" | "local_logout") => sessions::logout(sh, method, &params),
        ("session", "get_this_host") => sessions::get_this_host(sh, method, args),
        ("event", "from") => events::from(sh, method, args).await,
        ("event", "inject") => events::inject(sh, method, args),
        ("host", "call_plugin") => plugin::call_plugin(sh, method, &session, args).await,
        _ => {
            let mut db = sh.lock();
            let call = Call {
                method,
                class,
                verb,
                args,
            };
            let r = object_call(sh, &mut db, &call);
            drop(db);
            r
        }
    }
}

/// A call on an object class, split into its parts; `args` follow the session.
struct Call<'a> {
    method: &'a str,
    class: &'a str,
    verb: &'a str,
    args: &'a [Value],
}

fn object_call(sh: &Shared, db: &mut Db, c: &Call<'_>) -> ApiResult {
    let (method, class, verb, args) = (c.method, c.class, c.verb, c.args);
    match (class, verb) {
        ("VM", "start_on") => vm_start_on(sh, db, method, args),
        ("VM", "pool_migrate") => vm_pool_migrate(sh, db, method, args),
        ("VM", "power_state_reset") => vm_power(sh, db, method, args, None, "Halted"),
        ("VM", "hard_shutdown") => {
            vm_power(sh, db, method, args, Some(&["running", "paused"]), "Halted")
        }
        ("VM", "pause") => vm_power(sh, db, method, args, Some(&["running"]), "Paused"),
        ("VM", "unpause") => vm_power(sh, db, method, args, Some(&["paused"]), "Running"),
        ("VDI", "pool_migrate") => super::storage::vdi_pool_migrate(sh, db, method, args),
        ("VDI", "copy") => super::storage::vdi_copy(sh, db, method, args),
        ("VBD", "create") => super::storage::vbd_create(sh, db, args),
        ("VBD", "destroy") => super::storage::vbd_destroy(sh, db, method, args),
        ("secret", "create") => secret_create(sh, db, args),
        ("host", "compute_free_memory") => {
            let host = arg_str(args, 0, method)?;
            db.obj("host", host)?;
            Ok(Value::int64(db.free_memory(host)))
        }
        _ if methods::is_class(class) => generic(sh, db, c),
        _ => Err(not_implemented(method)),
    }
}

/// A VM's `power_state`, lower case (as xapi's errors print it).
fn power_state(o: &super::objects::Obj) -> String {
    o.fields
        .get("power_state")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_lowercase()
}

/// The checks `VM.start_on` and `VM.pool_migrate` share, in xapi's order: the host and VM
/// exist, the VM is no template (`VM_IS_TEMPLATE`), is `expected` (`VM_BAD_POWER_STATE [vm,
/// expected, actual]`, lower case) and fits in the host's free memory
/// (`HOST_NOT_ENOUGH_FREE_MEMORY [needed, available]`).
fn check_placement(db: &Db, vm: &str, host: &str, expected: &str) -> Result<(), Failure> {
    db.obj("host", host)?;
    let o = db.obj("VM", vm)?;
    if o.fields.get("is_a_template").and_then(Value::as_bool) == Some(true) {
        return Err(fail("VM_IS_TEMPLATE", &[vm]));
    }
    let state = power_state(o);
    if state != expected {
        return Err(fail("VM_BAD_POWER_STATE", &[vm, expected, &state]));
    }
    let need = o
        .fields
        .get("memory_static_max")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let already_there =
        o.fields.get("resident_on").and_then(Value::as_str) == Some(host) && state == "running";
    let free = db.free_memory(host) + if already_there { need } else { 0 };
    if need > free {
        return Err(fail(
            "HOST_NOT_ENOUGH_FREE_MEMORY",
            &[&need.to_string(), &free.to_string()],
        ));
    }
    Ok(())
}

/// `VM.start_on(session, vm, host, start_paused, force)`: a halted, non-template VM starts on
/// `host` if it has the memory; `power_state`, `resident_on` and `domid` change in one `mod`
/// event.
fn vm_start_on(sh: &Shared, db: &mut Db, method: &str, args: &[Value]) -> ApiResult {
    let vm = arg_str(args, 0, method)?;
    let host = arg_str(args, 1, method)?;
    let paused = args.get(2).and_then(Value::as_bool).unwrap_or(false);
    check_placement(db, vm, host, "halted")?;
    // Xen does not hand a domain id out again soon: each start gets a new one.
    let next_domid = db
        .objects
        .values()
        .filter_map(|o| o.fields.get("domid").and_then(Value::as_i64))
        .max()
        .unwrap_or(0)
        .max(db.last_domid)
        + 1;
    db.last_domid = next_domid;
    let o = db.obj_mut("VM", vm)?;
    let state = if paused { "Paused" } else { "Running" };
    o.fields.insert("power_state".into(), Value::str(state));
    o.fields.insert("resident_on".into(), Value::str(host));
    o.fields.insert("domid".into(), Value::int64(next_domid));
    sh.emit(db, vm, "mod");
    Ok(Value::str(""))
}

/// `VM.power_state_reset` (any state: xapi's recovery after a host failure, database only),
/// `VM.hard_shutdown`, `VM.pause`, `VM.unpause`: from one of `from` (lower case) to `to`
/// (`VM_BAD_POWER_STATE [vm, expected, actual]` otherwise). Halted clears `resident_on`.
fn vm_power(
    sh: &Shared,
    db: &mut Db,
    method: &str,
    args: &[Value],
    from: Option<&[&str]>,
    to: &str,
) -> ApiResult {
    let vm = arg_str(args, 0, method)?;
    let o = db.obj_mut("VM", vm)?;
    let state = power_state(o);
    if let Some(from) = from {
        if !from.contains(&state.as_str()) {
            return Err(fail("VM_BAD_POWER_STATE", &[vm, from[0], &state]));
        }
    }
    o.fields.insert("power_state".into(), Value::str(to));
    if to == "Halted" {
        o.fields
            .insert("resident_on".into(), Value::str(super::NULL_REF));
        o.fields.insert("domid".into(), Value::int64(-1));
    }
    sh.emit(db, vm, "mod");
    Ok(Value::str(""))
}

/// `VM.pool_migrate(session, vm, host, options)`: a running VM moves if `host` has the memory.
fn vm_pool_migrate(sh: &Shared, db: &mut Db, method: &str, args: &[Value]) -> ApiResult {
    let vm = arg_str(args, 0, method)?;
    let host = arg_str(args, 1, method)?;
    check_placement(db, vm, host, "running")?;
    let o = db.obj_mut("VM", vm)?;
    o.fields.insert("resident_on".into(), Value::str(host));
    sh.emit(db, vm, "mod");
    Ok(Value::str(""))
}

/// `secret.create(session, {value, other_config})`.
fn secret_create(sh: &Shared, db: &mut Db, args: &[Value]) -> ApiResult {
    let rec = args[0]
        .as_struct()
        .ok_or_else(|| fail("FIELD_TYPE_ERROR", &["args"]))?;
    let value = rec
        .get("value")
        .and_then(Value::as_str)
        .ok_or_else(|| fail("FIELD_TYPE_ERROR", &["value"]))?;
    let mut f = BTreeMap::new();
    f.insert("uuid".into(), Value::str(new_uuid()));
    f.insert("value".into(), Value::str(value));
    f.insert(
        "other_config".into(),
        rec.get("other_config")
            .cloned()
            .unwrap_or_else(|| Value::Struct(BTreeMap::new())),
    );
    let r = db.insert("secret", f);
    sh.emit(db, &r, "add");
    Ok(Value::String(r))
}

/// The messages every class has (datamodel `FromField` / `FromObject` tags).
fn generic(sh: &Shared, db: &mut Db, c: &Call<'_>) -> ApiResult {
    let (method, class, verb, args) = (c.method, c.class, c.verb, c.args);
    let of_class = |db: &Db| -> Vec<(String, BTreeMap<String, Value>)> {
        db.objects
            .iter()
            .filter(|(_, o)| o.class == class)
            .map(|(r, o)| (r.clone(), o.fields.clone()))
            .collect()
    };
    match verb {
        "get_all" => Ok(Value::Array(
            of_class(db)
                .into_iter()
                .map(|(r, _)| Value::String(r))
                .collect(),
        )),
        "get_all_records" => Ok(Value::Struct(
            of_class(db)
                .into_iter()
                .map(|(r, f)| (r, Value::Struct(f)))
                .collect(),
        )),
        "get_record" => {
            let r = arg_str(args, 0, method)?;
            Ok(Value::Struct(db.obj(class, r)?.fields.clone()))
        }
        "get_by_uuid" => {
            let u = arg_str(args, 0, method)?;
            of_class(db)
                .into_iter()
                .find(|(_, f)| f.get("uuid").and_then(Value::as_str) == Some(u))
                .map(|(r, _)| Value::String(r))
                .ok_or_else(|| fail("UUID_INVALID", &[class, u]))
        }
        "get_by_name_label" => {
            let n = arg_str(args, 0, method)?;
            Ok(Value::Array(
                of_class(db)
                    .into_iter()
                    .filter(|(_, f)| f.get("name_label").and_then(Value::as_str) == Some(n))
                    .map(|(r, _)| Value::String(r))
                    .collect(),
            ))
        }
        "get_all_records_where" => Err(not_implemented(method)),
        v if v.starts_with("add_to_") => {
            let field = &v["add_to_".len()..];
            let r = arg_str(args, 0, method)?;
            let k = arg_str(args, 1, method)?;
            let val = arg_str(args, 2, method)?;
            let o = db.obj_mut(class, r)?;
            let Some(Value::Struct(m)) = o.fields.get_mut(field) else {
                return Err(not_implemented(method));
            };
            if m.contains_key(k) {
                return Err(fail("MAP_DUPLICATE_KEY", &[class, field, r, k]));
            }
            m.insert(k.to_string(), Value::str(val));
            sh.emit(db, r, "mod");
            Ok(Value::str(""))
        }
        v if v.starts_with("remove_from_") => {
            let field = &v["remove_from_".len()..];
            let r = arg_str(args, 0, method)?;
            let k = arg_str(args, 1, method)?;
            let o = db.obj_mut(class, r)?;
            let Some(Value::Struct(m)) = o.fields.get_mut(field) else {
                return Err(not_implemented(method));
            };
            m.remove(k);
            sh.emit(db, r, "mod");
            Ok(Value::str(""))
        }
        v if v.starts_with("set_") => {
            let field = &v["set_".len()..];
            let r = arg_str(args, 0, method)?;
            let val = args[1].clone();
            let (map, string) = (
                WRITABLE_MAPS.contains(&field),
                WRITABLE_STRINGS.contains(&field),
            );
            if !map && !string {
                return Err(not_implemented(method));
            }
            if (map && val.as_struct().is_none()) || (string && val.as_str().is_none()) {
                return Err(fail("FIELD_TYPE_ERROR", &[field]));
            }
            let o = db.obj_mut(class, r)?;
            o.fields.insert(field.to_string(), val);
            sh.emit(db, r, "mod");
            Ok(Value::str(""))
        }
        v if v.starts_with("get_") => {
            let field = &v["get_".len()..];
            let r = arg_str(args, 0, method)?;
            let o = db.obj(class, r)?;
            match o.fields.get(field) {
                Some(x) => Ok(x.clone()),
                None if MAP_FIELDS.contains(&field) => Ok(Value::Struct(BTreeMap::new())),
                None => Err(not_implemented(method)),
            }
        }
        _ => Err(not_implemented(method)),
    }
}
