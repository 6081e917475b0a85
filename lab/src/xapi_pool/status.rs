//! A host's status file and its share of the event log, from outside the product: what the
//! host's `xenft-agent` says (its status API: `GET /status`, and every decision as it is made
//! on `GET /events`), what the VM's components say on their control sockets (`xenft-blkback`,
//! `xenft-netback`, `xenft-checkpoint`, through the control contract), and what the VM
//! process wrote when it started serving. The drills and `status` read these
//! files; nothing here acts on the pool.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use xenft_agent::decision::{Action, Decision};
use xenft_control::{blkback, checkpoint, netback, Blkback, Checkpoint, Client, Netback};

use crate::state::{
    AgentView, CheckpointView, Event, LinkView, NetView, NodeRole, NodeStatus, PathView, StateDir,
    Takeover,
};
use crate::topology::{Host, STATUS_PORT};
use crate::{json_word, now_ms};

/// What the VM process writes once it serves (`<dir>/<host>.vm.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmProcStatus {
    /// The VM process.
    pub pid: u32,
    /// When it started serving (Unix ms).
    pub serving_ms: u64,
    /// The service's counter recovered from the disk.
    pub recovered_count: u64,
}

/// The VM process status file of host `h`.
#[must_use]
pub fn vm_file(dir: &StateDir, h: Host) -> PathBuf {
    dir.file(&format!("{}.vm.json", h.name()))
}

/// A fail-over decided by this host's agent, waiting for the VM to serve here.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    decided_ms: Option<u64>,
    reason: String,
    done: Option<Takeover>,
    /// The replica's last committed checkpoint while it received (the one a take-over
    /// resumes: the engine reports none once the guest runs).
    replica_epoch: u64,
}

fn agent_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], STATUS_PORT))
}

/// `GET path` on the agent's status API (blocking, bounded).
fn agent_get(path: &str) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&agent_addr(), Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.take(4 << 20).read_to_string(&mut out).ok()?;
    let body = out.split_once("\r\n\r\n")?.1;
    serde_json::from_str(body).ok()
}

