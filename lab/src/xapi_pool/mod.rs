//! The local pool driven through XenAPI alone (`xenft-lab protect`): the XenAPI test server
//! (`xenft-fake-xapi`) is the pool's xapi in the quorum namespace, each host runs the
//! production `xenft-agent` with host-local configuration only and a hypervisor stand-in
//! ([`hypervisor`], the local pool's xenopsd), and protection is asked for the way a pool
//! administrator asks: `xenft pool-init` and `xenft vm-protect vm=vm1 level=3 secondary=host2`.
//! Everything else — membership, the A-link key, the VM's components (`xenft-blkback`,
//! `xenft-netback`, `xenft-checkpoint` with its synthetic guest), the first sync — the
//! agents do from the registry.
//!
//! ```text
//!   xftlab-quorum: xenft-quorum, xenft-fake-xapi (the pool's xapi, :8080 on each mgmt gateway)
//!   xftlab-host1 / host2: xenft-agent (config: who am I, where xapi is, directories, timing)
//!                         xenft-lab hypervisor (runs the VM where xapi says it runs)
//!                         the agent's components under <state>/<host>/run/<vm uuid>/
//!   xftlab-host1-vm / host2-vm: the VM process (xenft-lab vm: the service on its disk)
//!   xftlab-client: the client writing numbered records through the service
//! ```
//!
//! The `protect` row ([`protect`]) measures the time from the `vm-protect` command until
//! `xenft vm-status vm=vm1` reports the VM `protected`, then checks that the client's writes
//! are acknowledged through the protected VM and every acknowledged record reads back.

pub mod host;
pub mod hypervisor;
pub mod status;
pub mod vm;

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use std::process::Child;

use crate::pool::{pid_of, spawn_in, UpConfig};
use crate::state::{PoolRecord, StateDir};
use crate::topology::{
    self, Host, ALINK_IFS, ALINK_PORT, MGMT_HB_PORT, NS_CLIENT, NS_QUORUM, PROD_IF, QUORUM_PORT,
    STATUS_PORT, VIF_IF, VM_MAC,
};
use crate::{now_ms, LabError};

/// Port of the pool's xapi (the test server) in the quorum namespace.
pub const XAPI_PORT: u16 = 8080;
/// The protected VM's name in xapi.
pub const VM_NAME: &str = "vm1";
/// Port of the agents' availability console (on every address of the host; the page lists
/// the consoles by management address).
pub const CONSOLE_PORT: u16 = 8080;

/// Host `h`'s console, on the management network (reach it from the quorum namespace, which
/// routes that network).
#[must_use]
pub fn console_url(h: Host) -> String {
    format!("http://{}:{CONSOLE_PORT}/", h.mgmt_ip())
}

/// What the `protect` row found.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ProtectReport {
    /// `vm-protect` → `vm-status` says protected (ms).
    pub protect_ms: Option<u64>,
    /// The VM's `xenft.state` at the end.
    pub state: String,
    /// Client writes acknowledged once protected.
    pub acked_writes: u64,
    /// Acknowledged records missing when read back.
    pub missing: Option<u64>,
    /// Checks that failed.
    pub failures: Vec<String>,
}

impl ProtectReport {
    /// PASS: protected, served, nothing lost.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.failures.is_empty() && self.protect_ms.is_some() && self.missing == Some(0)
    }
}

