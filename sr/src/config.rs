//! What the plugin knows: host-local facts ([`HostConfig`], a file on each host) and the SR's
//! pool-wide configuration ([`DeviceConfig`], xapi's `device-config`), plus the checked
//! readers of call arguments ([`Args`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{SrError, SrResult};

/// Default host configuration file; `XENFT_SR_CONFIG` names another.
pub const CONFIG_FILE: &str = "/etc/xenft/sr.json";

/// Host-local facts. Every field has a default, so a host without the file works when its
/// hostname is the name the SR's `hosts` uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// This host's name in the SR's `hosts` (default: the hostname).
    #[serde(default)]
    pub host: Option<String>,
    /// Volume disk files and SR state: `<state_dir>/<sr uuid>/`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Per-volume sockets, pid and log: `<run_dir>/<sr uuid>/<volume>/`.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// `xenft-blkback`.
    #[serde(default = "default_blkback")]
    pub blkback: PathBuf,
    /// The command that runs this same program on the other host of the pair (argv; the
    /// method name is appended, the arguments go to its stdin as JSON). Without it, the peer
    /// is never told anything: its copy is created when it first serves as secondary.
    #[serde(default)]
    pub peer_command: Vec<String>,
}

fn default_state_dir() -> PathBuf {
    "/var/lib/xenft/sr".into()
}
fn default_run_dir() -> PathBuf {
    "/run/xenft/sr".into()
}
fn default_blkback() -> PathBuf {
    "/usr/bin/xenft-blkback".into()
}

impl HostConfig {
    /// Every field at its default (what a host without the file has).
    #[must_use]
    pub fn defaults() -> Self {
        Self {
            host: None,
            state_dir: default_state_dir(),
            run_dir: default_run_dir(),
            blkback: default_blkback(),
            peer_command: Vec::new(),
        }
    }

    /// Reads `XENFT_SR_CONFIG` or [`CONFIG_FILE`]; a missing default file means defaults.
    pub fn load() -> SrResult<Self> {
        let (path, explicit) = match std::env::var_os("XENFT_SR_CONFIG") {
            Some(p) => (PathBuf::from(p), true),
            None => (PathBuf::from(CONFIG_FILE), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => "{}".into(),
            Err(e) => return Err(SrError::failed(format!("{}: {e}", path.display()))),
        };
        serde_json::from_str(&text)
            .map_err(|e| SrError::failed(format!("host configuration {}: {e}", path.display())))
    }

    /// This host's name.
    pub fn me(&self) -> SrResult<String> {
        if let Some(h) = &self.host {
            return Ok(h.clone());
        }
        let h =
            nix::sys::utsname::uname().map_err(|e| SrError::failed(format!("hostname: {e}")))?;
        Ok(h.nodename().to_string_lossy().into_owned())
    }
}

/// The SR's configuration (xapi's `device-config`, the same on both hosts):
/// `hosts=A,B`, `alink=A_IP:PORT=B_IP:PORT[,...]` (each A-link path as A's address = B's
/// address; volume `slot` uses `PORT + slot` on both ends), `secret-file=PATH` (the pool
/// secret, same path on both hosts), optional `write-through=true|false` (default true) and
/// `uuid` (set by `SR.create`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// The pair: `[A, B]`.
    pub hosts: [String; 2],
    /// A-link paths as `(A address, B address)`.
    pub alink: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
    /// Pool secret file.
    pub secret_file: PathBuf,
    /// Writes durable on both hosts before their reply (tapdisk never flushes).
    pub write_through: bool,
    /// The SR's uuid.
    pub uuid: Option<String>,
}

/// Most volumes (A-link port slots) per SR.
pub const MAX_SLOTS: u16 = 512;

