//! Two hosts of real processes in network namespaces: each runs `xenft-agent` (drivers
//! "real"), `xenft-blkback` and `xenft-netback` built from the workspace.
//!
//! ```text
//!  h1 ── al0 (10.60.0.0/24), al1 (10.61.0.0/24), mgmt (10.62.0.0/24) ── h2
//!  h1 up0 ── sw:pa ┐
//!  h2 up0 ── sw:pb ┼─ br0        client eth0 ── sw:pc ┘
//!  each host: vif0 ── vm0 (a veth pair standing in for the VM's vif)
//! ```
//! The agents use UDP heartbeats on port 7480 over al0/al1/mgmt and no quorum server (the
//! two-host rule); blkback mirrors over its own A-link on port 7490. VM vm1 is level 2,
//! primary h1; its "domain" is a `sleep` process whose pid file lets the fixture kill it.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use xenft_control::{blkback, Blkback};
pub use xenft_tests::components::{
    blkback_status, checkpoint_status, netback_counters, outcome_json,
};
use xenft_tests::netns::{veth, Netns};

pub const SECRET: &str = "agent-shims-pool-secret-0123456789";
pub const VM_MAC: &str = "00:16:3e:00:00:42";
pub const VM_MAC_BYTES: [u8; 6] = [0x00, 0x16, 0x3e, 0x00, 0x00, 0x42];
pub const VM_IP: [u8; 4] = [10, 70, 0, 42];
pub const DISK: &str = "128M";
pub const MIB: u64 = 1 << 20;

/// The workspace binaries, built once (a no-op after a workspace build).
pub struct Bins {
    pub agent: PathBuf,
    pub blkback: PathBuf,
    pub netback: PathBuf,
    pub checkpoint: PathBuf,
}

pub fn bins() -> Bins {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let t = xenft_tests::lab::target_dir();
    // Same profile as this binary (a benchmark runs from target/release).
    let release = t.file_name().is_some_and(|n| n == "release");
    let st = Command::new(cargo)
        .arg("build")
        .args(release.then_some("--release"))
        .args([
            "-q",
            "-p",
            "xenft-agent",
            "-p",
            "xenft-blkback",
            "-p",
            "xenft-netback",
            "-p",
            "xenft-checkpoint",
            "--bins",
            "--manifest-path",
        ])
        .arg(manifest)
        .status()
        .expect("run cargo build");
    assert!(st.success(), "building the agent and shim binaries failed");
    Bins {
        agent: t.join("xenft-agent"),
        blkback: t.join("xenft-blkback"),
        netback: t.join("xenft-netback"),
        checkpoint: t.join("xenft-checkpoint"),
    }
}

/// One host's processes.
#[derive(Default)]
pub struct HostProcs {
    pub agent: Option<Child>,
    pub blkback: Option<Child>,
    pub netback: Option<Child>,
    /// The checkpoint engine (level 3).
    pub checkpoint: Option<Child>,
}

impl HostProcs {
    /// SIGKILL of every process of the host, and of the VM process its agent started.
    pub fn kill_all(&mut self, vm_pid_file: &Path) {
        for c in [
            &mut self.agent,
            &mut self.blkback,
            &mut self.netback,
            &mut self.checkpoint,
        ] {
            if let Some(mut c) = c.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        kill_pid_file(vm_pid_file);
    }
}

fn kill_pid_file(p: &Path) {
    if let Some(pid) = std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

pub struct Pool {
    pub bins: Bins,
    /// vm1's protection level (2 unless a test says 3).
    pub level: u8,
    pub dir: tempfile::TempDir,
    pub procs: [HostProcs; 2],
    // Namespaces last: processes die before their namespaces go.
    pub h: [Netns; 2],
    pub sw: Netns,
    pub client: Netns,
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Ok(keep) = std::env::var("XENFT_KEEP_LOGS") {
            for f in [
                "agent-h1.log",
                "agent-h2.log",
                "blk-h1.log",
                "blk-h2.log",
                "net-h1.log",
                "net-h2.log",
                "ck-h1.log",
                "ck-h2.log",
            ] {
                let _ = std::fs::copy(self.dir.path().join(f), Path::new(&keep).join(f));
            }
        }
        for i in 0..2 {
            let pid = self.vm_pid_file(i);
            self.procs[i].kill_all(&pid);
        }
    }
}

fn bare_pair_in(ns: &Netns, a: &str, b: &str) {
    ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b])
        .unwrap();
    ns.ip(&["link", "set", a, "up"]).unwrap();
    ns.ip(&["link", "set", b, "up"]).unwrap();
}

