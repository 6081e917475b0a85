//! The `xenft` command line, in `xe`'s style: `xenft <class>-<verb> key=value ...`.
//!
//! ```text
//! xenft pool-init alink:host1=10.1.0.1:7000,10.2.0.1:7000 alink:host2=10.1.0.2:7000,10.2.0.2:7000 quorum=10.0.0.9:7100
//! xenft pool-status
//! xenft host-list
//! xenft host-compat-check [host=NAME|UUID]
//! xenft vm-protect vm=web01 level=1|2|3 secondary=host2 [move=true [sr=NAME|UUID]]
//! xenft vm-unprotect vm=web01
//! xenft vm-status vm=web01
//! xenft vm-list
//! xenft vm-migrate vm=web01 host=host3 [live=true]
//! xenft event-list [classes=vm,pool] [timeout=10]
//! ```
//!
//! Output is a human table by default, `--json` for scripts, `--minimal` for a comma-separated
//! list of uuids (or the single value) as `xe --minimal` prints.
//!
//! Connection: `--url` / `XENFT_URL` / config `url=` (`https://pool-master`, `unix:/path`; in
//! dom0 the default is xapi's socket), `--user` / `XENFT_USER` / `user=` (default `root`), the
//! password from `--password-file` / `XENFT_PASSWORD_FILE` / `password_file=`, or prompted
//! without echo on a terminal. Never from the command line. The config file is `--config` /
//! `XENFT_CONFIG`, else `~/.config/xenft/config`, else `/etc/xenft/xenft.conf`: `key = value`
//! lines with keys `url`, `user`, `password_file`, `ca_file`, `pin_sha256`. TLS trust:
//! system roots by default, `--ca-file`, or `--pin-sha256` (xapi's self-signed certificate);
//! `--insecure` only when given, and logged.
//!
//! Exit codes ([`exit`]): 0 success; 1 XenAPI or other failure; 2 usage error; 3 cannot connect
//! or log in; 4 no such object (or ambiguous name); 5 refused by admission control or the
//! compatibility check; 6 registry malformed, from a newer xenft, or changed concurrently.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use crate::api::EventStream;
use crate::client::{ConnectOptions, Credentials, Protocol, XenApi};
use crate::disks;
use crate::error::{codes, XapiError};
use crate::ops::{self, OpError};
use crate::registry::{Level, Policy, RegistryError};
use crate::transport::{Endpoint, TlsOptions, XAPI_UNIX_SOCKET};

/// Exit codes.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// A XenAPI call or something else failed.
    pub const FAILURE: i32 = 1;
    /// Bad command line.
    pub const USAGE: i32 = 2;
    /// Cannot connect to xapi or log in.
    pub const CONNECT: i32 = 3;
    /// No such VM/host, or an ambiguous name.
    pub const NOT_FOUND: i32 = 4;
    /// Refused by admission control or the compatibility check.
    pub const REFUSED: i32 = 5;
    /// Registry malformed, from a newer xenft, or changed concurrently.
    pub const REGISTRY: i32 = 6;
}

/// Command-line arguments.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "xenft",
    about = "xenft: fault tolerance for Xen VMs (xe-style commands)",
    after_help = "Commands: pool-init pool-status host-list host-compat-check vm-protect \
                  vm-unprotect vm-status vm-list vm-migrate event-list\n\
                  Exit codes: 0 ok, 1 failure, 2 usage, 3 connect/login, 4 not found, \
                  5 refused, 6 registry"
)]
pub struct Args {
    /// xapi address: https://host, http://host:port, unix:/path.
    #[arg(long, env = "XENFT_URL")]
    pub url: Option<String>,
    /// User name.
    #[arg(long, short = 'u', env = "XENFT_USER")]
    pub user: Option<String>,
    /// File holding the password (first line).
    #[arg(long, env = "XENFT_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// Config file (`key = value` lines).
    #[arg(long, env = "XENFT_CONFIG")]
    pub config: Option<PathBuf>,
    /// PEM file of trusted certificates (pin xapi's certificate by putting it here).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Accept only xapi's certificate with this SHA-256 fingerprint.
    #[arg(long, env = "XENFT_PIN_SHA256")]
    pub pin_sha256: Option<String>,
    /// Do not verify xapi's TLS certificate (dangerous; logged).
    #[arg(long)]
    pub insecure: bool,
    /// Use JSON-RPC instead of XML-RPC.
    #[arg(long)]
    pub jsonrpc: bool,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
    /// Minimal output: uuids comma-separated, or the single value.
    #[arg(long)]
    pub minimal: bool,
    /// The command, `<class>-<verb>`.
    pub command: String,
    /// `key=value` parameters.
    pub params: Vec<String>,
}

