//! The xenft SR on a two-host namespace pool (two network namespaces joined by a veth pair,
//! the A-link), driven as xapi-storage-script drives a plugin, with the real `xenft-blkback`
//! on both sides and a client that talks NBD as tapdisk does (no FLUSH, no FUA).
//! Privileged: needs root (skips with a message otherwise); namespaces and blkbacks are
//! removed on drop, even when the test fails.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::tapdisk::{block, Tapdisk};
use common::{install_plugins, run_raw, Outcome};
use serde_json::{json, Value};
use xenft_tests::components::{blkback_status, wait_blkback_status};
use xenft_tests::netns::{require_root, veth, Netns};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;

/// Builds `xenft-blkback` (a no-op after a workspace build) and returns its path.
fn blkback_bin() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let st = std::process::Command::new(cargo)
        .args([
            "build",
            "-q",
            "-p",
            "xenft-blkback",
            "--bin",
            "xenft-blkback",
        ])
        .arg("--manifest-path")
        .arg(manifest)
        .status()
        .expect("run cargo build");
    assert!(st.success(), "building xenft-blkback failed");
    xenft_tests::lab::target_dir().join("xenft-blkback")
}

struct Host {
    ns: Netns,
    name: &'static str,
    root: PathBuf,
    prefix: Vec<String>,
    vol: PathBuf,
    dp: PathBuf,
}

