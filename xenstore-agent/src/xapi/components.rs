//! The VM's components on this host, from the registry: [`plan`] says which processes a VM
//! needs here (pure), [`Supervisor`] keeps exactly those running.
//!
//! Per protected VM at level 2 or 3, on both its hosts: `xenft-blkback` (`--role primary`
//! where the VM runs, `secondary` where its copy is) on `<disk_dir>/<vm uuid>.img`, serving NBD
//! on `<run_dir>/<vm uuid>/nbd.sock`, its control socket `<run_dir>/<vm uuid>/blkback.sock`,
//! mirrored over the pool's A-links (`xenft.pool`'s addresses, the port moved to a slot of its
//! own per VM: [`port_slot`]). The runtime directory per VM keeps each process's pid, argv and
//! log, so that a restarted agent adopts what runs ([`Supervisor::adopt`]): components outlive
//! the agent (each runs in its own process group). A component that exits is started again
//! with backoff ([`BACKOFF`] doubling to [`MAX_BACKOFF`]) and reported; one no longer wanted
//! (unprotected, level 1, the VM gone) gets SIGTERM — the VM itself is never touched here.
//!
//! With relay settings ([`HostFacts::relay`]) each such VM also gets its `xenft-netback`
//! ([`super::relay_plan`]), and at level 3 the checkpoint engine (`xenft-checkpoint
//! primary|secondary --control`, [`super::engine_plan`]). The disk copy is sized from the VM's
//! disk (its `VDI`'s `virtual_size`), or from [`HostFacts::disk_size`] when xapi names no disk.
//!
//! A VM whose disk is on the xenft SR gets no blkback from the agent: the SR's own blkback of
//! that volume mirrors it already (primary where xapi activated the volume, i.e. where the VM
//! runs), and a second mirror would be of nothing the VM writes. The agent drives the SR's
//! blkback instead ([`super::sr_disk`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::desired::{Desired, Role};

/// First restart delay of a component that exited; doubled up to [`MAX_BACKOFF`].
pub const BACKOFF: Duration = Duration::from_millis(500);
/// Longest restart delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A-link port slots per VM range: `base + 100 + 3 * slot`.
const SLOTS: u64 = 1000;

/// Host-local facts the plan needs.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// This host's uuid.
    pub me: String,
    /// Per-VM runtime directories live here (`/run/xenft`).
    pub run_dir: PathBuf,
    /// Disk copies live here.
    pub disk_dir: PathBuf,
    /// The xenft SR's per-volume runtime directories on this host (its host configuration's
    /// `run_dir`: [`super::sr_disk::sr_run_dir`]).
    pub sr_run_dir: PathBuf,
    /// `xenft-blkback`.
    pub blkback: PathBuf,
    /// The pool secret (A-link key), a file.
    pub secret_file: PathBuf,
    /// Disk size when xapi names no disk for the VM (bytes).
    pub disk_size: Option<u64>,
    /// The relay's settings; `None`: no relay is started by the agent.
    pub relay: Option<super::relay_plan::RelayFacts>,
    /// The checkpoint engine of level-3 VMs, if configured ([`super::engine_plan`]).
    pub engine: Option<super::engine_plan::EngineFacts>,
    /// A-link path timeout of the disk mirror and the checkpoint engine (milliseconds;
    /// `None`: the A-link's default).
    pub alink_path_timeout_ms: Option<u64>,
}

/// One process to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcSpec {
    /// The VM (uuid).
    pub vm: String,
    /// Which component (`blkback`).
    pub name: &'static str,
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
}

/// The VM's A-link port slot: the same on both hosts, from its uuid.
#[must_use]
pub fn port_slot(uuid: &str) -> u64 {
    // FNV-1a: stable across builds and hosts.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uuid.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h % SLOTS
}

/// Port offsets within a VM's slot: blkback's A-link, the checkpoint engine's, the relay's.
pub const BLKBACK_PORT: u64 = 0;
/// See [`BLKBACK_PORT`].
pub const RELAY_PORT: u64 = 2;

