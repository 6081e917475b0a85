//! A XenAPI test server with xapi's semantics, for tests and demos without a real xapi.
//!
//! Written from xapi's documentation (xen-api `doc/content/xen-api/wire-protocol.md`, the
//! datamodel reference, `api_errors.ml` for error codes). What it implements:
//!
//! - transports: XML-RPC over HTTP/1.1 (keep-alive) on 127.0.0.1 and optionally a Unix socket,
//!   JSON-RPC 2.0 at `/jsonrpc`;
//! - the `Status`/`Value`/`ErrorDescription` envelope; XenAPI ints as decimal strings;
//! - sessions: `session.login_with_password` (`SESSION_AUTHENTICATION_FAILED`),
//!   `session.logout`, `SESSION_INVALID [ref]` for unknown/expired sessions;
//! - classes `pool`, `host`, `VM` with opaque refs and UUIDs, and for each: `get_all`,
//!   `get_all_records`, `get_record` (`HANDLE_INVALID [class, ref]`), `get_by_uuid`
//!   (`UUID_INVALID [class, uuid]`), `get_by_name_label`, `get_<field>`, `set_<field>` for
//!   writable fields, `add_to_<map>` (`MAP_DUPLICATE_KEY [class, field, ref, key]`) and
//!   `remove_from_<map>` (silent when the key is absent); `secret.create` and the generic
//!   calls on `secret` (`get_by_uuid`, `get_value`, `get_uuid`);
//! - `VM.start_on`, `VM.pool_migrate` (power-state and memory checks),
//!   `host.compute_free_memory`, `host.call_plugin` (runs a plugin executable from a directory
//!   with the XML-RPC methodCall in argv[1], as xapi does with `/etc/xapi.d/plugins`);
//! - `event.from(classes, token, timeout)`: one event per changed object since `token`
//!   (latest snapshot), an empty token returns every object as `add`, long-polls up to
//!   `timeout`, `EVENTS_LOST` when the token predates the kept history.
//!
//! Test hooks ([`FakeXapi::expire_sessions`], [`FakeXapi::drop_event_history`], ...) simulate
//! what a test cannot otherwise provoke.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xenft_xapi::client::{failure_envelope, success_envelope};
use xenft_xapi::xmlrpc::{self, Value};

/// Largest request body the server reads.
const MAX_BODY: usize = 16 << 20;
/// Largest request head.
const MAX_HEAD: usize = 64 << 10;
/// Longest `event.from` wait honoured.
const MAX_EVENT_WAIT: f64 = 60.0;
/// Pseudo-method counted by [`FakeXapi::calls`] for every JSON-RPC request.
pub const JSONRPC_REQUESTS: &str = "<jsonrpc>";
/// Refs of nothing.
pub const NULL_REF: &str = "OpaqueRef:NULL";

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
        }
    }
}

type ApiResult = Result<Value, (String, Vec<String>)>;

fn fail(code: &str, params: &[&str]) -> (String, Vec<String>) {
    (
        code.to_string(),
        params.iter().map(|s| (*s).to_string()).collect(),
    )
}

#[derive(Debug, Clone)]
struct Obj {
    class: &'static str,
    fields: BTreeMap<String, Value>,
}

#[derive(Debug, Clone)]
struct Ev {
    id: u64,
    class: String,
    op: &'static str,
    obj_ref: String,
    snapshot: Option<Value>,
}

#[derive(Debug, Default)]
struct Db {
    objects: BTreeMap<String, Obj>,
    sessions: HashSet<String>,
    events: std::collections::VecDeque<Ev>,
    /// Id of the last event created (0 = none).
    last_event: u64,
    /// Events with id <= this were dropped from history.
    dropped_upto: u64,
    host_memory_total: BTreeMap<String, i64>,
    calls: BTreeMap<String, u64>,
    deny_next: Vec<(String, String, Vec<String>)>,
}

struct Shared {
    cfg: FakeXapiConfig,
    db: Mutex<Db>,
    event_tx: tokio::sync::watch::Sender<u64>,
    url: String,
}

/// A running test server; stops when dropped.
pub struct FakeXapi {
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    addr: SocketAddr,
}

