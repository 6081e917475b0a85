//! The object database: records of the classes the server models, refs, UUIDs, the event log
//! and the memory accounting behind `host.compute_free_memory`.
//!
//! Field names follow the datamodel (xen-api `ocaml/idl/datamodel*.ml`): xapi lists each host's
//! control domain among the VMs (`is_control_domain`, `resident_on` the host, `domid` 0),
//! installs default templates (`is_a_template`, `is_default_template`, halted) and keeps
//! snapshots as templates with `is_a_snapshot` and `snapshot_of`.

use std::collections::{BTreeMap, HashSet, VecDeque};

use xenft_xapi::xmlrpc::Value;

use super::{fail, Failure, DOM0_MEMORY, NULL_REF};

/// One object: its class (`VM`, `host`, as in method names) and record.
#[derive(Debug, Clone)]
pub(super) struct Obj {
    pub(super) class: &'static str,
    pub(super) fields: BTreeMap<String, Value>,
}

/// One recorded change, for `event.from`.
#[derive(Debug, Clone)]
pub(super) struct Ev {
    pub(super) id: u64,
    /// Lower-case class, as events carry it.
    pub(super) class: String,
    pub(super) op: &'static str,
    pub(super) obj_ref: String,
    pub(super) snapshot: Option<Value>,
}

/// Everything the server knows, under one lock.
#[derive(Debug, Default)]
pub(super) struct Db {
    pub(super) objects: BTreeMap<String, Obj>,
    pub(super) sessions: HashSet<String>,
    pub(super) events: VecDeque<Ev>,
    /// Id of the last event created (0 = none).
    pub(super) last_event: u64,
    /// Events with id <= this were dropped from history.
    pub(super) dropped_upto: u64,
    pub(super) host_memory_total: BTreeMap<String, i64>,
    pub(super) calls: BTreeMap<String, u64>,
    pub(super) deny_next: Vec<(String, String, Vec<String>)>,
    /// The last domain id `VM.start_on` handed out.
    pub(super) last_domid: i64,
    /// Each SR's driver features (xapi keeps them on the `SM` object of the SR's type).
    pub(super) sr_features: BTreeMap<String, Vec<String>>,
}

pub(super) fn new_uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub(super) fn new_ref() -> String {
    format!("OpaqueRef:{}", new_uuid())
}

/// The class name events carry (`vm` for `VM`; xapi lower-cases table names).
pub(super) fn class_event_name(class: &str) -> String {
    class.to_ascii_lowercase()
}

fn empty_map() -> Value {
    Value::Struct(BTreeMap::new())
}

fn fields<const N: usize>(pairs: [(&str, Value); N]) -> BTreeMap<String, Value> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

pub(super) fn pool_record(name: &str) -> BTreeMap<String, Value> {
    fields([
        ("uuid", Value::str(new_uuid())),
        ("name_label", Value::str(name)),
        ("name_description", Value::str("")),
        ("master", Value::str(NULL_REF)),
        ("other_config", empty_map()),
        ("gui_config", empty_map()),
        ("ha_enabled", Value::Bool(false)),
        ("tags", Value::Array(vec![])),
    ])
}

pub(super) fn host_record(name: &str, address: &str, uuid: &str) -> BTreeMap<String, Value> {
    let sw = fields([
        ("product_version", Value::str("8.3.0")),
        ("xen", Value::str("4.17.5")),
    ]);
    fields([
        ("uuid", Value::str(uuid)),
        ("name_label", Value::str(name)),
        ("name_description", Value::str("")),
        ("hostname", Value::str(name)),
        ("address", Value::str(address)),
        ("enabled", Value::Bool(true)),
        ("API_version_major", Value::int64(2)),
        ("API_version_minor", Value::int64(21)),
        ("software_version", Value::Struct(sw)),
        ("other_config", empty_map()),
        ("tags", Value::Array(vec![])),
    ])
}