/// `ip:port` with the port moved to the VM's slot (`offset`: which component's port).
fn slot_addr(addr: &str, slot: u64, offset: u64) -> Option<String> {
    let sa: std::net::SocketAddr = addr.parse().ok()?;
    let port = u64::from(sa.port()) + 100 + 3 * slot + offset;
    let port = u16::try_from(port).ok()?;
    Some(std::net::SocketAddr::new(sa.ip(), port).to_string())
}

/// The processes this host runs for the registry's VMs, and why a VM gets none it needs.
#[must_use]
pub fn plan(d: &Desired, f: &HostFacts) -> (Vec<ProcSpec>, BTreeMap<String, String>) {
    let mut out = Vec::new();
    let mut problems = BTreeMap::new();
    let mut slots: BTreeMap<u64, String> = BTreeMap::new();
    for v in d.vms.values().filter(|v| v.level >= 2) {
        let (role, peer) = match d.role(&v.uuid, &f.me) {
            Some(Role::Primary { secondary }) => ("primary", secondary),
            Some(Role::Secondary {
                primary: Some(primary),
            }) => ("secondary", primary),
            Some(Role::Secondary { primary: None }) => {
                problems.insert(v.uuid.clone(), "the VM does not run: no mirror yet".into());
                continue;
            }
            None => continue,
        };
        let slot = port_slot(&v.uuid);
        if let Some(other) = slots.insert(slot, v.uuid.clone()) {
            problems.insert(
                v.uuid.clone(),
                format!("A-link port slot {slot} is taken by VM {other}"),
            );
            continue;
        }
        let Some(pool) = &d.pool else { continue };
        let (Some(mine), Some(theirs)) = (pool.hosts.get(&f.me), pool.hosts.get(&peer)) else {
            problems.insert(v.uuid.clone(), "a host of the pair has no A-link".into());
            continue;
        };
        let paths_at = |offset: u64| -> Result<Vec<String>, String> {
            mine.alinks
                .iter()
                .zip(&theirs.alinks)
                .map(
                    |(a, b)| match (slot_addr(a, slot, offset), slot_addr(b, slot, offset)) {
                        (Some(a), Some(b)) => Ok(format!("{a}={b}")),
                        _ => Err(format!("A-link address {a} or {b} unusable")),
                    },
                )
                .collect()
        };
        let paths = match paths_at(BLKBACK_PORT) {
            Ok(p) => p,
            Err(why) => {
                problems.insert(v.uuid.clone(), why);
                continue;
            }
        };
        if paths.is_empty() {
            problems
                .entry(v.uuid.clone())
                .or_insert_with(|| "the two hosts share no A-link path".into());
            continue;
        }
        let name = |u: &str| d.hosts.get(u).map_or(u.to_string(), |h| h.name.clone());
        let dir = f.run_dir.join(&v.uuid);
        match super::sr_disk::volume(v) {
            // The SR's blkback mirrors it: none of ours.
            Some(_) if !v.devices.off_xenft_sr.is_empty() => note(
                &mut problems,
                &v.uuid,
                format!(
                    "disks {:?} are not on the xenft SR: not mirrored",
                    v.devices.off_xenft_sr
                ),
            ),
            Some(_) => {}
            None => match blkback(v, f, role, &name(&f.me), &name(&peer), &paths, &dir) {
                Ok((spec, why)) => {
                    out.push(spec);
                    if let Some(why) = why {
                        note(&mut problems, &v.uuid, why);
                    }
                }
                Err(why) => {
                    problems.insert(v.uuid.clone(), why);
                    continue;
                }
            },
        }
        if let Some(relay) = &f.relay {
            let spec = paths_at(RELAY_PORT).and_then(|paths| {
                super::relay_plan::spec(
                    v,
                    relay,
                    &super::relay_plan::RelayContext {
                        role,
                        me: &name(&f.me),
                        peer: &name(&peer),
                        paths: &paths,
                        dir: &dir,
                        secret_file: &f.secret_file,
                        slot,
                    },
                )
            });
            match spec {
                Ok(p) => out.push(p),
                Err(why) => note(&mut problems, &v.uuid, format!("no relay: {why}")),
            }
        }
        for p in &v.devices.problems {
            note(&mut problems, &v.uuid, p.clone());
        }
        match super::engine_plan::engine(d, v, role == "primary", &peer, slot, f) {
            Ok(spec) => out.extend(spec),
            Err(why) => note(&mut problems, &v.uuid, why),
        }
    }
    if let Some(ms) = f.alink_path_timeout_ms {
        // The mirror and the engine share the A-link's options (`xenft_alink::cli`).
        for p in out
            .iter_mut()
            .filter(|p| matches!(p.name, "blkback" | "checkpoint"))
            .filter(|p| p.args.iter().any(|a| a == "--alink-path"))
        {
            p.args
                .extend(["--alink-path-timeout-ms".into(), ms.to_string()]);
        }
    }
    (out, problems)
}

