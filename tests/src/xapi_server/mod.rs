//! A XenAPI test server with xapi's semantics, for tests and demos without a real xapi.
//!
//! Written from xapi's documentation and sources (xen-api `doc/content/xen-api/wire-protocol.md`,
//! the datamodel, `ocaml/xapi-consts/api_errors.ml` for error codes, `ocaml/xapi/api_server.ml`
//! and `ocaml/idl/ocaml_backend/gen_server.ml` for dispatch, `ocaml/xapi/xapi_event.ml` for
//! events). What it implements, by module:
//!
//! - [`transport`]: XML-RPC over HTTP/1.1 (keep-alive) on 127.0.0.1 (any path; Xen
//!   Orchestra's client posts to `/xmlrpc`) and optionally a Unix socket, JSON-RPC 2.0 at
//!   `/jsonrpc`; the `Status`/`Value`/`ErrorDescription` envelope; `system.listMethods`
//!   answered bare, outside the envelope, as xapi does;
//! - [`methods`]: the method list of xapi's datamodel (`xapi-plugin/datamodel/xapi-methods.txt`):
//!   `MESSAGE_METHOD_UNKNOWN [name]`, `MESSAGE_PARAMETER_COUNT_MISMATCH [name, expected,
//!   received]` before the session is looked at; `NOT_IMPLEMENTED [name]` for a datamodel
//!   method this server does not model;
//! - [`sessions`]: `session.login_with_password` (`SESSION_AUTHENTICATION_FAILED`; `HOST_IS_SLAVE
//!   [master address]` when configured as a pool member), `session.logout`, `SESSION_INVALID
//!   [ref]` for unknown, logged-out or expired sessions, `session.get_this_host`;
//! - [`objects`]: classes `pool`, `host`, `VM`, `secret` with opaque refs and UUIDs; a control
//!   domain per host (`is_control_domain`, `resident_on` its host) and default templates among
//!   the VMs, snapshots on demand; [`calls`]: `get_all`, `get_all_records` (every datamodel
//!   class; empty for those never populated), `get_record` (`HANDLE_INVALID [class, ref]`),
//!   `get_by_uuid` (`UUID_INVALID [class, uuid]`), `get_by_name_label`, `get_<field>`,
//!   `set_<field>` for writable fields, `add_to_<map>` (`MAP_DUPLICATE_KEY [class, field, ref,
//!   key]`), `remove_from_<map>` (silent when absent); `secret.create`; `VM.start_on`,
//!   `VM.pool_migrate` (power-state, template and memory checks), `host.compute_free_memory`;
//!   `SR`s with their driver's features, `VDI`s on them ([`FakeXapi::add_sr`],
//!   [`FakeXapi::add_disk_on`]);
//! - [`storage`]: `VDI.pool_migrate`, a disk moved to another SR as xapi moves it (new VDI,
//!   VBD re-pointed, old VDI destroyed; xapi's power-state and SR-feature checks);
//!   `VDI.copy`, `VBD.create`, `VBD.destroy`;
//! - [`plugin`]: `host.call_plugin` runs a plugin executable from a directory with the XML-RPC
//!   methodCall in argv[1], as xapi does with `/etc/xapi.d/plugins`;
//! - [`events`]: `event.from(classes, token, timeout)` with xapi's token format, one event per
//!   changed object, `valid_ref_counts`, long polls, `EVENTS_LOST` when the token predates the
//!   kept history; `event.inject(class, ref)`.
//!
//! Test hooks ([`FakeXapi::expire_sessions`], [`FakeXapi::drop_event_history`], ...) simulate
//! what a test cannot otherwise provoke.

mod calls;
mod events;
mod methods;
mod objects;
mod plugin;
mod sessions;
mod storage;
mod transport;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use xenft_xapi::xmlrpc::Value;

use objects::{new_uuid, Db};

/// Pseudo-method counted by [`FakeXapi::calls`] for every JSON-RPC request.
pub const JSONRPC_REQUESTS: &str = "<jsonrpc>";
/// Refs of nothing.
pub const NULL_REF: &str = "OpaqueRef:NULL";
/// Memory of each host's control domain (not counted against the guests' memory).
pub const DOM0_MEMORY: i64 = 1 << 30;
/// The default templates every server starts with (xapi installs a set of them).
pub const DEFAULT_TEMPLATES: [&str; 2] = ["Debian Bookworm 12", "Windows Server 2022 (64-bit)"];