/// A guest VM record; running on `resident_on` when given.
pub(super) fn vm_record(
    name: &str,
    uuid: &str,
    memory_static_max: i64,
    resident_on: Option<&str>,
) -> BTreeMap<String, Value> {
    let running = resident_on.is_some();
    fields([
        ("uuid", Value::str(uuid)),
        ("name_label", Value::str(name)),
        ("name_description", Value::str("")),
        (
            "power_state",
            Value::str(if running { "Running" } else { "Halted" }),
        ),
        ("resident_on", Value::str(resident_on.unwrap_or(NULL_REF))),
        ("affinity", Value::str(NULL_REF)),
        ("domid", Value::int64(if running { 1 } else { -1 })),
        ("memory_static_max", Value::int64(memory_static_max)),
        ("memory_dynamic_max", Value::int64(memory_static_max)),
        ("memory_static_min", Value::int64(memory_static_max / 4)),
        ("VCPUs_max", Value::int64(1)),
        ("is_a_template", Value::Bool(false)),
        ("is_default_template", Value::Bool(false)),
        ("is_a_snapshot", Value::Bool(false)),
        ("snapshot_of", Value::str(NULL_REF)),
        ("is_control_domain", Value::Bool(false)),
        ("other_config", empty_map()),
        ("tags", Value::Array(vec![])),
        ("VIFs", Value::Array(vec![])),
        ("VBDs", Value::Array(vec![])),
    ])
}

/// A disk (`VDI`) of `virtual_size` bytes on `sr`. Its `location` is its uuid (what an SMAPIv3
/// SR such as the xenft SR returns as the volume's `key`, and xapi stores as `location`).
pub(super) fn vdi_record(virtual_size: i64, sr: &str, name: &str) -> BTreeMap<String, Value> {
    let uuid = new_uuid();
    fields([
        ("uuid", Value::str(&uuid)),
        ("name_label", Value::str(name)),
        ("name_description", Value::str("")),
        ("virtual_size", Value::int64(virtual_size)),
        ("SR", Value::str(sr)),
        ("location", Value::str(&uuid)),
        ("type", Value::str("user")),
        ("read_only", Value::Bool(false)),
        ("sharable", Value::Bool(false)),
        ("managed", Value::Bool(true)),
        ("is_a_snapshot", Value::Bool(false)),
        ("cbt_enabled", Value::Bool(false)),
        ("VBDs", Value::Array(vec![])),
        ("other_config", empty_map()),
        ("sm_config", empty_map()),
    ])
}

/// A storage repository of driver `kind` (`SR.type`).
pub(super) fn sr_record(name: &str, kind: &str, shared: bool) -> BTreeMap<String, Value> {
    fields([
        ("uuid", Value::str(new_uuid())),
        ("name_label", Value::str(name)),
        ("name_description", Value::str("")),
        ("type", Value::str(kind)),
        ("content_type", Value::str("user")),
        ("shared", Value::Bool(shared)),
        ("VDIs", Value::Array(vec![])),
        ("PBDs", Value::Array(vec![])),
        ("other_config", empty_map()),
        ("sm_config", empty_map()),
        ("tags", Value::Array(vec![])),
    ])
}

/// The attachment (`VBD`) of disk `vdi` to `vm` at `userdevice`.
pub(super) fn vbd_record(vm: &str, vdi: &str, userdevice: u32) -> BTreeMap<String, Value> {
    fields([
        ("uuid", Value::str(new_uuid())),
        ("VM", Value::str(vm)),
        ("VDI", Value::str(vdi)),
        ("userdevice", Value::str(userdevice.to_string())),
        ("type", Value::str("Disk")),
        ("mode", Value::str("RW")),
        ("bootable", Value::Bool(userdevice == 0)),
        ("empty", Value::Bool(false)),
        ("other_config", empty_map()),
    ])
}

/// Network interface `device` of `vm` with `mac`.
pub(super) fn vif_record(vm: &str, device: u32, mac: &str) -> BTreeMap<String, Value> {
    fields([
        ("uuid", Value::str(new_uuid())),
        ("VM", Value::str(vm)),
        ("device", Value::str(device.to_string())),
        ("MAC", Value::str(mac)),
        ("network", Value::str(NULL_REF)),
        ("MTU", Value::int64(1500)),
        ("other_config", empty_map()),
    ])
}

/// Removes `item` from the ref list `field` of object `r`.
pub(super) fn remove_ref(db: &mut Db, r: &str, field: &str, item: &str) {
    if let Some(Value::Array(a)) = db.objects.get_mut(r).and_then(|o| o.fields.get_mut(field)) {
        a.retain(|v| v.as_str() != Some(item));
    }
}