/// Follows the agent's decisions (`GET /events`) into the event log for ever, reconnecting
/// when the agent restarts; a fail-over by this host starts `pending`.
pub fn follow_decisions(h: Host, dir: &StateDir, pending: &Arc<Mutex<Pending>>) {
    loop {
        if let Ok(mut s) = TcpStream::connect_timeout(&agent_addr(), Duration::from_millis(300)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            if write!(s, "GET /events HTTP/1.1\r\nHost: agent\r\n\r\n").is_ok() {
                for line in BufReader::new(s).lines() {
                    let Ok(line) = line else { break };
                    let Some(data) = line.strip_prefix("data: ") else {
                        continue;
                    };
                    if let Ok(d) = serde_json::from_str::<Decision>(data) {
                        record(h, dir, pending, d);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn record(h: Host, dir: &StateDir, pending: &Arc<Mutex<Pending>>, d: Decision) {
    let t_ms = now_ms();
    if d.action == Action::FailOver && d.host.as_str() == h.name() {
        let mut p = pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        p.decided_ms = Some(t_ms);
        p.reason.clone_from(&d.reason);
        p.done = None;
    }
    dir.log_event(&Event {
        t_ms,
        host: d.host.to_string(),
        what: format!(
            "agent {}: {}",
            json_word(&d.class),
            match d.action {
                Action::Redirect(c) => format!("redirect {}", json_word(&c)),
                Action::Restore(c) => format!("restore {}", json_word(&c)),
                a => json_word(&a)
                    .trim_start_matches("{\"kind\":\"")
                    .trim_end_matches("\"}")
                    .to_string(),
            }
        ),
        why: d.reason,
    });
}

/// The VM's runtime directory under `run_dir` (the lab runs one VM).
fn vm_dir(run_dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(run_dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_dir())
}

const CONTROL_TIMEOUT: Duration = Duration::from_millis(500);

fn disk_view(dir: Option<&Path>) -> (String, serde_json::Value, bool) {
    let Some(d) = dir else {
        return (String::new(), serde_json::Value::Null, false);
    };
    let st = match Client::<Blkback>::new(d.join("blkback.sock"), CONTROL_TIMEOUT)
        .call(&blkback::Request::Status)
    {
        Ok(blkback::Reply::Status(s)) => s.node,
        Ok(other) => {
            return (
                "unknown".into(),
                serde_json::json!({"reply": format!("{other:?}")}),
                false,
            )
        }
        Err(e) => {
            return (
                "unknown".into(),
                serde_json::json!({"error": e.to_string()}),
                false,
            )
        }
    };
    let (state, copy) = match &st {
        blkback::NodeStatus::Primary { primary: p } if p.local_failure.is_some() => {
            ("remote", false)
        }
        blkback::NodeStatus::Primary { primary: p } => (
            match p.peer {
                blkback::PeerLink::InSync => "in_sync",
                blkback::PeerLink::Resyncing => "resyncing",
                blkback::PeerLink::Degraded => "degraded",
            },
            false,
        ),
        blkback::NodeStatus::Local => ("local", false),
        blkback::NodeStatus::Secondary { .. } => ("copy", true),
    };
    let detail = match &st {
        blkback::NodeStatus::Primary { primary } => serde_json::to_value(primary),
        blkback::NodeStatus::Secondary { secondary } => serde_json::to_value(secondary),
        blkback::NodeStatus::Local => Ok(serde_json::Value::Null),
    };
    (state.into(), detail.unwrap_or_default(), copy)
}

/// The relay's view, and whether it isolates the VM (fenced: no frame either way).
fn net_view(dir: Option<&Path>) -> Option<(NetView, bool)> {
    let c = match Client::<Netback>::new(dir?.join("netback.sock"), CONTROL_TIMEOUT)
        .call(&netback::Request::Counters)
    {
        Ok(netback::Reply::Counters { counters }) => *counters,
        _ => return None,
    };
    Some((
        NetView {
            mode: json_word(&c.mode),
            redirecting: c.redirect.redirecting,
            serving_peer: c.redirect.serving_peer,
            uplink_up: c.redirect.uplink_up,
        },
        c.isolated,
    ))
}

/// The engine's view and the guest's pid.
fn checkpoint_view(dir: Option<&Path>) -> (CheckpointView, Option<u32>) {
    let Some(d) = dir else {
        return (CheckpointView::default(), None);
    };
    let s = match Client::<Checkpoint>::new(d.join("checkpoint.sock"), CONTROL_TIMEOUT)
        .call(&checkpoint::Request::Status)
    {
        Ok(checkpoint::Reply::Status(s)) => *s,
        _ => return (CheckpointView::default(), None),
    };
    let committed = s.committed_epoch.unwrap_or(0);
    let view = match (&s.state, &s.primary) {
        (checkpoint::State::Protecting, Some(p)) => CheckpointView {
            phase: match p.phase {
                checkpoint::Phase::Failed => {
                    format!("failed: {}", p.reason.clone().unwrap_or_default())
                }
                ph => json_word(&ph),
            },
            epoch: p.epoch,
            committed_epoch: p.committed_epoch,
            lag_bytes: 0,
            last_commit_age_ms: None,
        },
        (checkpoint::State::Waiting | checkpoint::State::Receiving, _) => CheckpointView {
            phase: "receiving".into(),
            committed_epoch: committed,
            ..CheckpointView::default()
        },
        (checkpoint::State::Running, _) => CheckpointView {
            phase: "unprotected".into(),
            committed_epoch: committed,
            ..CheckpointView::default()
        },
        (other, _) => CheckpointView {
            phase: json_word(other),
            committed_epoch: committed,
            ..CheckpointView::default()
        },
    };
    (view, s.guest_pid)
}

/// Whether `pid` runs (`None`: gone or a zombie), and whether it is stopped (SIGSTOP: a
/// paused VM).
pub(crate) fn proc_state(pid: u32) -> Option<bool> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat[stat.rfind(')')? + 1..].split_whitespace().next()?;
    match state {
        "Z" | "X" => None,
        s => Some(s == "T" || s == "t"),
    }
}

fn agent_view(h: Host, doc: Option<&serde_json::Value>) -> (AgentView, LinkView) {
    let t = crate::pool::lab_timing();
    let mut v = AgentView {
        expected_failover_ms: t.peer_dead_ms.max(t.lease_ms) + t.heartbeat_ms,
        ..AgentView::default()
    };
    let mut link = LinkView::default();
    let Some(doc) = doc else {
        return (v, link);
    };
    v.quorum_ok = doc["quorum"]
        .as_array()
        .is_some_and(|q| q.iter().any(|e| e[1].as_bool() == Some(true)));
    v.quorum_requests = doc["counters"]["quorum_requests"].as_u64().unwrap_or(0);
    if let Some(p) = doc["peers"].as_array().and_then(|p| p.first()) {
        v.peer_silent = p["silent"].as_bool().unwrap_or(false);
        for path in p["paths"].as_array().into_iter().flatten() {
            let up = path[1].as_bool().unwrap_or(false);
            v.paths.push((json_word(&path[0]), up));
            // The agent's heartbeat paths: the A-links (the management path has no "alink").
            if json_word(&path[0]).to_lowercase().contains("alink") {
                link.paths.push(PathView {
                    up,
                    rtt_ms: None,
                    connects: 0,
                });
            }
        }
        link.connected = link.paths.iter().any(|p| p.up);
    }
    if let Some(vm) = doc["vms"].as_array().and_then(|v| v.first()) {
        v.phase = json_word(&vm["record"]["phase"]);
        v.primary = json_word(&vm["record"]["primary"]);
        v.generation = vm["record"]["generation"].as_u64().unwrap_or(0);
        v.local = json_word(&vm["local"]);
        v.lease_valid = vm["lease_valid"].as_bool().unwrap_or(false);
    }
    let _ = h;
    (v, link)
}

/// Host `h`'s status now.
pub fn snapshot(
    h: Host,
    dir: &StateDir,
    run_dir: &Path,
    pending: &Arc<Mutex<Pending>>,
) -> NodeStatus {
    let doc = agent_get("/status");
    let (agent, link) = agent_view(h, doc.as_ref());
    let vmd = vm_dir(run_dir);
    let (disk_state, disk, copy) = disk_view(vmd.as_deref());
    let (checkpoint, guest_pid) = checkpoint_view(vmd.as_deref());
    let vm: Option<VmProcStatus> = dir.read_json(&vm_file(dir, h)).ok().flatten();
    let running = vm
        .as_ref()
        .and_then(|v| proc_state(v.pid).map(|stopped| (v.clone(), stopped)));
    let net = net_view(vmd.as_deref());
    // Fenced: the VM paused, or its relay isolating it (the agent fences through both; the
    // pause goes through xapi, which an isolated host may not reach).
    let isolated = net.as_ref().is_some_and(|n| n.1);
    let running = running.map(|(v, stopped)| (v, stopped || isolated));
    let role = match &running {
        Some((_, false)) => NodeRole::Primary,
        Some((_, true)) => NodeRole::Fenced,
        None if copy => NodeRole::Secondary,
        None => NodeRole::Standby,
    };
    let takeover = {
        let mut p = pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if checkpoint.phase == "receiving" {
            p.replica_epoch = checkpoint.committed_epoch;
        }
        // A take-over belongs to the VM's stay here: gone with it (the VM moved back).
        if running.is_none() && p.done.is_some() {
            p.done = None;
            p.decided_ms = None;
        }
        if p.done.is_none() {
            if let (Some(decided), Some((v, false))) = (p.decided_ms, &running) {
                if v.serving_ms >= decided {
                    p.done = Some(Takeover {
                        decided_ms: decided,
                        serving_ms: v.serving_ms,
                        failover_epoch: p.replica_epoch.max(checkpoint.committed_epoch),
                        recovered_count: v.recovered_count,
                        reason: p.reason.clone(),
                    });
                }
            }
        }
        p.done.clone()
    };
    NodeStatus {
        host: h,
        pid: std::process::id(),
        updated_ms: now_ms(),
        role,
        serving: matches!(running, Some((_, false))),
        service_count: running.as_ref().map_or(0, |(v, _)| v.recovered_count),
        guest_pid,
        link,
        checkpoint,
        disk_state,
        disk,
        net: net.map(|n| n.0),
        takeover,
        agent,
    }
}