fn bare_veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    veth(a, a_if, "192.0.2.1/32", b, b_if, "192.0.2.2/32").unwrap();
    a.ip(&["addr", "flush", "dev", a_if]).unwrap();
    b.ip(&["addr", "flush", "dev", b_if]).unwrap();
}

impl Pool {
    /// The namespaces and links; no process yet.
    pub fn new() -> Self {
        let bins = bins();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        let h = [Netns::new().unwrap(), Netns::new().unwrap()];
        let sw = Netns::new().unwrap();
        let client = Netns::new().unwrap();
        veth(&h[0], "al0", "10.60.0.1/24", &h[1], "al0", "10.60.0.2/24").unwrap();
        veth(&h[0], "al1", "10.61.0.1/24", &h[1], "al1", "10.61.0.2/24").unwrap();
        veth(&h[0], "mgmt", "10.62.0.1/24", &h[1], "mgmt", "10.62.0.2/24").unwrap();
        sw.ip(&["link", "add", "br0", "type", "bridge", "stp_state", "0"])
            .unwrap();
        sw.ip(&["link", "set", "br0", "up"]).unwrap();
        bare_veth(&h[0], "up0", &sw, "pa");
        bare_veth(&h[1], "up0", &sw, "pb");
        bare_veth(&client, "eth0", &sw, "pc");
        for port in ["pa", "pb", "pc"] {
            sw.ip(&["link", "set", port, "master", "br0"]).unwrap();
        }
        for ns in &h {
            bare_pair_in(ns, "vif0", "vm0");
        }
        Self {
            bins,
            level: 2,
            dir,
            procs: [HostProcs::default(), HostProcs::default()],
            h,
            sw,
            client,
        }
    }

    pub fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn vm_pid_file(&self, i: usize) -> PathBuf {
        self.p(&format!("vm-h{}.pid", i + 1))
    }

    pub fn blk_ctl(&self, i: usize) -> PathBuf {
        self.p(&format!("blk-h{}.ctl", i + 1))
    }

    pub fn ckpt_ctl(&self, i: usize) -> PathBuf {
        self.p(&format!("ck-h{}.ctl", i + 1))
    }

    pub fn net_ctl(&self, i: usize) -> PathBuf {
        self.p(&format!("net-h{}.ctl", i + 1))
    }

    /// Starts the checkpoint engine of vm1 on host `i`: `secondary` (listens, control socket)
    /// or `primary` (a synthetic guest protected towards the secondary, stamping blkback's
    /// epochs through its control socket).
    pub fn start_checkpoint(&mut self, i: usize, role: &str) {
        let xs = |v: &[&str]| v.iter().map(|x| (*x).to_string()).collect::<Vec<_>>();
        let sock = self.p("ck.sock").display().to_string();
        let mut args = xs(&[role, "--memory-mib", "16"]);
        if role == "secondary" {
            args.extend(xs(&["--listen", &sock, "--control"]));
            args.push(self.ckpt_ctl(i).display().to_string());
            // After a take-over it protects the resumed guest as `primary` would.
            args.push("--blkback-control".into());
            args.push(self.blk_ctl(i).display().to_string());
            args.push("--netback-control".into());
            args.push(self.net_ctl(i).display().to_string());
        } else {
            args.extend(xs(&[
                "--connect",
                &sock,
                "--epoch-ms",
                "25",
                "--blkback-control",
            ]));
            args.push(self.blk_ctl(i).display().to_string());
            args.push("--netback-control".into());
            args.push(self.net_ctl(i).display().to_string());
        }
        let c = self.spawn(
            i,
            &self.bins.checkpoint.clone(),
            &args,
            &format!("ck-h{}.log", i + 1),
        );
        self.procs[i].checkpoint = Some(c);
    }

    pub fn nbd_sock(&self, i: usize) -> PathBuf {
        self.p(&format!("nbd-h{}.sock", i + 1))
    }

    pub fn nbd_uri(&self, i: usize) -> String {
        nbd_unix_uri(&self.nbd_sock(i))
    }

