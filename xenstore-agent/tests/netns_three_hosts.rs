//! A 3-host pool with one quorum server, real processes in network namespaces (needs root).
//! Every pair of hosts has two A-link paths (veth pairs); the management network is a bridge
//! in the quorum server's namespace. vm1 runs on h1 (secondary h2), vm2 on h2 (secondary h3),
//! vm3 on h3 (secondary h1). Scripted: kill h1's agent, bring it back, isolate h2, heal — the
//! checker polls all three agents and fails on two running copies of any VM.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::{spawn, status_all_by_name, VmState, SECRET};
use xenft_tests::netns::{require_root, veth, Netns};

struct Procs(Vec<Option<Child>>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in self.0.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Address of host `h` (0-based) on path `p` of the pair (a, b), a < b.
fn alink_ip(a: usize, b: usize, p: usize, h: usize) -> String {
    format!("10.{}{}{}.0.{}", a + 1, b + 1, p, h + 1)
}

fn dev(other: usize, p: usize) -> String {
    format!("a{}p{}", other + 1, p)
}

fn config(dir: &Path, me: usize) -> std::path::PathBuf {
    let peers: Vec<serde_json::Value> = (0..3)
        .filter(|&o| o != me)
        .map(|o| {
            let (a, b) = (me.min(o), me.max(o));
            serde_json::json!({
                "host": format!("h{}", o + 1),
                "alink": (0..2).map(|p| serde_json::json!({
                    "local": format!("{}:7480", alink_ip(a, b, p, me)),
                    "peer": format!("{}:7480", alink_ip(a, b, p, o)),
                })).collect::<Vec<_>>(),
                "mgmt": {"local": format!("10.20.0.{}:{}", me + 1, 7490 + o), "peer": format!("10.20.0.{}:{}", o + 1, 7490 + me)}
            })
        })
        .collect();
    let vms: Vec<serde_json::Value> = (0..3)
        .map(|i| {
            serde_json::json!({"vm": format!("vm{}", i + 1), "level": 3,
                "primary": format!("h{}", i + 1), "secondary": format!("h{}", (i + 1) % 3 + 1), "memory_mb": 256})
        })
        .collect();
    let cfg = serde_json::json!({
        "host": format!("h{}", me + 1),
        "secret_file": dir.join("secret"),
        "state_file": dir.join(format!("state-h{}.json", me + 1)),
        "peers": peers,
        "quorum": ["10.20.0.254:7479"],
        "vms": vms,
        "free_memory_mb": 4096
    });
    let p = dir.join(format!("h{}.json", me + 1));
    std::fs::write(&p, cfg.to_string()).unwrap();
    p
}

type View = [Option<BTreeMap<String, VmState>>; 3];

fn poll(h: &[Netns; 3]) -> View {
    [
        status_all_by_name(h[0].name()),
        status_all_by_name(h[1].name()),
        status_all_by_name(h[2].name()),
    ]
}

fn runners(v: &View, vm: &str) -> Vec<usize> {
    (0..3)
        .filter(|&i| {
            v[i].as_ref()
                .and_then(|m| m.get(vm))
                .is_some_and(VmState::running)
        })
        .collect()
}

fn log_tails(logs: &Path) -> String {
    if let Ok(keep) = std::env::var("XENFT_KEEP_LOGS") {
        for f in ["h1.log", "h2.log", "h3.log", "q.log"] {
            let _ = std::fs::copy(logs.join(f), Path::new(&keep).join(f));
        }
    }
    (1..=3)
        .map(|i| {
            let s = std::fs::read_to_string(logs.join(format!("h{i}.log"))).unwrap_or_default();
            let lines: Vec<&str> = s
                .lines()
                .filter(|l| l.contains("decision") || l.contains("quorum"))
                .collect();
            format!(
                "h{i}:\n{}",
                lines[lines.len().saturating_sub(30)..].join("\n")
            )
        })
        .chain(std::iter::once(format!(
            "q:\n{}",
            std::fs::read_to_string(logs.join("q.log"))
                .unwrap_or_default()
                .lines()
                .rev()
                .take(8)
                .collect::<Vec<_>>()
                .join("\n")
        )))
        .collect::<Vec<_>>()
        .join("\n")
}

fn until(h: &[Netns; 3], logs: &Path, what: &str, timeout: Duration, cond: impl Fn(&View) -> bool) {
    let start = Instant::now();
    loop {
        let v = poll(h);
        for vm in ["vm1", "vm2", "vm3"] {
            let r = runners(&v, vm);
            assert!(
                r.len() <= 1,
                "split brain on {vm} ({r:?}) while waiting for {what}: {v:?}\n{}",
                log_tails(logs)
            );
        }
        if cond(&v) {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {what}: {v:?}\n{}",
            log_tails(logs)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn all_protected(v: &View) -> bool {
    v.iter().all(|m| {
        m.as_ref()
            .is_some_and(|m| m.len() == 2 && m.values().all(|s| s.phase == "protected"))
    }) && ["vm1", "vm2", "vm3"]
        .iter()
        .all(|vm| runners(v, vm).len() == 1)
}

#[test]
fn three_host_pool_with_quorum_server_survives_host_loss_and_isolation() {
    if !require_root("three_host_pool_with_quorum_server_survives_host_loss_and_isolation") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let q = Netns::new().unwrap();
    let h = [
        Netns::new().unwrap(),
        Netns::new().unwrap(),
        Netns::new().unwrap(),
    ];
    for a in 0..3 {
        for b in (a + 1)..3 {
            for p in 0..2 {
                veth(
                    &h[a],
                    &dev(b, p),
                    &format!("{}/24", alink_ip(a, b, p, a)),
                    &h[b],
                    &dev(a, p),
                    &format!("{}/24", alink_ip(a, b, p, b)),
                )
                .unwrap();
            }
        }
    }
    // Management network: a bridge in q.
    q.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    q.ip(&["addr", "add", "10.20.0.254/24", "dev", "br0"])
        .unwrap();
    q.ip(&["link", "set", "br0", "up"]).unwrap();
    for (i, ns) in h.iter().enumerate() {
        let port = format!("p{}", i + 1);
        veth(
            ns,
            "mgmt",
            &format!("10.20.0.{}/24", i + 1),
            &q,
            &port,
            "10.99.0.1/32",
        )
        .unwrap();
        q.ip(&["addr", "flush", "dev", &port]).unwrap();
        q.ip(&["link", "set", &port, "master", "br0"]).unwrap();
    }
    let secret = dir.path().join("secret");
    let mut procs = Procs(vec![Some(spawn(
        &q,
        env!("CARGO_BIN_EXE_xenft-quorum"),
        &[
            "--listen",
            "10.20.0.254:7479",
            "--secret-file",
            secret.to_str().unwrap(),
        ],
        &dir.path().join("q.log"),
    ))]);
    let start_agent = |i: usize| {
        let cfg = config(dir.path(), i);
        spawn(
            &h[i],
            env!("CARGO_BIN_EXE_xenft-agent"),
            &["--config", cfg.to_str().unwrap()],
            &dir.path().join(format!("h{}.log", i + 1)),
        )
    };
    for i in 0..3 {
        procs.0.push(Some(start_agent(i)));
    }
    until(
        &h,
        dir.path(),
        "protection of all VMs",
        Duration::from_secs(20),
        all_protected,
    );

    // Kill h1's agent: vm1 moves to h2; vm3 stays on h3.
    if let Some(mut c) = procs.0[1].take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    until(
        &h,
        dir.path(),
        "take-over of vm1 by h2",
        Duration::from_secs(5),
        |v| runners(v, "vm1") == vec![1] && runners(v, "vm3") == vec![2],
    );
    procs.0[1] = Some(start_agent(0));
    until(
        &h,
        dir.path(),
        "re-protection after h1 returns",
        Duration::from_secs(20),
        all_protected,
    );

    // Isolate h2 (it now runs vm1 and vm2): both move away, h2 fences.
    let isolate = |up: bool| {
        for o in [0, 2] {
            for p in 0..2 {
                h[1].ip(&["link", "set", &dev(o, p), if up { "up" } else { "down" }])
                    .unwrap();
            }
        }
        h[1].ip(&["link", "set", "mgmt", if up { "up" } else { "down" }])
            .unwrap();
    };
    isolate(false);
    until(
        &h,
        dir.path(),
        "take-over of h2's VMs",
        Duration::from_secs(6),
        |v| runners(v, "vm1") == vec![0] && runners(v, "vm2") == vec![2],
    );
    isolate(true);
    until(
        &h,
        dir.path(),
        "re-protection after heal",
        Duration::from_secs(20),
        all_protected,
    );
    drop(procs);
}