impl std::fmt::Display for ProtectReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "protect vm1 through XenAPI (xenft vm-protect level=3)")?;
        writeln!(
            f,
            "  protected : {}",
            self.protect_ms.map_or_else(
                || "NOT REACHED".into(),
                |m| format!("{m} ms after vm-protect")
            )
        )?;
        writeln!(f, "  state     : {}", self.state)?;
        writeln!(
            f,
            "  data      : {} acknowledged writes, {} missing",
            self.acked_writes,
            self.missing
                .map_or_else(|| "NOT CHECKED".into(), |m| m.to_string())
        )?;
        for e in &self.failures {
            writeln!(f, "  FAILED    : {e}")?;
        }
        writeln!(
            f,
            "  verdict   : {}",
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

impl ProtectReport {
    /// The demo's summary row (the columns of [`crate::drill::table`]).
    #[must_use]
    pub fn row(&self) -> String {
        format!(
            "{:<10} {:<6} {:>10} {:>10} {:>14} {:>10}  {:<8} {}\n",
            "protect",
            "host1",
            "-",
            "-",
            self.missing.map_or_else(
                || "not checked".into(),
                |m| format!("{}/{m}", self.acked_writes)
            ),
            "-",
            if self.passed() { "PASS" } else { "FAIL" },
            self.protect_ms.map_or_else(
                || format!("not protected ({})", self.state),
                |ms| format!("xenft vm-protect level=3 -> vm-status protected in {ms} ms")
            )
        )
    }
}

/// A XenAPI client of the pool's xapi at `url`, logging in with the credential file (the
/// agent's format, `xenft_agent::xapi::follower::read_credentials`), each call at most
/// `timeout`.
///
/// # Errors
/// A bad URL or credential file.
pub(crate) fn connect(
    url: &str,
    credential_file: &Path,
    timeout: Duration,
) -> Result<xenft_xapi::XenApi, LabError> {
    let endpoint = xenft_xapi::transport::Endpoint::parse(url)
        .map_err(|e| LabError::component("xapi address", e))?;
    let creds = xenft_agent::xapi::follower::read_credentials(credential_file)
        .map_err(|e| LabError::component("xapi credentials", e))?;
    let mut opts = xenft_xapi::ConnectOptions::new(endpoint, creds);
    opts.timeout = timeout;
    xenft_xapi::XenApi::new(opts).map_err(|e| LabError::component("xapi client", e))
}

/// The pool's xapi as host `h` reaches it (its management gateway).
pub(crate) fn xapi_url(h: Host) -> String {
    format!("http://{}:{XAPI_PORT}", h.mgmt_gw())
}

/// Runs `xenft` against the pool's xapi from the quorum namespace; its standard output.
fn xenft(dir: &StateDir, exe: &Path, args: &[&str]) -> Result<String, LabError> {
    let bin = exe.with_file_name("xenft");
    let url = format!("http://127.0.0.1:{XAPI_PORT}");
    let creds = dir.file("xapi-password").display().to_string();
    let mut all = vec![
        "netns",
        "exec",
        NS_QUORUM,
        bin.to_str().unwrap_or("xenft"),
        "--url",
        &url,
        "-u",
        "root",
        "--password-file",
        &creds,
    ];
    all.extend_from_slice(args);
    topology::run("ip", &all)
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), LabError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| LabError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(path, data).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)
}

/// The command pausing (`stop`) or unpausing (`cont`) host `h`'s VM without xapi.
fn local_fence(dir: &StateDir, cfg: &UpConfig, h: Host, action: &str) -> Vec<String> {
    vec![
        cfg.exe.display().to_string(),
        "--dir".into(),
        dir.root().display().to_string(),
        "vm-signal".into(),
        "--host".into(),
        h.name().into(),
        action.into(),
    ]
}

/// Host `h`'s agent configuration: host-local facts only.
fn agent_config(dir: &StateDir, cfg: &UpConfig, h: Host) -> serde_json::Value {
    let home = dir.file(h.name());
    serde_json::json!({
        "host": h.name(),
        "secret_file": home.join("pool-secret"),
        "state_file": home.join("agent-state.json"),
        "timing": crate::pool::agent_timing(cfg.product_timing),
        "status": {"listen": format!("127.0.0.1:{STATUS_PORT}")},
        // The availability console: a login with the pool's xapi credentials or the token.
        "console": {
            "listen": format!("0.0.0.0:{CONSOLE_PORT}"),
            "token_file": dir.file("console-token"),
            "xapi_login": true
        },
        "xapi": {
            "url": xapi_url(h),
            "credential_file": dir.file("xapi-credentials"),
            "event_timeout_ms": 2000,
            "mgmt_port": MGMT_HB_PORT,
            // An isolated host cannot reach the pool's xapi: it pauses its VM itself (on
            // XCP-ng `xl pause {domid}`; here the VM process gets SIGSTOP / SIGCONT).
            "local_fence": {
                "pause": local_fence(dir, cfg, h, "stop"),
                "resume": local_fence(dir, cfg, h, "cont")
            },
            "components": {
                "run_dir": home.join("run"),
                "disk_dir": home.join("disks"),
                "relay": {"uplink": PROD_IF, "vif_name": VIF_IF},
                "checkpoint": {
                    "guest": {"synthetic": {
                        "binary": cfg.guest_binary,
                        "memory_mib": cfg.memory_mib
                    }},
                    "epoch_ms": cfg.epoch_ms
                }
            }
        }
    })
}