/// The agent's own `xenft-blkback` of VM `v` (a disk on no xenft SR), and a note.
fn blkback(
    v: &super::desired::VmDesired,
    f: &HostFacts,
    role: &str,
    me: &str,
    peer: &str,
    paths: &[String],
    dir: &Path,
) -> Result<(ProcSpec, Option<String>), String> {
    let s = |p: &Path| p.display().to_string();
    let Some(size) = v.devices.disk.as_ref().map(|k| k.size).or(f.disk_size) else {
        return Err(
            "xapi names no disk for the VM and disk_size_bytes is not set: the mirror's size is unknown".into(),
        );
    };
    let why = (!v.devices.other_disks.is_empty()).then(|| {
        format!(
            "only the disk at userdevice {} is mirrored; disks {:?} are not",
            v.devices.disk.as_ref().map_or(0, |k| k.userdevice),
            v.devices.other_disks
        )
    });
    let mut args = vec![
        "--role".into(),
        role.into(),
        "--disk".into(),
        s(&f.disk_dir.join(format!("{}.img", v.uuid))),
        "--size".into(),
        size.to_string(),
        "--nbd-unix".into(),
        s(&dir.join("nbd.sock")),
        "--control".into(),
        s(&dir.join("blkback.sock")),
        "--host".into(),
        me.into(),
        "--peer-host".into(),
        peer.into(),
        "--secret-file".into(),
        s(&f.secret_file),
    ];
    for p in paths {
        args.push("--alink-path".into());
        args.push(p.clone());
    }
    Ok((
        ProcSpec {
            vm: v.uuid.clone(),
            name: "blkback",
            program: f.blkback.clone(),
            args,
        },
        why,
    ))
}

/// Adds `why` to the VM's problems.
fn note(problems: &mut BTreeMap<String, String>, vm: &str, why: String) {
    problems
        .entry(vm.to_string())
        .and_modify(|p| {
            p.push_str("; ");
            p.push_str(&why);
        })
        .or_insert(why);
}

/// What happened to a component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Started (or started again).
    Started {
        /// VM.
        vm: String,
        /// Component.
        name: &'static str,
        /// Its pid.
        pid: u32,
    },
    /// Found running from an earlier agent, and kept.
    Adopted {
        /// VM.
        vm: String,
        /// Component.
        name: &'static str,
        /// Its pid.
        pid: u32,
    },
    /// Exited on its own; restarted after backoff.
    Exited {
        /// VM.
        vm: String,
        /// Component.
        name: &'static str,
    },
    /// Stopped because it is no longer wanted.
    Stopped {
        /// VM.
        vm: String,
        /// Component.
        name: &'static str,
    },
    /// Could not be started.
    Failed {
        /// VM.
        vm: String,
        /// Component.
        name: &'static str,
        /// Why.
        reason: String,
    },
}

struct Running {
    spec: ProcSpec,
    pid: u32,
    child: Option<Child>,
    started: Instant,
    /// The delay before the next restart if it exits soon.
    backoff: Duration,
}

/// A component that ran this long before it exited restarts after [`BACKOFF`] again.
const STABLE: Duration = Duration::from_secs(60);

struct Waiting {
    at: Instant,
    backoff: Duration,
}

