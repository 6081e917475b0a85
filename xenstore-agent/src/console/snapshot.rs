//! One pool snapshot as the page shows it, built purely from what the console gathered: the
//! registry as xapi holds it ([`RegistryView`]: hosts, every VM with its `xenft.level`,
//! `xenft.secondary`, `xenft.state`) and each host's agent as its console reports it (the
//! agent's status — peers, paths, protected VMs with phase and generation —, its decisions
//! with their reasons, its VMs' components: disk mirror, resync, checkpoints). A peer's view
//! arrives over the network and is read as untrusted JSON: a missing or odd field is shown as
//! unknown, never a panic.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};
use xenft_xapi::api::{Ref, VmRecord};
use xenft_xapi::registry::{VM_LEVEL, VM_SECONDARY, VM_STATE};

use crate::xapi::desired::Desired;

/// A host as the registry lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RegHost {
    /// `name_label`.
    pub name: String,
    /// Management address.
    pub address: String,
}

/// A VM as the registry holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RegVm {
    /// uuid (the agents' VM id).
    pub uuid: String,
    /// `name_label`.
    pub name: String,
    /// `power_state`.
    pub power_state: String,
    /// The host it runs on (name).
    pub runs_on: Option<String>,
    /// `xenft.level`, when protection is asked for.
    pub level: Option<u8>,
    /// `xenft.secondary` (name, or the uuid when the host is unknown).
    pub secondary: Option<String>,
    /// `xenft.state`, as the agents wrote it.
    pub state: Option<String>,
}

/// The registry part of a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RegistryView {
    /// Hosts, by name.
    pub hosts: Vec<RegHost>,
    /// VMs (no templates, snapshots or control domains), by name.
    pub vms: Vec<RegVm>,
    /// Why the VM list is missing or old (xapi unreachable), if it is.
    pub problem: Option<String>,
}

/// The registry view from the follower's desired state and xapi's VM records.
#[must_use]
pub fn registry_view(d: &Desired, vms: &BTreeMap<Ref, VmRecord>) -> RegistryView {
    let name_of_ref: BTreeMap<&str, &str> = d
        .host_refs
        .iter()
        .filter_map(|(uuid, r)| Some((r.as_str(), d.hosts.get(uuid)?.name.as_str())))
        .collect();
    let mut hosts: Vec<RegHost> = d
        .hosts
        .values()
        .map(|h| RegHost {
            name: h.name.clone(),
            address: h.address.clone(),
        })
        .collect();
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    let mut list: Vec<RegVm> = vms
        .values()
        .filter(|v| !v.is_a_template && !v.is_control_domain && !v.is_a_snapshot)
        .map(|v| {
            let oc = |k: &str| {
                v.other_config
                    .get(k)
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
            };
            RegVm {
                uuid: v.uuid.clone(),
                name: v.name_label.clone(),
                power_state: v.power_state.clone(),
                runs_on: name_of_ref
                    .get(v.resident_on.as_str())
                    .map(|s| (*s).to_string()),
                level: oc(VM_LEVEL).and_then(|l| l.parse().ok()),
                secondary: oc(VM_SECONDARY).map(|s| d.hosts.get(&s).map_or(s, |h| h.name.clone())),
                state: oc(VM_STATE),
            }
        })
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name).then(a.uuid.cmp(&b.uuid)));
    RegistryView {
        hosts,
        vms: list,
        problem: d.pool_problem.clone(),
    }
}

/// A host's agent as its console reported it, or why it could not be reached.
pub type AgentView = (String, Result<Value, String>);

/// The agent's words for a path id (`"Mgmt"`, `{"Alink": 0}` → `mgmt`, `alink0`), as its
/// decisions and metrics name it.
fn path_name(v: &Value) -> String {
    match v {
        Value::String(s) => s.to_lowercase(),
        Value::Object(m) => m
            .iter()
            .map(|(k, n)| format!("{}{}", k.to_lowercase(), n.as_u64().unwrap_or(0)))
            .collect(),
        _ => "?".into(),
    }
}