fn new_uuid() -> String {
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

fn new_ref() -> String {
    format!("OpaqueRef:{}", new_uuid())
}

fn class_event_name(class: &str) -> String {
    class.to_ascii_lowercase()
}

impl Db {
    fn emit(
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

    fn refs_of(&self, class: &str) -> Vec<String> {
        self.objects
            .iter()
            .filter(|(_, o)| o.class == class)
            .map(|(r, _)| r.clone())
            .collect()
    }

    fn obj(&self, class: &'static str, r: &str) -> Result<&Obj, (String, Vec<String>)> {
        match self.objects.get(r) {
            Some(o) if o.class == class => Ok(o),
            _ => Err(fail("HANDLE_INVALID", &[class, r])),
        }
    }

    fn obj_mut(&mut self, class: &'static str, r: &str) -> Result<&mut Obj, (String, Vec<String>)> {
        match self.objects.get_mut(r) {
            Some(o) if o.class == class => Ok(o),
            _ => Err(fail("HANDLE_INVALID", &[class, r])),
        }
    }

    fn used_memory(&self, host: &str) -> i64 {
        self.objects
            .values()
            .filter(|o| o.class == "VM")
            .filter(|o| {
                o.fields.get("resident_on").and_then(Value::as_str) == Some(host)
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

    fn free_memory(&self, host: &str) -> i64 {
        self.host_memory_total.get(host).copied().unwrap_or(0) - self.used_memory(host)
    }
}

impl FakeXapi {
    /// Starts a server with an empty pool (no hosts, no VMs).
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
        let limit = cfg.event_history;
        let shared = Arc::new(Shared {
            cfg,
            db: Mutex::new(Db::default()),
            event_tx,
            url: format!("http://{addr}"),
        });
        {
            let mut db = shared.lock();
            let pool = new_ref();
            let mut f = BTreeMap::new();
            f.insert("uuid".into(), Value::str(new_uuid()));
            f.insert("name_label".into(), Value::str(&pool_name));
            f.insert("name_description".into(), Value::str(""));
            f.insert("master".into(), Value::str(NULL_REF));
            f.insert("other_config".into(), Value::Struct(BTreeMap::new()));
            f.insert("gui_config".into(), Value::Struct(BTreeMap::new()));
            f.insert("ha_enabled".into(), Value::Bool(false));
            f.insert("tags".into(), Value::Array(vec![]));
            db.objects.insert(
                pool.clone(),
                Obj {
                    class: "pool",
                    fields: f,
                },
            );
            db.emit(&shared.event_tx, limit, &pool, "add");
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
                rt.block_on(serve(sh, std_listener, unix, stop_rx));
                rt.shutdown_timeout(Duration::from_millis(100));
            })?;
        Ok(FakeXapi {
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
            addr,
        })
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

    /// Adds a host with `memory_total` bytes for guests; the first host becomes pool master.
    /// Returns (ref, uuid).
    pub fn add_host(&self, name: &str, address: &str, memory_total: i64) -> (String, String) {
        let mut db = self.shared.lock();
        let r = new_ref();
        let uuid = new_uuid();
        let mut f = BTreeMap::new();
        f.insert("uuid".into(), Value::str(&uuid));
        f.insert("name_label".into(), Value::str(name));
        f.insert("name_description".into(), Value::str(""));
        f.insert("hostname".into(), Value::str(name));
        f.insert("address".into(), Value::str(address));
        f.insert("enabled".into(), Value::Bool(true));
        f.insert("API_version_major".into(), Value::int64(2));
        f.insert("API_version_minor".into(), Value::int64(21));
        let mut sw = BTreeMap::new();
        sw.insert("product_version".to_string(), Value::str("8.3.0"));
        sw.insert("xen".to_string(), Value::str("4.17.5"));
        f.insert("software_version".into(), Value::Struct(sw));
        f.insert("other_config".into(), Value::Struct(BTreeMap::new()));
        f.insert("tags".into(), Value::Array(vec![]));
        db.objects.insert(
            r.clone(),
            Obj {
                class: "host",
                fields: f,
            },
        );
        db.host_memory_total.insert(r.clone(), memory_total);
        let limit = self.shared.cfg.event_history;
        db.emit(&self.shared.event_tx, limit, &r, "add");
        let pool = db.refs_of("pool").into_iter().next().unwrap_or_default();
        if let Some(p) = db.objects.get_mut(&pool) {
            if p.fields.get("master").and_then(Value::as_str) == Some(NULL_REF) {
                p.fields.insert("master".into(), Value::str(&r));
                db.emit(&self.shared.event_tx, limit, &pool, "mod");
            }
        }
        (r, uuid)
    }

    /// Adds a VM; `resident_on` is a host ref when running. Returns (ref, uuid).
    pub fn add_vm(
        &self,
        name: &str,
        memory_static_max: i64,
        resident_on: Option<&str>,
    ) -> (String, String) {
        let mut db = self.shared.lock();
        let r = new_ref();
        let uuid = new_uuid();
        let mut f = BTreeMap::new();
        f.insert("uuid".into(), Value::str(&uuid));
        f.insert("name_label".into(), Value::str(name));
        f.insert("name_description".into(), Value::str(""));
        f.insert(
            "power_state".into(),
            Value::str(if resident_on.is_some() {
                "Running"
            } else {
                "Halted"
            }),
        );
        f.insert(
            "resident_on".into(),
            Value::str(resident_on.unwrap_or(NULL_REF)),
        );
        f.insert("memory_static_max".into(), Value::int64(memory_static_max));
        f.insert("memory_dynamic_max".into(), Value::int64(memory_static_max));
        f.insert(
            "memory_static_min".into(),
            Value::int64(memory_static_max / 4),
        );
        f.insert("VCPUs_max".into(), Value::int64(1));
        f.insert("is_a_template".into(), Value::Bool(false));
        f.insert("is_control_domain".into(), Value::Bool(false));
        f.insert("other_config".into(), Value::Struct(BTreeMap::new()));
        f.insert("tags".into(), Value::Array(vec![]));
        db.objects.insert(
            r.clone(),
            Obj {
                class: "VM",
                fields: f,
            },
        );
        let limit = self.shared.cfg.event_history;
        db.emit(&self.shared.event_tx, limit, &r, "add");
        (r, uuid)
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
        let limit = self.shared.cfg.event_history;
        db.emit(&self.shared.event_tx, limit, r, "mod");
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
        let limit = self.shared.cfg.event_history;
        db.emit(&self.shared.event_tx, limit, r, "del");
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
        db.dropped_upto = db.last_event;
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

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Db> {
        self.db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn serve(
    sh: Arc<Shared>,
    tcp: std::net::TcpListener,
    unix: Option<std::os::unix::net::UnixListener>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let Ok(tcp) = tokio::net::TcpListener::from_std(tcp) else {
        return;
    };
    let unix = unix.and_then(|u| tokio::net::UnixListener::from_std(u).ok());
    loop {
        tokio::select! {
            _ = &mut stop => return,
            a = tcp.accept() => {
                if let Ok((s, _)) = a {
                    let sh = sh.clone();
                    tokio::spawn(async move { let _ = connection(sh, s).await; });
                }
            }
            a = async {
                match &unix {
                    Some(u) => u.accept().await.map(|(s, _)| s),
                    None => std::future::pending().await,
                }
            } => {
                if let Ok(s) = a {
                    let sh = sh.clone();
                    tokio::spawn(async move { let _ = connection(sh, s).await; });
                }
            }
        }
    }
}

/// Serves HTTP/1.1 requests on one connection until it closes.
async fn connection<S>(sh: Arc<Shared>, mut s: S) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Read the head.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if buf.len() > MAX_HEAD {
                return respond(&mut s, 431, "text/plain", b"head too large", true).await;
            }
            let mut chunk = [0u8; 8192];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let req_line = lines.next().unwrap_or("");
        let mut parts = req_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("/").to_string();
        let mut length = 0usize;
        let mut close = req_line.ends_with("HTTP/1.0");
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                let v = v.trim();
                if k == "content-length" {
                    length = match v.parse() {
                        Ok(n) => n,
                        Err(_) => {
                            return respond(&mut s, 400, "text/plain", b"bad length", true).await
                        }
                    };
                } else if k == "connection" {
                    close = v.eq_ignore_ascii_case("close");
                }
            }
        }
        if length > MAX_BODY {
            return respond(&mut s, 413, "text/plain", b"body too large", true).await;
        }
        buf.drain(..head_end + 4);
        while buf.len() < length {
            let mut chunk = vec![0u8; (length - buf.len()).min(64 << 10)];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        if method != "POST" {
            respond(&mut s, 405, "text/plain", b"POST only", close).await?;
        } else if path == "/jsonrpc" {
            *sh.lock()
                .calls
                .entry(JSONRPC_REQUESTS.to_string())
                .or_default() += 1;
            let reply = match xenft_xapi::jsonrpc::decode_request(&body) {
                Ok((m, params, id)) => {
                    let r = dispatch(&sh, &m, params).await;
                    match &r {
                        Ok(v) => xenft_xapi::jsonrpc::encode_reply(&id, Ok(v)),
                        Err((c, p)) => xenft_xapi::jsonrpc::encode_reply(&id, Err((c, p))),
                    }
                }
                Err(e) => xenft_xapi::jsonrpc::encode_reply(
                    &serde_json::Value::Null,
                    Err(("PARSE_ERROR", &[e.to_string()])),
                ),
            };
            respond(&mut s, 200, "application/json", &reply, close).await?;
        } else {
            let reply = match std::str::from_utf8(&body)
                .map_err(|e| e.to_string())
                .and_then(|t| xmlrpc::decode_call(t).map_err(|e| e.to_string()))
            {
                Ok((m, params)) => {
                    let env = match dispatch(&sh, &m, params).await {
                        Ok(v) => success_envelope(v),
                        Err((c, p)) => failure_envelope(&c, &p),
                    };
                    xmlrpc::encode_response(&env)
                }
                Err(e) => xmlrpc::encode_fault(-32700, &format!("parse error: {e}")),
            };
            respond(&mut s, 200, "text/xml", reply.as_bytes(), close).await?;
        }
        if close {
            return Ok(());
        }
    }
}

async fn respond<S>(
    s: &mut S,
    status: u16,
    ctype: &str,
    body: &[u8],
    close: bool,
) -> std::io::Result<()>
where
    S: tokio::io::AsyncWrite + Unpin,
{
    let reason = if status == 200 { "OK" } else { "Error" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{}\r\n",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.flush().await
}

fn arg_str<'a>(
    params: &'a [Value],
    i: usize,
    method: &str,
) -> Result<&'a str, (String, Vec<String>)> {
    params.get(i).and_then(Value::as_str).ok_or_else(|| {
        fail(
            "FIELD_TYPE_ERROR",
            &[method, &format!("parameter {i} must be a string")],
        )
    })
}

fn check_count(method: &str, params: &[Value], n: usize) -> Result<(), (String, Vec<String>)> {
    if params.len() == n {
        Ok(())
    } else {
        Err(fail(
            "MESSAGE_PARAMETER_COUNT_MISMATCH",
            &[method, &n.to_string(), &params.len().to_string()],
        ))
    }
}

fn api_class(name: &str) -> Option<&'static str> {
    match name {
        "VM" => Some("VM"),
        "host" => Some("host"),
        "pool" => Some("pool"),
        "secret" => Some("secret"),
        _ => None,
    }
}

const MAP_FIELDS: &[&str] = &["other_config", "gui_config", "software_version"];
const WRITABLE_MAPS: &[&str] = &["other_config", "gui_config"];
const WRITABLE_STRINGS: &[&str] = &["name_label", "name_description"];

async fn dispatch(sh: &Arc<Shared>, method: &str, params: Vec<Value>) -> ApiResult {
    {
        let mut db = sh.lock();
        *db.calls.entry(method.to_string()).or_default() += 1;
        if let Some(i) = db.deny_next.iter().position(|(m, _, _)| m == method) {
            let (_, code, p) = db.deny_next.remove(i);
            return Err((code, p));
        }
    }
    match method {
        "session.login_with_password" => {
            if params.len() < 2 || params.len() > 4 {
                return Err(fail(
                    "MESSAGE_PARAMETER_COUNT_MISMATCH",
                    &[method, "4", &params.len().to_string()],
                ));
            }
            let user = arg_str(&params, 0, method)?;
            let pw = arg_str(&params, 1, method)?;
            if user != sh.cfg.user || pw != sh.cfg.password {
                return Err(fail(
                    "SESSION_AUTHENTICATION_FAILED",
                    &[user, "Authentication failure"],
                ));
            }
            let s = new_ref();
            sh.lock().sessions.insert(s.clone());
            return Ok(Value::String(s));
        }
        "session.logout" | "session.local_logout" => {
            let s = arg_str(&params, 0, method)?;
            sh.lock().sessions.remove(s);
            return Ok(Value::str(""));
        }
        _ => {}
    }
    let session = params.first().and_then(Value::as_str).unwrap_or("");
    if !sh.lock().sessions.contains(session) {
        return Err(fail("SESSION_INVALID", &[session]));
    }
    let args = &params[1..];
    let (class, verb) = method.split_once('.').unwrap_or(("", method));
    if class == "event" && verb == "from" {
        return event_from(sh, method, args).await;
    }
    if class == "host" && verb == "call_plugin" {
        return call_plugin(sh, method, session, args).await;
    }
    let Some(class) = api_class(class) else {
        return Err(fail("MESSAGE_METHOD_UNKNOWN", &[method]));
    };
    let limit = sh.cfg.event_history;
    let mut db = sh.lock();
    match (class, verb) {
        ("VM", "start_on") => {
            check_count(method, &params, 5)?;
            let vm = arg_str(args, 0, method)?;
            let host = arg_str(args, 1, method)?;
            let paused = args.get(2).and_then(Value::as_bool).unwrap_or(false);
            db.obj("host", host)?;
            let o = db.obj("VM", vm)?;
            let state = o
                .fields
                .get("power_state")
                .and_then(Value::as_str)
                .unwrap_or("");
            if state != "Halted" {
                return Err(fail(
                    "VM_BAD_POWER_STATE",
                    &[vm, "halted", &state.to_lowercase()],
                ));
            }
            let need = o
                .fields
                .get("memory_static_max")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            let free = db.free_memory(host);
            if need > free {
                return Err(fail(
                    "HOST_NOT_ENOUGH_FREE_MEMORY",
                    &[&need.to_string(), &free.to_string()],
                ));
            }
            let o = db.obj_mut("VM", vm)?;
            o.fields.insert(
                "power_state".into(),
                Value::str(if paused { "Paused" } else { "Running" }),
            );
            o.fields.insert("resident_on".into(), Value::str(host));
            db.emit(&sh.event_tx, limit, vm, "mod");
            Ok(Value::str(""))
        }
        ("VM", "pool_migrate") => {
            check_count(method, &params, 4)?;
            let vm = arg_str(args, 0, method)?;
            let host = arg_str(args, 1, method)?;
            db.obj("host", host)?;
            let o = db.obj("VM", vm)?;
            let state = o
                .fields
                .get("power_state")
                .and_then(Value::as_str)
                .unwrap_or("");
            if state != "Running" {
                return Err(fail(
                    "VM_BAD_POWER_STATE",
                    &[vm, "running", &state.to_lowercase()],
                ));
            }
            let need = o
                .fields
                .get("memory_static_max")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            let same_host = o.fields.get("resident_on").and_then(Value::as_str) == Some(host);
            let free = db.free_memory(host) + if same_host { need } else { 0 };
            if need > free {
                return Err(fail(
                    "HOST_NOT_ENOUGH_FREE_MEMORY",
                    &[&need.to_string(), &free.to_string()],
                ));
            }
            let o = db.obj_mut("VM", vm)?;
            o.fields.insert("resident_on".into(), Value::str(host));
            db.emit(&sh.event_tx, limit, vm, "mod");
            Ok(Value::str(""))
        }
        ("secret", "create") => {
            check_count(method, &params, 2)?;
            let rec = args[0]
                .as_struct()
                .ok_or_else(|| fail("FIELD_TYPE_ERROR", &["args"]))?;
            let value = rec
                .get("value")
                .and_then(Value::as_str)
                .ok_or_else(|| fail("FIELD_TYPE_ERROR", &["value"]))?;
            let r = new_ref();
            let mut f = BTreeMap::new();
            f.insert("uuid".into(), Value::str(new_uuid()));
            f.insert("value".into(), Value::str(value));
            f.insert(
                "other_config".into(),
                rec.get("other_config")
                    .cloned()
                    .unwrap_or_else(|| Value::Struct(BTreeMap::new())),
            );
            db.objects.insert(
                r.clone(),
                Obj {
                    class: "secret",
                    fields: f,
                },
            );
            db.emit(&sh.event_tx, limit, &r, "add");
            Ok(Value::String(r))
        }
        ("host", "compute_free_memory") => {
            check_count(method, &params, 2)?;
            let host = arg_str(args, 0, method)?;
            db.obj("host", host)?;
            Ok(Value::int64(db.free_memory(host)))
        }
        (_, "get_all") => {
            check_count(method, &params, 1)?;
            Ok(Value::Array(
                db.refs_of(class).into_iter().map(Value::String).collect(),
            ))
        }
        (_, "get_all_records") => {
            check_count(method, &params, 1)?;
            Ok(Value::Struct(
                db.objects
                    .iter()
                    .filter(|(_, o)| o.class == class)
                    .map(|(r, o)| (r.clone(), Value::Struct(o.fields.clone())))
                    .collect(),
            ))
        }
        (_, "get_record") => {
            check_count(method, &params, 2)?;
            let r = arg_str(args, 0, method)?;
            Ok(Value::Struct(db.obj(class, r)?.fields.clone()))
        }
        (_, "get_by_uuid") => {
            check_count(method, &params, 2)?;
            let u = arg_str(args, 0, method)?;
            db.objects
                .iter()
                .find(|(_, o)| {
                    o.class == class && o.fields.get("uuid").and_then(Value::as_str) == Some(u)
                })
                .map(|(r, _)| Value::str(r))
                .ok_or_else(|| fail("UUID_INVALID", &[class, u]))
        }
        (_, "get_by_name_label") if class != "pool" => {
            check_count(method, &params, 2)?;
            let n = arg_str(args, 0, method)?;
            Ok(Value::Array(
                db.objects
                    .iter()
                    .filter(|(_, o)| {
                        o.class == class
                            && o.fields.get("name_label").and_then(Value::as_str) == Some(n)
                    })
                    .map(|(r, _)| Value::str(r))
                    .collect(),
            ))
        }
        (_, v) if v.starts_with("add_to_") => {
            let field = &v["add_to_".len()..];
            if !WRITABLE_MAPS.contains(&field) {
                return Err(fail("MESSAGE_METHOD_UNKNOWN", &[method]));
            }
            check_count(method, &params, 4)?;
            let r = arg_str(args, 0, method)?;
            let k = arg_str(args, 1, method)?;
            let val = arg_str(args, 2, method)?;
            let o = db.obj_mut(class, r)?;
            let Some(Value::Struct(m)) = o.fields.get_mut(field) else {
                return Err(fail("MESSAGE_METHOD_UNKNOWN", &[method]));
            };
            if m.contains_key(k) {
                return Err(fail("MAP_DUPLICATE_KEY", &[class, field, r, k]));
            }
            m.insert(k.to_string(), Value::str(val));
            db.emit(&sh.event_tx, limit, r, "mod");
            Ok(Value::str(""))
        }
        (_, v) if v.starts_with("remove_from_") => {
            let field = &v["remove_from_".len()..];
            if !WRITABLE_MAPS.contains(&field) {
                return Err(fail("MESSAGE_METHOD_UNKNOWN", &[method]));
            }
            check_count(method, &params, 3)?;
            let r = arg_str(args, 0, method)?;
            let k = arg_str(args, 1, method)?;
            let o = db.obj_mut(class, r)?;
            if let Some(Value::Struct(m)) = o.fields.get_mut(field) {
                m.remove(k);
            }
            db.emit(&sh.event_tx, limit, r, "mod");
            Ok(Value::str(""))
        }
        (_, v) if v.starts_with("set_") => {
            let field = &v["set_".len()..];
            check_count(method, &params, 3)?;
            let r = arg_str(args, 0, method)?;
            let val = args[1].clone();
            let ok = (WRITABLE_MAPS.contains(&field) && val.as_struct().is_some())
                || (WRITABLE_STRINGS.contains(&field) && val.as_str().is_some());
            if !ok {
                if WRITABLE_MAPS.contains(&field) || WRITABLE_STRINGS.contains(&field) {
                    return Err(fail("FIELD_TYPE_ERROR", &[field]));
                }
                return Err(fail("MESSAGE_METHOD_UNKNOWN", &[method]));
            }
            let o = db.obj_mut(class, r)?;
            o.fields.insert(field.to_string(), val);
            db.emit(&sh.event_tx, limit, r, "mod");
            Ok(Value::str(""))
        }
        (_, v) if v.starts_with("get_") => {
            let field = &v["get_".len()..];
            check_count(method, &params, 2)?;
            let r = arg_str(args, 0, method)?;
            let o = db.obj(class, r)?;
            match o.fields.get(field) {
                Some(x) => Ok(x.clone()),
                None if MAP_FIELDS.contains(&field) => Ok(Value::Struct(BTreeMap::new())),
                None => Err(fail("MESSAGE_METHOD_UNKNOWN", &[method])),
            }
        }
        _ => Err(fail("MESSAGE_METHOD_UNKNOWN", &[method])),
    }
}

fn class_matches(filters: &[String], class: &str, r: &str) -> bool {
    filters.iter().any(|f| {
        f == "*" || f.eq_ignore_ascii_case(class) || {
            match f.split_once('/') {
                Some((c, fr)) => c.eq_ignore_ascii_case(class) && fr == r,
                None => false,
            }
        }
    })
}

fn event_value(id: u64, class: &str, op: &str, r: &str, snapshot: Option<Value>) -> Value {
    let mut m = BTreeMap::new();
    m.insert(
        "id".into(),
        Value::int64(i64::try_from(id).unwrap_or(i64::MAX)),
    );
    m.insert("timestamp".into(), Value::str(format!("{id}.0")));
    m.insert("class".into(), Value::str(class));
    m.insert("operation".into(), Value::str(op));
    m.insert("ref".into(), Value::str(r));
    m.insert(
        "obj_uuid".into(),
        Value::str(
            snapshot
                .as_ref()
                .and_then(|s| s.as_struct())
                .and_then(|s| s.get("uuid"))
                .and_then(Value::as_str)
                .unwrap_or(""),
        ),
    );
    if let Some(s) = snapshot {
        m.insert("snapshot".into(), s);
    }
    Value::Struct(m)
}

fn batch(events: Vec<Value>, token: u64) -> Value {
    let mut m = BTreeMap::new();
    m.insert("events".into(), Value::Array(events));
    m.insert("valid_ref_counts".into(), Value::Struct(BTreeMap::new()));
    m.insert("token".into(), Value::str(format!("{token:020}")));
    Value::Struct(m)
}

async fn event_from(sh: &Arc<Shared>, method: &str, args: &[Value]) -> ApiResult {
    if args.len() != 3 {
        return Err(fail(
            "MESSAGE_PARAMETER_COUNT_MISMATCH",
            &[method, "4", &(args.len() + 1).to_string()],
        ));
    }
    let filters: Vec<String> = args[0]
        .as_array()
        .ok_or_else(|| fail("FIELD_TYPE_ERROR", &["classes"]))?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let token = arg_str(args, 1, method)?;
    let timeout = match &args[2] {
        Value::Double(d) => *d,
        v => v.as_i64().map(|i| i as f64).unwrap_or(0.0),
    };
    let timeout = if timeout.is_finite() {
        timeout.clamp(0.0, MAX_EVENT_WAIT)
    } else {
        0.0
    };
    if token.is_empty() {
        let db = sh.lock();
        let events = db
            .objects
            .iter()
            .filter(|(r, o)| class_matches(&filters, &class_event_name(o.class), r))
            .map(|(r, o)| {
                event_value(
                    db.last_event,
                    &class_event_name(o.class),
                    "add",
                    r,
                    Some(Value::Struct(o.fields.clone())),
                )
            })
            .collect();
        return Ok(batch(events, db.last_event));
    }
    let since: u64 = token
        .trim()
        .parse()
        .map_err(|_| fail("EVENT_FROM_TOKEN_PARSE_FAILURE", &[token]))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(timeout);
    let mut rx = sh.event_tx.subscribe();
    loop {
        {
            let db = sh.lock();
            if since < db.dropped_upto {
                return Err(fail("EVENTS_LOST", &[]));
            }
            // One event per object: its latest state; "add" if created after the token.
            let mut per_obj: BTreeMap<&str, (u64, &'static str, &Ev)> = BTreeMap::new();
            for e in db.events.iter().filter(|e| e.id > since) {
                if !class_matches(&filters, &e.class, &e.obj_ref) {
                    continue;
                }
                let op = match per_obj.get(e.obj_ref.as_str()) {
                    Some((_, "add", _)) if e.op != "del" => "add",
                    _ => e.op,
                };
                per_obj.insert(e.obj_ref.as_str(), (e.id, op, e));
            }
            if !per_obj.is_empty() || tokio::time::Instant::now() >= deadline {
                let mut evs: Vec<_> = per_obj.into_values().collect();
                evs.sort_by_key(|(id, _, _)| *id);
                let events = evs
                    .into_iter()
                    .map(|(id, op, e)| {
                        event_value(id, &e.class, op, &e.obj_ref, e.snapshot.clone())
                    })
                    .collect();
                return Ok(batch(events, db.last_event.max(since)));
            }
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            // Loop once more to return an empty batch with the current token.
        }
    }
}

async fn call_plugin(sh: &Arc<Shared>, method: &str, session: &str, args: &[Value]) -> ApiResult {
    if args.len() != 4 {
        return Err(fail(
            "MESSAGE_PARAMETER_COUNT_MISMATCH",
            &[method, "5", &(args.len() + 1).to_string()],
        ));
    }
    let host = arg_str(args, 0, method)?;
    let plugin = arg_str(args, 1, method)?;
    let func = arg_str(args, 2, method)?;
    let fargs = args[3]
        .as_struct()
        .ok_or_else(|| fail("FIELD_TYPE_ERROR", &["args"]))?
        .clone();
    sh.lock().obj("host", host)?;
    let Some(dir) = &sh.cfg.plugin_dir else {
        return Err(fail("XENAPI_MISSING_PLUGIN", &[plugin]));
    };
    if plugin.is_empty() || plugin.contains('/') || plugin.starts_with('.') {
        return Err(fail("XENAPI_MISSING_PLUGIN", &[plugin]));
    }
    let path = dir.join(plugin);
    if !path.is_file() {
        return Err(fail("XENAPI_MISSING_PLUGIN", &[plugin]));
    }
    let call = xmlrpc::encode_call(func, &[Value::str(session), Value::Struct(fargs)]);
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(&path)
            .arg(call)
            .env("XENFT_URL", &sh.url)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let out = match out {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return Err(fail("XENAPI_PLUGIN_FAILURE", &["exec", "", &e.to_string()])),
        Err(_) => return Err(fail("XENAPI_PLUGIN_FAILURE", &["timeout", "", ""])),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        return Err(fail(
            "XENAPI_PLUGIN_FAILURE",
            &["non-zero exit", &stdout, &stderr],
        ));
    }
    match xmlrpc::decode_response(&stdout) {
        Ok(xmlrpc::Response::Success(v)) => match xenft_xapi::client::unwrap_envelope(v) {
            Ok(Value::String(s)) => Ok(Value::String(s)),
            Ok(other) => Err(fail(
                "XENAPI_PLUGIN_FAILURE",
                &["result is not a string", &format!("{other:?}"), ""],
            )),
            Err(xenft_xapi::XapiError::Api { code, params }) => Err((code, params)),
            Err(e) => Err(fail(
                "XENAPI_PLUGIN_FAILURE",
                &["bad envelope", &stdout, &e.to_string()],
            )),
        },
        Ok(xmlrpc::Response::Fault { code, message }) => Err(fail(
            "XENAPI_PLUGIN_FAILURE",
            &["fault", &code.to_string(), &message],
        )),
        Err(e) => Err(fail(
            "XENAPI_PLUGIN_FAILURE",
            &["unparsable output", &stdout, &e.to_string()],
        )),
    }
}
