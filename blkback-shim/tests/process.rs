//! The real `xenft-blkback` binary: a primary and a secondary process mirrored over loopback
//! TCP, driven by real NBD clients, with the secondary or the primary killed mid-stream.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{call, free_port, nbd_uri, peer_link, run_ok, status, wait_for_status};
use xenft_control::blkback::{Reply, Request};

const MIB: u64 = 1 << 20;
/// Write slots (8 KiB apart) of the SIGKILL test: 16 MiB of the disk.
const SLOTS: u64 = 2048;
const BIN: &str = env!("CARGO_BIN_EXE_xenft-blkback");

/// A child process killed (SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Setup {
    dir: tempfile::TempDir,
    port: u16,
    port2: u16,
    size: u64,
    alink: bool,
    /// Where the primary's disk lives (default: in the temp dir).
    primary_disk: Option<PathBuf>,
}

impl Setup {
    fn new(size: u64) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            port2: free_port(),
            size,
            alink: false,
            primary_disk: None,
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
            // Generous: test hosts are often overloaded.
            "--alink-path-timeout-ms".to_string(),
            "2000".to_string(),
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
            self.primary_disk
                .clone()
                .unwrap_or_else(|| self.p("primary.img"))
                .display()
                .to_string(),
            "--bitmap".into(),
            self.p("primary.bitmap").display().to_string(),
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
    wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "in_sync");
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
    let v = status(&s.p("primary.ctl")).unwrap();
    let p = &v["primary"];
    if p["sessions"] != 1 || p["writes_degraded"] != 0 {
        // The link dropped during the run (an overloaded host can delay heartbeats past the
        // path timeout): the guarantee then holds once back in sync and flushed.
        eprintln!("link dropped during the run: {v}");
        wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "in_sync");
        run_ok("qemu-io", &["-f", "raw", "-c", "flush", &s.uri()]);
    } else {
        assert_eq!(p["writes_mirrored"], 5, "{v}");
    }
    assert!(
        files_identical(&s.p("primary.img"), &s.p("secondary.img")),
        "{}",
        s.log()
    );
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
    wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "in_sync");
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
    let degraded = wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "degraded");
    let dirty = degraded["primary"]["dirty_bytes"].as_u64().unwrap();
    assert!(dirty >= 3 * 65536, "dirty {dirty}");
    assert!(!files_identical(&s.p("primary.img"), &s.p("secondary.img")));
    // Restart the secondary: resync copies exactly the dirty chunks.
    let _sec2 = s.secondary();
    let done = wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "in_sync");
    let last = &done["primary"]["last_resync"];
    assert_eq!(last["full"], false);
    assert_eq!(last["bytes_copied"].as_u64().unwrap(), dirty, "{done}");
    let sst = status(&s.p("secondary.ctl")).unwrap();
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
    wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "in_sync");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pri.0.id()).unwrap());
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
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
            match c.write((i % SLOTS) * 8192, &block, false).await {
                Ok(()) => acked.push(i),
                Err(_) => break,
            }
        }
        acked
    });
    killer.join().unwrap();
    drop(pri);
    assert!(!acked.is_empty(), "no write acked before the kill");
    assert!(acked.len() < 100_000, "primary was never killed");
    let sec = std::fs::read(s.p("secondary.img")).unwrap();
    // Each slot holds its last acknowledged write, or the one write that was in flight when
    // the primary died (sent, maybe applied by the secondary, never acknowledged).
    let in_flight = acked.last().map_or(0, |l| l + 1);
    let mut last = std::collections::HashMap::new();
    for i in &acked {
        last.insert(i % SLOTS, *i);
    }
    for (slot, i) in last {
        let off = usize::try_from(slot * 8192).unwrap();
        let got = &sec[off..off + 4096];
        let ok = got == &block_for(i)[..]
            || (in_flight % SLOTS == slot && got == &block_for(in_flight)[..]);
        assert!(ok, "acked write {i} missing from the secondary");
    }
    // Restart the primary: its activity log makes it resync whatever was in flight.
    let _pri = s.primary();
    let v = wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "in_sync");
    assert!(
        v["primary"]["al_recovered_extents"].as_u64().unwrap() > 0,
        "{v}"
    );
    run_ok("qemu-io", &["-f", "raw", "-c", "flush", &s.uri()]);
    assert!(
        files_identical(&s.p("primary.img"), &s.p("secondary.img")),
        "{}",
        s.log()
    );
}

fn block_for(i: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for (k, chunk) in b.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(i * 1000 + k as u64).to_be_bytes());
    }
    b
}