fn word(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The state shown for a VM: the agents' phase when one reports it, else the registry's.
fn vm_state(reg: &RegVm, rec: Option<&Value>) -> String {
    let phase = rec.map(|r| word(&r["record"]["phase"]));
    match (reg.level, phase.as_deref()) {
        (None, None) => "unprotected".into(),
        (None, Some(_)) => "unprotecting".into(),
        (Some(_), Some("failed-over")) => "running unprotected (failed over)".into(),
        (Some(_), Some("fenced")) => "fenced (paused)".into(),
        (Some(_), Some(p)) if !p.is_empty() => p.into(),
        (Some(_), _) => reg
            .state
            .as_deref()
            .and_then(|s| s.split_whitespace().next())
            .map_or_else(|| "waiting for the agents".into(), str::to_string),
    }
}

/// One snapshot. `me`: this host; `consoles`: the consoles' URLs (this one first);
/// `views`: every host's agent (this one included); `now_ms`: Unix ms.
#[must_use]
pub fn build(
    me: &str,
    consoles: &[String],
    reg: &RegistryView,
    views: &[AgentView],
    now_ms: u64,
) -> Value {
    let ok: Vec<(&str, &Value)> = views
        .iter()
        .filter_map(|(h, v)| v.as_ref().ok().map(|v| (h.as_str(), v)))
        .collect();
    let empty = Vec::new();
    let arr = |v: &Value, k: &str| v[k].as_array().unwrap_or(&empty).clone();
    // Who hears whom: (listener, peer) -> not silent.
    let mut heard: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut alinks = Vec::new();
    for (h, v) in &ok {
        for p in arr(v, "peers") {
            let peer = word(&p["host"]);
            if p["silent"] == Value::Bool(false) {
                if let Some(name) = reg.hosts.iter().find(|x| x.name == peer) {
                    heard.entry(name.name.as_str()).or_default().push(h);
                }
            }
            for path in p["paths"].as_array().into_iter().flatten() {
                alinks.push(json!({
                    "from": h, "to": peer, "path": path_name(&path[0]),
                    "up": path[1].as_bool().unwrap_or(false),
                    "last_heard_ms": path[2].as_u64(),
                }));
            }
        }
    }
    let hosts: Vec<Value> = reg
        .hosts
        .iter()
        .map(|h| {
            let view = views.iter().find(|(n, _)| *n == h.name);
            let console = match view {
                _ if h.name == me => "this console".to_string(),
                Some((_, Ok(_))) => "answers".to_string(),
                Some((_, Err(e))) => format!("unreachable: {e}"),
                None => "not asked".to_string(),
            };
            let heard_by = heard.get(h.name.as_str()).cloned().unwrap_or_default();
            let up = h.name == me || matches!(view, Some((_, Ok(_)))) || !heard_by.is_empty();
            let running = reg
                .vms
                .iter()
                .filter(|v| v.runs_on.as_deref() == Some(h.name.as_str()))
                .count();
            json!({
                "name": h.name, "address": h.address, "up": up, "console": console,
                "heard_by": heard_by, "vms_running": running,
            })
        })
        .collect();
    let vms: Vec<Value> = reg.vms.iter().map(|v| vm_json(v, reg, &ok)).collect();
    let mut events: Vec<Value> = Vec::new();
    let vm_name = |id: &str| {
        reg.vms
            .iter()
            .find(|v| v.uuid == id)
            .map_or(id.to_string(), |v| v.name.clone())
    };
    for (_, v) in &ok {
        let inc = v["incarnation"].as_u64().unwrap_or(0);
        for d in arr(v, "decisions") {
            let what = format!(
                "{}: {}{}",
                word(&d["class"]),
                word(&d["action"]["kind"]),
                d["vm"]
                    .as_str()
                    .map(|id| format!(" ({})", vm_name(id)))
                    .unwrap_or_default()
            );
            events.push(json!({
                "t_ms": inc.saturating_add(d["at_ms"].as_u64().unwrap_or(0)),
                "host": word(&d["host"]), "what": what, "why": word(&d["reason"]),
            }));
        }
    }
    events.sort_by(|a, b| b["t_ms"].as_u64().cmp(&a["t_ms"].as_u64()));
    events.dedup();
    events.truncate(60);
    let agents: Vec<Value> = views
        .iter()
        .map(|(h, v)| match v {
            Ok(v) => json!({
                "host": h, "reachable": true,
                "vms": arr(v, "vms").iter().map(|x| json!({
                    "vm": vm_name(x["record"]["vm"].as_str().unwrap_or("")),
                    "phase": word(&x["record"]["phase"]),
                    "primary": word(&x["record"]["primary"]),
                    "generation": x["record"]["generation"].as_u64(),
                    "local": word(&x["local"]), "lease_valid": x["lease_valid"].as_bool(),
                })).collect::<Vec<_>>(),
                "quorum_ok": arr(v, "quorum").iter().any(|q| q[1] == Value::Bool(true)),
            }),
            Err(e) => json!({"host": h, "reachable": false, "error": e}),
        })
        .collect();
    json!({
        "served_by": me,
        "consoles": consoles,
        "now_ms": now_ms,
        "pool": {"hosts": hosts, "registry_problem": reg.problem},
        "alinks": alinks,
        "vms": vms,
        "agents": agents,
        "events": events,
    })
}

/// A VM's row: the registry's facts with the agents' live view laid over them.
fn vm_json(v: &RegVm, reg: &RegistryView, ok: &[(&str, &Value)]) -> Value {
    // The agents' records of this VM: the one running it, else the highest generation.
    let mut recs: Vec<(&str, &Value)> = ok
        .iter()
        .flat_map(|(h, view)| {
            view["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|x| x["record"]["vm"].as_str() == Some(v.uuid.as_str()))
                .map(move |x| (*h, x))
        })
        .collect();
    recs.sort_by_key(|(_, x)| {
        (
            x["local"].as_str() == Some("running"),
            x["record"]["generation"].as_u64().unwrap_or(0),
        )
    });
    let best = recs.last().map(|(_, x)| *x);
    let runs_on = recs
        .iter()
        .find(|(_, x)| x["local"].as_str() == Some("running"))
        .map(|(h, _)| (*h).to_string())
        .or_else(|| v.runs_on.clone());
    let primary_view = runs_on
        .as_deref()
        .and_then(|r| ok.iter().find(|(h, _)| *h == r).map(|(_, view)| *view));
    let comp = primary_view.map_or(Value::Null, |p| p["components"][&v.uuid].clone());
    let disk = &comp["disk"];
    let (rpo_bytes, rpo) = match (v.level, disk["role"].as_str(), disk["peer"].as_str()) {
        (None, ..) => (None, "-".to_string()),
        (Some(1), ..) => (None, "restart from the VM's disk (level 1)".into()),
        (_, Some("primary"), Some("in_sync")) => (Some(0), "0 B: mirrored synchronously".into()),
        (_, Some("local"), _) => (None, "no copy: the disk has no mirror".into()),
        (_, Some("primary"), _) if disk["remote_mode"] == Value::Bool(true) => (
            Some(0),
            "0 B: the disk is served from the copy (remote mode)".into(),
        ),
        (_, Some("primary"), Some(link)) => {
            let d = disk["dirty_bytes"].as_u64().unwrap_or(0);
            (Some(d), format!("{d} B not on the copy ({link})"))
        }
        _ if primary_view.is_none() => (None, "unknown (the VM's host is not reachable)".into()),
        _ => (None, "unknown (no mirror report)".into()),
    };
    let resync = &disk["resync"];
    let resync = (resync["total_bytes"].as_u64().unwrap_or(0) > 0
        && resync["bytes_left"].as_u64().unwrap_or(0) > 0)
        .then(|| resync.clone());
    let ckpt = &comp["checkpoint"]["primary"];
    let checkpoint = ckpt.is_object().then(|| {
        json!({"phase": word(&ckpt["phase"]), "epoch": ckpt["epoch"], "committed_epoch": ckpt["committed_epoch"]})
    });
    let expected = primary_view
        .or_else(|| ok.first().map(|(_, x)| *x))
        .and_then(|p| p["expected_failover_ms"].as_u64());
    let secondaries: Vec<&str> = reg
        .hosts
        .iter()
        .map(|h| h.name.as_str())
        .filter(|h| Some(*h) != runs_on.as_deref())
        .collect();
    json!({
        "name": v.name, "uuid": v.uuid, "power_state": v.power_state,
        "level": v.level, "state": vm_state(v, best), "registry_state": v.state,
        "runs_on": runs_on, "secondary": v.secondary,
        "generation": best.and_then(|b| b["record"]["generation"].as_u64()),
        "rpo_bytes": rpo_bytes, "rpo": rpo, "checkpoint": checkpoint,
        "expected_failover_ms": v.level.and(expected),
        "resync": resync, "protected": v.level.is_some(),
        "secondary_choices": secondaries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> RegistryView {
        RegistryView {
            hosts: vec![
                RegHost {
                    name: "host1".into(),
                    address: "10.0.0.1".into(),
                },
                RegHost {
                    name: "host2".into(),
                    address: "10.0.0.2".into(),
                },
            ],
            vms: vec![
                RegVm {
                    uuid: "u1".into(),
                    name: "vm1".into(),
                    power_state: "Running".into(),
                    runs_on: Some("host1".into()),
                    level: Some(3),
                    secondary: Some("host2".into()),
                    state: Some("protected level=3".into()),
                },
                RegVm {
                    uuid: "u2".into(),
                    name: "web".into(),
                    power_state: "Running".into(),
                    runs_on: Some("host2".into()),
                    ..RegVm::default()
                },
            ],
            problem: None,
        }
    }

    fn view(host: &str, peer: &str, silent: bool, phase: &str, local: &str, gen: u64) -> Value {
        json!({
            "host": host, "incarnation": 1_000_000,
            "peers": [{"host": peer, "silent": silent, "last_heard_ms_ago": 5,
                       "paths": [[{"Alink": 0}, !silent, 5], ["Mgmt", true, 7]]}],
            "vms": [{"record": {"vm": "u1", "phase": phase, "primary": "host1", "generation": gen},
                     "local": local, "lease_valid": true}],
            "quorum": [["10.0.0.254:7479", true]],
            "decisions": [{"at_ms": 500, "host": host, "vm": "u1", "class": "peer_silent",
                           "action": {"kind": "fail_over"}, "reason": "primary silent"}],
            "components": {"u1": {"disk": {"role": "primary", "peer": "resyncing", "dirty_bytes": 4096,
                           "resync": {"total_bytes": 8192, "bytes_left": 4096}}}},
            "expected_failover_ms": 2000,
        })
    }

    #[test]
    fn a_healthy_pool_shows_the_vm_protected_with_its_mirror_and_the_unprotected_one() {
        let views = vec![
            (
                "host1".to_string(),
                Ok(view("host1", "host2", false, "resyncing", "running", 2)),
            ),
            (
                "host2".to_string(),
                Ok(view("host2", "host1", false, "resyncing", "stopped", 2)),
            ),
        ];
        let s = build("host1", &["http://a/".into()], &reg(), &views, 5);
        let vm1 = &s["vms"][0];
        assert_eq!(vm1["state"], "resyncing");
        assert_eq!(vm1["runs_on"], "host1");
        assert_eq!(vm1["rpo_bytes"], 4096);
        assert_eq!(vm1["resync"]["bytes_left"], 4096);
        assert_eq!(vm1["expected_failover_ms"], 2000);
        assert_eq!(vm1["secondary_choices"], json!(["host2"]));
        let web = &s["vms"][1];
        assert_eq!(web["state"], "unprotected");
        assert_eq!(web["protected"], false);
        assert_eq!(s["pool"]["hosts"][1]["up"], true);
        assert_eq!(s["pool"]["hosts"][1]["heard_by"], json!(["host1"]));
        assert_eq!(s["alinks"][0]["path"], "alink0");
        assert_eq!(s["events"][0]["what"], "peer_silent: fail_over (vm1)");
        assert_eq!(s["events"][0]["t_ms"], 1_000_500);
        assert_eq!(s["events"][0]["why"], "primary silent");
    }

    #[test]
    fn a_dead_host_is_down_and_the_survivor_shows_the_failover() {
        let views = vec![
            (
                "host2".to_string(),
                Ok(view("host2", "host1", true, "failed-over", "running", 3)),
            ),
            ("host1".to_string(), Err("connection refused".to_string())),
        ];
        let mut r = reg();
        r.vms[0].runs_on = Some("host1".into()); // xapi not updated yet
        let s = build("host2", &[], &r, &views, 5);
        let h1 = &s["pool"]["hosts"][0];
        assert_eq!(h1["up"], false);
        assert!(h1["console"]
            .as_str()
            .unwrap()
            .contains("connection refused"));
        assert_eq!(s["vms"][0]["state"], "running unprotected (failed over)");
        assert_eq!(
            s["vms"][0]["runs_on"], "host2",
            "the agent running it wins over xapi"
        );
        assert_eq!(s["agents"][1]["reachable"], false);
    }

    #[test]
    fn hostile_peer_views_are_shown_as_unknown_without_panic() {
        for bad in [
            json!(null),
            json!(1),
            json!("x"),
            json!([1, 2]),
            json!({"peers": 5, "vms": {"a": 1}, "decisions": [1, null, {"at_ms": -1}]}),
            json!({"peers": [{"paths": [[], [null], "x"]}], "vms": [{"record": 3}],
                   "components": {"u1": {"disk": {"role": "primary", "peer": 7}}},
                   "incarnation": u64::MAX, "decisions": [{"at_ms": u64::MAX}]}),
        ] {
            let views = vec![("host2".to_string(), Ok(bad))];
            let s = build("host1", &[], &reg(), &views, 0);
            assert_eq!(s["vms"].as_array().unwrap().len(), 2);
        }
    }

    #[test]
    fn the_registry_view_lists_real_vms_with_their_protection_by_host_name() {
        use xenft_xapi::api::HostRecord;
        let mut d = Desired::default();
        d.hosts.insert(
            "h1".into(),
            crate::xapi::desired::HostInfo {
                name: "host1".into(),
                address: "10.0.0.1".into(),
            },
        );
        d.host_refs.insert("h1".into(), "OpaqueRef:h1".into());
        let _ = HostRecord::default();
        let mut vms = BTreeMap::new();
        let mut v = VmRecord {
            uuid: "u1".into(),
            name_label: "vm1".into(),
            power_state: "Running".into(),
            resident_on: "OpaqueRef:h1".into(),
            ..VmRecord::default()
        };
        v.other_config.insert(VM_LEVEL.into(), "3".into());
        v.other_config.insert(VM_SECONDARY.into(), "h1".into());
        v.other_config.insert(VM_STATE.into(), "protected".into());
        vms.insert("OpaqueRef:v1".to_string(), v);
        vms.insert(
            "OpaqueRef:t".to_string(),
            VmRecord {
                is_a_template: true,
                ..VmRecord::default()
            },
        );
        vms.insert(
            "OpaqueRef:d".to_string(),
            VmRecord {
                is_control_domain: true,
                ..VmRecord::default()
            },
        );
        let r = registry_view(&d, &vms);
        assert_eq!(r.vms.len(), 1);
        assert_eq!(r.vms[0].runs_on.as_deref(), Some("host1"));
        assert_eq!(r.vms[0].level, Some(3));
        assert_eq!(r.vms[0].secondary.as_deref(), Some("host1"));
        assert_eq!(r.hosts[0].name, "host1");
    }
}
