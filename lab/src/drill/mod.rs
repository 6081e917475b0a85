//! The fire drill: inject one real fault into the local pool and measure what the client saw.
//!
//! Every figure comes from outside the component that handles the fault: detection and
//! decisions from the hosts' status files and event log, downtime from the client's
//! acknowledgement log (longest gap between two acknowledged writes around the fault), and
//! the data check by reading every acknowledged record back through the service from the
//! client's namespace. The verdict is PASS only when every check below ran and held.

mod report;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::pool::{node_status, protected_primary, restart_node};
pub use report::{table, DrillReport};

use crate::service::{parse_check, CheckResult};
use crate::state::{Event, NodeStatus, PoolRecord, StateDir};
use crate::topology::{
    self, Host, ALINK_IFS, MGMT_IF, NS_CLIENT, PROD_IF, SERVICE_IP, SERVICE_PORT, VM_IF,
};
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
    /// The primary's disk fails: its file is cut short under its `xenft-blkback` (every I/O
    /// fails).
    Disk,
    /// The A-links and the hosts' direct management path are cut; both hosts still reach
    /// the quorum server, which decides who keeps the VM.
    Partition,
    /// The primary's production interface goes down.
    Uplink,
    /// The primary loses its A-links and its management link (peer and quorum server) but
    /// keeps its production interface: clients still reach it; it must fence itself.
    Isolate,
}

