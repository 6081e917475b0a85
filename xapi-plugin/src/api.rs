//! Typed XenAPI calls and records used by xenft.
//!
//! Field names and types follow the XenAPI datamodel (xen-api `ocaml/idl/datamodel*.ml`, the
//! "XenAPI Reference"): classes `VM`, `host`, `pool`; records are structs of fields; `int` fields
//! are decimal strings on the wire; `(string → string) map` fields such as `other_config` and
//! `gui_config` are edited with `add_to_<field>` / `remove_from_<field>`.
//!
//! `add_to_<map>` fails with `MAP_DUPLICATE_KEY` when the key exists, so [`XenApi::set_map_key`]
//! does remove-then-add, as XenCenter does. That pair is not atomic; the registry layer checks
//! for concurrent edits on top.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::client::XenApi;
use crate::error::{codes, XapiError};
use crate::xmlrpc::Value;

/// An opaque reference (`OpaqueRef:...`).
pub type Ref = String;

/// The classes xenft reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `VM`.
    Vm,
    /// `host`.
    Host,
    /// `pool`.
    Pool,
    /// `secret`: a value readable only by authenticated pool admins.
    Secret,
}

impl Class {
    /// Every class xenft reads.
    pub const ALL: [Class; 4] = [Class::Vm, Class::Host, Class::Pool, Class::Secret];

    /// The `(string → string) map` fields xenft reads and edits on this class; the map helpers
    /// ([`XenApi::get_map`], [`XenApi::add_to_map`], ...) refuse any other before calling xapi,
    /// so every call they make is one the datamodel has (checked by the `datamodel` tests).
    pub fn map_fields(self) -> &'static [&'static str] {
        match self {
            Class::Vm | Class::Host | Class::Secret => &["other_config"],
            Class::Pool => &["other_config", "gui_config"],
        }
    }

    /// Whether xapi has `<class>.get_by_name_label` (`pool` and `secret` have none).
    pub fn has_get_by_name_label(self) -> bool {
        matches!(self, Class::Vm | Class::Host)
    }

    /// The class name in method names (`VM.get_record`).
    pub fn api_name(self) -> &'static str {
        match self {
            Class::Vm => "VM",
            Class::Host => "host",
            Class::Pool => "pool",
            Class::Secret => "secret",
        }
    }

    /// The class name in `event.from` (lower case).
    pub fn event_name(self) -> &'static str {
        match self {
            Class::Vm => "vm",
            Class::Host => "host",
            Class::Pool => "pool",
            Class::Secret => "secret",
        }
    }
}

fn field<'a>(m: &'a BTreeMap<String, Value>, name: &str) -> Option<&'a Value> {
    m.get(name)
}

pub(crate) fn str_field(m: &BTreeMap<String, Value>, name: &str) -> String {
    field(m, name)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

pub(crate) fn int_field(m: &BTreeMap<String, Value>, name: &str) -> i64 {
    field(m, name).and_then(Value::as_i64).unwrap_or(0)
}

fn bool_field(m: &BTreeMap<String, Value>, name: &str) -> bool {
    field(m, name).and_then(Value::as_bool).unwrap_or(false)
}

fn map_field(m: &BTreeMap<String, Value>, name: &str) -> BTreeMap<String, String> {
    field(m, name)
        .and_then(Value::to_string_map)
        .unwrap_or_default()
}

/// The `VM` fields xenft uses.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct VmRecord {
    /// `uuid`.
    pub uuid: String,
    /// `name_label`.
    pub name_label: String,
    /// `power_state`: `Halted`, `Paused`, `Running`, `Suspended`.
    pub power_state: String,
    /// `resident_on`: host ref, `OpaqueRef:NULL` when not running.
    pub resident_on: Ref,
    /// `memory_static_max` in bytes: the most memory the VM can have.
    pub memory_static_max: i64,
    /// `domid`: the running domain's id, `-1` when the VM does not run.
    pub domid: i64,
    /// `is_a_template`.
    pub is_a_template: bool,
    /// `is_control_domain` (dom0).
    pub is_control_domain: bool,
    /// `is_a_snapshot` (xapi's snapshots are also templates; checked on its own all the same).
    pub is_a_snapshot: bool,
    /// `other_config`.
    pub other_config: BTreeMap<String, String>,
}