/// A failure with its exit code and message.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub code: i32,
    /// Message for stderr.
    pub message: String,
}

impl CliError {
    fn usage(m: impl Into<String>) -> CliError {
        CliError {
            code: exit::USAGE,
            message: m.into(),
        }
    }
}

fn api_exit(e: &XapiError) -> i32 {
    match e {
        XapiError::Connect { .. }
        | XapiError::Timeout { .. }
        | XapiError::Http { .. }
        | XapiError::Config(_) => exit::CONNECT,
        e if e.is(codes::SESSION_AUTHENTICATION_FAILED) => exit::CONNECT,
        e if e.is(codes::HANDLE_INVALID) || e.is(codes::UUID_INVALID) => exit::NOT_FOUND,
        _ => exit::FAILURE,
    }
}

impl From<OpError> for CliError {
    fn from(e: OpError) -> CliError {
        let code = match &e {
            OpError::NotFound { .. } | OpError::Ambiguous { .. } => exit::NOT_FOUND,
            OpError::Refused(_) => exit::REFUSED,
            OpError::Invalid(_) => exit::USAGE,
            OpError::Registry(RegistryError::Api(a)) | OpError::Api(a) => api_exit(a),
            OpError::Registry(_) => exit::REGISTRY,
        };
        CliError {
            code,
            message: e.to_string(),
        }
    }
}

impl From<XapiError> for CliError {
    fn from(e: XapiError) -> CliError {
        CliError {
            code: api_exit(&e),
            message: e.to_string(),
        }
    }
}

const COMMANDS: &[(&str, &[&str])] = &[
    (
        "pool-init",
        &[
            "alink:*",
            "quorum",
            "secret-uuid",
            "secret-file",
            "heartbeat-ms",
            "failover",
            "force",
        ],
    ),
    ("pool-status", &[]),
    ("host-list", &[]),
    ("host-compat-check", &["host"]),
    ("vm-protect", &["vm", "level", "secondary", "move", "sr"]),
    ("vm-unprotect", &["vm"]),
    ("vm-status", &["vm"]),
    ("vm-list", &[]),
    ("vm-migrate", &["vm", "host", "live"]),
    ("event-list", &["classes", "timeout"]),
    ("lab-up", &[]),
    ("lab-down", &[]),
    ("lab-status", &[]),
    ("drill", &["vm", "fault"]),
];

/// `lab-*` and `drill`: the local two-host pool of this machine, run by the `xenft-lab`
/// binary installed next to this one (crate `xenft-lab`). `None` for every other command.
fn local_lab(a: &Args, p: &Params) -> Option<Result<(), CliError>> {
    let mut args: Vec<String> = match a.command.as_str() {
        "lab-up" => vec!["up".into()],
        "lab-down" => vec!["down".into()],
        "lab-status" => vec!["status".into()],
        "drill" => {
            if a.url.is_some() {
                return Some(Err(CliError::usage(
                    "drills run on the local pool only (xenft lab-up); drills on a real pool \
                     are not implemented",
                )));
            }
            if p.get("vm").is_some_and(|v| v != "vm1") {
                return Some(Err(CliError::usage("the local pool has one VM: vm1")));
            }
            let Some(fault) = p.get("fault") else {
                return Some(Err(CliError::usage(
                    "drill needs fault=host|alink|alinks|disk",
                )));
            };
            vec!["drill".into(), format!("fault={fault}")]
        }
        _ => return None,
    };
    if a.json && a.command == "drill" {
        args.push("--json".into());
    }
    let lab = std::env::current_exe()
        .map(|e| e.with_file_name("xenft-lab"))
        .unwrap_or_else(|_| PathBuf::from("xenft-lab"));
    Some(
        match std::process::Command::new(&lab).args(&args).status() {
            Ok(st) if st.success() => Ok(()),
            Ok(st) => Err(CliError {
                code: exit::FAILURE,
                message: format!("{} {}: {st}", lab.display(), args.join(" ")),
            }),
            Err(e) => Err(CliError {
                code: exit::FAILURE,
                message: format!("cannot run {}: {e}", lab.display()),
            }),
        },
    )
}