/// Keeps the planned processes running.
pub struct Supervisor {
    run_dir: PathBuf,
    running: BTreeMap<(String, &'static str), Running>,
    waiting: BTreeMap<(String, &'static str), Waiting>,
}

fn alive(pid: u32, spec: &ProcSpec) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    // A pid reused by another program is not ours.
    let mut want = spec.program.as_os_str().as_encoded_bytes().to_vec();
    want.push(0);
    for a in &spec.args {
        want.extend_from_slice(a.as_bytes());
        want.push(0);
    }
    cmdline == want
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
}

impl Supervisor {
    /// A supervisor over `run_dir`, adopting what earlier agents left running
    /// ([`Supervisor::adopt`] is done by the first [`Supervisor::reconcile`]).
    #[must_use]
    pub fn new(run_dir: PathBuf) -> Self {
        Self {
            run_dir,
            running: BTreeMap::new(),
            waiting: BTreeMap::new(),
        }
    }

    fn pid_file(&self, spec: &ProcSpec) -> PathBuf {
        self.run_dir
            .join(&spec.vm)
            .join(format!("{}.pid", spec.name))
    }

    /// Adopts `spec`'s process if an earlier agent started it and it still runs as planned.
    fn adopt(&mut self, spec: &ProcSpec) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pid_file(spec))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // As planned, or the secondary form that took the VM over (super::roles).
        let launched = std::iter::once(spec.clone())
            .chain(super::roles::standby_form(spec))
            .find(|s| alive(pid, s))?;
        self.running.insert(
            (spec.vm.clone(), spec.name),
            Running {
                spec: launched,
                pid,
                child: None,
                started: Instant::now(),
                backoff: BACKOFF,
            },
        );
        Some(pid)
    }

    fn start(&mut self, spec: &ProcSpec, backoff: Duration) -> Result<u32, String> {
        let dir = self.run_dir.join(&spec.vm);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.log", spec.name)))
            .map_err(|e| format!("log: {e}"))?;
        let err = log.try_clone().map_err(|e| format!("log: {e}"))?;
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(&spec.program)
                .args(&spec.args)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(err)
                // Its own process group: a signal to the agent's group does not reach it.
                .process_group(0)
                .spawn()
                .map_err(|e| format!("{}: {e}", spec.program.display()))?
        };
        let pid = child.id();
        std::fs::write(self.pid_file(spec), pid.to_string())
            .map_err(|e| format!("pid file: {e}"))?;
        self.running.insert(
            (spec.vm.clone(), spec.name),
            Running {
                spec: spec.clone(),
                pid,
                child: Some(child),
                started: Instant::now(),
                backoff,
            },
        );
        Ok(pid)
    }

    fn stop(&mut self, key: &(String, &'static str)) {
        if let Some(mut r) = self.running.remove(key) {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(r.pid).unwrap_or(i32::MAX));
            if alive(r.pid, &r.spec) {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            }
            if let Some(c) = r.child.as_mut() {
                // Reap it (SIGTERM is a clean stop: store synced).
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = std::fs::remove_file(self.pid_file(&r.spec));
        }
        self.waiting.remove(key);
    }

    /// Makes what runs match `wanted` at `now`; returns what changed.
    pub fn reconcile(&mut self, wanted: &[ProcSpec], now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        let keys: Vec<_> = self.running.keys().cloned().collect();
        for key in keys {
            let want = wanted
                .iter()
                .find(|s| (s.vm.as_str(), s.name) == (key.0.as_str(), key.1));
            // A secondary that took the VM over is the primary now: kept (super::roles).
            let same = want.is_some_and(|w| super::roles::satisfies(&self.running[&key].spec, w));
            if !same {
                self.stop(&key);
                changes.push(Change::Stopped {
                    vm: key.0.clone(),
                    name: key.1,
                });
                continue;
            }
            let r = self.running.get_mut(&key).expect("listed");
            let exited = match r.child.as_mut() {
                Some(c) => !matches!(c.try_wait(), Ok(None)),
                None => !alive(r.pid, &r.spec),
            };
            if exited {
                let (spec, ran, backoff) = (r.spec.clone(), r.started.elapsed(), r.backoff);
                self.running.remove(&key);
                let _ = std::fs::remove_file(self.pid_file(&spec));
                let backoff = if ran >= STABLE { BACKOFF } else { backoff };
                tracing::warn!(vm = %spec.vm, component = spec.name, ?backoff, "component exited: restarting after backoff");
                self.waiting.insert(
                    key.clone(),
                    Waiting {
                        at: now + backoff,
                        backoff: (backoff * 2).min(MAX_BACKOFF),
                    },
                );
                changes.push(Change::Exited {
                    vm: key.0.clone(),
                    name: key.1,
                });
            }
        }
        self.waiting.retain(|k, _| {
            wanted
                .iter()
                .any(|s| (s.vm.as_str(), s.name) == (k.0.as_str(), k.1))
        });
        for spec in wanted {
            let key = (spec.vm.clone(), spec.name);
            if self.running.contains_key(&key) {
                continue;
            }
            if let Some(w) = self.waiting.get(&key) {
                if now < w.at {
                    continue;
                }
            } else if let Some(pid) = self.adopt(spec) {
                changes.push(Change::Adopted {
                    vm: spec.vm.clone(),
                    name: spec.name,
                    pid,
                });
                continue;
            }
            let backoff = self.waiting.get(&key).map_or(BACKOFF, |w| w.backoff);
            match self.start(spec, backoff) {
                Ok(pid) => {
                    self.waiting.remove(&key);
                    changes.push(Change::Started {
                        vm: spec.vm.clone(),
                        name: spec.name,
                        pid,
                    });
                }
                Err(reason) => {
                    self.waiting.insert(
                        key,
                        Waiting {
                            at: now + backoff,
                            backoff: (backoff * 2).min(MAX_BACKOFF),
                        },
                    );
                    changes.push(Change::Failed {
                        vm: spec.vm.clone(),
                        name: spec.name,
                        reason,
                    });
                }
            }
        }
        changes
    }

    /// Replaces the components launched in their standby form that took the VM over since
    /// (super::roles::took_over) although the plan wants them as the secondary again — the
    /// VM went back to the other host — when `is_secondary(vm)` (the core agrees this host
    /// holds the copy: never in the middle of a take-over, before the registry shows it).
    /// Returns the components replaced.
    pub fn replace_took_over(
        &mut self,
        wanted: &[ProcSpec],
        is_secondary: impl Fn(&str) -> bool,
    ) -> Vec<(String, &'static str)> {
        let stale: Vec<_> = self
            .running
            .iter()
            .filter(|(_, r)| {
                wanted.contains(&r.spec)
                    && super::roles::is_standby(&r.spec)
                    && is_secondary(&r.spec.vm)
                    && super::roles::took_over(&self.run_dir.join(&r.spec.vm), &r.spec)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in &stale {
            self.stop(key);
        }
        stale
    }

    /// Stops component `name` of `vm` so that the next [`Self::reconcile`] starts a fresh
    /// process at once (no backoff); whether one ran.
    pub fn renew(&mut self, vm: &str, name: &'static str) -> bool {
        let key = (vm.to_string(), name);
        let ran = self.running.contains_key(&key);
        self.stop(&key);
        ran
    }

    /// The specs of `vm`'s running components, as launched.
    #[must_use]
    pub fn specs_of(&self, vm: &str) -> Vec<ProcSpec> {
        self.running
            .iter()
            .filter(|((v, _), _)| v == vm)
            .map(|(_, r)| r.spec.clone())
            .collect()
    }

    /// The pid of a running component.
    #[must_use]
    pub fn pid(&self, vm: &str, name: &str) -> Option<u32> {
        self.running
            .iter()
            .find(|((v, n), _)| v == vm && *n == name)
            .map(|(_, r)| r.pid)
    }

    /// Forgets the children without stopping them (the agent restarts; they run on).
    pub fn release(mut self) {
        for r in self.running.values_mut() {
            drop(r.child.take());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::xapi::desired::{HostInfo, VmDesired};
    use xenft_xapi::registry::{HostLinks, PoolConfig};

    /// Two hosts (u1 = h1 on 127.0.0.1, u2 = h2 on 127.0.0.2, one A-link each on port 17500)
    /// and VM `vm-a` (web01) at `level`, running on `resident`, its copy on u2.
    pub(crate) fn desired(level: u8, resident: Option<&str>) -> Desired {
        let mut d = Desired::default();
        let mut hosts = BTreeMap::new();
        for (u, n, a) in [
            ("u1", "h1", "127.0.0.1:17500"),
            ("u2", "h2", "127.0.0.2:17500"),
        ] {
            d.hosts.insert(
                u.into(),
                HostInfo {
                    name: n.into(),
                    address: String::new(),
                },
            );
            hosts.insert(
                u.to_string(),
                HostLinks {
                    name: n.into(),
                    alinks: vec![a.into()],
                },
            );
        }
        d.pool = Some(PoolConfig {
            format_version: 1,
            hosts,
            quorum_servers: vec![],
            policy: xenft_xapi::registry::Policy::default(),
            secret_uuid: None,
        });
        d.vms.insert(
            "vm-a".into(),
            VmDesired {
                uuid: "vm-a".into(),
                vm_ref: "OpaqueRef:a".into(),
                name: "web01".into(),
                level,
                secondary: "u2".into(),
                resident_on: resident.map(str::to_string),
                power_state: "Running".into(),
                memory_bytes: 1 << 30,
                devices: crate::xapi::devices::VmDevices::default(),
            },
        );
        d
    }

    /// Host `me`'s facts as the plan tests use them (no relay, no engine).
    pub(crate) fn facts(me: &str) -> HostFacts {
        HostFacts {
            me: me.into(),
            run_dir: "/run/xenft".into(),
            disk_dir: "/var/lib/xenft".into(),
            sr_run_dir: "/run/xenft/sr".into(),
            blkback: "/usr/bin/xenft-blkback".into(),
            secret_file: "/etc/xenft/secret".into(),
            disk_size: Some(1 << 30),
            relay: None,
            engine: None,
            alink_path_timeout_ms: None,
        }
    }

    #[test]
    fn a_level_2_vm_gets_a_mirrored_blkback_on_each_of_its_hosts() {
        let d = desired(2, Some("u1"));
        let (p1, problems) = plan(&d, &facts("u1"));
        assert!(problems.is_empty(), "{problems:?}");
        let slot = port_slot("vm-a");
        let port = 17500 + 100 + 3 * slot;
        let args = &p1[0].args;
        assert_eq!(args[1], "primary");
        assert!(
            args.contains(&format!("127.0.0.1:{port}=127.0.0.2:{port}")),
            "{args:?}"
        );
        assert!(args.contains(&"/run/xenft/vm-a/blkback.sock".to_string()));
        let (p2, _) = plan(&d, &facts("u2"));
        assert_eq!(p2[0].args[1], "secondary");
        assert!(p2[0]
            .args
            .contains(&format!("127.0.0.2:{port}=127.0.0.1:{port}")));
        assert_eq!(port_slot("vm-a"), slot, "stable");
        assert!(!args.iter().any(|a| a == "--alink-path-timeout-ms"));
        // A slow host's path timeout reaches the mirror.
        let slow = HostFacts {
            alink_path_timeout_ms: Some(8000),
            ..facts("u1")
        };
        let args = &plan(&d, &slow).0[0].args;
        let at = args.iter().position(|a| a == "--alink-path-timeout-ms");
        assert_eq!(at.map(|i| args[i + 1].as_str()), Some("8000"), "{args:?}");
    }

    #[test]
    fn level_1_a_third_host_and_a_halted_vm_get_nothing() {
        assert!(plan(&desired(1, Some("u1")), &facts("u1")).0.is_empty());
        assert!(plan(&desired(2, Some("u1")), &facts("u3")).0.is_empty());
        let (p, problems) = plan(&desired(2, None), &facts("u2"));
        assert!(p.is_empty());
        assert!(problems["vm-a"].contains("does not run"), "{problems:?}");
    }
}