impl VmRecord {
    /// Reads a `VM` record struct.
    pub fn from_value(v: &Value) -> Result<VmRecord, XapiError> {
        let m = v
            .as_struct()
            .ok_or_else(|| XapiError::type_err("VM record", v))?;
        Ok(VmRecord {
            uuid: str_field(m, "uuid"),
            name_label: str_field(m, "name_label"),
            power_state: str_field(m, "power_state"),
            resident_on: str_field(m, "resident_on"),
            memory_static_max: int_field(m, "memory_static_max"),
            domid: field(m, "domid").and_then(Value::as_i64).unwrap_or(-1),
            is_a_template: bool_field(m, "is_a_template"),
            is_control_domain: bool_field(m, "is_control_domain"),
            is_a_snapshot: bool_field(m, "is_a_snapshot"),
            other_config: map_field(m, "other_config"),
        })
    }

    /// A real guest: not a template, not a snapshot, not a control domain.
    pub fn is_guest(&self) -> bool {
        self.not_a_guest().is_none()
    }

    /// Why this VM object is not a guest xenft can protect, if it is not one: xapi lists
    /// control domains (dom0, one per host), templates and snapshots among the VMs.
    pub fn not_a_guest(&self) -> Option<&'static str> {
        if self.is_control_domain {
            Some("a control domain (dom0)")
        } else if self.is_a_snapshot {
            Some("a snapshot")
        } else if self.is_a_template {
            Some("a template")
        } else {
            None
        }
    }
}

/// The `host` fields xenft uses.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct HostRecord {
    /// `uuid`.
    pub uuid: String,
    /// `name_label`.
    pub name_label: String,
    /// `hostname`.
    pub hostname: String,
    /// `address`: management IP.
    pub address: String,
    /// `enabled`.
    pub enabled: bool,
    /// `API_version_major`.
    pub api_version_major: i64,
    /// `API_version_minor`.
    pub api_version_minor: i64,
    /// `software_version` (`product_version`, `xen`, ...).
    pub software_version: BTreeMap<String, String>,
    /// `other_config`.
    pub other_config: BTreeMap<String, String>,
}

impl HostRecord {
    /// Reads a `host` record struct.
    pub fn from_value(v: &Value) -> Result<HostRecord, XapiError> {
        let m = v
            .as_struct()
            .ok_or_else(|| XapiError::type_err("host record", v))?;
        Ok(HostRecord {
            uuid: str_field(m, "uuid"),
            name_label: str_field(m, "name_label"),
            hostname: str_field(m, "hostname"),
            address: str_field(m, "address"),
            enabled: bool_field(m, "enabled"),
            api_version_major: int_field(m, "API_version_major"),
            api_version_minor: int_field(m, "API_version_minor"),
            software_version: map_field(m, "software_version"),
            other_config: map_field(m, "other_config"),
        })
    }
}

/// The `pool` fields xenft uses.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct PoolRecord {
    /// `uuid`.
    pub uuid: String,
    /// `name_label`.
    pub name_label: String,
    /// `master`: host ref.
    pub master: Ref,
    /// `other_config`.
    pub other_config: BTreeMap<String, String>,
    /// `gui_config`: XenCenter's settings (custom field definitions live here).
    pub gui_config: BTreeMap<String, String>,
}

impl PoolRecord {
    /// Reads a `pool` record struct.
    pub fn from_value(v: &Value) -> Result<PoolRecord, XapiError> {
        let m = v
            .as_struct()
            .ok_or_else(|| XapiError::type_err("pool record", v))?;
        Ok(PoolRecord {
            uuid: str_field(m, "uuid"),
            name_label: str_field(m, "name_label"),
            master: str_field(m, "master"),
            other_config: map_field(m, "other_config"),
            gui_config: map_field(m, "gui_config"),
        })
    }
}

/// `event.from`'s `operation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventOp {
    /// Object created (or, with an empty token, present).
    Add,
    /// Object modified.
    Mod,
    /// Object deleted.
    Del,
}

/// One event of an `event.from` batch (datamodel class `event`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Event {
    /// `id`: increasing event number.
    pub id: i64,
    /// `class`: lower-case class name (`vm`, `pool`).
    pub class: String,
    /// `operation`.
    pub operation: EventOp,
    /// `ref`: the object.
    #[serde(rename = "ref")]
    pub obj_ref: Ref,
    /// `snapshot`: the object's record after the change (absent for `del`).
    #[serde(skip)]
    pub snapshot: Option<Value>,
}

