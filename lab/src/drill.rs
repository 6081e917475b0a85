//! The fire drill: inject one real fault into the local pool and measure what the client saw.
//!
//! Every figure comes from outside the component that handles the fault: detection and
//! decisions from the nodes' status files and event log, downtime from the client's
//! acknowledgement log (longest gap between two acknowledged writes around the fault), and
//! the data check by reading every acknowledged record back through the service from the
//! client's namespace. The verdict is PASS only when every check below ran and held.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::pool::{node_status, protected};
use crate::service::{parse_check, CheckResult};
use crate::state::{Event, NodeRole, NodeStatus, PoolRecord, StateDir};
use crate::topology::{self, Host, ALINK_IFS, NS_CLIENT, PROD_IF, SERVICE_IP, SERVICE_PORT};
use crate::{now_ms, require_root, LabError};

/// The faults the lab can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// Host 1 dies: its processes get SIGKILL and its interfaces go down.
    Host,
    /// One A-link cable is cut (`alink1` down), then repaired.
    Alink,
    /// Both A-link cables are cut, then repaired.
    Alinks,
    /// Host 1's disk fails (every I/O returns EIO).
    Disk,
}

impl std::str::FromStr for Fault {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self, LabError> {
        match s {
            "host" => Ok(Self::Host),
            "alink" => Ok(Self::Alink),
            "alinks" => Ok(Self::Alinks),
            "disk" => Ok(Self::Disk),
            "uplink" | "partition" => Err(LabError::WrongState(format!(
                "fault={s} is not implemented in the local pool yet (host, alink, alinks, disk are)"
            ))),
            _ => Err(LabError::WrongState(format!(
                "unknown fault {s:?} (host, alink, alinks, disk)"
            ))),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Host => "host",
            Self::Alink => "alink",
            Self::Alinks => "alinks",
            Self::Disk => "disk",
        })
    }
}

/// What a drill found.
#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    /// The fault.
    pub fault: Fault,
    /// Fault injected → the pool noticed (ms).
    pub detection_ms: Option<u64>,
    /// What the pool did.
    pub action: String,
    /// Why (the deciding node's reasoning).
    pub why: String,
    /// Longest gap between two acknowledged client writes around the fault (ms).
    pub downtime_ms: Option<u64>,
    /// Writes acknowledged to the client when the check ran.
    pub acked_writes: u64,
    /// Reading every acknowledged record back.
    pub data: Option<CheckResult>,
    /// Repair → replication back to full protection (ms).
    pub resync_ms: Option<u64>,
    /// Notes (what was not measured and why).
    pub notes: Vec<String>,
    /// Checks that failed.
    pub failures: Vec<String>,
}

impl DrillReport {
    fn new(fault: Fault) -> Self {
        Self {
            fault,
            detection_ms: None,
            action: String::new(),
            why: String::new(),
            downtime_ms: None,
            acked_writes: 0,
            data: None,
            resync_ms: None,
            notes: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// PASS when nothing failed and the data check ran.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.failures.is_empty() && self.data.is_some_and(|d| d.missing == 0)
    }

    fn fail(&mut self, what: impl Into<String>) {
        self.failures.push(what.into());
    }
}

fn ms(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v} ms"))
}

impl fmt::Display for DrillReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "drill fault={}", self.fault)?;
        writeln!(f, "  detection : {}", ms(self.detection_ms))?;
        writeln!(f, "  action    : {}", self.action)?;
        writeln!(f, "  why       : {}", self.why)?;
        writeln!(
            f,
            "  downtime  : {} (longest gap between acknowledged client writes)",
            ms(self.downtime_ms)
        )?;
        match self.data {
            Some(d) => writeln!(
                f,
                "  data      : {} acknowledged writes, {} read back, {} missing",
                self.acked_writes,
                d.checked - d.missing,
                d.missing
            )?,
            None => writeln!(f, "  data      : NOT CHECKED")?,
        }
        writeln!(f, "  resync    : {}", ms(self.resync_ms))?;
        for n in &self.notes {
            writeln!(f, "  note      : {n}")?;
        }
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