    fn spawn(&self, i: usize, bin: &Path, args: &[String], log: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.p(log))
            .unwrap();
        xenft_lab::spawn_logged(self.h[i].command(bin.to_str().unwrap()).args(args), log).unwrap()
    }

    /// Starts host `i`'s blkback: `primary` or `secondary` (the disk is created sparse).
    pub fn start_blkback(&mut self, i: usize, role: &str) {
        let (a, b) = (i + 1, 2 - i);
        let s = |x: &str| x.to_string();
        let mut args = vec![
            s("--role"),
            s(role),
            s("--disk"),
            self.p(&format!("disk-h{a}.img")).display().to_string(),
            s("--size"),
            s(DISK),
            s("--nbd-unix"),
            self.nbd_sock(i).display().to_string(),
            s("--control"),
            self.blk_ctl(i).display().to_string(),
            s("--host"),
            format!("h{a}"),
            s("--peer-host"),
            format!("h{b}"),
            s("--secret-file"),
            self.p("secret").display().to_string(),
            s("--alink-path-timeout-ms"),
            s("400"),
        ];
        for net in [60, 61] {
            args.push(s("--alink-path"));
            args.push(format!("10.{net}.0.{a}:7490=10.{net}.0.{b}:7490"));
        }
        let c = self.spawn(
            i,
            &self.bins.blkback.clone(),
            &args,
            &format!("blk-h{a}.log"),
        );
        self.procs[i].blkback = Some(c);
    }

    /// Starts host `i`'s netback in `mode` (`passthrough` on the primary, `standby` on the
    /// secondary).
    pub fn start_netback(&mut self, i: usize, mode: &str) {
        let a = i + 1;
        let args: Vec<String> = [
            "--vif",
            "vif0",
            "--uplink",
            "up0",
            "--mac",
            VM_MAC,
            "--mode",
            mode,
            "--control",
        ]
        .iter()
        .map(|x| (*x).to_string())
        .chain(std::iter::once(self.net_ctl(i).display().to_string()))
        .collect();
        let c = self.spawn(
            i,
            &self.bins.netback.clone(),
            &args,
            &format!("net-h{a}.log"),
        );
        self.procs[i].netback = Some(c);
    }

    fn agent_config(&self, i: usize) -> PathBuf {
        let (a, b) = (i + 1, 2 - i);
        let vm_pid = self.vm_pid_file(i);
        let cfg = serde_json::json!({
            "host": format!("h{a}"),
            "secret_file": self.p("secret"),
            "state_file": self.p(&format!("state-h{a}.json")),
            "peers": [{
                "host": format!("h{b}"),
                "alink": [
                    {"local": format!("10.60.0.{a}:7480"), "peer": format!("10.60.0.{b}:7480")},
                    {"local": format!("10.61.0.{a}:7480"), "peer": format!("10.61.0.{b}:7480")}
                ],
                "mgmt": {"local": format!("10.62.0.{a}:7480"), "peer": format!("10.62.0.{b}:7480")}
            }],
            "vms": [{"vm": "vm1", "level": self.level, "primary": "h1", "secondary": "h2", "memory_mb": 256}],
            "free_memory_mb": 4096,
            "drivers": "real",
            "vm_drivers": {"vm1": {
                "domain": {"command": ["sh", "-c",
                    format!("echo $$ > {}; exec sleep 55", vm_pid.display())]},
                "blkback": {"control": self.blk_ctl(i), "sync_timeout_ms": 30000},
                "netback": {"control": self.net_ctl(i),
                            "addresses": ["10.70.0.42"]}
            }}
        });
        let mut cfg = cfg;
        if self.level == 3 {
            // The VM is the `sleep` process beside the engine's synthetic guest: a take-over
            // resumes the memory, then the agent starts the process.
            cfg["vm_drivers"]["vm1"]["domain"]["after_resume"] = serde_json::json!("start");
            cfg["vm_drivers"]["vm1"]["checkpoint"] = serde_json::json!({"control": self.ckpt_ctl(i), "request_timeout_ms": 10000,
                                   "peer_listen": self.p("ck.sock")});
        }
        if self.level == 1 {
            // Level 1: no shims, the VM restarts from its (shared) disk.
            if let Some(d) = cfg["vm_drivers"]["vm1"].as_object_mut() {
                d.remove("blkback");
                d.remove("netback");
            }
        }
        let p = self.p(&format!("agent-h{a}.json"));
        std::fs::write(&p, cfg.to_string()).unwrap();
        p
    }

    pub fn start_agent(&mut self, i: usize) {
        let cfg = self.agent_config(i);
        let args = vec!["--config".to_string(), cfg.display().to_string()];
        let c = self.spawn(
            i,
            &self.bins.agent.clone(),
            &args,
            &format!("agent-h{}.log", i + 1),
        );
        self.procs[i].agent = Some(c);
    }

    /// Starts host `i`'s components as vm1's secondary at the pool's level: blkback
    /// `secondary` and the relay in standby; at level 3 blkback in epoch mode and the checkpoint
    /// engine's replica.
    pub fn start_secondary_components(&mut self, i: usize) {
        self.start_blkback(i, "secondary");
        if self.level == 3 {
            assert!(wait_until(Duration::from_secs(10), || self
                .blk(i, &blkback::Request::EpochMode { on: true })
                .is_some_and(|v| v["ok"] == true)));
        }
        self.start_netback(i, "standby");
        if self.level == 3 {
            self.start_checkpoint(i, "secondary");
        }
    }

    /// Starts host `i`'s components as vm1's primary at the pool's level: blkback `primary`
    /// and the relay in pass-through; at level 3 the relay buffered per epoch and, once the
    /// replica listens, the checkpoint engine protecting the synthetic guest.
    pub fn start_primary_components(&mut self, i: usize) {
        self.start_blkback(i, "primary");
        if self.level == 3 {
            self.start_netback(i, "buffered");
            assert!(wait_until(Duration::from_secs(10), || self
                .p("ck.sock")
                .exists()));
            self.start_checkpoint(i, "primary");
        } else {
            self.start_netback(i, "passthrough");
        }
    }

    /// Starts the pool with vm1 primary on h1: h2's components, h1's, then both agents (h2's
    /// first). The caller waits for the protection.
    pub fn start_primary_on_h1(&mut self) {
        self.start_secondary_components(1);
        self.start_primary_components(0);
        self.start_agent(1);
        self.start_agent(0);
    }

    /// A pool at `level` with vm1 running protected on h1.
    pub fn protected_on_h1(level: u8) -> Self {
        let mut pool = Self::new();
        pool.level = level;
        pool.start_primary_on_h1();
        assert!(
            pool.wait_protected(),
            "h1 never protected vm1: {:?}\n{}",
            pool.vm1(0),
            pool.log("agent-h1.log")
        );
        pool
    }

    /// A level-3 pool protected on h1 whose replica on h2 holds more than 3 checkpoints.
    pub fn level3_protected_on_h1() -> Self {
        let pool = Self::protected_on_h1(3);
        assert!(
            wait_until(Duration::from_secs(20), || pool.committed(1) > 3),
            "h2's memory replica holds no checkpoint\n{}",
            pool.log("ck-h2.log")
        );
        pool
    }

    /// Whether host `i`'s agent runs vm1 as its primary (local copy running, the record names
    /// host `i` primary).
    pub fn runs_vm1(&self, i: usize) -> bool {
        self.runs_vm1_in(i, |_| true)
    }

    /// Whether host `i`'s agent runs vm1 as its primary, protected.
    pub fn runs_vm1_protected(&self, i: usize) -> bool {
        self.runs_vm1_in(i, |phase| phase == "protected")
    }

    fn runs_vm1_in(&self, i: usize, phase_ok: impl Fn(&str) -> bool) -> bool {
        let me = format!("h{}", i + 1);
        self.vm1(i).is_some_and(|(local, phase, primary)| {
            local == "running" && phase_ok(&phase) && primary == me
        })
    }

    /// Whether host `i`'s agent holds vm1 as the secondary of host `primary` (its local copy
    /// stopped, the record naming `primary`).
    pub fn holds_vm1_for(&self, i: usize, primary: usize) -> bool {
        let p = format!("h{}", primary + 1);
        self.vm1(i)
            .is_some_and(|(local, _, rec)| local == "stopped" && rec == p)
    }

    /// SIGKILL of host `i` between two checkpoints while `writer` writes through it: its
    /// checkpoint engine first, then, once three more writes are acknowledged (writes of an
    /// epoch no checkpoint completed), its agent, shims and VM. Returns every acknowledged
    /// write.
    pub fn kill_host_mid_epoch(&mut self, i: usize, writer: EpochWriter) -> Vec<Acked> {
        if let Some(mut c) = self.procs[i].checkpoint.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let before = writer.count();
        assert!(wait_until(Duration::from_secs(10), || writer.count() >= before + 3));
        self.kill_host(i);
        writer.finish()
    }

    /// SIGKILL of host `i`'s agent, shims and VM process.
    pub fn kill_host(&mut self, i: usize) {
        let pid = self.vm_pid_file(i);
        self.procs[i].kill_all(&pid);
    }

    /// GET /status of host `i`'s agent.
    pub fn status(&self, i: usize) -> Option<Value> {
        self.get(i, "/status")
    }

    /// The decisions host `i`'s agent logged, oldest first (GET /events/log).
    pub fn decisions(&self, i: usize) -> Vec<Value> {
        self.get(i, "/events/log")
            .and_then(|v| v["events"].as_array().cloned())
            .unwrap_or_default()
    }

    /// GET `path` of host `i`'s agent's status API.
    fn get(&self, i: usize, path: &str) -> Option<Value> {
        let ns = self.h[i].name().to_string();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/var/run/netns/{ns}")).ok()?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            let mut s = std::net::TcpStream::connect_timeout(
                &"127.0.0.1:7481".parse().ok()?,
                Duration::from_millis(300),
            )
            .ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(request.as_bytes()).ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            serde_json::from_str::<Value>(out.split_once("\r\n\r\n")?.1).ok()
        })
        .join()
        .ok()?
    }

    /// vm1 as host `i`'s agent sees it: (local copy, phase, primary).
    pub fn vm1(&self, i: usize) -> Option<(String, String, String)> {
        let v = self.status(i)?;
        let vm = v["vms"].get(0)?;
        let f = |x: &Value| x.as_str().unwrap_or("-").to_string();
        Some((
            f(&vm["local"]),
            f(&vm["record"]["phase"]),
            f(&vm["record"]["primary"]),
        ))
    }

    /// Whether host `i`'s agent holds vm1's replica as consistent (a take-over is allowed).
    pub fn consistent(&self, i: usize) -> bool {
        self.status(i)
            .is_some_and(|v| v["vms"][0]["record"]["consistent"] == true)
    }

    /// Waits until h1 runs vm1 protected and h2 knows its replica is consistent.
    pub fn wait_protected(&self) -> bool {
        self.wait_protected_on(0)
    }

    /// Waits until host `p` runs vm1 protected and the other host knows its replica is
    /// consistent.
    pub fn wait_protected_on(&self, p: usize) -> bool {
        wait_until(Duration::from_secs(30), || {
            self.vm1(p)
                .is_some_and(|(local, phase, _)| local == "running" && phase == "protected")
                && self.consistent(1 - p)
        })
    }

    /// The committed checkpoint of host `i`'s engine (0 when unknown).
    pub fn committed(&self, i: usize) -> u64 {
        checkpoint_status(&self.ckpt_ctl(i))
            .and_then(|v| v["committed_epoch"].as_u64())
            .unwrap_or(0)
    }

    /// Host `i`'s relay counters (the reply to `counters` on its control socket).
    pub fn relay_counters(&self, i: usize) -> Option<Value> {
        netback_counters(&self.net_ctl(i))
    }

    /// One request to blkback `i`; the outcome as JSON (`"ok"`, the reply's fields or the
    /// refusal's `"error"`).
    pub fn blk(&self, i: usize, req: &blkback::Request) -> Option<Value> {
        outcome_json::<Blkback>(&self.blk_ctl(i), req)
    }

    /// Blkback `i`'s status as JSON.
    pub fn blk_status(&self, i: usize) -> Option<Value> {
        blkback_status(&self.blk_ctl(i))
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.p(name)).unwrap_or_default()
    }
}