/// The result of `event.from`: `{events, valid_ref_counts, token}`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    /// Events, oldest first.
    pub events: Vec<Event>,
    /// Token to pass to the next call.
    pub token: String,
    /// True if this batch is a full re-read after `EVENTS_LOST` (see [`EventStream`]).
    pub resynced: bool,
}

impl EventBatch {
    fn from_value(v: &Value) -> Result<EventBatch, XapiError> {
        let m = v
            .as_struct()
            .ok_or_else(|| XapiError::type_err("event batch", v))?;
        let token = m
            .get("token")
            .and_then(Value::as_str)
            .ok_or_else(|| XapiError::type_err("event batch token", v))?
            .to_string();
        let mut events = Vec::new();
        for e in m
            .get("events")
            .and_then(Value::as_array)
            .unwrap_or_default()
        {
            let em = e
                .as_struct()
                .ok_or_else(|| XapiError::type_err("event", e))?;
            let operation = match em.get("operation").and_then(Value::as_str) {
                Some("add") => EventOp::Add,
                Some("mod") => EventOp::Mod,
                Some("del") => EventOp::Del,
                _ => return Err(XapiError::type_err("event operation", e)),
            };
            events.push(Event {
                id: int_field(em, "id"),
                class: str_field(em, "class"),
                operation,
                obj_ref: str_field(em, "ref"),
                snapshot: em
                    .get("snapshot")
                    .filter(|s| s.as_struct().is_some())
                    .cloned(),
            });
        }
        Ok(EventBatch {
            events,
            token,
            resynced: false,
        })
    }
}

/// Refuses a map field the class does not declare in [`Class::map_fields`].
fn check_map_field(class: Class, field: &str, verb: &str) -> Result<(), XapiError> {
    if class.map_fields().contains(&field) {
        Ok(())
    } else {
        Err(XapiError::NotInDatamodel(format!(
            "{}.{verb}{field}",
            class.api_name()
        )))
    }
}

fn refs(v: &Value, what: &str) -> Result<Vec<Ref>, XapiError> {
    v.as_array()
        .ok_or_else(|| XapiError::type_err(what, v))?
        .iter()
        .map(|r| {
            r.as_str()
                .map(str::to_string)
                .ok_or_else(|| XapiError::type_err(what, r))
        })
        .collect()
}

/// A `get_all_records` reply (`{ref: record}`), each record parsed; `what` names it in errors.
pub(crate) fn records<T>(
    v: &Value,
    what: &str,
    parse: fn(&Value) -> Result<T, XapiError>,
) -> Result<BTreeMap<Ref, T>, XapiError> {
    v.as_struct()
        .ok_or_else(|| XapiError::type_err(what, v))?
        .iter()
        .map(|(r, rec)| Ok((r.clone(), parse(rec)?)))
        .collect()
}

impl XenApi {
    /// `<class>.get_all_records`, raw.
    pub async fn get_all_records_raw(&self, class: Class) -> Result<Value, XapiError> {
        self.call(&format!("{}.get_all_records", class.api_name()), vec![])
            .await
    }

    /// `<class>.get_record`, raw.
    pub async fn get_record_raw(&self, class: Class, r: &str) -> Result<Value, XapiError> {
        self.call(
            &format!("{}.get_record", class.api_name()),
            vec![Value::str(r)],
        )
        .await
    }