impl DeviceConfig {
    /// Parses xapi's `configuration` dictionary.
    pub fn parse(v: &Value) -> SrResult<Self> {
        let m = v
            .as_object()
            .ok_or_else(|| SrError::bad_args("configuration: not a JSON object"))?;
        let get = |k: &str| -> SrResult<&str> {
            m.get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| SrError::bad_args(format!("device-config: {k} is missing")))
        };
        let hosts: Vec<&str> = get("hosts")?.split(',').map(str::trim).collect();
        let [a, b] = hosts[..] else {
            return Err(SrError::bad_args(
                "device-config: hosts must name exactly two hosts, A,B",
            ));
        };
        if a == b || !safe_name(a) || !safe_name(b) {
            return Err(SrError::bad_args(format!(
                "device-config: hosts {a:?},{b:?}: two different names of letters, digits, '.', '-', '_'"
            )));
        }
        let mut alink = Vec::new();
        for p in get("alink")?.split(',').filter(|s| !s.trim().is_empty()) {
            let (x, y) = p.trim().split_once('=').ok_or_else(|| {
                SrError::bad_args(format!("device-config: alink path {p:?} is not A=B"))
            })?;
            let addr = |s: &str| {
                s.parse::<std::net::SocketAddr>().map_err(|_| {
                    SrError::bad_args(format!("device-config: alink address {s:?} is not IP:PORT"))
                })
            };
            let (x, y) = (addr(x)?, addr(y)?);
            if u32::from(x.port().max(y.port())) + u32::from(MAX_SLOTS) > 65535 {
                return Err(SrError::bad_args(format!(
                    "device-config: alink port of {p:?} leaves no room for {MAX_SLOTS} volumes"
                )));
            }
            alink.push((x, y));
        }
        if alink.is_empty() {
            return Err(SrError::bad_args("device-config: alink names no path"));
        }
        let secret_file = PathBuf::from(get("secret-file")?);
        if !secret_file.is_absolute() {
            return Err(SrError::bad_args(
                "device-config: secret-file must be an absolute path",
            ));
        }
        let write_through = match m.get("write-through").and_then(Value::as_str) {
            None | Some("true") => true,
            Some("false") => false,
            Some(o) => {
                return Err(SrError::bad_args(format!(
                    "device-config: write-through {o:?} is not true or false"
                )))
            }
        };
        let uuid = match m.get("uuid").and_then(Value::as_str) {
            Some(u) => Some(check_id("device-config uuid", u)?.to_string()),
            None => None,
        };
        Ok(Self {
            hosts: [a.to_string(), b.to_string()],
            alink,
            secret_file,
            write_through,
            uuid,
        })
    }

    /// Back to xapi's dictionary form.
    #[must_use]
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("hosts".into(), self.hosts.join(",").into());
        let paths: Vec<String> = self.alink.iter().map(|(a, b)| format!("{a}={b}")).collect();
        m.insert("alink".into(), paths.join(",").into());
        m.insert(
            "secret-file".into(),
            self.secret_file.display().to_string().into(),
        );
        m.insert(
            "write-through".into(),
            self.write_through.to_string().into(),
        );
        if let Some(u) = &self.uuid {
            m.insert("uuid".into(), u.clone().into());
        }
        Value::Object(m)
    }

    /// The other host of the pair, seen from `me`.
    pub fn peer_of(&self, me: &str) -> SrResult<&str> {
        match &self.hosts {
            [a, b] if a == me => Ok(b),
            [a, b] if b == me => Ok(a),
            _ => Err(SrError::failed(format!(
                "this host ({me}) is not one of the SR's hosts {:?}: set \"host\" in {CONFIG_FILE}",
                self.hosts
            ))),
        }
    }

    /// `--alink-path LOCAL=PEER` values for volume `slot`, seen from `me`.
    pub fn alink_paths(&self, me: &str, slot: u16) -> SrResult<Vec<String>> {
        let a_side = self.hosts[0] == me;
        self.peer_of(me)?;
        let at = |mut s: std::net::SocketAddr| {
            s.set_port(s.port() + slot);
            s
        };
        Ok(self
            .alink
            .iter()
            .map(|(a, b)| {
                let (l, p) = if a_side { (*a, *b) } else { (*b, *a) };
                format!("{}={}", at(l), at(p))
            })
            .collect())
    }
}

/// A host name we put on a command line.
fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// An SR uuid or volume key: it becomes a path component, so letters, digits and '-' only.
pub fn check_id<'a>(what: &str, s: &'a str) -> SrResult<&'a str> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(SrError::bad_args(format!(
            "{what} {s:?}: 1 to 64 letters, digits or '-'"
        )));
    }
    Ok(s)
}

/// The call's arguments (a JSON object of named parameters) with checked accessors.
pub struct Args<'a>(pub &'a Map<String, Value>);

impl<'a> Args<'a> {
    /// Wraps the parsed stdin; it must be an object.
    pub fn new(v: &'a Value) -> SrResult<Self> {
        v.as_object()
            .map(Args)
            .ok_or_else(|| SrError::bad_args("arguments: not a JSON object of named parameters"))
    }

    /// A string parameter.
    pub fn str(&self, k: &str) -> SrResult<&'a str> {
        match self.0.get(k) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(SrError::bad_args(format!("argument {k}: not a string"))),
            None => Err(SrError::bad_args(format!("argument {k} is missing"))),
        }
    }

    /// An int64 parameter that must be >= 0.
    pub fn size(&self, k: &str) -> SrResult<u64> {
        match self.0.get(k) {
            Some(v) => v.as_u64().ok_or_else(|| {
                SrError::bad_args(format!("argument {k}: not a non-negative integer"))
            }),
            None => Err(SrError::bad_args(format!("argument {k} is missing"))),
        }
    }

    /// A raw parameter.
    pub fn value(&self, k: &str) -> SrResult<&'a Value> {
        self.0
            .get(k)
            .ok_or_else(|| SrError::bad_args(format!("argument {k} is missing")))
    }
}

/// `dir/name` after checking `name` is one safe path component.
pub fn under(dir: &Path, what: &str, name: &str) -> SrResult<PathBuf> {
    Ok(dir.join(check_id(what, name)?))
}