fn wait_for<T>(
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>, LabError>,
) -> Result<Option<T>, LabError> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(Some(v));
        }
        if start.elapsed() > timeout {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status(dir: &StateDir, h: Host) -> Result<NodeStatus, LabError> {
    node_status(dir, h)?.ok_or_else(|| LabError::WrongState(format!("{} has no status", h.name())))
}

/// Longest gap between consecutive acknowledgements, over acks from 1 s before `from_ms`.
fn longest_gap(acks: &[(u64, u64)], from_ms: u64) -> Option<u64> {
    let times: Vec<u64> = acks
        .iter()
        .map(|a| a.1)
        .filter(|t| *t + 1000 >= from_ms)
        .collect();
    times.windows(2).map(|w| w[1].saturating_sub(w[0])).max()
}

/// Waits until the client got `n` acknowledgements after `after_ms`.
fn wait_acks_after(
    dir: &StateDir,
    after_ms: u64,
    n: usize,
    timeout: Duration,
) -> Result<bool, LabError> {
    Ok(wait_for(timeout, || {
        Ok((dir.acks()?.iter().filter(|a| a.1 > after_ms).count() >= n).then_some(()))
    })?
    .is_some())
}

/// Asks the service (from the client namespace) to read back records 1..=n.
fn check_records(exe: &Path, n: u64) -> Result<CheckResult, LabError> {
    let req = format!("CHECK 1 {n}");
    let addr = format!("{SERVICE_IP}:{SERVICE_PORT}");
    let out = topology::run(
        "ip",
        &[
            "netns",
            "exec",
            NS_CLIENT,
            &exe.display().to_string(),
            "ask",
            "--addr",
            &addr,
            "--request",
            &req,
        ],
    )?;
    parse_check(out.trim())
}

fn data_check(dir: &StateDir, exe: &Path, r: &mut DrillReport) -> Result<(), LabError> {
    let acks = dir.acks()?;
    let Some(&(last, _)) = acks.last() else {
        r.fail("the client has no acknowledged writes");
        return Ok(());
    };
    r.acked_writes = u64::try_from(acks.len()).unwrap_or(u64::MAX);
    if acks.iter().zip(1u64..).any(|(a, i)| a.0 != i) {
        r.fail("acknowledgement log is not 1..n in order");
    }
    match check_records(exe, last) {
        Ok(c) => {
            if c.missing > 0 {
                r.fail(format!(
                    "{} acknowledged writes missing (first #{})",
                    c.missing, c.first_missing
                ));
            }
            r.data = Some(c);
        }
        Err(e) => r.fail(format!("data check could not run: {e}")),
    }
    Ok(())
}

/// Settings of a drill.
#[derive(Debug, Clone)]
pub struct DrillConfig {
    /// The fault.
    pub fault: Fault,
    /// The `xenft-lab` binary (runs the data check in the client namespace).
    pub exe: PathBuf,
    /// How long a cut A-link stays cut.
    pub hold: Duration,
}

/// Runs one drill on the local pool.
pub fn run(dir: &StateDir, cfg: &DrillConfig) -> Result<DrillReport, LabError> {
    require_root()?;
    let rec: PoolRecord = dir
        .read_json(&dir.pool_file())?
        .ok_or_else(|| LabError::WrongState("no lab pool: run `xenft-lab up` first".into()))?;
    if !protected(dir)? {
        return Err(LabError::WrongState(
            "the VM is not fully protected now (host1 checkpointing, disk in sync, host2 \
             receiving); a drill needs a healthy pool: `xenft-lab down && xenft-lab up`"
                .into(),
        ));
    }
    if !wait_acks_after(dir, now_ms(), 3, Duration::from_secs(5))? {
        return Err(LabError::WrongState(
            "the client is not being served".into(),
        ));
    }
    let mut r = DrillReport::new(cfg.fault);
    let say = |what: String, why: &str| {
        dir.log_event(&Event {
            t_ms: now_ms(),
            host: "drill".into(),
            what,
            why: why.into(),
        });
    };
    say(
        format!("drill fault={}: injecting", cfg.fault),
        "fire drill",
    );
    match cfg.fault {
        Fault::Host => host(dir, &rec, &mut r)?,
        Fault::Alink => alinks(dir, cfg, &mut r, &ALINK_IFS[..1])?,
        Fault::Alinks => alinks(dir, cfg, &mut r, &ALINK_IFS)?,
        Fault::Disk => disk(dir, &rec, &mut r)?,
    }
    data_check(dir, &cfg.exe, &mut r)?;
    say(
        format!(
            "drill fault={}: {}",
            cfg.fault,
            if r.passed() { "PASS" } else { "FAIL" }
        ),
        &r.failures.join("; "),
    );
    Ok(r)
}

fn host(dir: &StateDir, rec: &PoolRecord, r: &mut DrillReport) -> Result<(), LabError> {
    let before = status(dir, Host::Host1)?;
    let committed_before = before.checkpoint.committed_epoch;
    let fault_ms = now_ms();
    let _ = kill(Pid::from_raw(rec.host1_pid), Signal::SIGKILL);
    if let Some(g) = before.guest_pid.and_then(|g| i32::try_from(g).ok()) {
        let _ = kill(Pid::from_raw(g), Signal::SIGKILL);
    }
    for ifname in [PROD_IF, ALINK_IFS[0], ALINK_IFS[1]] {
        topology::set_link(Host::Host1.netns(), ifname, false)?;
    }
    let took = wait_for(Duration::from_secs(20), || {
        Ok(node_status(dir, Host::Host2)?.and_then(|s| s.takeover))
    })?;
    let Some(t) = took else {
        r.fail("host2 did not take over within 20 s");
        return Ok(());
    };
    r.detection_ms = Some(t.decided_ms.saturating_sub(fault_ms));
    r.action = format!(
        "host2 took over: guest resumed from checkpoint {} (host1 had {} acknowledged), disk copy served, \
         service address moved; {} records recovered from disk",
        t.failover_epoch, committed_before, t.recovered_count
    );
    r.why = t.reason.clone();
    if t.failover_epoch < committed_before {
        r.fail(format!(
            "guest resumed from checkpoint {} older than the {} host1 had committed",
            t.failover_epoch, committed_before
        ));
    }
    if !wait_acks_after(dir, t.serving_ms, 10, Duration::from_secs(20))? {
        r.fail("the client was not served again within 20 s of the takeover");
    }
    r.downtime_ms = longest_gap(&dir.acks()?, fault_ms);
    let h2 = status(dir, Host::Host2)?;
    match h2.guest_pid {
        Some(p) if Path::new(&format!("/proc/{p}")).exists() => {}
        _ => r.fail("no running guest on host2 after the takeover"),
    }
    r.notes.push(
        "resync not measured: host1 rejoining as the new secondary is not implemented in the \
         lab yet; the VM runs unprotected on host2 (rebuild: xenft-lab down && xenft-lab up)"
            .into(),
    );
    Ok(())
}

fn alinks(
    dir: &StateDir,
    cfg: &DrillConfig,
    r: &mut DrillReport,
    cut: &[&str],
) -> Result<(), LabError> {
    let all = cut.len() == ALINK_IFS.len();
    let fault_ms = now_ms();
    for ifname in cut {
        topology::set_link(Host::Host1.netns(), ifname, false)?;
    }
    // Detection: host1 sees the cut path(s) down.
    let seen = wait_for(Duration::from_secs(10), || {
        let s = status(dir, Host::Host1)?;
        let down = s.link.paths.iter().take(cut.len()).all(|p| !p.up);
        Ok(down.then(now_ms))
    })?;
    match seen {
        Some(t) => r.detection_ms = Some(t.saturating_sub(fault_ms)),
        None => r.fail("host1 never reported the cut A-link path down"),
    }
    std::thread::sleep(cfg.hold);
    let h1 = status(dir, Host::Host1)?;
    let h2 = status(dir, Host::Host2)?;
    if h2.role != NodeRole::Secondary || h2.takeover.is_some() {
        r.fail("host2 took the VM over although host1 was alive (split brain)");
    }
    if !h1.serving {
        r.fail("host1 stopped serving");
    }
    if all {
        r.action = format!(
            "no failover; host1 keeps the VM, disk mirror {} (writes tracked in the dirty bitmap), \
             checkpoint {}",
            h1.disk_state, h1.checkpoint.phase
        );
        r.why = if h2.peer_alive_on_prod == Some(true) {
            "host2 lost both A-links but host1 answered on the production network: alive, so \
             taking over would split the brain"
                .into()
        } else {
            r.fail("host2 did not establish that host1 is alive");
            "host2 had not probed host1".into()
        };
    } else {
        r.action = "traffic moved to alink2; no failover".into();
        r.why = if h1.link.connected {
            "one A-link path is still up: the link carries on over it".into()
        } else {
            r.fail("the A-link was disconnected although one path stayed up");
            "link disconnected".into()
        };
    }
    if !wait_acks_after(
        dir,
        fault_ms + u64::try_from(cfg.hold.as_millis()).unwrap_or(0),
        5,
        Duration::from_secs(10),
    )? {
        r.fail("client writes stalled while the A-link was cut");
    }
    r.downtime_ms = longest_gap(&dir.acks()?, fault_ms);
    let repair_ms = now_ms();
    for ifname in cut {
        topology::set_link(Host::Host1.netns(), ifname, true)?;
    }
    let healed = wait_for(Duration::from_secs(30), || {
        let s = status(dir, Host::Host1)?;
        let ok = s.link.paths.iter().all(|p| p.up)
            && s.disk_state == "in_sync"
            && s.checkpoint.phase == "protected";
        Ok(ok.then(now_ms))
    })?;
    match healed {
        Some(t) => r.resync_ms = Some(t.saturating_sub(repair_ms)),
        None => {
            let s = status(dir, Host::Host1)?;
            r.fail(format!(
                "not back to full protection 30 s after the repair (disk {}, checkpoint {})",
                s.disk_state, s.checkpoint.phase
            ));
        }
    }
    Ok(())
}

fn disk(dir: &StateDir, rec: &PoolRecord, r: &mut DrillReport) -> Result<(), LabError> {
    let fault_ms = now_ms();
    kill(Pid::from_raw(rec.host1_pid), Signal::SIGUSR1)
        .map_err(|e| LabError::component("signalling host1", e))?;
    let seen = wait_for(Duration::from_secs(10), || {
        Ok((status(dir, Host::Host1)?.disk_state == "remote").then(now_ms))
    })?;
    match seen {
        Some(t) => r.detection_ms = Some(t.saturating_sub(fault_ms)),
        None => r.fail("host1's disk never switched to remote mode"),
    }
    let h1 = status(dir, Host::Host1)?;
    r.action =
        "host1 serves the disk from host2's copy over the A-link (remote mode); no failover".into();
    r.why = h1
        .disk
        .get("primary")
        .and_then(|p| p.get("local_failure"))
        .or_else(|| h1.disk.get("local_failure"))
        .and_then(|v| v.as_str())
        .map_or_else(
            || "local store failed".into(),
            |c| format!("local store failed: {c}"),
        );
    if !wait_acks_after(dir, seen.unwrap_or(fault_ms), 10, Duration::from_secs(10))? {
        r.fail("client writes did not continue on the remote copy");
    }
    r.downtime_ms = longest_gap(&dir.acks()?, fault_ms);
    r.notes.push(
        "resync not measured: replacing the failed store is not automated; the VM keeps \
         running on the peer's copy (rebuild: xenft-lab down && xenft-lab up)"
            .into(),
    );
    Ok(())
}

/// A summary table of several drills.
#[must_use]
pub fn table(reports: &[DrillReport]) -> String {
    let mut s = format!(
        "{:<8} {:>10} {:>10} {:>18} {:>10}  {}\n",
        "fault", "detection", "downtime", "acked/missing", "resync", "verdict"
    );
    for r in reports {
        let data = r.data.map_or_else(
            || "not checked".into(),
            |d| format!("{}/{}", r.acked_writes, d.missing),
        );
        s.push_str(&format!(
            "{:<8} {:>10} {:>10} {:>18} {:>10}  {}\n",
            r.fault.to_string(),
            ms(r.detection_ms),
            ms(r.downtime_ms),
            data,
            ms(r.resync_ms),
            if r.passed() { "PASS" } else { "FAIL" }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_gap_looks_around_the_fault_only() {
        let acks = [
            (1, 0),
            (2, 5000),
            (3, 9000),
            (4, 9020),
            (5, 9900),
            (6, 9920),
        ];
        assert_eq!(longest_gap(&acks, 9010), Some(880));
        assert_eq!(longest_gap(&[], 10), None);
    }

    #[test]
    fn a_report_without_data_check_never_passes() {
        let r = DrillReport::new(Fault::Alink);
        assert!(!r.passed());
        let mut ok = DrillReport::new(Fault::Alink);
        ok.data = Some(CheckResult {
            checked: 3,
            missing: 0,
            first_missing: 0,
        });
        assert!(ok.passed());
        ok.fail("x");
        assert!(!ok.passed());
    }

    #[test]
    fn unimplemented_faults_are_refused_by_name() {
        assert!("uplink".parse::<Fault>().is_err());
        assert_eq!("disk".parse::<Fault>().unwrap(), Fault::Disk);
    }
}
