//! `promote` on a secondary's control socket (the agent's take-over step), with the real
//! binary: a copy that never completed a sync is refused unless forced; a promoted shim serves
//! the disk over NBD and refuses a second promotion; bad requests get typed error replies.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use xenft_control::blkback::{Reply, Request};
use xenft_control::{ControlError, ErrorKind};

/// One raw line to the control socket (what a script sends), the raw reply line.
fn raw(p: &Path, line: &str) -> String {
    let mut s = UnixStream::connect(p).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    let mut out = String::new();
    BufReader::new(s).read_line(&mut out).unwrap();
    out
}

const BIN: &str = env!("CARGO_BIN_EXE_xenft-blkback");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status(p: &Path) -> Value {
    xenft_tests::components::blkback_status(p).expect("a status")
}

fn promote(p: &Path, epoch: Option<u64>, force: bool) -> Result<Reply, ControlError> {
    xenft_tests::components::blkback_call(p, &Request::Promote { epoch, force })
}

#[test]
fn promote_refuses_a_never_synced_copy_unless_forced_then_serves_nbd() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _sec = Proc(
        Command::new(BIN)
            .args(["--role", "secondary", "--size", "4M", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--disk")
            .arg(p("sec.img"))
            .arg("--nbd-unix")
            .arg(p("nbd.sock"))
            .arg("--control")
            .arg(p("ctl"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let end = Instant::now() + Duration::from_secs(10);
    while !p("ctl").exists() {
        assert!(Instant::now() < end, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!p("nbd.sock").exists(), "a secondary must not serve NBD");

    let e = promote(&p("ctl"), None, false).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Refused), "{e}");
    assert!(e.to_string().contains("not consistent"), "{e}");
    let e = raw(
        &p("ctl"),
        "{\"v\":1,\"req\":{\"op\":\"promote\",\"epoch\":\"bogus\"}}\n",
    );
    assert!(e.contains("\"kind\":\"malformed\""), "{e}");
    assert_eq!(status(&p("ctl"))["role"], "secondary");

    let r = promote(&p("ctl"), None, true).unwrap();
    assert!(matches!(r, Reply::Promoted { .. }), "{r:?}");
    assert_eq!(status(&p("ctl"))["role"], "primary");
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x33 0 64k",
            "-c",
            "read -P 0x33 0 64k",
        ])
        .arg(format!(
            "nbd+unix:///xenft?socket={}",
            p("nbd.sock").display()
        ))
        .output()
        .expect("qemu-io (scripts/deps/blkback.apt)");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success()
            && out.contains("read 65536/65536")
            && !out.contains("verification failed"),
        "{out}"
    );
    let e = promote(&p("ctl"), None, false).unwrap_err();
    assert_eq!(
        e.kind(),
        Some(ErrorKind::Refused),
        "a second promotion: {e}"
    );
}

#[test]
fn an_oversized_control_line_is_refused_and_the_socket_keeps_serving() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    let _local = Proc(
        Command::new(BIN)
            .args(["--role", "local", "--size", "1M"])
            .arg("--disk")
            .arg(p("d.img"))
            .arg("--nbd-unix")
            .arg(p("nbd.sock"))
            .arg("--control")
            .arg(p("ctl"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let end = Instant::now() + Duration::from_secs(10);
    while !p("ctl").exists() {
        assert!(Instant::now() < end, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut s = UnixStream::connect(p("ctl")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // No newline in 2 MiB: the shim must answer without buffering it all.
    let _ = s.write_all(&vec![b'x'; 2 << 20]);
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(line.contains("\"kind\":\"too_long\""), "{line}");
    assert_eq!(status(&p("ctl"))["role"], "local");
    let r = raw(&p("ctl"), "{\"v\":1,\"req\":{\"op\":\"bogus\"}}\n");
    assert!(r.contains("\"kind\":\"unknown_request\""), "{r}");
    let e = promote(&p("ctl"), Some(3), false).unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::Refused), "{e}");
}