#[test]
fn truncating_the_primary_backing_file_mid_stream_switches_to_remote_mode_without_client_errors() {
    let s = Setup::new(32 * MIB);
    let _sec = s.secondary();
    let _pri = s.primary();
    wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "in_sync");
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x31 0 16M",
            "-c",
            "flush",
            &s.uri(),
        ],
    );
    // A real local failure: the backing file loses its tail under the running primary.
    std::fs::OpenOptions::new()
        .write(true)
        .open(s.p("primary.img"))
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x31 4M 8M",
            "-c",
            "write -P 0x32 20M 2M",
            "-c",
            "flush",
            "-c",
            "read -P 0x32 20M 2M",
            "-c",
            "read -P 0x31 0 16M",
            &s.uri(),
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    let v = status(&s.p("primary.ctl")).unwrap();
    let cause = v["primary"]["local_failure"]
        .as_str()
        .expect("failure reported")
        .to_string();
    assert!(cause.contains("truncated"), "{cause}");
    // The secondary holds everything the client wrote.
    let sec = std::fs::read(s.p("secondary.img")).unwrap();
    assert!(sec[..16 << 20].iter().all(|&b| b == 0x31));
    assert!(sec[20 << 20..22 << 20].iter().all(|&b| b == 0x32));
}

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_local_filesystem_switches_to_remote_mode_without_client_errors() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: mounting a small tmpfs needs root");
        return;
    }
    let mut s = Setup::new(32 * MIB);
    let mnt = s.p("small-fs");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount tmpfs");
    let _fs = Tmpfs(mnt.clone());
    s.primary_disk = Some(mnt.join("primary.img"));
    let _sec = s.secondary();
    let _pri = s.primary();
    wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "in_sync");
    // 24 MiB of data on a filesystem of 8 MiB: the local store hits ENOSPC part way.
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x61 0 24M",
            "-c",
            "flush",
            "-c",
            "read -P 0x61 0 24M",
            &s.uri(),
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    let v = status(&s.p("primary.ctl")).unwrap();
    let cause = v["primary"]["local_failure"]
        .as_str()
        .expect("failure reported")
        .to_string();
    assert!(cause.contains("No space left"), "{cause}");
    let sec = std::fs::read(s.p("secondary.img")).unwrap();
    assert!(sec[..24 << 20].iter().all(|&b| b == 0x61));
}

#[test]
fn over_alink_idle_primary_goes_degraded_when_the_secondary_dies() {
    let s = Setup::over_alink(16 * MIB);
    let sec = s.secondary();
    let _pri = s.primary();
    wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "in_sync");
    drop(sec);
    // No client traffic, so no acknowledgement can time out: the link itself must tell.
    let v = wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "degraded");
    assert_eq!(v["primary"]["dirty_bytes"], 0);
    // And a write now is recorded for resync.
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &s.uri()]);
    let v = status(&s.p("primary.ctl")).unwrap();
    assert_eq!(v["primary"]["dirty_bytes"], 65536);
}

#[test]
fn secondary_restarted_while_the_client_keeps_writing_ends_identical() {
    let s = Setup::new(64 * MIB);
    let sec = s.secondary();
    let _pri = s.primary();
    wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "in_sync");
    drop(sec);
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x44 0 32M", &s.uri()],
    );
    wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "degraded");
    // The resync (32 MiB dirty, rate-limited so it overlaps) races with a new write stream.
    call(
        &s.p("primary.ctl"),
        &Request::ResyncRate {
            bytes_per_sec: 8 << 20,
        },
    )
    .unwrap();
    let uri = s.uri();
    let stream = std::thread::spawn(move || {
        let mut args = vec!["-f".to_string(), "raw".to_string()];
        for i in 0..400u32 {
            args.push("-c".into());
            args.push(format!(
                "write -P {} {}k 16k",
                i % 200 + 1,
                (i * 7919) % 60_000
            ));
        }
        args.push(uri);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run_ok("qemu-io", &a)
    });
    let _sec2 = s.secondary();
    wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "resyncing");
    stream.join().unwrap();
    call(
        &s.p("primary.ctl"),
        &Request::ResyncRate { bytes_per_sec: 0 },
    )
    .unwrap();
    wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "in_sync");
    run_ok("qemu-io", &["-f", "raw", "-c", "flush", &s.uri()]);
    assert!(
        files_identical(&s.p("primary.img"), &s.p("secondary.img")),
        "{}",
        s.log()
    );
}