impl Host {
    fn call(&self, datapath: bool, method: &str, args: &Value) -> Outcome {
        let dir = if datapath { &self.dp } else { &self.vol };
        run_raw(&self.prefix, &dir.join(method), args.to_string().as_bytes())
    }
    fn ok(&self, datapath: bool, method: &str, args: &Value) -> Value {
        self.call(datapath, method, args)
            .reply(&format!("{method} on {}", self.name))
    }
    fn run_dir(&self, sr: &str, key: &str) -> PathBuf {
        self.root.join("run").join(sr).join(key)
    }
    fn disk(&self, sr: &str, key: &str) -> PathBuf {
        self.root.join("state").join(sr).join(format!("{key}.img"))
    }
    fn pid(&self, sr: &str, key: &str) -> Option<i32> {
        let t = std::fs::read_to_string(self.run_dir(sr, key).join("blkback.json")).ok()?;
        serde_json::from_str::<Value>(&t).ok()?["pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
    }
}

/// Kills every blkback the hosts' run directories name (a failed test leaves none behind).
struct Pool {
    _dir: tempfile::TempDir,
    h1: Host,
    h2: Host,
}

impl Drop for Pool {
    fn drop(&mut self) {
        for h in [&self.h1, &self.h2] {
            for f in walk(&h.root.join("run")) {
                if f.ends_with("blkback.json") {
                    if let Some(pid) = std::fs::read_to_string(&f)
                        .ok()
                        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                        .and_then(|v| v["pid"].as_i64())
                        .and_then(|p| i32::try_from(p).ok())
                    {
                        kill(pid);
                    }
                }
            }
        }
    }
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn kill(pid: i32) {
    if pid > 1 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn pool() -> Pool {
    let bin = blkback_bin();
    // Short paths: Unix socket paths are at most 107 bytes.
    let dir = tempfile::Builder::new()
        .prefix("xsr")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::write(
        dir.path().join("secret"),
        b"xenft sr netns test pool secret!",
    )
    .unwrap();
    let n1 = Netns::new().unwrap();
    let n2 = Netns::new().unwrap();
    veth(&n1, "al1", "10.93.1.1/24", &n2, "al1", "10.93.1.2/24").unwrap();
    let cfg = |name: &str| dir.path().join(name).join("sr.json");
    let make = |ns: Netns, name: &'static str, peer: &str, peer_ns: &str| {
        let root = dir.path().join(name);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(
            cfg(name),
            json!({
                "host": name,
                "state_dir": root.join("state"),
                "run_dir": root.join("run"),
                "blkback": bin,
                "peer_command": ["ip", "netns", "exec", peer_ns, "env",
                                 format!("XENFT_SR_CONFIG={}", cfg(peer).display()), common::BIN],
            })
            .to_string(),
        )
        .unwrap();
        let (vol, dp) = install_plugins(&root.join("plugins"));
        let prefix = vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            ns.name().to_string(),
            "env".into(),
            format!("XENFT_SR_CONFIG={}", cfg(name).display()),
        ];
        Host {
            ns,
            name,
            root,
            prefix,
            vol,
            dp,
        }
    };
    let (n1name, n2name) = (n1.name().to_string(), n2.name().to_string());
    let h1 = make(n1, "h1", "h2", &n2name);
    let h2 = make(n2, "h2", "h1", &n1name);
    Pool { _dir: dir, h1, h2 }
}

/// The NBD socket path out of `Datapath.attach`'s reply, checking both implementations.
fn socket_of(backend: &Value) -> PathBuf {
    let imps = backend["implementations"]
        .as_array()
        .expect("implementations");
    assert_eq!(imps[0][0], "XenDisk");
    assert_eq!(imps[0][1]["backend_type"], "vbd3");
    let params = imps[0][1]["params"].as_str().unwrap();
    assert_eq!(imps[1][0], "Nbd");
    let uri = imps[1][1]["uri"].as_str().unwrap();
    let parts: Vec<&str> = uri.split(':').collect();
    assert_eq!(parts.len(), 4, "parse_nbd_uri's shape: {uri}");
    assert_eq!((parts[0], parts[1]), ("nbd", "unix"));
    assert!(parts[3].starts_with("exportname="));
    assert_eq!(params, format!("nbd:{}", parts[2]));
    PathBuf::from(parts[2])
}

fn in_sync(ctl: &Path) {
    let _ = wait_blkback_status(ctl, Duration::from_secs(60), |v| {
        v["role"] == "primary" && v["primary"]["peer"] == "in_sync"
    });
}

#[test]
fn a_volume_follows_the_vm_between_hosts_and_keeps_every_acknowledged_write() {
    if !require_root("a_volume_follows_the_vm_between_hosts_and_keeps_every_acknowledged_write") {
        return;
    }
    let p = pool();
    let (h1, h2) = (&p.h1, &p.h2);
    for h in [h1, h2] {
        for dp in [false, true] {
            let q = h.ok(dp, "Plugin.query", &json!({"dbg": "t"}));
            assert_eq!(
                (q["plugin"].as_str(), q["required_api_version"].as_str()),
                (Some("xenft"), Some("5.0"))
            );
        }
    }
    // The SR: created once (xapi: on the master), attached on both hosts (PBD.plug).
    let sr = "0f1e2d3c-0000-4000-8000-00000000a11c";
    let secret = p._dir.path().join("secret");
    let conf = json!({"hosts": "h1,h2", "alink": "10.93.1.1:7300=10.93.1.2:7300",
                      "secret-file": secret});
    let dc = h1.ok(
        false,
        "SR.create",
        &json!({"dbg": "t", "uuid": sr, "configuration": conf,
                                              "name": "xenft", "description": "mirrored"}),
    );
    for h in [h1, h2] {
        assert_eq!(
            h.ok(
                false,
                "SR.attach",
                &json!({"dbg": "t", "configuration": dc})
            ),
            sr
        );
    }
    // A volume created on h1 exists on both hosts.
    let v = h1.ok(
        false,
        "Volume.create",
        &json!({"dbg": "t", "sr": sr, "name": "disk0",
                  "description": "", "size": 64 * MIB, "sharable": false}),
    );
    let key = v["key"].as_str().unwrap().to_string();
    let vargs = json!({"dbg": "t", "sr": sr, "key": key});
    h1.ok(
        false,
        "Volume.set",
        &json!({"dbg": "t", "sr": sr, "key": key, "k": "vdi-type", "v": "user"}),
    );
    let on2 = h2.ok(false, "Volume.stat", &vargs);
    assert_eq!(on2["virtual_size"], 64 * MIB);
    assert_eq!(on2["keys"]["vdi-type"], "user");
    assert_eq!(
        h2.ok(false, "SR.ls", &json!({"dbg": "t", "sr": sr}))
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let uri = v["uri"][0].as_str().unwrap().to_string();
    let dargs = json!({"dbg": "t", "uri": uri, "domain": "7"});

    // The VM starts on h1: attach + activate there; h2 holds the copy.
    let sock = socket_of(&h1.ok(true, "Datapath.attach", &dargs));
    h1.ok(true, "Datapath.activate", &dargs);
    in_sync(&h1.run_dir(sr, &key).join("ctl.sock"));
    let s2 = blkback_status(&h2.run_dir(sr, &key).join("ctl.sock")).expect("h2's blkback");
    assert_eq!(s2["role"], "secondary");
    let (code, _) = h2
        .call(true, "Datapath.activate", &dargs)
        .error("activate on h2 while active on h1");
    assert_eq!(code, "Activated_on_another_host");

    // tapdisk writes (no FLUSH, no FUA) while h1's blkback is killed.
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let writer = {
        let (acked, sock) = (acked.clone(), sock.clone());
        std::thread::spawn(move || {
            let mut t = Tapdisk::connect(&sock).expect("tapdisk connects");
            assert_eq!(t.size, 64 * MIB);
            for i in 0..4000u64 {
                let off = (i * 7919 % 16000) * BLOCK as u64;
                if t.write(off, &block(i, BLOCK)).is_err() {
                    return;
                }
                acked.lock().unwrap().push(i);
            }
        })
    };
    let start = Instant::now();
    while acked.lock().unwrap().len() < 200 {
        assert!(
            start.elapsed() < Duration::from_secs(60) && !writer.is_finished(),
            "writes stalled"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    kill(h1.pid(sr, &key).expect("h1's blkback pid"));
    writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 200 && acked.len() < 4000,
        "the kill cut the stream: {}",
        acked.len()
    );
    // Every acknowledged write is on h2's copy (last write to an offset wins).
    let copy = std::fs::read(h2.disk(sr, &key)).unwrap();
    let mut last = std::collections::BTreeMap::new();
    for i in &acked {
        last.insert((i * 7919 % 16000) * BLOCK as u64, *i);
    }
    for (off, i) in &last {
        let o = usize::try_from(*off).unwrap();
        assert!(
            copy[o..o + BLOCK] == block(*i, BLOCK)[..],
            "acknowledged write {i} at {off} is missing on h2"
        );
    }

    // xapi restarts the VM on h2: h1's side is deactivated and detached, h2 activates (its
    // secondary is promoted, h1 gets a secondary again).
    h1.ok(true, "Datapath.deactivate", &dargs);
    h1.ok(true, "Datapath.detach", &dargs);
    let sock2 = socket_of(&h2.ok(true, "Datapath.attach", &dargs));
    h2.ok(true, "Datapath.activate", &dargs);
    h2.ok(true, "Datapath.activate", &dargs); // idempotent
    let mut t = Tapdisk::connect(&sock2).expect("tapdisk on h2");
    for (off, i) in &last {
        assert_eq!(
            t.read(*off, 4096).unwrap(),
            block(*i, BLOCK),
            "block {i} read back on h2"
        );
    }
    // h2 is now the primary, mirroring to h1.
    for i in 0..50u64 {
        t.write(60 * MIB + i * BLOCK as u64, &block(10_000 + i, BLOCK))
            .unwrap();
    }
    t.disconnect();
    in_sync(&h2.run_dir(sr, &key).join("ctl.sock"));
    let back = std::fs::read(h1.disk(sr, &key)).unwrap();
    for i in 0..50u64 {
        let o = usize::try_from(60 * MIB + i * BLOCK as u64).unwrap();
        assert!(
            back[o..o + BLOCK] == block(10_000 + i, BLOCK)[..],
            "h2's write {i} mirrored to h1"
        );
    }
    let (code, _) = h1
        .call(true, "Datapath.activate", &dargs)
        .error("activate on h1 while active on h2");
    assert_eq!(code, "Activated_on_another_host");
    let resize = json!({"dbg": "t", "sr": sr, "key": key, "new_size": 128 * MIB});
    let (code, why) = h1
        .call(false, "Volume.resize", &resize)
        .error("resize while active on h2");
    assert_eq!(
        (code.as_str(), why[1].as_str()),
        ("Activated_on_another_host", "h2")
    );

    // The VM stops: resize, then destroy, from h1.
    h2.ok(true, "Datapath.deactivate", &dargs);
    h2.ok(true, "Datapath.detach", &dargs);
    h1.ok(
        false,
        "Volume.resize",
        &json!({"dbg": "t", "sr": sr, "key": key, "new_size": 128 * MIB}),
    );
    for h in [h1, h2] {
        assert_eq!(
            h.ok(false, "Volume.stat", &vargs)["virtual_size"],
            128 * MIB
        );
        assert_eq!(
            std::fs::metadata(h.disk(sr, &key)).unwrap().len(),
            128 * MIB
        );
    }
    h1.ok(false, "Volume.destroy", &vargs);
    for h in [h1, h2] {
        assert!(!h.disk(sr, &key).exists(), "disk removed on {}", h.name);
        assert!(h.pid(sr, &key).is_none(), "no blkback left on {}", h.name);
        let (code, _) = h
            .call(false, "Volume.stat", &vargs)
            .error("stat after destroy");
        assert_eq!(code, "Volume_does_not_exist");
    }
    h2.ok(false, "SR.detach", &json!({"dbg": "t", "sr": sr}));
    h1.ok(false, "SR.destroy", &json!({"dbg": "t", "sr": sr}));
    assert!(!h1.root.join("state").join(sr).exists() && !h2.root.join("state").join(sr).exists());
    let _ = (&h1.ns, &h2.ns);
}

#[test]
fn a_copy_the_agent_promoted_on_take_over_activates_where_xapi_restarts_the_vm() {
    if !require_root("a_copy_the_agent_promoted_on_take_over_activates_where_xapi_restarts_the_vm")
    {
        return;
    }
    let p = pool();
    let (h1, h2) = (&p.h1, &p.h2);
    let sr = "0f1e2d3c-0000-4000-8000-00000000b22d";
    let conf = json!({"hosts": "h1,h2", "alink": "10.93.1.1:7400=10.93.1.2:7400",
                      "secret-file": p._dir.path().join("secret")});
    let dc = h1.ok(
        false,
        "SR.create",
        &json!({"dbg": "t", "uuid": sr, "configuration": conf, "name": "xenft", "description": ""}),
    );
    for h in [h1, h2] {
        h.ok(
            false,
            "SR.attach",
            &json!({"dbg": "t", "configuration": dc}),
        );
    }
    let v = h1.ok(
        false,
        "Volume.create",
        &json!({"dbg": "t", "sr": sr, "name": "disk0", "description": "",
                "size": 16 * MIB, "sharable": false}),
    );
    let key = v["key"].as_str().unwrap().to_string();
    let dargs = json!({"dbg": "t", "uri": v["uri"][0], "domain": "7"});
    h1.ok(true, "Datapath.attach", &dargs);
    h1.ok(true, "Datapath.activate", &dargs);
    in_sync(&h1.run_dir(sr, &key).join("ctl.sock"));

    // h1 dies; h2's agent takes the VM over: it promotes h2's copy through the volume's
    // control socket (the agent's disk seam, xenft_sr::blkback::control_socket_of).
    kill(h1.pid(sr, &key).expect("h1's blkback"));
    let ctl2 = xenft_sr::blkback::control_socket_of(&h2.root.join("run"), sr, &key).unwrap();
    assert_eq!(ctl2, h2.run_dir(sr, &key).join("ctl.sock"));
    let promoted =
        xenft_control::Client::<xenft_control::Blkback>::new(&ctl2, Duration::from_secs(30))
            .call(&xenft_control::blkback::Request::Promote {
                epoch: None,
                force: false,
            })
            .expect("the agent's promotion");
    assert!(
        matches!(promoted, xenft_control::blkback::Reply::Promoted { .. }),
        "{promoted:?}"
    );
    // xapi then restarts the VM on h2: attach and activate there find the copy promoted.
    h2.ok(true, "Datapath.attach", &dargs);
    h2.ok(true, "Datapath.activate", &dargs);
    let st = blkback_status(&ctl2).expect("h2's blkback");
    assert_eq!(st["role"], "primary", "{st}");
    let proc_file: Value = serde_json::from_str(
        &std::fs::read_to_string(h2.run_dir(sr, &key).join("blkback.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        proc_file["role"], "primary",
        "the SR records it as the primary"
    );
    let _ = (&h1.ns, &h2.ns);
}