/// The SR [`FakeXapi::add_disk`] uses.
pub const DEFAULT_SR: &str = "NFS storage";
/// The features xcp-ng/sm's `NFSSR.py` (an SMAPIv1 driver) lists, as xapi's `SM.features`
/// has them.
pub const SMAPIV1_NFS_FEATURES: &[&str] = &[
    "SR_PROBE",
    "SR_UPDATE",
    "SR_CACHING",
    "VDI_CREATE",
    "VDI_DELETE",
    "VDI_ATTACH",
    "VDI_DETACH",
    "VDI_UPDATE",
    "VDI_CLONE",
    "VDI_SNAPSHOT",
    "VDI_RESIZE",
    "VDI_GENERATE_CONFIG",
    "VDI_MIRROR",
    "VDI_RESET_ON_BOOT/2",
    "ATOMIC_PAUSE",
    "VDI_CONFIG_CBT",
    "VDI_ACTIVATE",
    "VDI_DEACTIVATE",
    "THIN_PROVISIONING",
    "VDI_READ_CACHING",
];

/// Server settings.
#[derive(Debug, Clone)]
pub struct FakeXapiConfig {
    /// Accepted user.
    pub user: String,
    /// Accepted password.
    pub password: String,
    /// Directory of host plugins (`host.call_plugin(_, name, ..)` runs `plugin_dir/name`).
    pub plugin_dir: Option<PathBuf>,
    /// Also listen on this Unix socket.
    pub unix_socket: Option<PathBuf>,
    /// Bind address (default 127.0.0.1:0).
    pub listen: SocketAddr,
    /// How many events are kept for `event.from`; older tokens get `EVENTS_LOST`.
    pub event_history: usize,
    /// Name of the pool.
    pub pool_name: String,
    /// Run as a pool member whose master has this address: logins answer `HOST_IS_SLAVE
    /// [address]`, as xapi on a pool member does.
    pub slave_of: Option<String>,
}

impl Default for FakeXapiConfig {
    fn default() -> Self {
        FakeXapiConfig {
            user: "root".into(),
            password: "xenroot".into(),
            plugin_dir: None,
            unix_socket: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            event_history: 10_000,
            pool_name: "pool0".into(),
            slave_of: None,
        }
    }
}

/// A XenAPI failure: code and parameters.
type Failure = (String, Vec<String>);
type ApiResult = Result<Value, Failure>;

fn fail(code: &str, params: &[&str]) -> Failure {
    (
        code.to_string(),
        params.iter().map(|s| (*s).to_string()).collect(),
    )
}