/// Parsed `key=value` parameters, checked against the command's allowed keys.
#[derive(Debug)]
struct Params(BTreeMap<String, String>);

impl Params {
    fn parse(cmd: &str, raw: &[String]) -> Result<Params, CliError> {
        let Some((_, allowed)) = COMMANDS.iter().find(|(c, _)| *c == cmd) else {
            let hint = ops::suggest(cmd, COMMANDS.iter().map(|(c, _)| *c))
                .map(|s| format!("; did you mean '{s}'?"))
                .unwrap_or_default();
            return Err(CliError::usage(format!("unknown command '{cmd}'{hint}")));
        };
        let mut m = BTreeMap::new();
        for p in raw {
            let Some((k, v)) = p.split_once('=') else {
                return Err(CliError::usage(format!("parameter '{p}' is not key=value")));
            };
            let ok = allowed.iter().any(|a| match a.strip_suffix('*') {
                Some(prefix) => k.starts_with(prefix) && k.len() > prefix.len(),
                None => *a == k,
            });
            if !ok {
                let hint = ops::suggest(k, allowed.iter().copied())
                    .map(|s| format!("; did you mean '{s}'?"))
                    .unwrap_or_default();
                return Err(CliError::usage(format!(
                    "{cmd} has no parameter '{k}'{hint} (allowed: {})",
                    allowed.join(", ")
                )));
            }
            if m.insert(k.to_string(), v.to_string()).is_some() {
                return Err(CliError::usage(format!("parameter '{k}' given twice")));
            }
        }
        Ok(Params(m))
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    fn req(&self, cmd: &str, k: &str) -> Result<&str, CliError> {
        self.get(k)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| CliError::usage(format!("{cmd} needs {k}=")))
    }

    fn bool(&self, k: &str, default: bool) -> Result<bool, CliError> {
        match self.get(k) {
            None => Ok(default),
            Some("true" | "yes" | "1") => Ok(true),
            Some("false" | "no" | "0") => Ok(false),
            Some(v) => Err(CliError::usage(format!("{k}={v}: expected true or false"))),
        }
    }
}

/// Settings read from a config file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FileConfig {
    /// `url`.
    pub url: Option<String>,
    /// `user`.
    pub user: Option<String>,
    /// `password_file`.
    pub password_file: Option<PathBuf>,
    /// `ca_file`.
    pub ca_file: Option<PathBuf>,
    /// `pin_sha256`.
    pub pin_sha256: Option<String>,
}

