//! Real processes in network namespaces (needs root): two `xenft-agent`s and one
//! `xenft-quorum`, every A-link path, the management network and each host's link to the
//! quorum server a veth pair. Scripted faults with `ip link set down` and SIGKILL; throughout,
//! the two agents' status APIs are polled and the VM must never run on both.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use xenft_tests::netns::{require_root, veth, Netns};

struct Procs(Vec<(String, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Procs {
    fn kill(&mut self, name: &str) {
        if let Some(i) = self.0.iter().position(|(n, _)| n == name) {
            let (_, mut c) = self.0.remove(i);
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }
}

const SECRET: &str = "netns-pool-secret-0123456789";

fn agent_config(dir: &Path, me: usize) -> std::path::PathBuf {
    let (a, b) = (me + 1, 2 - me);
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
        "free_memory_mb": 4096
    });
    let p = dir.join(format!("h{a}.json"));
    std::fs::write(&p, cfg.to_string()).unwrap();
    p
}

/// GET /status inside a namespace.
fn status(ns: &Netns) -> Option<Value> {
    ns.spawn(|| {
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
        serde_json::from_str(body).ok()
    })
    .ok()?
    .join()
    .ok()?
}

fn vm(s: &Option<Value>) -> (String, String, String) {
    let v = s
        .as_ref()
        .and_then(|s| s["vms"].get(0).cloned())
        .unwrap_or(Value::Null);
    let f = |x: &Value| x.as_str().unwrap_or("-").to_string();
    (
        f(&v["local"]),
        f(&v["record"]["phase"]),
        f(&v["record"]["primary"]),
    )
}

struct World {
    h: [Netns; 2],
    polls: u64,
}

impl World {
    /// Polls both agents until `cond` holds; fails on a split brain or after `timeout`.
    fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&[(String, String, String); 2]) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let s = [vm(&status(&self.h[0])), vm(&status(&self.h[1]))];
            self.polls += 1;
            assert!(
                !(s[0].0 == "running" && s[1].0 == "running"),
                "split brain while waiting for {what}: {s:?}"
            );
            if cond(&s) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {what}: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn link(&self, host: usize, dev: &str, up: bool) {
        self.h[host]
            .ip(&["link", "set", dev, if up { "up" } else { "down" }])
            .unwrap();
    }
}

fn spawn(ns: &Netns, bin: &str, args: &[&str], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    ns.command(bin)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

#[test]
fn agents_in_namespaces_survive_link_cuts_isolation_and_sigkill() {
    if !require_root("agents_in_namespaces_survive_link_cuts_isolation_and_sigkill") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let q = Netns::new().unwrap();
    let mut w = World {
        h: [Netns::new().unwrap(), Netns::new().unwrap()],
        polls: 0,
    };
    let [h1, h2] = &w.h;
    veth(h1, "al0", "10.10.0.1/24", h2, "al0", "10.10.0.2/24").unwrap();
    veth(h1, "al1", "10.11.0.1/24", h2, "al1", "10.11.0.2/24").unwrap();
    veth(h1, "mgmt", "10.20.0.1/24", h2, "mgmt", "10.20.0.2/24").unwrap();
    veth(h1, "q", "10.30.1.1/24", &q, "h1", "10.30.1.2/24").unwrap();
    veth(h2, "q", "10.30.2.1/24", &q, "h2", "10.30.2.2/24").unwrap();

    let agent = env!("CARGO_BIN_EXE_xenft-agent");
    let quorum = env!("CARGO_BIN_EXE_xenft-quorum");
    let secret = dir.path().join("secret");
    let mut procs = Procs(vec![(
        "q".into(),
        spawn(
            &q,
            quorum,
            &[
                "--listen",
                "0.0.0.0:7479",
                "--secret-file",
                secret.to_str().unwrap(),
            ],
            &dir.path().join("q.log"),
        ),
    )]);
    for i in 0..2 {
        let cfg = agent_config(dir.path(), i);
        procs.0.push((
            format!("h{}", i + 1),
            spawn(
                &w.h[i],
                agent,
                &["--config", cfg.to_str().unwrap()],
                &dir.path().join(format!("h{}.log", i + 1)),
            ),
        ));
    }

    w.until("protection", Duration::from_secs(15), |s| {
        s[0].1 == "protected" && s[1].1 == "protected" && s[0].0 == "running"
    });

    // One A-link path down: logged only, still protected, no take-over.
    w.link(0, "al0", false);
    std::thread::sleep(Duration::from_millis(1000));
    w.until("still protected", Duration::from_secs(1), |s| {
        s[0].1 == "protected" && s[1].0 == "stopped"
    });

    // All A-links down: degraded, no take-over (the peer is alive on the management network).
    w.link(0, "al1", false);
    w.until("degraded", Duration::from_secs(3), |s| s[0].1 == "degraded");
    std::thread::sleep(Duration::from_millis(1500));
    w.until("no take-over", Duration::from_secs(1), |s| {
        s[0].0 == "running" && s[1].0 == "stopped"
    });
    w.link(0, "al0", true);
    w.link(0, "al1", true);
    w.until("re-protection", Duration::from_secs(10), |s| {
        s[0].1 == "protected" && s[1].1 == "protected"
    });

    // Isolate h1 (A-links, mgmt, quorum link): it fences, h2 takes over.
    for dev in ["al0", "al1", "mgmt", "q"] {
        w.link(0, dev, false);
    }
    let took = w.until(
        "take-over of an isolated primary",
        Duration::from_secs(5),
        |s| s[1].0 == "running",
    );
    w.until("fenced old primary", Duration::from_secs(2), |s| {
        s[0].0 != "running"
    });
    println!("isolated primary replaced in {} ms", took.as_millis());
    for dev in ["al0", "al1", "mgmt", "q"] {
        w.link(0, dev, true);
    }
    w.until(
        "old primary back as secondary",
        Duration::from_secs(10),
        |s| s[0].1 == "protected" && s[1].1 == "protected" && s[0].2 == "h2" && s[0].0 == "stopped",
    );

    // SIGKILL the primary's agent: h1 takes over.
    procs.kill("h2");
    let took = w.until("take-over after SIGKILL", Duration::from_secs(5), |s| {
        s[0].0 == "running"
    });
    println!(
        "take-over {} ms after SIGKILL of the primary agent (polls {})",
        took.as_millis(),
        w.polls
    );
    assert!(took < Duration::from_secs(2), "take-over took {took:?}");
    drop(procs);
}