/// The processes `build` started, by name, for the caller to watch.
pub(crate) type Started = Vec<(&'static str, Child)>;

/// The binaries the pool runs, beside `xenft-lab`.
pub const BINARIES: [&str; 7] = [
    "xenft",
    "xenft-agent",
    "xenft-quorum",
    "xenft-fake-xapi",
    "xenft-blkback",
    "xenft-netback",
    "xenft-checkpoint",
];

/// Builds the pool (namespaces, quorum server, the pool's xapi with host1, host2 and vm1
/// running on host1, `xenft pool-init`, each host's agent configuration, the host processes
/// and the client) with nothing protected yet. Returns the pool record and the started
/// processes (name, child) for the caller to watch.
///
/// # Errors
/// A binary is missing, or a step fails.
pub(crate) fn build(dir: &StateDir, cfg: &UpConfig) -> Result<(PoolRecord, Started), LabError> {
    for bin in BINARIES {
        if !cfg.exe.with_file_name(bin).is_file() {
            return Err(LabError::WrongState(format!(
                "{bin} not found beside {}: build the workspace's binaries (`cargo build --workspace --bins`)",
                cfg.exe.display()
            )));
        }
    }
    if !cfg.guest_binary.is_file() {
        return Err(LabError::WrongState(format!(
            "{} not found: build it with `cargo build -p xenft-checkpoint --bins`",
            cfg.guest_binary.display()
        )));
    }
    // The pool's A-link key as text (xapi keeps secrets as strings); the quorum server reads
    // the same file, the agents get it from xapi.
    let mut key = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut key);
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    write_file(&dir.file("secret"), hex.as_bytes(), 0o600)?;
    write_file(&dir.file("xapi-password"), b"xenroot\n", 0o600)?;
    write_file(&dir.file("xapi-credentials"), b"root\nxenroot\n", 0o600)?;
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut key);
    let token: String = key.iter().map(|b| format!("{b:02x}")).collect();
    write_file(&dir.file("console-token"), token.as_bytes(), 0o600)?;
    topology::create()?;
    let root = dir.root().display().to_string();
    let lease = crate::pool::agent_timing(cfg.product_timing)
        .lease_ms
        .to_string();
    let quorum = spawn_in(
        dir,
        NS_QUORUM,
        &cfg.exe.with_file_name("xenft-quorum"),
        &[
            "--listen".into(),
            format!("0.0.0.0:{QUORUM_PORT}"),
            "--secret-file".into(),
            dir.file("secret").display().to_string(),
            "--lease-ms".into(),
            lease,
        ],
        "quorum.log",
    )?;
    let mut xapi_args = vec![
        "--listen".to_string(),
        format!("0.0.0.0:{XAPI_PORT}"),
        "--password-file".into(),
        dir.file("xapi-password").display().to_string(),
    ];
    for h in [Host::Host1, Host::Host2] {
        xapi_args.push("--host".into());
        xapi_args.push(format!("{}={}", h.name(), h.mgmt_ip()));
    }
    xapi_args.push("--vm".into());
    xapi_args.push(format!(
        "{VM_NAME}:{},disk={},mac={VM_MAC}",
        cfg.memory_mib.max(64),
        cfg.disk_mib << 20
    ));
    let xapi = spawn_in(
        dir,
        NS_QUORUM,
        &cfg.exe.with_file_name("xenft-fake-xapi"),
        &xapi_args,
        "xapi.log",
    )?;
    let mut procs = vec![("quorum", quorum), ("xapi", xapi)];
    wait_until(Duration::from_secs(10), "the pool's xapi answering", || {
        xenft(dir, &cfg.exe, &["host-list"]).is_ok()
    })?;
    let alink = |h: Host| {
        format!(
            "alink:{}={}",
            h.name(),
            (0..ALINK_IFS.len())
                .map(|p| format!("{}:{ALINK_PORT}", h.alink_ip(u8::try_from(p).unwrap_or(0))))
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    let secret_arg = format!("secret-file={}", dir.file("secret").display());
    let quorum_arg = format!("quorum={}", Host::Host1.quorum_addr());
    xenft(
        dir,
        &cfg.exe,
        &[
            "pool-init",
            &alink(Host::Host1),
            &alink(Host::Host2),
            &quorum_arg,
            &secret_arg,
        ],
    )?;
    let host_args = |h: Host| -> Vec<String> {
        vec![
            "--dir".into(),
            root.clone(),
            "host".into(),
            "--host".into(),
            h.name().into(),
        ]
    };
    let mut pids = Vec::new();
    for h in [Host::Host1, Host::Host2] {
        let home = dir.file(h.name());
        std::fs::create_dir_all(&home).map_err(|source| LabError::Io {
            path: home.clone(),
            source,
        })?;
        let text = serde_json::to_vec_pretty(&agent_config(dir, cfg, h))
            .map_err(|e| LabError::component("agent config", e))?;
        write_file(&home.join("agent.json"), &text, 0o600)?;
        let child = spawn_in(
            dir,
            h.netns(),
            &cfg.exe,
            &host_args(h),
            &format!("{}.log", h.name()),
        )?;
        pids.push(pid_of(&child)?);
        procs.push((h.name(), child));
    }
    let client = spawn_in(
        dir,
        NS_CLIENT,
        &cfg.exe,
        &["--dir".into(), root.clone(), "client".into()],
        "client.log",
    )?;
    let rec = PoolRecord {
        created_ms: now_ms(),
        host1_pid: pids[0],
        host2_pid: pids[1],
        client_pid: pid_of(&client)?,
        quorum_pid: pid_of(&procs[0].1)?,
        exe: cfg.exe.clone(),
        node_args: [host_args(Host::Host1), host_args(Host::Host2)],
    };
    procs.push(("client", client));
    dir.write_json(&dir.pool_file(), &rec)?;
    // The agents are up once their status API answers.
    for h in [Host::Host1, Host::Host2] {
        wait_until(
            Duration::from_secs(30),
            &format!("{}'s agent", h.name()),
            || {
                topology::run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        h.netns(),
                        "bash",
                        "-c",
                        &format!("exec 3<>/dev/tcp/127.0.0.1/{STATUS_PORT}"),
                    ],
                )
                .is_ok()
            },
        )?;
    }
    Ok((rec, procs))
}