/// Parses a config file's text.
pub fn parse_config(text: &str, path: &Path) -> Result<FileConfig, CliError> {
    let mut c = FileConfig::default();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(CliError::usage(format!(
                "{}:{}: expected key = value",
                path.display(),
                i + 1
            )));
        };
        let v = v.trim().to_string();
        match k.trim() {
            "url" => c.url = Some(v),
            "user" => c.user = Some(v),
            "password_file" => c.password_file = Some(v.into()),
            "ca_file" => c.ca_file = Some(v.into()),
            "pin_sha256" => c.pin_sha256 = Some(v),
            "password" => {
                return Err(CliError::usage(format!(
                    "{}:{}: passwords do not go in the config file; use password_file",
                    path.display(),
                    i + 1
                )))
            }
            other => {
                return Err(CliError::usage(format!(
                    "{}:{}: unknown key '{other}' (url, user, password_file, ca_file, pin_sha256)",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    Ok(c)
}

fn load_config(explicit: Option<&Path>) -> Result<FileConfig, CliError> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None => {
            let mut v = Vec::new();
            if let Some(h) = std::env::var_os("HOME") {
                v.push(PathBuf::from(h).join(".config/xenft/config"));
            }
            v.push(PathBuf::from("/etc/xenft/xenft.conf"));
            v
        }
    };
    for p in candidates {
        match std::fs::read_to_string(&p) {
            Ok(t) => return parse_config(&t, &p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => {}
            Err(e) => {
                return Err(CliError::usage(format!(
                    "cannot read config {}: {e}",
                    p.display()
                )))
            }
        }
    }
    Ok(FileConfig::default())
}

fn read_password_file(p: &Path) -> Result<String, CliError> {
    let t = std::fs::read_to_string(p).map_err(|e| CliError {
        code: exit::CONNECT,
        message: format!("cannot read password file {}: {e}", p.display()),
    })?;
    Ok(t.lines().next().unwrap_or("").to_string())
}

fn prompt_password(user: &str) -> Result<String, CliError> {
    use nix::sys::termios::{self, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    let no_tty = || CliError {
        code: exit::CONNECT,
        message: "no password: use --password-file or XENFT_PASSWORD_FILE (stdin is not a \
                  terminal to prompt on)"
            .into(),
    };
    let old = termios::tcgetattr(&stdin).map_err(|_| no_tty())?;
    let mut quiet = old.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    eprint!("Password for {user}: ");
    let _ = std::io::stderr().flush();
    termios::tcsetattr(&stdin, SetArg::TCSANOW, &quiet).map_err(|_| no_tty())?;
    let mut line = String::new();
    let r = std::io::stdin().read_line(&mut line);
    let _ = termios::tcsetattr(&stdin, SetArg::TCSANOW, &old);
    eprintln!();
    r.map_err(|_| no_tty())?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Builds connection options from flags, environment (through clap) and config file.
pub fn connect_options(a: &Args) -> Result<ConnectOptions, CliError> {
    let file = load_config(a.config.as_deref())?;
    let url = a.url.clone().or(file.url).or_else(|| {
        Path::new(XAPI_UNIX_SOCKET)
            .exists()
            .then(|| format!("unix:{XAPI_UNIX_SOCKET}"))
    });
    let Some(url) = url else {
        return Err(CliError::usage(
            "no xapi address: use --url, XENFT_URL or url= in the config file",
        ));
    };
    let endpoint = Endpoint::parse(&url).map_err(|e| CliError::usage(e.to_string()))?;
    let user = a
        .user
        .clone()
        .or(file.user)
        .unwrap_or_else(|| "root".into());
    let password = match a.password_file.clone().or(file.password_file) {
        Some(p) => read_password_file(&p)?,
        // xapi trusts root on its local Unix socket.
        None if matches!(endpoint, Endpoint::Unix(_)) => String::new(),
        None => prompt_password(&user)?,
    };
    let mut o = ConnectOptions::new(endpoint, Credentials { user, password });
    o.tls = TlsOptions {
        ca_file: a.ca_file.clone().or(file.ca_file),
        pin_sha256: a.pin_sha256.clone().or(file.pin_sha256),
        insecure: a.insecure,
    };
    if a.jsonrpc {
        o.protocol = Protocol::JsonRpc;
    }
    Ok(o)
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Human,
    Json,
    Minimal,
}

fn json_out(out: &mut dyn Write, v: &impl serde::Serialize) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| CliError {
        code: exit::FAILURE,
        message: e.to_string(),
    })?;
    writeln!(out, "{s}").map_err(io_err)
}

// By value: it is used as `map_err(io_err)`.
#[allow(clippy::needless_pass_by_value)]
fn io_err(e: std::io::Error) -> CliError {
    CliError {
        code: exit::FAILURE,
        message: format!("cannot write output: {e}"),
    }
}

fn gib(b: i64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let g = b as f64 / f64::from(1u32 << 30);
    format!("{g:.1}G")
}

/// Runs one command; output to `out`. Returns the exit code's error on failure.
pub async fn run(a: &Args, out: &mut dyn Write) -> Result<(), CliError> {
    let cmd = a.command.as_str();
    let p = Params::parse(cmd, &a.params)?;
    if let Some(r) = local_lab(a, &p) {
        return r;
    }
    let fmt = match (a.json, a.minimal) {
        (true, true) => return Err(CliError::usage("--json and --minimal exclude each other")),
        (true, false) => Format::Json,
        (false, true) => Format::Minimal,
        _ => Format::Human,
    };
    // Validate arguments before connecting.
    let level = match p.get("level") {
        Some(l) => Some(
            Level::parse(l)
                .ok_or_else(|| CliError::usage(format!("level={l}: expected 1, 2 or 3")))?,
        ),
        None => None,
    };
    let api = XenApi::new(connect_options(a)?)?;
    let r = dispatch(&api, cmd, &p, level, fmt, out).await;
    let _ = api.logout().await;
    r
}

async fn dispatch(
    api: &XenApi,
    cmd: &str,
    p: &Params,
    level: Option<Level>,
    fmt: Format,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match cmd {
        "vm-protect" => {
            let vm = p.req(cmd, "vm")?;
            let secondary = p.req(cmd, "secondary")?;
            let level = level.ok_or_else(|| CliError::usage("vm-protect needs level=1|2|3"))?;
            let move_disks = p.bool("move", false)?;
            if p.get("sr").is_some() && !move_disks {
                return Err(CliError::usage("sr= names where move=true moves the disks"));
            }
            let (r, moved) = if move_disks {
                let m = disks::protect_moving(api, vm, level, secondary, p.get("sr")).await?;
                if fmt == Format::Json {
                    return json_out(out, &m);
                }
                (m.protected, m.moved)
            } else {
                (ops::protect(api, vm, level, secondary).await?, Vec::new())
            };
            if fmt == Format::Human {
                for m in &moved {
                    writeln!(
                        out,
                        "disk {} moved from SR {:?} into SR {:?} (VDI {} is now {})",
                        m.userdevice, m.from_sr, m.to_sr, m.from_vdi, m.to_vdi
                    )
                    .map_err(io_err)?;
                    if let Some(k) = &m.kept {
                        writeln!(
                            out,
                            "  the original VDI {k} is kept, detached, on SR {:?}: delete it \
                             (xe vdi-destroy uuid={k}) once the VM runs from the copy",
                            m.from_sr
                        )
                        .map_err(io_err)?;
                    }
                }
            }
            match fmt {
                Format::Json => json_out(out, &r)?,
                Format::Minimal => writeln!(out, "{}", r.vm).map_err(io_err)?,
                Format::Human => writeln!(
                    out,
                    "VM {} protected at level {} with secondary {} ({} needed, {} available there)",
                    r.name,
                    r.level.as_str(),
                    r.secondary_name,
                    gib(r.admission.vm_memory),
                    gib(r.admission.available)
                )
                .map_err(io_err)?,
            }
        }
        "vm-unprotect" => {
            let vm = p.req(cmd, "vm")?;
            let was = ops::unprotect(api, vm).await?;
            match fmt {
                Format::Json => {
                    json_out(out, &serde_json::json!({"vm": vm, "was_protected": was}))?;
                }
                Format::Minimal => writeln!(out, "{was}").map_err(io_err)?,
                Format::Human if was => writeln!(out, "VM {vm} unprotected").map_err(io_err)?,
                Format::Human => writeln!(out, "VM {vm} was not protected").map_err(io_err)?,
            }
        }
        "vm-status" => {
            let s = ops::status(api, p.req(cmd, "vm")?).await?;
            match fmt {
                Format::Json => json_out(out, &s)?,
                Format::Minimal => {
                    writeln!(out, "{}", s.level.map_or("", Level::as_str)).map_err(io_err)?;
                }
                Format::Human => vm_table(out, std::slice::from_ref(&s))?,
            }
        }
        "vm-list" => {
            let l = ops::list(api).await?;
            match fmt {
                Format::Json => json_out(out, &l)?,
                Format::Minimal => writeln!(
                    out,
                    "{}",
                    l.iter()
                        .map(|v| v.uuid.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                )
                .map_err(io_err)?,
                Format::Human => vm_table(out, &l)?,
            }
        }
        "host-list" => {
            let l = ops::host_list(api).await?;
            match fmt {
                Format::Json => json_out(out, &l)?,
                Format::Minimal => writeln!(
                    out,
                    "{}",
                    l.iter()
                        .map(|h| h.uuid.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                )
                .map_err(io_err)?,
                Format::Human => {
                    writeln!(
                        out,
                        "{:<16} {:<15} {:>8} {:>6} {:<7} A-LINKS",
                        "HOST", "ADDRESS", "FREE", "MASTER", "LEVELS"
                    )
                    .map_err(io_err)?;
                    for h in &l {
                        let levels = h.levels.as_ref().map_or("?".to_string(), |l| {
                            l.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
                        });
                        writeln!(
                            out,
                            "{:<16} {:<15} {:>8} {:>6} {:<7} {}",
                            h.name,
                            h.address,
                            gib(h.free_memory),
                            if h.master { "yes" } else { "" },
                            levels,
                            h.alinks.join(" ")
                        )
                        .map_err(io_err)?;
                    }
                }
            }
        }
        "host-compat-check" => {
            let hosts = api.host_get_all_records().await?;
            let names: Vec<String> = match p.get("host") {
                Some(h) => vec![h.to_string()],
                None => {
                    let mut v: Vec<_> = hosts.values().collect();
                    v.sort_by(|a, b| a.name_label.cmp(&b.name_label));
                    v.into_iter().map(|h| h.uuid.clone()).collect()
                }
            };
            let local = ops::LocalFacts::gather();
            let mut reports = Vec::new();
            for n in &names {
                reports.push(ops::compat_check(api, n, &local).await?);
            }
            match fmt {
                Format::Json => json_out(out, &reports)?,
                Format::Minimal => {
                    for r in &reports {
                        writeln!(
                            out,
                            "{}",
                            r.levels
                                .iter()
                                .map(u8::to_string)
                                .collect::<Vec<_>>()
                                .join(",")
                        )
                        .map_err(io_err)?;
                    }
                }
                Format::Human => {
                    for r in &reports {
                        let name = hosts
                            .values()
                            .find(|h| h.uuid == r.host)
                            .map_or(r.host.as_str(), |h| h.name_label.as_str());
                        writeln!(
                            out,
                            "{name}: levels {}{}",
                            if r.levels.is_empty() {
                                "none".to_string()
                            } else {
                                r.levels
                                    .iter()
                                    .map(u8::to_string)
                                    .collect::<Vec<_>>()
                                    .join(",")
                            },
                            if r.local_facts {
                                " (with local facts)"
                            } else {
                                " (XenAPI facts only)"
                            }
                        )
                        .map_err(io_err)?;
                        for reason in &r.reasons {
                            writeln!(out, "  - {reason}").map_err(io_err)?;
                        }
                        for fact in &r.facts {
                            writeln!(out, "  · {fact}").map_err(io_err)?;
                        }
                    }
                }
            }
        }
        "vm-migrate" => {
            let vm = p.req(cmd, "vm")?;
            let host = p.req(cmd, "host")?;
            let live = p.bool("live", false)?;
            ops::migrate(api, vm, host, live).await?;
            if fmt == Format::Human {
                writeln!(out, "VM {vm} migrated to {host}").map_err(io_err)?;
            } else if fmt == Format::Json {
                json_out(
                    out,
                    &serde_json::json!({"vm": vm, "host": host, "live": live}),
                )?;
            }
        }
        "pool-status" => {
            let s = ops::pool_status(api).await?;
            let registry_bad = s.registry_error.clone();
            match fmt {
                Format::Json => json_out(out, &s)?,
                Format::Minimal => writeln!(out, "{}", s.uuid).map_err(io_err)?,
                Format::Human => {
                    writeln!(
                        out,
                        "pool {} ({}): {} hosts, {} VMs",
                        s.name, s.uuid, s.hosts, s.vms
                    )
                    .map_err(io_err)?;
                    match (&s.registry, &s.registry_error) {
                        (Some(c), _) => {
                            writeln!(out, "registry: format {}, {} hosts with A-links, quorum [{}], failover {}",
                                c.format_version, c.hosts.len(), c.quorum_servers.join(", "), c.policy.failover)
                                .map_err(io_err)?;
                        }
                        (None, Some(e)) => writeln!(out, "registry: ERROR {e}").map_err(io_err)?,
                        (None, None) => {
                            writeln!(out, "registry: not initialised (xenft pool-init)")
                                .map_err(io_err)?;
                        }
                    }
                    for (l, n) in &s.protected {
                        writeln!(out, "protected at level {l}: {n}").map_err(io_err)?;
                    }
                }
            }
            if let Some(e) = registry_bad {
                return Err(CliError {
                    code: exit::REGISTRY,
                    message: e,
                });
            }
        }
        "pool-init" => {
            let mut req = ops::PoolInit {
                force: p.bool("force", false)?,
                secret_uuid: p.get("secret-uuid").map(str::to_string),
                ..Default::default()
            };
            if let Some(f) = p.get("secret-file") {
                let v = std::fs::read_to_string(f)
                    .map_err(|e| CliError::usage(format!("cannot read secret-file {f}: {e}")))?;
                let v = v.trim().to_string();
                if v.len() < 16 || v.len() > 4096 {
                    return Err(CliError::usage(
                        "secret-file must hold 16 to 4096 characters",
                    ));
                }
                req.secret_value = Some(v);
            }
            for (k, v) in &p.0 {
                if let Some(host) = k.strip_prefix("alink:") {
                    let addrs: Vec<String> = v
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect();
                    req.alinks.push((host.to_string(), addrs));
                }
            }
            if let Some(q) = p.get("quorum") {
                req.quorum_servers = q
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
            }
            let mut policy = Policy::default();
            if let Some(h) = p.get("heartbeat-ms") {
                policy.heartbeat_ms = h
                    .parse()
                    .ok()
                    .filter(|&n: &u32| (10..=10_000).contains(&n))
                    .ok_or_else(|| {
                        CliError::usage(format!("heartbeat-ms={h}: expected 10..10000"))
                    })?;
            }
            if let Some(f) = p.get("failover") {
                if f != "auto" && f != "manual" {
                    return Err(CliError::usage(format!(
                        "failover={f}: expected auto or manual"
                    )));
                }
                policy.failover = f.to_string();
            }
            req.policy = Some(policy);
            let c = ops::pool_init(api, &req).await?;
            match fmt {
                Format::Json => json_out(out, &c)?,
                Format::Minimal => {}
                Format::Human => writeln!(
                    out,
                    "pool initialised: {} hosts with A-links, {} quorum servers; XenCenter custom \
                     fields defined",
                    c.hosts.len(),
                    c.quorum_servers.len()
                )
                .map_err(io_err)?,
            }
        }
        "event-list" => {
            let classes: Vec<String> = p
                .get("classes")
                .unwrap_or("vm,pool,host")
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let secs: u64 = p
                .get("timeout")
                .unwrap_or("10")
                .parse()
                .map_err(|_| CliError::usage("timeout= expects whole seconds"))?;
            let refs: Vec<&str> = classes.iter().map(String::as_str).collect();
            let mut stream = EventStream::new(&refs);
            // Skip the initial snapshot; report changes from now on.
            stream.next(api, Duration::ZERO).await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                let b = stream.next(api, left).await?;
                for e in &b.events {
                    let name = e
                        .snapshot
                        .as_ref()
                        .and_then(|s| s.as_struct())
                        .and_then(|m| m.get("name_label"))
                        .and_then(|v| v.as_str())
                        .unwrap_or("")
                        .to_string();
                    match fmt {
                        Format::Json => writeln!(
                            out,
                            "{}",
                            serde_json::json!({"id": e.id, "class": e.class, "operation": e.operation,
                                               "ref": e.obj_ref, "name": name, "resynced": b.resynced})
                        )
                        .map_err(io_err)?,
                        _ => writeln!(out, "{} {} {:?} {} {}", e.id, e.class, e.operation, e.obj_ref, name)
                            .map_err(io_err)?,
                    }
                }
                out.flush().map_err(io_err)?;
            }
        }
        other => return Err(CliError::usage(format!("unknown command '{other}'"))),
    }
    Ok(())
}

fn vm_table(out: &mut dyn Write, l: &[ops::VmStatus]) -> Result<(), CliError> {
    writeln!(
        out,
        "{:<20} {:<9} {:<12} {:<5} {:<12} STATE",
        "VM", "POWER", "HOST", "LEVEL", "SECONDARY"
    )
    .map_err(io_err)?;
    for v in l {
        let state = match (&v.error, &v.state) {
            (Some(e), _) => format!("ERROR {e}"),
            (None, Some(s)) => s.clone(),
            _ => String::new(),
        };
        writeln!(
            out,
            "{:<20} {:<9} {:<12} {:<5} {:<12} {}",
            v.name,
            v.power_state,
            v.host.as_deref().unwrap_or("-"),
            v.level.map_or("-", Level::as_str),
            v.secondary.as_deref().unwrap_or("-"),
            state
        )
        .map_err(io_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_command_and_key_suggest_the_right_one() {
        let e = Params::parse("vm-protec", &[]).unwrap_err();
        assert_eq!(e.code, exit::USAGE);
        assert!(
            e.message.contains("did you mean 'vm-protect'"),
            "{}",
            e.message
        );
        let e = Params::parse("vm-protect", &["levl=2".into()]).unwrap_err();
        assert!(e.message.contains("did you mean 'level'"), "{}", e.message);
        assert!(Params::parse("vm-protect", &["level".into()]).is_err());
        let p = Params::parse("pool-init", &["alink:host1=1.2.3.4:5".into()]).unwrap();
        assert_eq!(p.get("alink:host1"), Some("1.2.3.4:5"));
    }

    #[test]
    fn drill_refuses_a_real_pool_a_missing_fault_and_other_vms() {
        use clap::Parser;
        let run = |argv: &[&str]| {
            let a = Args::parse_from(argv);
            let p = Params::parse(&a.command, &a.params).unwrap();
            local_lab(&a, &p).expect("a lab command").unwrap_err()
        };
        let e = run(&["xenft", "--url", "https://pool", "drill", "fault=host"]);
        assert!(e.message.contains("local pool only"), "{}", e.message);
        assert!(run(&["xenft", "drill"]).message.contains("fault="));
        assert!(run(&["xenft", "drill", "fault=host", "vm=db"])
            .message
            .contains("vm1"));
        let a = Args::parse_from(["xenft", "vm-list"]);
        assert!(local_lab(&a, &Params::parse("vm-list", &[]).unwrap()).is_none());
    }

    #[test]
    fn config_file_refuses_passwords_and_unknown_keys() {
        let p = Path::new("c");
        let c = parse_config("# x\nurl = https://a\nuser=admin\n", p).unwrap();
        assert_eq!(c.url.as_deref(), Some("https://a"));
        assert_eq!(c.user.as_deref(), Some("admin"));
        assert!(parse_config("password = x\n", p).is_err());
        assert!(parse_config("colour = red\n", p).is_err());
        assert!(parse_config("garbage\n", p).is_err());
    }
}
