//! `up`, `down` and `status` of the local pool.

use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::state::{NodeRole, NodeStatus, PoolRecord, StateDir};
use crate::topology::{self, Host};
use crate::{now_ms, require_root, LabError};

/// How `up` builds the pool.
#[derive(Debug, Clone)]
pub struct UpConfig {
    /// The `xenft-lab` binary (started inside the namespaces).
    pub exe: PathBuf,
    /// `xenft-synthetic-guest`.
    pub guest_binary: PathBuf,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Disk, MiB.
    pub disk_mib: u64,
    /// Checkpoint epoch, ms.
    pub epoch_ms: u64,
    /// Run the agents with the product's default timing instead of
    /// [`lab_timing`].
    pub product_timing: bool,
    /// How long to wait for the VM to be protected and the client served.
    pub ready_timeout: Duration,
}

pub(crate) fn spawn_in(
    dir: &StateDir,
    ns: &str,
    exe: &Path,
    args: &[String],
    log: &str,
) -> Result<std::process::Child, LabError> {
    let out = dir.open_log(log)?;
    let err = out.try_clone().map_err(|source| LabError::Io {
        path: dir.file(log),
        source,
    })?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|source| LabError::Spawn {
            cmd: format!("ip netns exec {ns} {}", exe.display()),
            source,
        })?;
    Ok(child)
}

pub(crate) fn pid_of(c: &std::process::Child) -> Result<i32, LabError> {
    i32::try_from(c.id()).map_err(|_| LabError::WrongState("pid out of range".into()))
}

/// Builds the pool and waits until the VM is protected and the client's writes are
/// acknowledged. On failure everything built is removed again.
pub fn up(dir: &StateDir, cfg: &UpConfig) -> Result<PoolRecord, LabError> {
    require_root()?;
    if dir.pool_file().exists() || !topology::existing_namespaces()?.is_empty() {
        return Err(LabError::WrongState(
            "a lab pool exists already; run `xenft-lab down` first".into(),
        ));
    }
    let r = build(dir, cfg);
    if r.is_err() {
        // Keep the logs for the error message's reader; forget the pool.
        let _ = teardown(dir);
        let _ = std::fs::remove_file(dir.pool_file());
    }
    r
}

fn build(dir: &StateDir, cfg: &UpConfig) -> Result<PoolRecord, LabError> {
    let _ = std::fs::remove_dir_all(dir.root());
    dir.create()?;
    let (rec, mut procs) = crate::xapi_pool::build(dir, cfg)?;
    let report = crate::xapi_pool::protect(dir, &cfg.exe, cfg.ready_timeout)?;
    if !report.passed() {
        return Err(LabError::WrongState(format!(
            "protecting vm1 through XenAPI failed:\n{report}(logs in {})",
            dir.root().display()
        )));
    }
    wait_ready(dir, &mut procs, cfg.ready_timeout)?;
    Ok(rec)
}

/// The agent timing used in the lab.
///
/// The product defaults (`heartbeat 100, path_down 350, peer_dead 500, lease 600, margin
/// 200`) fit a take-over within 1 s; this machine is shared by several builds on two cores,
/// where a process regularly stalls for a few hundred ms, so the lab runs 3× slower
/// detection and a wider safety margin: expect a take-over 1.5–2 s after a host dies.
#[must_use]
pub fn lab_timing() -> xenft_agent::timing::Timing {
    xenft_agent::timing::Timing {
        heartbeat_ms: 100,
        path_down_ms: 1000,
        peer_dead_ms: 1500,
        lease_ms: 1500,
        margin_ms: 500,
        quorum_request_timeout_ms: 400,
    }
}

/// The agent timing: the product's defaults, or [`lab_timing`].
#[must_use]
pub fn agent_timing(product: bool) -> xenft_agent::timing::Timing {
    if product {
        xenft_agent::timing::Timing::default()
    } else {
        lab_timing()
    }
}

/// True while `pid` runs (a zombie is dead).
#[must_use]
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

/// A host's current status file, if fresh (written in the last 2 s).
pub fn node_status(dir: &StateDir, h: Host) -> Result<Option<NodeStatus>, LabError> {
    let st: Option<NodeStatus> = dir.read_json(&dir.status_file(h))?;
    Ok(st.filter(|s| {
        now_ms().saturating_sub(s.updated_ms) < 2000 && i32::try_from(s.pid).is_ok_and(alive)
    }))
}

