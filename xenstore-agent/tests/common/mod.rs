//! A 2-host pool of real processes in network namespaces (needs root): namespaces h1, h2 and
//! q; veth pairs for A-link paths al0 and al1, the management network (mgmt) and each host's
//! link to the quorum server (q). Agents and the quorum server are this crate's binaries.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;
use xenft_tests::netns::{veth, Netns};

pub const SECRET: &str = "netns-pool-secret-0123456789";

/// The devices of a host, by role.
pub const ALINKS: [&str; 2] = ["al0", "al1"];
pub const MGMT: [&str; 2] = ["mgmt", "q"];

/// What one agent says about vm1: local copy, phase, primary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmState {
    pub local: String,
    pub phase: String,
    pub primary: String,
    /// The replica is consistent (a take-over from it is allowed).
    pub consistent: bool,
}

impl VmState {
    pub fn running(&self) -> bool {
        self.local == "running" || self.local == "starting"
    }
}

pub struct Pool {
    pub dir: tempfile::TempDir,
    pub agents: [Option<Child>; 2],
    pub quorum: Option<Child>,
    // Namespaces last: processes are killed before their namespaces go.
    pub q: Netns,
    pub h: [Netns; 2],
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Ok(keep) = std::env::var("XENFT_KEEP_LOGS") {
            for f in ["h1.log", "h2.log", "q.log"] {
                let _ = std::fs::copy(self.dir.path().join(f), Path::new(&keep).join(f));
            }
        }
        for c in self
            .agents
            .iter_mut()
            .chain(std::iter::once(&mut self.quorum))
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn spawn(ns: &Netns, bin: &str, args: &[&str], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    ns.command(bin)
        .args(args)
        .env("RUST_LOG", "info,xenft_agent::core=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

impl Pool {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        let q = Netns::new().unwrap();
        let h = [Netns::new().unwrap(), Netns::new().unwrap()];
        veth(&h[0], "al0", "10.10.0.1/24", &h[1], "al0", "10.10.0.2/24").unwrap();
        veth(&h[0], "al1", "10.11.0.1/24", &h[1], "al1", "10.11.0.2/24").unwrap();
        veth(&h[0], "mgmt", "10.20.0.1/24", &h[1], "mgmt", "10.20.0.2/24").unwrap();
        veth(&h[0], "q", "10.30.1.1/24", &q, "h1", "10.30.1.2/24").unwrap();
        veth(&h[1], "q", "10.30.2.1/24", &q, "h2", "10.30.2.2/24").unwrap();
        let mut pool = Self {
            dir,
            agents: [None, None],
            quorum: None,
            q,
            h,
        };
        let secret = pool.dir.path().join("secret");
        pool.quorum = Some(spawn(
            &pool.q,
            env!("CARGO_BIN_EXE_xenft-quorum"),
            &[
                "--listen",
                "0.0.0.0:7479",
                "--secret-file",
                secret.to_str().unwrap(),
            ],
            &pool.dir.path().join("q.log"),
        ));
        for i in 0..2 {
            pool.start_agent(i);
        }
        pool
    }

    fn config(&self, me: usize) -> PathBuf {
        let (a, b) = (me + 1, 2 - me);
        let dir = self.dir.path();
        let cfg = serde_json::json!({
            "host": format!("h{a}"),
            "secret_file": dir.join("secret"),
            "state_file": dir.join(format!("state-h{a}.json")),
            "peers": [{
                "host": format!("h{b}"),
                "alink": [
                    {"local": format!("10.10.0.{a}:7480"), "peer": format!("10.10.0.{b}:7480")},
                    {"local": format!("10.11.0.{a}:7480"), "peer": format!("10.11.0.{b}:7480")}
                ],
                "mgmt": {"local": format!("10.20.0.{a}:7480"), "peer": format!("10.20.0.{b}:7480")}
            }],
            "quorum": [format!("10.30.{a}.2:7479")],
            "vms": [{"vm": "vm1", "level": 3, "primary": "h1", "secondary": "h2", "memory_mb": 256}],
            "free_memory_mb": 4096,
            "drivers": "record"
        });
        let p = dir.join(format!("h{a}.json"));
        std::fs::write(&p, cfg.to_string()).unwrap();
        p
    }

    pub fn start_agent(&mut self, i: usize) {
        if self.agents[i].is_some() {
            return;
        }
        let cfg = self.config(i);
        let log = self.dir.path().join(format!("h{}.log", i + 1));
        self.agents[i] = Some(spawn(
            &self.h[i],
            env!("CARGO_BIN_EXE_xenft-agent"),
            &["--config", cfg.to_str().unwrap()],
            &log,
        ));
    }

    /// SIGKILL of a host's agent (with the recording components, its VM copy dies with it).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn alive(&self, i: usize) -> bool {
        self.agents[i].is_some()
    }

    pub fn link(&self, host: usize, dev: &str, up: bool) {
        self.h[host]
            .ip(&["link", "set", dev, if up { "up" } else { "down" }])
            .unwrap();
    }

    pub fn status(&self, i: usize) -> Option<VmState> {
        status(&self.h[i])
    }

    pub fn log_tail(&self, i: usize) -> String {
        let s = std::fs::read_to_string(self.dir.path().join(format!("h{}.log", i + 1)))
            .unwrap_or_default();
        let lines: Vec<&str> = s.lines().filter(|l| l.contains("decision")).collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// GET /status inside the namespace called `name` (it must outlive the call).
pub fn status_by_name(name: &str) -> Option<VmState> {
    let path = format!("/var/run/netns/{name}");
    let v = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).ok()?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        get_status()
    })
    .join()
    .ok()??;
    reduce(&v)
}

/// GET /status inside a namespace, reduced to vm1's state.
pub fn status(ns: &Netns) -> Option<VmState> {
    status_by_name(ns.name())
}

fn get_status() -> Option<Value> {
    let mut s = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:7481".parse().unwrap(),
        Duration::from_millis(300),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let body = out.split_once("\r\n\r\n")?.1;
    serde_json::from_str::<Value>(body).ok()
}

/// Every VM's state as one agent reports it (inside the namespace called `name`).
pub fn status_all_by_name(name: &str) -> Option<std::collections::BTreeMap<String, VmState>> {
    let path = format!("/var/run/netns/{name}");
    let v = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).ok()?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        get_status()
    })
    .join()
    .ok()??;
    let f = |x: &Value| x.as_str().unwrap_or("-").to_string();
    Some(
        v["vms"]
            .as_array()?
            .iter()
            .map(|vm| {
                (
                    f(&vm["record"]["vm"]),
                    VmState {
                        local: f(&vm["local"]),
                        phase: f(&vm["record"]["phase"]),
                        primary: f(&vm["record"]["primary"]),
                        consistent: vm["record"]["consistent"].as_bool().unwrap_or(false),
                    },
                )
            })
            .collect(),
    )
}

fn reduce(v: &Value) -> Option<VmState> {
    let vm = v["vms"].get(0)?;
    let f = |x: &Value| x.as_str().unwrap_or("-").to_string();
    Some(VmState {
        local: f(&vm["local"]),
        phase: f(&vm["record"]["phase"]),
        primary: f(&vm["record"]["primary"]),
        consistent: vm["record"]["consistent"].as_bool().unwrap_or(false),
    })
}