    /// `<class>.get_by_uuid`.
    pub async fn get_by_uuid(&self, class: Class, uuid: &str) -> Result<Ref, XapiError> {
        let v = self
            .call(
                &format!("{}.get_by_uuid", class.api_name()),
                vec![Value::str(uuid)],
            )
            .await?;
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| XapiError::type_err("ref", &v))
    }

    /// `<class>.get_by_name_label` (VM and host; names are not unique).
    pub async fn get_by_name_label(&self, class: Class, name: &str) -> Result<Vec<Ref>, XapiError> {
        if !class.has_get_by_name_label() {
            return Err(XapiError::NotInDatamodel(format!(
                "{}.get_by_name_label",
                class.api_name()
            )));
        }
        let v = self
            .call(
                &format!("{}.get_by_name_label", class.api_name()),
                vec![Value::str(name)],
            )
            .await?;
        refs(&v, "ref set")
    }

    /// `VM.get_all_records`.
    pub async fn vm_get_all_records(&self) -> Result<BTreeMap<Ref, VmRecord>, XapiError> {
        let v = self.get_all_records_raw(Class::Vm).await?;
        records(&v, "VM records", VmRecord::from_value)
    }

    /// `VM.get_record`.
    pub async fn vm_get_record(&self, vm: &str) -> Result<VmRecord, XapiError> {
        VmRecord::from_value(&self.get_record_raw(Class::Vm, vm).await?)
    }

    /// `host.get_all_records`.
    pub async fn host_get_all_records(&self) -> Result<BTreeMap<Ref, HostRecord>, XapiError> {
        let v = self.get_all_records_raw(Class::Host).await?;
        records(&v, "host records", HostRecord::from_value)
    }

    /// `host.get_record`.
    pub async fn host_get_record(&self, host: &str) -> Result<HostRecord, XapiError> {
        HostRecord::from_value(&self.get_record_raw(Class::Host, host).await?)
    }

    /// `pool.get_all_records`.
    pub async fn pool_get_all_records(&self) -> Result<BTreeMap<Ref, PoolRecord>, XapiError> {
        let v = self.get_all_records_raw(Class::Pool).await?;
        records(&v, "pool records", PoolRecord::from_value)
    }

    /// The pool (there is exactly one per xapi).
    pub async fn the_pool(&self) -> Result<(Ref, PoolRecord), XapiError> {
        self.pool_get_all_records()
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| XapiError::Envelope("xapi reports no pool object".into()))
    }

    /// `pool.get_record`.
    pub async fn pool_get_record(&self, pool: &str) -> Result<PoolRecord, XapiError> {
        PoolRecord::from_value(&self.get_record_raw(Class::Pool, pool).await?)
    }

    /// `<class>.get_<field>` of a `(string → string) map` field.
    pub async fn get_map(
        &self,
        class: Class,
        r: &str,
        field: &str,
    ) -> Result<BTreeMap<String, String>, XapiError> {
        check_map_field(class, field, "get_")?;
        let v = self
            .call(
                &format!("{}.get_{field}", class.api_name()),
                vec![Value::str(r)],
            )
            .await?;
        v.to_string_map()
            .ok_or_else(|| XapiError::type_err(field, &v))
    }

    /// `<class>.add_to_<field>(ref, key, value)`; fails with `MAP_DUPLICATE_KEY` if present.
    pub async fn add_to_map(
        &self,
        class: Class,
        r: &str,
        field: &str,
        key: &str,
        value: &str,
    ) -> Result<(), XapiError> {
        check_map_field(class, field, "add_to_")?;
        self.call(
            &format!("{}.add_to_{field}", class.api_name()),
            vec![Value::str(r), Value::str(key), Value::str(value)],
        )
        .await
        .map(drop)
    }

    /// `<class>.remove_from_<field>(ref, key)`; no error when the key is absent.
    pub async fn remove_from_map(
        &self,
        class: Class,
        r: &str,
        field: &str,
        key: &str,
    ) -> Result<(), XapiError> {
        check_map_field(class, field, "remove_from_")?;
        self.call(
            &format!("{}.remove_from_{field}", class.api_name()),
            vec![Value::str(r), Value::str(key)],
        )
        .await
        .map(drop)
    }

    /// Sets one map key: remove then add, as XenCenter does (add alone fails with
    /// `MAP_DUPLICATE_KEY`). If another client adds the key in between, the add is retried once
    /// after another remove.
    pub async fn set_map_key(
        &self,
        class: Class,
        r: &str,
        field: &str,
        key: &str,
        value: &str,
    ) -> Result<(), XapiError> {
        for attempt in 0..2 {
            self.remove_from_map(class, r, field, key).await?;
            match self.add_to_map(class, r, field, key, value).await {
                Err(e) if e.is(codes::MAP_DUPLICATE_KEY) && attempt == 0 => continue,
                r => return r,
            }
        }
        Ok(())
    }

    /// `secret.create({value})` → the new secret's uuid.
    pub async fn secret_create(&self, value: &str) -> Result<String, XapiError> {
        let mut rec = BTreeMap::new();
        rec.insert("value".to_string(), Value::str(value));
        rec.insert("other_config".to_string(), Value::Struct(BTreeMap::new()));
        let r = self.call("secret.create", vec![Value::Struct(rec)]).await?;
        let r = r
            .as_str()
            .ok_or_else(|| XapiError::type_err("secret ref", &r))?
            .to_string();
        let u = self.call("secret.get_uuid", vec![Value::str(&r)]).await?;
        u.as_str()
            .map(str::to_string)
            .ok_or_else(|| XapiError::type_err("secret uuid", &u))
    }

    /// The value of the secret with this uuid.
    pub async fn secret_value(&self, uuid: &str) -> Result<String, XapiError> {
        let r = self.get_by_uuid(Class::Secret, uuid).await?;
        let v = self.call("secret.get_value", vec![Value::str(&r)]).await?;
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| XapiError::type_err("secret value", &v))
    }

    /// `VM.start_on(vm, host, start_paused, force)`.
    pub async fn vm_start_on(&self, vm: &str, host: &str, paused: bool) -> Result<(), XapiError> {
        self.call(
            "VM.start_on",
            vec![
                Value::str(vm),
                Value::str(host),
                Value::Bool(paused),
                Value::Bool(false),
            ],
        )
        .await
        .map(drop)
    }

    /// `VM.pool_migrate(vm, host, options)`; `options` e.g. `{"live": "true"}`.
    pub async fn vm_pool_migrate(
        &self,
        vm: &str,
        host: &str,
        options: &BTreeMap<String, String>,
    ) -> Result<(), XapiError> {
        self.call(
            "VM.pool_migrate",
            vec![Value::str(vm), Value::str(host), Value::string_map(options)],
        )
        .await
        .map(drop)
    }

    /// `host.call_plugin(host, plugin, fn, args)` → the plugin's string result.
    pub async fn host_call_plugin(
        &self,
        host: &str,
        plugin: &str,
        func: &str,
        args: &BTreeMap<String, String>,
    ) -> Result<String, XapiError> {
        let v = self
            .call(
                "host.call_plugin",
                vec![
                    Value::str(host),
                    Value::str(plugin),
                    Value::str(func),
                    Value::string_map(args),
                ],
            )
            .await?;
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| XapiError::type_err("plugin result", &v))
    }

    /// `host.compute_free_memory(host)`: bytes a new VM could get on `host` now.
    pub async fn host_compute_free_memory(&self, host: &str) -> Result<i64, XapiError> {
        let v = self
            .call("host.compute_free_memory", vec![Value::str(host)])
            .await?;
        v.as_i64()
            .ok_or_else(|| XapiError::type_err("free memory", &v))
    }

    /// `event.from(classes, token, timeout)`: waits up to `timeout` for events after `token`
    /// (empty token: every current object as `add`).
    pub async fn event_from(
        &self,
        classes: &[&str],
        token: &str,
        timeout: Duration,
    ) -> Result<EventBatch, XapiError> {
        let v = self
            .call_with_timeout(
                "event.from",
                vec![
                    Value::Array(classes.iter().map(|c| Value::str(*c)).collect()),
                    Value::str(token),
                    Value::Double(timeout.as_secs_f64()),
                ],
                timeout,
            )
            .await?;
        EventBatch::from_value(&v)
    }
}