/// The `protect` row: `xenft vm-protect vm=vm1 level=3 secondary=host2` through XenAPI, the
/// time until `xenft vm-status vm=vm1` says protected, then the client's writes through the
/// protected VM, every acknowledged one read back.
///
/// # Errors
/// `vm-protect` itself fails.
pub fn protect(dir: &StateDir, exe: &Path, timeout: Duration) -> Result<ProtectReport, LabError> {
    let mut report = ProtectReport {
        protect_ms: None,
        state: String::new(),
        acked_writes: 0,
        missing: None,
        failures: Vec::new(),
    };
    let t0 = Instant::now();
    xenft(
        dir,
        exe,
        &["vm-protect", "vm=vm1", "level=3", "secondary=host2"],
    )?;
    while t0.elapsed() < timeout {
        report.state = vm_state(dir, exe).unwrap_or_else(|e| format!("unknown ({e})"));
        if report.state.starts_with("protected") {
            report.protect_ms = Some(u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if report.protect_ms.is_none() {
        report.failures.push(format!(
            "not protected {} s after vm-protect (state: {})",
            timeout.as_secs(),
            report.state
        ));
        return Ok(report);
    }
    // The protected VM serves: fresh acknowledgements, then every one reads back.
    let since = now_ms();
    let served = wait_until(
        Duration::from_secs(30),
        "the client's writes acknowledged",
        || {
            dir.acks()
                .is_ok_and(|a| a.iter().filter(|x| x.1 > since).count() >= 20)
        },
    );
    if let Err(e) = served {
        report.failures.push(e.to_string());
    }
    let acks = dir.acks()?;
    report.acked_writes = u64::try_from(acks.len()).unwrap_or(u64::MAX);
    if let Some(&(last, _)) = acks.last() {
        match crate::drill::check_records(exe, last) {
            Ok(c) => {
                report.missing = Some(c.missing);
                if c.missing > 0 {
                    report.failures.push(format!(
                        "{} acknowledged writes missing (first #{})",
                        c.missing, c.first_missing
                    ));
                }
            }
            Err(e) => report
                .failures
                .push(format!("data check could not run: {e}")),
        }
    } else {
        report
            .failures
            .push("the client has no acknowledged writes".into());
    }
    report.state = vm_state(dir, exe).unwrap_or_else(|e| format!("unknown ({e})"));
    dir.write_json(&dir.file("protect.json"), &report)?;
    Ok(report)
}

/// Host `h`'s copy of vm1's disk (the agent keeps it as `<disk_dir>/<vm uuid>.img`).
#[must_use]
pub fn disk_file(dir: &StateDir, h: Host) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir.file(h.name()).join("disks"))
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "img"))
}

/// The VM's `xenft.state`, as `xenft vm-status` reports it.
fn vm_state(dir: &StateDir, exe: &Path) -> Result<String, LabError> {
    let out = xenft(dir, exe, &["--json", "vm-status", "vm=vm1"])?;
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).map_err(|e| LabError::component("vm-status", e))?;
    Ok(v["state"].as_str().unwrap_or("-").to_string())
}

fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<(), LabError> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > timeout {
            return Err(LabError::Timeout(format!(
                "{what}: not within {} s",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