/// Polls `f` every 50 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The NBD URI of blkback's export `xenft` on the unix socket `sock`.
pub fn nbd_unix_uri(sock: &Path) -> String {
    format!("nbd+unix:///xenft?socket={}", sock.display())
}

/// `qemu-io` on an NBD URI with `cmds`; returns (success, stdout and stderr).
pub fn qemu_io(uri: &str, read_only: bool, cmds: &[impl AsRef<str>]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if read_only {
        c.arg("-r");
    }
    for cmd in cmds {
        c.args(["-c", cmd.as_ref()]);
    }
    let o = c
        .arg(uri)
        .output()
        .expect("qemu-io installed (scripts/deps/blkback.apt)");
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), out)
}

/// Size of each client write of [`EpochWriter`].
pub const WRITE: u64 = 64 * 1024;

/// A write the client had acknowledged: offset, pattern, the primary blkback's epoch before
/// and after it.
pub type Acked = (u64, u8, u64, u64);

/// A client writing 64 KiB patterns (1, 2, … 250, again) at consecutive offsets through host
/// `i`'s NBD export while checkpoints stamp the disk epochs, noting each acknowledged write
/// with the primary's epoch before and after it (so a write is known to belong to an epoch
/// `<= N` when its later epoch is).
pub struct EpochWriter {
    acked: Arc<Mutex<Vec<Acked>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl EpochWriter {
    /// Starts writing through host `i` (up to 1500 writes; stops at the first failure).
    pub fn start(pool: &Pool, i: usize) -> Self {
        let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (acked, stop, uri, ctl) = (
                acked.clone(),
                stop.clone(),
                pool.nbd_uri(i),
                pool.blk_ctl(i),
            );
            std::thread::spawn(move || {
                let epoch = || blkback_status(&ctl).and_then(|v| v["primary"]["epoch"].as_u64());
                for k in 0u64..1500 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let pat = u8::try_from(k % 250).unwrap() + 1;
                    let Some(e0) = epoch() else { break };
                    let (ok, out) =
                        qemu_io(&uri, false, &[format!("write -P {pat} {} 64k", k * WRITE)]);
                    if !ok || !out.contains("wrote 65536/65536 bytes") {
                        break;
                    }
                    let Some(e1) = epoch() else { break };
                    acked.lock().unwrap().push((k * WRITE, pat, e0, e1));
                }
            })
        };
        Self {
            acked,
            stop,
            thread,
        }
    }

    /// How many writes were acknowledged so far.
    pub fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Stops the client and returns every acknowledged write.
    pub fn finish(self) -> Vec<Acked> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