struct Shared {
    cfg: FakeXapiConfig,
    db: Mutex<Db>,
    event_tx: tokio::sync::watch::Sender<u64>,
    url: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Db> {
        self.db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records an event for `r` (after a change made under `db`).
    fn emit(&self, db: &mut Db, r: &str, op: &'static str) {
        db.emit(&self.event_tx, self.cfg.event_history, r, op);
    }
}

/// A running test server; stops when dropped.
pub struct FakeXapi {
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    addr: SocketAddr,
}

impl FakeXapi {
    /// Starts a server with a pool, no hosts, no guests and xapi's default templates
    /// ([`DEFAULT_TEMPLATES`]).
    pub fn start(cfg: FakeXapiConfig) -> std::io::Result<FakeXapi> {
        let std_listener = std::net::TcpListener::bind(cfg.listen)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let unix = match &cfg.unix_socket {
            Some(p) => {
                let _ = std::fs::remove_file(p);
                let l = std::os::unix::net::UnixListener::bind(p)?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        let (event_tx, _) = tokio::sync::watch::channel(0u64);
        let pool_name = cfg.pool_name.clone();
        let shared = Arc::new(Shared {
            cfg,
            db: Mutex::new(Db::default()),
            event_tx,
            url: format!("http://{addr}"),
        });
        {
            let mut db = shared.lock();
            let pool = db.insert("pool", objects::pool_record(&pool_name));
            shared.emit(&mut db, &pool, "add");
            for name in DEFAULT_TEMPLATES {
                let t = db.insert("VM", objects::template_record(name));
                shared.emit(&mut db, &t, "add");
            }
        }
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-xapi".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("fake-xapi: cannot start runtime: {e}");
                        return;
                    }
                };
                rt.block_on(transport::serve(sh, std_listener, unix, stop_rx));
                rt.shutdown_timeout(Duration::from_millis(100));
            })?;
        Ok(FakeXapi {
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
            addr,
        })
    }

    /// The usual test pool: hosts `host1` and `host2` with 16 GiB each, guest `web01` (4 GiB)
    /// running on host1. Returns (server, host1 ref, web01 ref).
    pub fn with_pool() -> (FakeXapi, String, String) {
        const GIB: i64 = 1 << 30;
        let srv = FakeXapi::start(FakeXapiConfig::default()).unwrap_or_else(|e| panic!("{e}"));
        let (h1, _) = srv.add_host("host1", "10.0.0.1", 16 * GIB);
        srv.add_host("host2", "10.0.0.2", 16 * GIB);
        let (vm, _) = srv.add_vm("web01", 4 * GIB, Some(&h1));
        (srv, h1, vm)
    }

    /// Options for a xenft-xapi client of this server: its URL and credentials, `protocol`,
    /// 10 s per call.
    pub fn client_options(&self, protocol: xenft_xapi::Protocol) -> xenft_xapi::ConnectOptions {
        let endpoint = xenft_xapi::transport::Endpoint::parse(&self.url())
            .unwrap_or_else(|e| panic!("our own URL: {e}"));
        let mut o = xenft_xapi::ConnectOptions::new(
            endpoint,
            xenft_xapi::Credentials {
                user: self.user().into(),
                password: self.password().into(),
            },
        );
        o.protocol = protocol;
        o.timeout = Duration::from_secs(10);
        o
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.shared.url.clone()
    }

    /// The TCP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The accepted user name.
    pub fn user(&self) -> &str {
        &self.shared.cfg.user
    }

    /// The accepted password.
    pub fn password(&self) -> &str {
        &self.shared.cfg.password
    }

    /// Adds a host with `memory_total` bytes for guests and its control domain (a running VM
    /// with `is_control_domain`, `resident_on` the host, as xapi lists dom0); the first host
    /// becomes pool master. Returns (ref, uuid) of the host.
    pub fn add_host(&self, name: &str, address: &str, memory_total: i64) -> (String, String) {
        let mut db = self.shared.lock();
        let uuid = new_uuid();
        let r = db.insert("host", objects::host_record(name, address, &uuid));
        db.host_memory_total.insert(r.clone(), memory_total);
        self.shared.emit(&mut db, &r, "add");
        let dom0 = db.insert("VM", objects::dom0_record(name, &r));
        self.shared.emit(&mut db, &dom0, "add");
        let pool = db.refs_of("pool").into_iter().next().unwrap_or_default();
        if let Some(p) = db.objects.get_mut(&pool) {
            if p.fields.get("master").and_then(Value::as_str) == Some(NULL_REF) {
                p.fields.insert("master".into(), Value::str(&r));
                self.shared.emit(&mut db, &pool, "mod");
            }
        }
        (r, uuid)
    }

    /// Adds a guest VM; `resident_on` is a host ref when running. Returns (ref, uuid).
    pub fn add_vm(
        &self,
        name: &str,
        memory_static_max: i64,
        resident_on: Option<&str>,
    ) -> (String, String) {
        let mut db = self.shared.lock();
        let uuid = new_uuid();
        let mut f = objects::vm_record(name, &uuid, memory_static_max, resident_on);
        if resident_on.is_some() {
            db.last_domid += 1;
            f.insert("domid".into(), Value::int64(db.last_domid));
        }
        let r = db.insert("VM", f);
        self.shared.emit(&mut db, &r, "add");
        (r, uuid)
    }

    /// Adds a storage repository of driver `kind` (`SR.type`: `nfs`, `lvm`, `xenft`, ...),
    /// shared by the pool's hosts, whose driver offers `features` (xapi's `SM.features`:
    /// `VDI_SNAPSHOT`, `VDI_MIRROR`, ...; what `VDI.pool_migrate` checks). Returns (ref,
    /// uuid).
    pub fn add_sr(&self, name: &str, kind: &str, features: &[&str]) -> (String, String) {
        let mut db = self.shared.lock();
        let f = objects::sr_record(name, kind, true);
        let uuid = f
            .get("uuid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let r = db.insert("SR", f);
        db.sr_features.insert(
            r.clone(),
            features.iter().map(|s| (*s).to_string()).collect(),
        );
        self.shared.emit(&mut db, &r, "add");
        (r, uuid)
    }

    /// The SR [`FakeXapi::add_disk`] puts disks on: [`DEFAULT_SR`] (an SMAPIv1 NFS SR, with
    /// the features its driver, xcp-ng/sm `NFSSR.py`, lists), made on first use.
    pub fn default_sr(&self) -> String {
        let existing = {
            let db = self.shared.lock();
            db.objects
                .iter()
                .find(|(_, o)| {
                    o.class == "SR"
                        && o.fields.get("name_label").and_then(Value::as_str) == Some(DEFAULT_SR)
                })
                .map(|(r, _)| r.clone())
        };
        existing.unwrap_or_else(|| self.add_sr(DEFAULT_SR, "nfs", SMAPIV1_NFS_FEATURES).0)
    }

    /// Adds a disk of `virtual_size` bytes to `vm` at `userdevice` on [`FakeXapi::default_sr`].
    /// Returns the VDI's ref.
    pub fn add_disk(&self, vm: &str, userdevice: u32, virtual_size: i64) -> String {
        let sr = self.default_sr();
        self.add_disk_on(vm, userdevice, virtual_size, &sr)
    }

    /// Adds a disk of `virtual_size` bytes on SR `sr` to `vm` at `userdevice`: a `VDI` and
    /// the `VBD` attaching it (listed in the VM's `VBDs`, the VDI's `VBDs` and the SR's
    /// `VDIs`, as xapi keeps them). Returns the VDI's ref.
    pub fn add_disk_on(&self, vm: &str, userdevice: u32, virtual_size: i64, sr: &str) -> String {
        let mut db = self.shared.lock();
        let name = format!("disk {userdevice}");
        let vdi = db.insert("VDI", objects::vdi_record(virtual_size, sr, &name));
        let vbd = db.insert("VBD", objects::vbd_record(vm, &vdi, userdevice));
        if let Some(o) = db.objects.get_mut(&vdi) {
            o.fields
                .insert("VBDs".into(), Value::Array(vec![Value::str(&vbd)]));
        }
        objects::push_ref(&mut db, vm, "VBDs", &vbd);
        objects::push_ref(&mut db, sr, "VDIs", &vdi);
        self.shared.emit(&mut db, &vdi, "add");
        self.shared.emit(&mut db, &vbd, "add");
        self.shared.emit(&mut db, vm, "mod");
        if db.objects.contains_key(sr) {
            self.shared.emit(&mut db, sr, "mod");
        }
        vdi
    }

    /// The VDI attached to `vm` at `userdevice` now (`VDI.pool_migrate` replaces it).
    pub fn disk_at(&self, vm: &str, userdevice: u32) -> Option<String> {
        let db = self.shared.lock();
        db.objects
            .values()
            .find(|o| {
                o.class == "VBD"
                    && o.fields.get("VM").and_then(Value::as_str) == Some(vm)
                    && o.fields.get("userdevice").and_then(Value::as_str)
                        == Some(userdevice.to_string().as_str())
            })
            .and_then(|o| o.fields.get("VDI").and_then(Value::as_str))
            .map(str::to_string)
    }

    /// Adds network interface `device` with `mac` to `vm`. Returns the VIF's ref.
    pub fn add_vif(&self, vm: &str, device: u32, mac: &str) -> String {
        let mut db = self.shared.lock();
        let vif = db.insert("VIF", objects::vif_record(vm, device, mac));
        objects::push_ref(&mut db, vm, "VIFs", &vif);
        self.shared.emit(&mut db, &vif, "add");
        self.shared.emit(&mut db, vm, "mod");
        vif
    }

    /// Adds a snapshot of `vm` named `name` (xapi's snapshots are halted templates with
    /// `is_a_snapshot` and `snapshot_of`). Returns its ref.
    pub fn add_snapshot(&self, vm: &str, name: &str) -> String {
        let mut db = self.shared.lock();
        let mem = db
            .objects
            .get(vm)
            .and_then(|o| o.fields.get("memory_static_max"))
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let mut f = objects::vm_record(name, &new_uuid(), mem, None);
        f.insert("is_a_template".into(), Value::Bool(true));
        f.insert("is_a_snapshot".into(), Value::Bool(true));
        f.insert("snapshot_of".into(), Value::str(vm));
        let r = db.insert("VM", f);
        self.shared.emit(&mut db, &r, "add");
        r
    }

    /// The ref of `host`'s control domain.
    pub fn control_domain(&self, host: &str) -> Option<String> {
        let db = self.shared.lock();
        db.objects
            .iter()
            .find(|(_, o)| {
                o.class == "VM"
                    && o.fields.get("is_control_domain").and_then(Value::as_bool) == Some(true)
                    && o.fields.get("resident_on").and_then(Value::as_str) == Some(host)
            })
            .map(|(r, _)| r.clone())
    }

    /// A copy of an object's record.
    pub fn record(&self, r: &str) -> Option<BTreeMap<String, Value>> {
        self.shared.lock().objects.get(r).map(|o| o.fields.clone())
    }

    /// An object's `other_config` (or another string map field).
    pub fn map_field(&self, r: &str, field: &str) -> BTreeMap<String, String> {
        self.record(r)
            .and_then(|f| f.get(field).and_then(Value::to_string_map))
            .unwrap_or_default()
    }

    /// Sets a map key directly, as another XenAPI client would, with an event.
    pub fn set_map_key(&self, r: &str, field: &str, key: &str, value: Option<&str>) {
        let mut db = self.shared.lock();
        if let Some(Value::Struct(m)) = db.objects.get_mut(r).and_then(|o| o.fields.get_mut(field))
        {
            match value {
                Some(v) => m.insert(key.to_string(), Value::str(v)),
                None => m.remove(key),
            };
        }
        self.shared.emit(&mut db, r, "mod");
    }

    /// Sets a string field directly (a VM's `power_state` to `Paused`, ...), with an event.
    pub fn set_field(&self, r: &str, field: &str, value: &str) {
        let mut db = self.shared.lock();
        if let Some(o) = db.objects.get_mut(r) {
            o.fields.insert(field.to_string(), Value::str(value));
        }
        self.shared.emit(&mut db, r, "mod");
    }

    /// The pool's ref.
    pub fn pool_ref(&self) -> String {
        self.shared
            .lock()
            .refs_of("pool")
            .into_iter()
            .next()
            .unwrap_or_default()
    }

    /// Destroys an object (as `VM.destroy` would), with a `del` event.
    pub fn destroy(&self, r: &str) {
        let mut db = self.shared.lock();
        self.shared.emit(&mut db, r, "del");
        db.objects.remove(r);
        db.host_memory_total.remove(r);
    }

    /// Invalidates every session (as a xapi restart does).
    pub fn expire_sessions(&self) {
        self.shared.lock().sessions.clear();
    }

    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        self.shared.lock().sessions.len()
    }

    /// Forgets all event history: every token issued so far gets `EVENTS_LOST`.
    pub fn drop_event_history(&self) {
        let mut db = self.shared.lock();
        db.events.clear();
        // Make sure there is an event after the drop so tokens before it are "lost".
        db.last_event += 1;
        db.dropped_upto = db.last_event;
        let id = db.last_event;
        let _ = self.shared.event_tx.send(id);
    }

    /// How many times `method` was called (all sessions).
    pub fn calls(&self, method: &str) -> u64 {
        self.shared.lock().calls.get(method).copied().unwrap_or(0)
    }

    /// Makes the next call of `method` fail with `code params` (fault injection).
    pub fn fail_next(&self, method: &str, code: &str, params: &[&str]) {
        self.shared.lock().deny_next.push((
            method.to_string(),
            code.to_string(),
            params.iter().map(|s| (*s).to_string()).collect(),
        ));
    }
}

impl Drop for FakeXapi {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.shared.cfg.unix_socket {
            let _ = std::fs::remove_file(p);
        }
    }
}
