//! The real `xenft-blkback` binary: a primary and a secondary process mirrored over loopback
//! TCP, driven by real NBD clients, with the secondary or the primary killed mid-stream.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{nbd_uri, run_ok};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const BIN: &str = env!("CARGO_BIN_EXE_xenft-blkback");

/// A child process killed (SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Setup {
    dir: tempfile::TempDir,
    port: u16,
    port2: u16,
    size: u64,
    alink: bool,
}

impl Setup {
    fn new(size: u64) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            port2: free_port(),
            size,
            alink: false,
        }
    }
    /// Mirror over a two-path A-link instead of plain TCP.
    fn over_alink(size: u64) -> Self {
        let s = Self {
            alink: true,
            ..Self::new(size)
        };
        std::fs::write(s.p("secret"), b"blkback process test pool secret").unwrap();
        s
    }
    /// Transport arguments; the primary is host-a (dials), the secondary host-b (accepts).
    fn peer_args(&self, primary: bool) -> Vec<String> {
        if !self.alink {
            return if primary {
                vec!["--peer".into(), format!("127.0.0.1:{}", self.port)]
            } else {
                vec!["--listen".into(), format!("127.0.0.1:{}", self.port)]
            };
        }
        let mut a = vec![
            "--secret-file".to_string(),
            self.p("secret").display().to_string(),
        ];
        let (me, peer) = if primary {
            ("host-a", "host-b")
        } else {
            ("host-b", "host-a")
        };
        a.extend([
            "--host".into(),
            me.into(),
            "--peer-host".into(),
            peer.into(),
        ]);
        for port in [self.port, self.port2] {
            a.push("--alink-path".into());
            a.push(if primary {
                format!("127.0.0.1:0=127.0.0.1:{port}")
            } else {
                format!("127.0.0.1:{port}=127.0.0.1:0")
            });
        }
        a
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn spawn(&self, args: &[String]) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.p("log"))
            .unwrap();
        Proc(
            Command::new(BIN)
                .args(args)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }
    fn secondary(&self) -> Proc {
        let mut args: Vec<String> = vec![
            "--role".into(),
            "secondary".into(),
            "--disk".into(),
            self.p("secondary.img").display().to_string(),
            "--size".into(),
            self.size.to_string(),
            "--control".into(),
            self.p("secondary.ctl").display().to_string(),
        ];
        args.extend(self.peer_args(false));
        let s = self.spawn(&args);
        wait_for_status(&self.p("secondary.ctl"), |_| true);
        s
    }
    fn primary(&self) -> Proc {
        let mut args: Vec<String> = vec![
            "--role".into(),
            "primary".into(),
            "--disk".into(),
            self.p("primary.img").display().to_string(),
            "--size".into(),
            self.size.to_string(),
            "--nbd-unix".into(),
            self.p("nbd.sock").display().to_string(),
            "--control".into(),
            self.p("primary.ctl").display().to_string(),
        ];
        args.extend(self.peer_args(true));
        let p = self.spawn(&args);
        wait_for_status(&self.p("primary.ctl"), |_| true);
        p
    }
    fn uri(&self) -> String {
        nbd_uri(&self.p("nbd.sock"))
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.p("log")).unwrap_or_default()
    }
}

/// Sends one control command; `None` if the socket is not there (yet).
fn control(sock: &Path, cmd: &str) -> Option<Value> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    writeln!(s, "{cmd}").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