/// Asserts that host `i`'s disk is checkpoint `n`'s: every acknowledged write of an epoch
/// `<= n` reads back with its pattern and every write begun after `n` reads back as zeroes
/// (writes straddling the boundary are not checked). Returns (kept, dropped) counts.
pub fn assert_disk_is_checkpoint(pool: &Pool, i: usize, n: u64, acked: &[Acked]) -> (usize, usize) {
    let (mut kept, mut dropped) = (Vec::new(), Vec::new());
    for (off, pat, e0, e1) in acked {
        if *e1 <= n {
            kept.push(format!("read -P {pat} {off} 64k"));
        } else if *e0 > n {
            dropped.push(format!("read -P 0 {off} 64k"));
        }
    }
    for chunk in kept.chunks(200).chain(dropped.chunks(200)) {
        let (ok, out) = qemu_io(&pool.nbd_uri(i), true, chunk);
        assert!(
            ok && !out.contains("Pattern verification failed")
                && out.matches("read 65536/65536 bytes").count() == chunk.len(),
            "h{}'s disk is not checkpoint {n}'s:\n{out}",
            i + 1
        );
    }
    (kept.len(), dropped.len())
}

/// Gratuitous ARPs for the VM's address seen on an interface (AF_PACKET capture).
pub struct ArpWatch {
    pub seen: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl ArpWatch {
    pub fn start(ns: &Netns, ifname: &str) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2, ifname) = (seen.clone(), stop.clone(), ifname.to_string());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = ns
            .spawn(move || {
                let sock =
                    xenft_netback::sys::PacketSocket::open(&ifname).expect("AF_PACKET socket");
                let _ = sock.set_recv_timeout(Duration::from_millis(50));
                let _ = ready_tx.send(());
                let mut buf = vec![0u8; 65_600];
                while !st2.load(Ordering::Relaxed) {
                    if let Ok(Some(n)) = sock.recv(&mut buf) {
                        if is_garp_for_vm(&buf[..n.min(buf.len())]) {
                            s2.lock().unwrap().push(Instant::now());
                        }
                    }
                }
            })
            .unwrap();
        ready_rx.recv().unwrap();
        Self {
            seen,
            stop,
            handle: Some(handle),
        }
    }

    pub fn seen_since(&self, t: Instant) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| **s >= t)
            .count()
    }
}

impl Drop for ArpWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// An ARP frame from the VM's MAC whose sender and target address are both the VM's.
fn is_garp_for_vm(f: &[u8]) -> bool {
    f.len() >= 42
        && f[6..12] == VM_MAC_BYTES
        && f[12..14] == [0x08, 0x06]
        && f[28..32] == VM_IP
        && f[38..42] == VM_IP
}