/// Follows `event.from` with its token, recovering from `EVENTS_LOST` by re-reading everything.
#[derive(Debug)]
pub struct EventStream {
    classes: Vec<String>,
    token: String,
}

impl EventStream {
    /// A stream over `classes` (`["vm", "pool"]`) starting with a full read.
    pub fn new(classes: &[&str]) -> EventStream {
        EventStream {
            classes: classes.iter().map(|c| (*c).to_string()).collect(),
            token: String::new(),
        }
    }

    /// The token of the last batch.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The next batch. On `EVENTS_LOST` the token is dropped and a full read returned with
    /// `resynced = true`: callers must treat it as the complete current state.
    pub async fn next(&mut self, api: &XenApi, timeout: Duration) -> Result<EventBatch, XapiError> {
        let classes: Vec<&str> = self.classes.iter().map(String::as_str).collect();
        match api.event_from(&classes, &self.token, timeout).await {
            Ok(b) => {
                self.token.clone_from(&b.token);
                Ok(b)
            }
            Err(e) if e.is(codes::EVENTS_LOST) => {
                tracing::warn!(token = %self.token, "xapi lost events; re-reading all objects");
                let mut b = api.event_from(&classes, "", timeout).await?;
                self.token.clone_from(&b.token);
                b.resynced = true;
                Ok(b)
            }
            Err(e) => Err(e),
        }
    }
}