fn wait_for_status(sock: &Path, f: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        if let Some(v) = control(sock, "status") {
            if f(&v) {
                return v;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timeout waiting on {}: last {:?}",
            sock.display(),
            control(sock, "status")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn link(v: &Value) -> &str {
    v["primary"]["peer"].as_str().unwrap_or("")
}

fn files_identical(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg(a)
        .arg(b)
        .status()
        .expect("cmp (diffutils) installed")
        .success()
}

#[test]
fn qemu_io_pattern_through_primary_is_byte_identical_on_secondary_after_flush() {
    pattern_identical_after_flush(&Setup::new(64 * MIB));
}

#[test]
fn over_alink_qemu_io_pattern_is_byte_identical_on_secondary_after_flush() {
    pattern_identical_after_flush(&Setup::over_alink(64 * MIB));
}

fn pattern_identical_after_flush(s: &Setup) {
    let _sec = s.secondary();
    let _pri = s.primary();
    wait_for_status(&s.p("primary.ctl"), |v| link(v) == "in_sync");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 4M",
            "-c",
            "write -P 0xa5 10M 3M",
            "-c",
            "write -f -P 0x11 20M 64k",
            "-c",
            "discard 1M 1M",
            "-c",
            "write -z 11M 512k",
            "-c",
            "flush",
            &s.uri(),
        ],
    );
    assert!(
        files_identical(&s.p("primary.img"), &s.p("secondary.img")),
        "{}",
        s.log()
    );
    let v = control(&s.p("primary.ctl"), "status").unwrap();
    assert!(v["primary"]["writes_mirrored"].as_u64().unwrap() >= 5);
}

#[test]
fn secondary_killed_mid_stream_then_restarted_resyncs_only_dirty_regions() {
    kill_and_restart_secondary(&Setup::new(64 * MIB));
}

#[test]
fn over_alink_secondary_killed_and_restarted_resyncs_only_dirty_regions() {
    kill_and_restart_secondary(&Setup::over_alink(64 * MIB));
}

fn kill_and_restart_secondary(s: &Setup) {
    let mut sec = s.secondary();
    let _pri = s.primary();
    wait_for_status(&s.p("primary.ctl"), |v| link(v) == "in_sync");
    // A write stream in the background; the secondary dies in the middle of it.
    let uri = s.uri();
    let stream = std::thread::spawn(move || {
        let mut args = vec!["-f".to_string(), "raw".to_string()];
        for i in 0..1000u32 {
            args.push("-c".into());
            args.push(format!("write -P {} {}k 64k", i % 250 + 1, (i % 100) * 256));
        }
        args.push("-c".into());
        args.push("flush".into());
        args.push(uri);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run_ok("qemu-io", &a)
    });
    std::thread::sleep(Duration::from_millis(30));
    drop(std::mem::replace(
        &mut sec,
        Proc(Command::new("true").spawn().unwrap()),
    ));
    let out = stream.join().expect("client must see no error");
    assert!(!out.contains("error"), "{out}");
    // More writes while the peer is away: 3 chunks.
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 40M 64k",
            "-c",
            "write -P 0x78 50M 128k",
            &s.uri(),
        ],
    );
    let degraded = wait_for_status(&s.p("primary.ctl"), |v| link(v) == "degraded");
    let dirty = degraded["primary"]["dirty_bytes"].as_u64().unwrap();
    assert!(dirty >= 3 * 65536, "dirty {dirty}");
    assert!(!files_identical(&s.p("primary.img"), &s.p("secondary.img")));
    // Restart the secondary: resync copies exactly the dirty chunks.
    let _sec2 = s.secondary();
    let done = wait_for_status(&s.p("primary.ctl"), |v| link(v) == "in_sync");
    let last = &done["primary"]["last_resync"];
    assert_eq!(last["full"], false);
    assert_eq!(last["bytes_copied"].as_u64().unwrap(), dirty, "{done}");
    let sst = control(&s.p("secondary.ctl"), "status").unwrap();
    assert_eq!(sst["secondary"]["resync_bytes"].as_u64().unwrap(), dirty);
    assert_eq!(sst["secondary"]["disk"], "consistent");
    run_ok("qemu-io", &["-f", "raw", "-c", "flush", &s.uri()]);
    assert!(
        files_identical(&s.p("primary.img"), &s.p("secondary.img")),
        "{}",
        s.log()
    );
}

#[test]
fn every_acked_write_is_on_the_secondary_after_sigkill_of_the_primary() {
    let s = Setup::new(64 * MIB);
    let _sec = s.secondary();
    let pri = s.primary();
    wait_for_status(&s.p("primary.ctl"), |v| link(v) == "in_sync");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pri.0.id()).unwrap());
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    });
    let rt = common::Rt::new();
    let sock = s.p("nbd.sock");
    let acked = rt.block_on(async move {
        let mut c = xenft_blkback::nbd::client::NbdClient::connect_unix(&sock, "xenft")
            .await
            .unwrap();
        let mut acked = Vec::new();
        for i in 0..100_000u64 {
            let block = block_for(i);
            match c.write((i % 8192) * 8192, &block, false).await {
                Ok(()) => acked.push(i),
                Err(_) => break,
            }
        }
        acked
    });
    killer.join().unwrap();
    drop(pri);
    assert!(acked.len() > 10, "only {} writes acked", acked.len());
    assert!(acked.len() < 100_000, "primary was never killed");
    let sec = std::fs::read(s.p("secondary.img")).unwrap();
    // The last write to each offset that was acknowledged must be there.
    let mut last = std::collections::HashMap::new();
    for i in &acked {
        last.insert(i % 8192, *i);
    }
    for (slot, i) in last {
        let off = usize::try_from(slot * 8192).unwrap();
        assert_eq!(
            &sec[off..off + 4096],
            &block_for(i)[..],
            "acked write {i} missing"
        );
    }
}

fn block_for(i: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for (k, chunk) in b.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(i * 1000 + k as u64).to_be_bytes());
    }
    b
}