/// Appends `item` to the ref list `field` of object `r` (a VM's `VIFs`, `VBDs`).
pub(super) fn push_ref(db: &mut Db, r: &str, field: &str, item: &str) {
    if let Some(o) = db.objects.get_mut(r) {
        let mut list = match o.fields.get(field) {
            Some(Value::Array(a)) => a.clone(),
            _ => Vec::new(),
        };
        list.push(Value::str(item));
        o.fields.insert(field.into(), Value::Array(list));
    }
}

/// The control domain of `host` (named as xapi names it, `Control domain on host: NAME`).
pub(super) fn dom0_record(host_name: &str, host: &str) -> BTreeMap<String, Value> {
    let mut f = vm_record(
        &format!("Control domain on host: {host_name}"),
        &new_uuid(),
        DOM0_MEMORY,
        Some(host),
    );
    f.insert("is_control_domain".into(), Value::Bool(true));
    f.insert("domid".into(), Value::int64(0));
    f.insert("affinity".into(), Value::str(host));
    f
}

/// A default template, as xapi installs them.
pub(super) fn template_record(name: &str) -> BTreeMap<String, Value> {
    let mut f = vm_record(name, &new_uuid(), 2 << 30, None);
    f.insert("is_a_template".into(), Value::Bool(true));
    f.insert("is_default_template".into(), Value::Bool(true));
    let mut oc = BTreeMap::new();
    oc.insert("default_template".to_string(), Value::str("true"));
    f.insert("other_config".into(), Value::Struct(oc));
    f
}

impl Db {
    /// Stores a new object of `class` and returns its ref (the caller emits the event).
    pub(super) fn insert(
        &mut self,
        class: &'static str,
        fields: BTreeMap<String, Value>,
    ) -> String {
        let r = new_ref();
        self.objects.insert(r.clone(), Obj { class, fields });
        r
    }

    pub(super) fn emit(
        &mut self,
        tx: &tokio::sync::watch::Sender<u64>,
        limit: usize,
        r: &str,
        op: &'static str,
    ) {
        let (class, snapshot) = match self.objects.get(r) {
            Some(o) => (
                class_event_name(o.class),
                Some(Value::Struct(o.fields.clone())),
            ),
            None => return,
        };
        self.last_event += 1;
        self.events.push_back(Ev {
            id: self.last_event,
            class,
            op,
            obj_ref: r.to_string(),
            snapshot: if op == "del" { None } else { snapshot },
        });
        while self.events.len() > limit {
            if let Some(e) = self.events.pop_front() {
                self.dropped_upto = e.id;
            }
        }
        let _ = tx.send(self.last_event);
    }

    pub(super) fn refs_of(&self, class: &str) -> Vec<String> {
        self.objects
            .iter()
            .filter(|(_, o)| o.class == class)
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// How many objects of each class exist, by event class name (`event.from`'s
    /// `valid_ref_counts`).
    pub(super) fn counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for o in self.objects.values() {
            *m.entry(class_event_name(o.class)).or_default() += 1;
        }
        m
    }

    pub(super) fn obj(&self, class: &str, r: &str) -> Result<&Obj, Failure> {
        match self.objects.get(r) {
            Some(o) if o.class == class => Ok(o),
            _ => Err(fail("HANDLE_INVALID", &[class, r])),
        }
    }

    pub(super) fn obj_mut(&mut self, class: &str, r: &str) -> Result<&mut Obj, Failure> {
        match self.objects.get_mut(r) {
            Some(o) if o.class == class => Ok(o),
            _ => Err(fail("HANDLE_INVALID", &[class, r])),
        }
    }

    /// Guest memory in use on `host` (control domains have their own memory, not counted in
    /// the host's guest memory).
    pub(super) fn used_memory(&self, host: &str) -> i64 {
        self.objects
            .values()
            .filter(|o| o.class == "VM")
            .filter(|o| {
                o.fields.get("resident_on").and_then(Value::as_str) == Some(host)
                    && o.fields.get("is_control_domain").and_then(Value::as_bool) != Some(true)
                    && matches!(
                        o.fields.get("power_state").and_then(Value::as_str),
                        Some("Running" | "Paused")
                    )
            })
            .map(|o| {
                o.fields
                    .get("memory_static_max")
                    .and_then(Value::as_i64)
                    .unwrap_or(0)
            })
            .sum()
    }

    pub(super) fn free_memory(&self, host: &str) -> i64 {
        self.host_memory_total.get(host).copied().unwrap_or(0) - self.used_memory(host)
    }
}