/// The host running the VM when it is fully protected: its agent says `protected`, it
/// checkpoints, its disk is in sync, and the other host receives.
pub fn protected_primary(dir: &StateDir) -> Result<Option<Host>, LabError> {
    for p in [Host::Host1, Host::Host2] {
        let a = node_status(dir, p)?;
        let b = node_status(dir, p.peer())?;
        if matches!((a, b), (Some(a), Some(b))
            if a.role == NodeRole::Primary && b.role == NodeRole::Secondary
                && a.agent.phase == "protected"
                && a.checkpoint.phase == "protected" && a.checkpoint.committed_epoch > 0
                && a.disk_state == "in_sync" && a.serving
                && b.checkpoint.committed_epoch > 0)
        {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// True when the VM is fully protected (see [`protected_primary`]).
pub fn protected(dir: &StateDir) -> Result<bool, LabError> {
    Ok(protected_primary(dir)?.is_some())
}

/// The host that runs the VM and serves it now, if one does.
pub fn serving_host(dir: &StateDir) -> Result<Option<Host>, LabError> {
    for h in [Host::Host1, Host::Host2] {
        if node_status(dir, h)?.is_some_and(|s| s.serving) {
            return Ok(Some(h));
        }
    }
    Ok(None)
}

/// Starts host `h`'s host process again (after a repair), with the arguments `up` used; returns
/// its PID (recorded in the pool record).
pub fn restart_node(dir: &StateDir, h: Host) -> Result<i32, LabError> {
    let mut rec: PoolRecord = dir
        .read_json(&dir.pool_file())?
        .ok_or_else(|| LabError::WrongState("no lab pool".into()))?;
    let child = spawn_in(
        dir,
        h.netns(),
        &rec.exe,
        rec.args(h),
        &format!("{}.log", h.name()),
    )?;
    let pid = pid_of(&child)?;
    // The child is watched through its status file; dropping the handle does not kill it.
    drop(child);
    rec.set_pid(h, pid);
    dir.write_json(&dir.pool_file(), &rec)?;
    Ok(pid)
}

fn wait_ready(
    dir: &StateDir,
    procs: &mut [(&'static str, std::process::Child)],
    timeout: Duration,
) -> Result<(), LabError> {
    let start = Instant::now();
    loop {
        for (name, child) in procs.iter_mut() {
            if !matches!(child.try_wait(), Ok(None)) {
                let log =
                    std::fs::read_to_string(dir.file(&format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(LabError::WrongState(format!(
                    "{name} process exited during start-up; last log lines:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )));
            }
        }
        if protected(dir)? && dir.acks()?.len() >= 5 {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(LabError::Timeout(format!(
                "the VM was not protected and serving within {timeout:?} (see {}/*.log)",
                dir.root().display()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn is_lab_process(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("xenft-"))
        .unwrap_or(false)
}

/// Kills the lab's processes (recorded PIDs and anything inside lab namespaces), deletes the
/// namespaces and the state directory. Idempotent.
pub fn down(dir: &StateDir) -> Result<(), LabError> {
    require_root()?;
    teardown(dir)?;
    match std::fs::remove_dir_all(dir.root()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LabError::Io {
            path: dir.root().to_owned(),
            source,
        }),
    }
}

/// Kills the processes and deletes the namespaces, keeping the state directory.
pub(crate) fn teardown(dir: &StateDir) -> Result<(), LabError> {
    let mut pids: Vec<i32> = Vec::new();
    if let Ok(Some(rec)) = dir.read_json::<PoolRecord>(&dir.pool_file()) {
        pids.extend(
            [rec.host1_pid, rec.host2_pid, rec.client_pid, rec.quorum_pid]
                .into_iter()
                .filter(|p| is_lab_process(*p)),
        );
    }
    pids.extend(topology::pids_in_namespaces()?);
    for p in &pids {
        let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
    }
    let t = Instant::now();
    while pids.iter().any(|p| alive(*p) && is_lab_process(*p)) && t.elapsed().as_secs() < 5 {
        std::thread::sleep(Duration::from_millis(20));
    }
    topology::destroy()
}

/// A human-readable status of the pool.
pub fn status(dir: &StateDir) -> Result<String, LabError> {
    let Some(rec) = dir.read_json::<PoolRecord>(&dir.pool_file())? else {
        return Ok("no lab pool (run `xenft-lab up`)\n".into());
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "pool: up {} s, state in {}",
        now_ms().saturating_sub(rec.created_ms) / 1000,
        dir.root().display()
    );
    for h in [Host::Host1, Host::Host2] {
        match node_status(dir, h)? {
            None => {
                let _ = writeln!(out, "{}: DOWN (no status)", h.name());
            }
            Some(s) => {
                let paths: Vec<String> = s
                    .link
                    .paths
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        format!(
                            "alink{}:{}{}",
                            i + 1,
                            if p.up { "up" } else { "DOWN" },
                            p.rtt_ms.map(|r| format!("({r:.2}ms)")).unwrap_or_default()
                        )
                    })
                    .collect();
                let _ = writeln!(
                    out,
                    "{}: {:?} agent={} serving={} records={} checkpoint={} committed_epoch={} lag={}B disk={} {}",
                    h.name(),
                    s.role,
                    if s.agent.phase.is_empty() { "-" } else { &s.agent.phase },
                    s.serving,
                    s.service_count,
                    s.checkpoint.phase,
                    s.checkpoint.committed_epoch,
                    s.checkpoint.lag_bytes,
                    s.disk_state,
                    paths.join(" ")
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "console: {} or {} (the management network: ip netns exec {} chromium ...; log in \
         with the pool's xapi user root and {}, or the token in {})",
        crate::xapi_pool::console_url(Host::Host1),
        crate::xapi_pool::console_url(Host::Host2),
        crate::topology::NS_QUORUM,
        dir.file("xapi-password").display(),
        dir.file("console-token").display()
    );
    let acks = dir.acks()?;
    match acks.last() {
        Some((n, t)) => {
            let _ = writeln!(
                out,
                "client: {} writes acknowledged, last #{n} {} ms ago",
                acks.len(),
                now_ms().saturating_sub(*t)
            );
        }
        None => {
            let _ = writeln!(out, "client: nothing acknowledged yet");
        }
    }
    Ok(out)
}