impl std::str::FromStr for Fault {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self, LabError> {
        match s {
            "host" => Ok(Self::Host),
            "alink" => Ok(Self::Alink),
            "alinks" => Ok(Self::Alinks),
            "disk" => Ok(Self::Disk),
            "partition" => Ok(Self::Partition),
            "uplink" => Ok(Self::Uplink),
            "isolate" => Ok(Self::Isolate),
            _ => Err(LabError::WrongState(format!(
                "unknown fault {s:?} (host, alink, alinks, partition, isolate, uplink, disk)"
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
            Self::Partition => "partition",
            Self::Uplink => "uplink",
            Self::Isolate => "isolate",
        })
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
pub(crate) fn check_records(exe: &Path, n: u64) -> Result<CheckResult, LabError> {
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
    /// How long a cut A-link (or a dead host, before its repair) stays cut.
    pub hold: Duration,
}

/// Runs one drill on the local pool, against whichever host runs the VM now.
pub fn run(dir: &StateDir, cfg: &DrillConfig) -> Result<DrillReport, LabError> {
    require_root()?;
    let rec: PoolRecord = dir
        .read_json(&dir.pool_file())?
        .ok_or_else(|| LabError::WrongState("no lab pool: run `xenft-lab up` first".into()))?;
    let Some(primary) = protected_primary(dir)? else {
        return Err(LabError::WrongState(
            "the VM is not fully protected now (agent phase protected, checkpointing, disk in \
             sync, the peer receiving); a drill needs a healthy pool: `xenft-lab down && \
             xenft-lab up`"
                .into(),
        ));
    };
    if !wait_acks_after(dir, now_ms(), 3, Duration::from_secs(5))? {
        return Err(LabError::WrongState(
            "the client is not being served".into(),
        ));
    }
    let mut r = DrillReport::new(cfg.fault);
    r.primary = Some(primary);
    let say = |what: String, why: &str| {
        dir.log_event(&Event {
            t_ms: now_ms(),
            host: "drill".into(),
            what,
            why: why.into(),
        });
    };
    say(
        format!(
            "drill fault={}: injecting (vm1 runs on {})",
            cfg.fault,
            primary.name()
        ),
        "fire drill",
    );
    match cfg.fault {
        Fault::Host => host(dir, cfg, &rec, &mut r, primary)?,
        Fault::Alink => alinks(dir, cfg, &mut r, primary, &ALINK_IFS[..1])?,
        Fault::Alinks => alinks(dir, cfg, &mut r, primary, &ALINK_IFS)?,
        Fault::Partition => partition(dir, cfg, &mut r, primary)?,
        Fault::Disk => disk(dir, &mut r, primary)?,
        Fault::Uplink => uplink(dir, cfg, &mut r, primary)?,
        Fault::Isolate => isolate(dir, cfg, &mut r, primary)?,
    }
    data_check(dir, &cfg.exe, &mut r)?;
    r.final_state = Some(final_state(dir)?);
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

/// `protected (vm1 on host2, host1 secondary)` or the agents' phases.
fn final_state(dir: &StateDir) -> Result<String, LabError> {
    if let Some(p) = protected_primary(dir)? {
        return Ok(format!(
            "protected (vm1 on {}, {} secondary)",
            p.name(),
            p.peer().name()
        ));
    }
    if let Some(p) = crate::pool::serving_host(dir)? {
        if status(dir, p)?.disk_state == "remote" {
            return Ok(format!(
                "running on {}, disk redirected to {}'s copy (remote mode)",
                p.name(),
                p.peer().name()
            ));
        }
    }
    let mut parts = Vec::new();
    for h in [Host::Host1, Host::Host2] {
        match node_status(dir, h)? {
            Some(s) => parts.push(format!(
                "{} {:?} agent {}",
                h.name(),
                s.role,
                if s.agent.phase.is_empty() {
                    "-"
                } else {
                    &s.agent.phase
                }
            )),
            None => parts.push(format!("{} down", h.name())),
        }
    }
    Ok(format!("not protected: {}", parts.join(", ")))
}

/// The first decision of `h`'s agent logged at or after `since_ms` whose text contains
/// `what` (class and action, e.g. `peer_silent`, `fail_over`, `redirect disk`).
fn agent_decision(
    dir: &StateDir,
    h: Host,
    since_ms: u64,
    what: &str,
) -> Result<Option<Event>, LabError> {
    Ok(dir
        .events_since(since_ms)?
        .into_iter()
        .find(|e| e.host == h.name() && e.what.starts_with("agent ") && e.what.contains(what)))
}

fn wait_decision(
    dir: &StateDir,
    h: Host,
    since_ms: u64,
    what: &str,
    timeout: Duration,
) -> Result<Option<Event>, LabError> {
    wait_for(timeout, || agent_decision(dir, h, since_ms, what))
}

/// Waits until the VM is fully protected with `primary` running it; the time it took.
fn wait_protected(
    dir: &StateDir,
    primary: Host,
    since: Instant,
    timeout: Duration,
) -> Result<Option<u64>, LabError> {
    wait_for(timeout, || {
        Ok((protected_primary(dir)? == Some(primary))
            .then(|| u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)))
    })
}

fn host(
    dir: &StateDir,
    cfg: &DrillConfig,
    rec: &PoolRecord,
    r: &mut DrillReport,
    p: Host,
) -> Result<(), LabError> {
    let s = p.peer();
    let before = status(dir, p)?;
    let committed_before = before.checkpoint.committed_epoch;
    let fault_ms = now_ms();
    // The whole host dies: its host process, its agent and components, and its VM.
    let _ = kill(Pid::from_raw(rec.pid(p)), Signal::SIGKILL);
    for ns in [p.netns(), p.vm_netns()] {
        for pid in topology::pids_in(ns)? {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    topology::set_host_links(p, false)?;
    let took = wait_for(Duration::from_secs(30), || {
        Ok(node_status(dir, s)?.and_then(|st| st.takeover))
    })?;
    let Some(t) = took else {
        r.fail(format!("{} did not take over within 30 s", s.name()));
        return Ok(());
    };
    match agent_decision(dir, s, fault_ms, "fail_over")? {
        Some(d) => {
            r.detection_ms = Some(d.t_ms.saturating_sub(fault_ms));
            r.why = format!("{}'s agent: {}", s.name(), d.why);
        }
        None => {
            r.fail("no fail_over decision from the agent");
            r.why = t.reason.clone();
        }
    }
    r.action = format!(
        "{} took over (agent decision fail_over): guest resumed from checkpoint {} ({} had {} \
         acknowledged), disk copy served, service address moved; {} records recovered from disk",
        s.name(),
        t.failover_epoch,
        p.name(),
        committed_before,
        t.recovered_count
    );
    if t.failover_epoch < committed_before {
        r.fail(format!(
            "guest resumed from checkpoint {} older than the {} {} had committed",
            t.failover_epoch,
            committed_before,
            p.name()
        ));
    }
    if !wait_acks_after(dir, t.serving_ms, 10, Duration::from_secs(20))? {
        r.fail("the client was not served again within 20 s of the takeover");
    }
    r.downtime_ms = longest_gap(&dir.acks()?, fault_ms);
    match status(dir, s)?.guest_pid {
        Some(g) if Path::new(&format!("/proc/{g}")).exists() => {}
        _ => r.fail(format!(
            "no running guest on {} after the takeover",
            s.name()
        )),
    }

    // The dead host stays down for `hold`; then the repair: the host comes back clean (no
    // service address), its host process and agent restart and its agent makes it the secondary of the VM
    // now running on the peer.
    std::thread::sleep(cfg.hold);
    let repair = Instant::now();
    let vip = format!("{SERVICE_IP}/24");
    let _ = topology::ip_in(p.vm_netns(), &["addr", "del", &vip, "dev", VM_IF]);
    topology::set_host_links(p, true)?;
    restart_node(dir, p)?;
    match wait_protected(dir, s, repair, Duration::from_secs(240))? {
        Some(ms) => {
            r.resync_ms = Some(ms);
            r.notes.push(format!(
                "repair: {} restarted; its agent adopted {}'s view (generation {}) and it became \
                 the secondary; full disk sync + memory initial sync (dirty-only resync needs \
                 the dead primary's bitmap)",
                p.name(),
                s.name(),
                status(dir, s)?.agent.generation
            ));
        }
        None => r.fail(format!(
            "{} back but vm1 not protected again within 240 s ({})",
            p.name(),
            final_state(dir)?
        )),
    }
    Ok(())
}

fn alinks(
    dir: &StateDir,
    cfg: &DrillConfig,
    r: &mut DrillReport,
    p: Host,
    cut: &[&str],
) -> Result<(), LabError> {
    let s = p.peer();
    let all = cut.len() == ALINK_IFS.len();
    let fault_ms = now_ms();
    for ifname in cut {
        topology::set_link(p.netns(), ifname, false)?;
    }
    let (class, decider) = if all {
        ("all_alinks_down", s)
    } else {
        ("path_down", p)
    };
    match wait_decision(dir, decider, fault_ms, class, Duration::from_secs(10))? {
        Some(d) => {
            r.detection_ms = Some(d.t_ms.saturating_sub(fault_ms));
            r.why = format!("{}'s agent ({class}): {}", decider.name(), d.why);
        }
        None => r.fail(format!(
            "{}'s agent made no {class} decision within 10 s",
            decider.name()
        )),
    }
    let hold_end = Instant::now() + cfg.hold;
    while Instant::now() < hold_end {
        if node_status(dir, s)?.is_some_and(|st| st.serving || st.takeover.is_some()) {
            r.fail(format!(
                "{} took the VM over although {} was alive (split brain)",
                s.name(),
                p.name()
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let hp = status(dir, p)?;
    if !hp.serving {
        r.fail(format!("{} stopped serving", p.name()));
    }
    r.action = if all {
        format!(
            "no failover; {} keeps the VM (agent phase {}), disk mirror {} (writes tracked in \
             the dirty bitmap), checkpoint {}",
            p.name(),
            hp.agent.phase,
            hp.disk_state,
            hp.checkpoint.phase
        )
    } else {
        if !hp.link.connected {
            r.fail("the A-link was disconnected although one path stayed up");
        }
        "traffic moved to alink2; no failover".into()
    };
    if !wait_acks_after(
        dir,
        fault_ms + u64::try_from(cfg.hold.as_millis()).unwrap_or(0),
        5,
        Duration::from_secs(10),
    )? {
        r.fail("client writes stalled while the A-link was cut");
    }
    r.downtime_ms = longest_gap(&dir.acks()?, fault_ms);
    let repair = Instant::now();
    for ifname in cut {
        topology::set_link(p.netns(), ifname, true)?;
    }
    heal(dir, r, p, repair)
}

fn heal(dir: &StateDir, r: &mut DrillReport, p: Host, repair: Instant) -> Result<(), LabError> {
    match wait_protected(dir, p, repair, Duration::from_secs(60))? {
        Some(ms) => r.resync_ms = Some(ms),
        None => r.fail(format!(
            "not back to full protection 60 s after the repair ({})",
            final_state(dir)?
        )),
    }
    Ok(())
}

/// Which host's copy answers `GET` on the service address inside the VM's namespace on
/// `from` (the copy there, if it holds the address and serves).
fn who_serves(exe: &Path, from: Host) -> Option<String> {
    let addr = format!("{SERVICE_IP}:{SERVICE_PORT}");
    let out = topology::run(
        "ip",
        &[
            "netns",
            "exec",
            from.vm_netns(),
            &exe.display().to_string(),
            "ask",
            "--addr",
            &addr,
            "--request",
            "GET",
            "--timeout-ms",
            "300",
        ],
    )
    .ok()?;
    out.split_whitespace()
        .skip_while(|w| *w != "HOST")
        .nth(1)
        .map(str::to_owned)
}

fn partition(
    dir: &StateDir,
    cfg: &DrillConfig,
    r: &mut DrillReport,
    p: Host,
) -> Result<(), LabError> {
    let s = p.peer();
    let claims_before = status(dir, s)?.agent.quorum_requests;
    let fault_ms = now_ms();
    for ifname in ALINK_IFS {
        topology::set_link(p.netns(), ifname, false)?;
    }
    topology::set_mgmt_forwarding(false)?;
    // Hold long enough for the secondary to declare the primary silent and ask the quorum
    // server; probe both hosts' view of the service all along.
    let (probes, two) = probe_copies(&cfg.exe, p, cfg.hold.max(Duration::from_secs(5)));
    if two > 0 {
        r.fail(format!(
            "split brain: both hosts served the VM in {two} of {probes} probes"
        ));
    }
    let (hp, hs) = (status(dir, p)?, status(dir, s)?);
    // A secondary asks the quorum server only to claim the VM.
    let claims = hs.agent.quorum_requests.saturating_sub(claims_before);
    if claims == 0 {
        r.fail(format!("{} never asked the quorum server", s.name()));
    }
    if !hp.serving {
        r.fail(format!("{} stopped serving", p.name()));
    }
    if hs.serving || hs.takeover.is_some() {
        r.fail(format!(
            "{} took the VM over during the partition",
            s.name()
        ));
    }
    if !hp.agent.lease_valid {
        r.fail(format!("{}'s agent holds no quorum lease", p.name()));
    }
    match agent_decision(dir, s, fault_ms, "peer_silent")? {
        Some(d) => {
            r.detection_ms = Some(d.t_ms.saturating_sub(fault_ms));
            r.why = format!(
                "{}'s agent: {}; the quorum server kept the lease with {} (its agent renews \
                 it: lease_valid={}), so {}'s {claims} claims were denied (lease_valid={}, \
                 local copy {})",
                s.name(),
                d.why,
                p.name(),
                hp.agent.lease_valid,
                s.name(),
                hs.agent.lease_valid,
                if hs.agent.local.is_empty() {
                    "-"
                } else {
                    &hs.agent.local
                }
            );
        }
        None => r.fail(format!(
            "{}'s agent never declared {} silent",
            s.name(),
            p.name()
        )),
    }
    r.action = format!(
        "A-links and the hosts' management path cut, both still reach the quorum server: {} \
         keeps the VM (agent phase {}), {} does not run it; {probes} probes of both hosts, \
         {two} with two serving copies",
        p.name(),
        hp.agent.phase,
        s.name()
    );
    if !wait_acks_after(dir, fault_ms + 1000, 5, Duration::from_secs(10))? {
        r.fail("client writes stalled during the partition");
    }
    r.downtime_ms = longest_gap(&dir.acks()?, fault_ms);
    let repair = Instant::now();
    topology::set_mgmt_forwarding(true)?;
    for ifname in ALINK_IFS {
        topology::set_link(p.netns(), ifname, true)?;
    }
    heal(dir, r, p, repair)
}

/// Probes both hosts' view of the service every 100 ms for `hold`: (probes, probes in which
/// each host answered with its own copy).
fn probe_copies(exe: &Path, p: Host, hold: Duration) -> (u32, u32) {
    let end = Instant::now() + hold;
    let (mut probes, mut two) = (0u32, 0u32);
    while Instant::now() < end {
        let a = who_serves(exe, p);
        let b = who_serves(exe, p.peer());
        probes += 1;
        if a.as_deref() == Some(p.name()) && b.as_deref() == Some(p.peer().name()) {
            two += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (probes, two)
}

fn isolate(
    dir: &StateDir,
    cfg: &DrillConfig,
    r: &mut DrillReport,
    p: Host,
) -> Result<(), LabError> {
    let s = p.peer();
    let fault_ms = now_ms();
    for ifname in [ALINK_IFS[0], ALINK_IFS[1], MGMT_IF] {
        topology::set_link(p.netns(), ifname, false)?;
    }
    let (probes, two) = probe_copies(&cfg.exe, p, cfg.hold.max(Duration::from_secs(6)));
    if two > 0 {
        r.fail(format!(
            "split brain: both hosts served the VM in {two} of {probes} probes"
        ));
    }
    let fence = agent_decision(dir, p, fault_ms, "fence")?;
    let failover = agent_decision(dir, s, fault_ms, "fail_over")?;
    match (&fence, &failover) {
        (Some(f), Some(o)) => {
            r.detection_ms = Some(o.t_ms.saturating_sub(fault_ms));
            r.why = format!(
                "{}'s agent fenced at +{} ms: {}; {}'s agent: {}",
                p.name(),
                f.t_ms.saturating_sub(fault_ms),
                f.why,
                s.name(),
                o.why
            );
            if f.t_ms > o.t_ms {
                r.fail("the isolated primary fenced after the peer took over");
            }
        }
        _ => r.fail(format!(
            "expected a fence on {} and a fail_over on {} (got {} and {})",
            p.name(),
            s.name(),
            fence.is_some(),
            failover.is_some()
        )),
    }
    let (hp, hs) = (status(dir, p)?, status(dir, s)?);
    if hp.serving || !hs.serving {
        r.fail(format!(
            "after the isolation {} serving={} and {} serving={}",
            p.name(),
            hp.serving,
            s.name(),
            hs.serving
        ));
    }
    r.action = format!(
        "{} paused its copy (fenced: no lease, no promise), {} took the VM over; {probes} \
         probes of both hosts, {two} with two serving copies",
        p.name(),
        s.name()
    );
    if !wait_acks_after(dir, now_ms(), 5, Duration::from_secs(10))? {
        r.fail("the client was not served after the take-over");
    }
    r.downtime_ms = longest_gap(&dir.acks()?, fault_ms);
    let repair = Instant::now();
    topology::set_host_links(p, true)?;
    match wait_protected(dir, s, repair, Duration::from_secs(120))? {
        Some(ms) => {
            r.resync_ms = Some(ms);
            r.notes.push(format!(
                "repair: {}'s agent stepped down (the peer owns the VM at a higher generation), \
                 dropped its fenced copy and became the secondary",
                p.name()
            ));
        }
        None => r.fail(format!(
            "not protected again 120 s after the repair ({})",
            final_state(dir)?
        )),
    }
    Ok(())
}

fn uplink(dir: &StateDir, cfg: &DrillConfig, r: &mut DrillReport, p: Host) -> Result<(), LabError> {
    let s = p.peer();
    let fault_ms = now_ms();
    topology::set_link(p.netns(), PROD_IF, false)?;
    match wait_decision(dir, p, fault_ms, "redirect uplink", Duration::from_secs(10))? {
        Some(d) => {
            r.detection_ms = Some(d.t_ms.saturating_sub(fault_ms));
            r.why = format!("{}'s agent: {}", p.name(), d.why);
        }
        None => r.fail(format!(
            "{}'s agent made no redirect decision for the uplink",
            p.name()
        )),
    }
    let hold_end = Instant::now() + cfg.hold;
    while Instant::now() < hold_end {
        if node_status(dir, s)?.is_some_and(|st| st.serving || st.takeover.is_some()) {
            r.fail(format!("{} took the VM over", s.name()));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !wait_acks_after(
        dir,
        fault_ms + u64::try_from(cfg.hold.as_millis()).unwrap_or(0),
        5,
        Duration::from_secs(10),
    )? {
        r.fail(format!(
            "the client was not served through {} while {}'s uplink was down",
            s.name(),
            p.name()
        ));
    }
    r.downtime_ms = longest_gap(&dir.acks()?, fault_ms);
    let hp = status(dir, p)?;
    if !hp.serving {
        r.fail(format!("{} stopped serving", p.name()));
    }
    r.action = format!(
        "no failover; {} keeps running vm1, its xenft-netback tunnels the VM's frames over the \
         A-link to {}'s xenft-netback, which relays them to the production network",
        p.name(),
        s.name()
    );
    let repair = Instant::now();
    let repair_ms = now_ms();
    topology::set_link(p.netns(), PROD_IF, true)?;
    match wait_decision(dir, p, repair_ms, "restore uplink", Duration::from_secs(10))? {
        Some(d) => r.notes.push(format!(
            "repair: {}'s agent restored the uplink after {} ms: {}",
            p.name(),
            d.t_ms.saturating_sub(repair_ms),
            d.why
        )),
        None => r.fail(format!(
            "{}'s agent did not restore the uplink after the repair",
            p.name()
        )),
    }
    let restored = wait_for(Duration::from_secs(10), || {
        Ok(status(dir, p)?
            .net
            .is_some_and(|n| !n.redirecting && n.uplink_up)
            .then_some(()))
    })?;
    if restored.is_none() {
        r.fail(format!(
            "{}'s netback never went back to its own uplink",
            p.name()
        ));
    }
    if !wait_acks_after(dir, now_ms(), 5, Duration::from_secs(10))? {
        r.fail("the client was not served after the uplink came back");
    }
    heal(dir, r, p, repair)
}

fn disk(dir: &StateDir, r: &mut DrillReport, p: Host) -> Result<(), LabError> {
    // The disk file is cut to half its size under the running blkback: every later I/O
    // fails (blkback checks its backing file at each one).
    let file = crate::xapi_pool::disk_file(dir, p)
        .ok_or_else(|| LabError::WrongState(format!("{} holds no disk copy of vm1", p.name())))?;
    let io = |source| LabError::Io {
        path: file.clone(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let fault_ms = now_ms();
    f.set_len(len / 2).map_err(io)?;
    let seen = wait_for(Duration::from_secs(10), || {
        Ok((status(dir, p)?.disk_state == "remote").then(now_ms))
    })?;
    match seen {
        Some(t) => r.detection_ms = Some(t.saturating_sub(fault_ms)),
        None => r.fail(format!("{}'s disk never switched to remote mode", p.name())),
    }
    r.action = format!(
        "{} serves the disk from {}'s copy over the A-link (remote mode); no failover",
        p.name(),
        p.peer().name()
    );
    match wait_decision(dir, p, fault_ms, "redirect disk", Duration::from_secs(5))? {
        Some(d) => r.why = format!("{}'s agent: {}", p.name(), d.why),
        None => r.fail(format!(
            "{}'s agent made no redirect decision for the disk",
            p.name()
        )),
    }
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
        assert!("meteor".parse::<Fault>().is_err());
        assert_eq!("uplink".parse::<Fault>().unwrap(), Fault::Uplink);
        assert_eq!("partition".parse::<Fault>().unwrap(), Fault::Partition);
        assert_eq!("disk".parse::<Fault>().unwrap(), Fault::Disk);
    }
}
