//! Primary and secondary shims on two simulated hosts (network namespaces) joined by a
//! two-path A-link over two veth pairs. Cutting one path during a write stream must not
//! disturb the mirror: no degraded write, no new session, identical copies.
//! Privileged: needs root (skips with a message otherwise); namespaces are removed on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use xenft_tests::netns::{require_root, veth, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_xenft-blkback");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

use xenft_tests::components::blkback_status as status;

fn wait_for(sock: &Path, f: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        if let Some(v) = status(sock) {
            if f(&v) {
                return v;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timeout: {:?}",
            status(sock)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn cutting_one_alink_path_mid_stream_keeps_the_mirror_in_sync() {
    if !require_root("cutting_one_alink_path_mid_stream_keeps_the_mirror_in_sync") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    std::fs::write(p("secret"), b"blkback netns test pool secret!!").unwrap();
    let h1 = Netns::new().unwrap();
    let h2 = Netns::new().unwrap();
    veth(&h1, "al1", "10.92.1.1/24", &h2, "al1", "10.92.1.2/24").unwrap();
    veth(&h1, "al2", "10.92.2.1/24", &h2, "al2", "10.92.2.2/24").unwrap();
    let spawn = |ns: &Netns, args: Vec<String>| {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p("log"))
            .unwrap();
        Proc(
            ns.command(BIN)
                .args(args)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let common = |disk: &str, ctl: &str, me: &str, peer: &str| -> Vec<String> {
        [
            "--disk",
            &p(disk),
            "--size",
            "32M",
            "--control",
            &p(ctl),
            "--secret-file",
            &p("secret"),
            "--host",
            me,
            "--peer-host",
            peer,
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect()
    };
    let mut sargs = common("secondary.img", "secondary.ctl", "host-b", "host-a");
    sargs.extend(
        [
            "--role",
            "secondary",
            "--alink-path",
            "10.92.1.2:7011=10.92.1.1:7011",
            "--alink-path",
            "10.92.2.2:7011=10.92.2.1:7011",
        ]
        .map(String::from),
    );
    let _sec = spawn(&h2, sargs);
    let mut pargs = common("primary.img", "primary.ctl", "host-a", "host-b");
    pargs.extend(
        [
            "--role",
            "primary",
            "--nbd-unix",
            &p("nbd.sock"),
            "--alink-path",
            "10.92.1.1:7011=10.92.1.2:7011",
            "--alink-path",
            "10.92.2.1:7011=10.92.2.2:7011",
        ]
        .map(String::from),
    );
    let _pri = spawn(&h1, pargs);
    let pctl = dir.path().join("primary.ctl");
    wait_for(&pctl, |v| v["primary"]["peer"] == "in_sync");

    let uri = format!("nbd+unix:///xenft?socket={}", p("nbd.sock"));
    let u = uri.clone();
    let stream = std::thread::spawn(move || {
        let mut args = vec!["-f".to_string(), "raw".to_string()];
        for i in 0..2000u32 {
            args.push("-c".into());
            args.push(format!("write -P {} {}k 64k", i % 200 + 1, (i % 400) * 64));
        }
        args.push("-c".into());
        args.push("flush".into());
        args.push(u);
        Command::new("qemu-io").args(&args).output().unwrap()
    });
    std::thread::sleep(Duration::from_millis(100));
    h1.ip(&["link", "set", "al1", "down"]).unwrap();
    assert!(
        !stream.is_finished(),
        "the path must be cut while the client writes"
    );
    let out = stream.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = status(&pctl).unwrap();
    assert_eq!(v["primary"]["peer"], "in_sync", "{v}");
    assert_eq!(
        v["primary"]["sessions"], 1,
        "the mirror session must survive a path cut"
    );
    assert_eq!(v["primary"]["writes_degraded"], 0, "{v}");
    assert_eq!(v["primary"]["dirty_bytes"], 0);
    assert_eq!(v["alink"]["paths"][0]["up"], false, "{v}");
    assert_eq!(v["alink"]["paths"][1]["up"], true, "{v}");
    let a = std::fs::read(p("primary.img")).unwrap();
    let b = std::fs::read(p("secondary.img")).unwrap();
    assert!(
        a == b,
        "copies differ; log: {}",
        std::fs::read_to_string(p("log")).unwrap_or_default()
    );
}