#[test]
fn epoch_mode_through_the_control_sockets_holds_commits_and_discards() {
    let s = Setup::new(16 * MIB);
    let _sec = s.secondary();
    let _pri = s.primary();
    wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "in_sync");
    let (pc, sc) = (s.p("primary.ctl"), s.p("secondary.ctl"));
    assert_eq!(
        call(&sc, &Request::EpochMode { on: true }).unwrap(),
        Reply::Done
    );
    // Checkpoint 0 ends: the writes that follow belong to epoch 1.
    assert_eq!(
        call(&pc, &Request::Checkpoint { epoch: 0 }).unwrap(),
        Reply::Checkpoint { next_epoch: 1 }
    );
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x0e 0 1M",
            "-c",
            "flush",
            &s.uri(),
        ],
    );
    let sec = std::fs::read(s.p("secondary.img")).unwrap();
    assert!(
        sec[..1 << 20].iter().all(|&b| b == 0),
        "epoch 1 applied before its commit"
    );
    let st = status(&sc).unwrap();
    assert_eq!(st["secondary"]["held_epochs"], serde_json::json!([1]));
    assert_eq!(
        call(&pc, &Request::Commit { epoch: 1 }).unwrap(),
        Reply::Done
    );
    let sec = std::fs::read(s.p("secondary.img")).unwrap();
    assert!(
        sec[..1 << 20].iter().all(|&b| b == 0x0e),
        "committed epoch not applied"
    );
    // Epoch 2 never commits: failover discards it.
    call(&pc, &Request::SetEpoch { epoch: 2 }).unwrap();
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x0f 2M 1M", &s.uri()],
    );
    let d = call(&sc, &Request::Discard).unwrap();
    assert_eq!(d, Reply::Discarded { discarded: 1 }, "{d:?}");
    call(&sc, &Request::CommitLocal { epoch: 10 }).unwrap();
    let sec = std::fs::read(s.p("secondary.img")).unwrap();
    assert!(
        sec[2 << 20..3 << 20].iter().all(|&b| b == 0),
        "discarded epoch reached the store"
    );
    let e = call(&pc, &Request::Discard).unwrap_err();
    assert_eq!(e.kind(), Some(xenft_control::ErrorKind::Refused), "{e}");
}

#[test]
fn sigterm_stops_the_primary_cleanly_so_a_restart_resyncs_nothing() {
    let s = Setup::new(32 * MIB);
    let _sec = s.secondary();
    let pri = s.primary();
    wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "in_sync");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x21 0 8M", &s.uri()],
    );
    let v = status(&s.p("primary.ctl")).unwrap();
    assert!(
        v["primary"]["al_active_extents"].as_u64().unwrap() >= 2,
        "{v}"
    );
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pri.0.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut pri = pri;
    let status = pri.0.wait().unwrap();
    assert!(status.success(), "clean exit: {status:?}\n{}", s.log());
    let _pri2 = s.primary();
    let v = wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "in_sync");
    assert_eq!(v["primary"]["al_recovered_extents"], 0, "{v}");
    assert_eq!(v["primary"]["last_resync"]["bytes_copied"], 0, "{v}");
    assert!(files_identical(&s.p("primary.img"), &s.p("secondary.img")));
}

#[test]
fn secondary_from_a_previous_boot_without_clean_stop_gets_a_full_sync() {
    let s = Setup::new(16 * MIB);
    let sec = s.secondary();
    let _pri = s.primary();
    wait_for_status(&s.p("primary.ctl"), |v| peer_link(v) == "in_sync");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x51 0 2M", &s.uri()],
    );
    drop(sec); // SIGKILL: acknowledged writes may sit in the page cache only
    let state_file = s.p("secondary.img.xenft-state");
    let state = std::fs::read_to_string(&state_file).unwrap();
    assert!(state.starts_with("consistent boot="), "{state}");
    // Pretend the host rebooted: the page cache, and so possibly acked writes, are gone.
    std::fs::write(
        &state_file,
        "consistent boot=00000000-0000-0000-0000-000000000000\n",
    )
    .unwrap();
    let _sec2 = s.secondary();
    let v = wait_for_status(&s.p("primary.ctl"), |v| {
        peer_link(v) == "in_sync" && v["primary"]["sessions"].as_u64() == Some(2)
    });
    assert_eq!(v["primary"]["last_resync"]["full"], true, "{v}");
    assert_eq!(v["primary"]["last_resync"]["bytes_copied"], 2 * MIB, "{v}");
    assert!(files_identical(&s.p("primary.img"), &s.p("secondary.img")));
}
