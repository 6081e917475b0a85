//! What durability without FLUSH/FUA costs: a mirrored `xenft-blkback` pair (primary and
//! secondary on this machine, plain TCP on loopback) written by a tapdisk-like client (oldstyle
//! NBD, WRITE only, no FLUSH, no FUA), 4 KiB random writes at queue depth 1 and 16, once in the
//! default mode (a write is acknowledged when both copies have it in their page cache) and once
//! with `--write-through` (the xenft SR's mode: acknowledged when durable on both copies).
//! Prints one line per case. `cargo bench -p xenft-sr --bench durable_writes`; `SECS=n` sets
//! the time per case (default 3), `DIR=path` where the disks live (default: the temp dir),
//! `BLKBACK=path` another `xenft-blkback` (default: built here, release).

#[path = "../tests/common/tapdisk.rs"]
mod tapdisk;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tapdisk::{block, Tapdisk};

const DISK: u64 = 256 << 20;
const BS: usize = 4096;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn blkback() -> PathBuf {
    if let Some(p) = std::env::var_os("BLKBACK") {
        return PathBuf::from(p);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let st = Command::new(cargo)
        .args([
            "build",
            "-q",
            "--release",
            "-p",
            "xenft-blkback",
            "--bin",
            "xenft-blkback",
        ])
        .arg("--manifest-path")
        .arg(manifest)
        .status()
        .expect("cargo build");
    assert!(st.success(), "building xenft-blkback");
    let exe = std::env::current_exe().expect("bench path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("xenft-blkback")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn spawn(bin: &Path, args: &[String]) -> Proc {
    Proc(
        Command::new(bin)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn xenft-blkback"),
    )
}

fn wait_for(p: &Path) {
    let start = Instant::now();
    while !p.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `secs` seconds of 4 KiB random writes at queue depth `qd`; returns (ops, elapsed).
fn run(sock: &Path, qd: usize, secs: f64) -> (u64, f64) {
    let mut t = Tapdisk::connect(sock).expect("connect");
    let blocks = DISK / BS as u64;
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let data = block(1, BS);
    let mut inflight = VecDeque::new();
    let (start, mut done) = (Instant::now(), 0u64);
    loop {
        let running = start.elapsed().as_secs_f64() < secs;
        while running && inflight.len() < qd {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let h = t.send_write((x % blocks) * BS as u64, &data).expect("send");
            inflight.push_back(h);
        }
        if inflight.is_empty() {
            break;
        }
        let (h, err) = t.recv_reply().expect("reply");
        assert_eq!(err, 0, "write failed");
        assert!(inflight.contains(&h), "unknown handle");
        inflight.retain(|x| *x != h);
        done += 1;
    }
    let el = start.elapsed().as_secs_f64();
    t.disconnect();
    (done, el)
}

fn main() {
    let secs: f64 = std::env::var("SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let bin = blkback();
    let base = std::env::var_os("DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    println!("durable_writes: mirrored xenft-blkback pair on loopback, tapdisk-like client, 4 KiB random writes over {} MiB, {secs} s per case, disks in {}", DISK >> 20, base.display());
    println!(
        "{:<14} {:>3} {:>10} {:>9} {:>12}",
        "mode", "qd", "IOPS", "MiB/s", "mean lat us"
    );
    let mut table = Vec::new();
    for write_through in [false, true] {
        let dir = tempfile::tempdir_in(&base).expect("temp dir");
        let p = |n: &str| dir.path().join(n).display().to_string();
        let port = free_port().to_string();
        let common = |role: &str, disk: &str| {
            let mut a: Vec<String> = [
                "--role",
                role,
                "--disk",
                &p(disk),
                "--size",
                "256M",
                "--nbd-unix",
                &p(&format!("{role}.sock")),
                "--nbd-oldstyle",
                "--control",
                &p(&format!("{role}.ctl")),
            ]
            .iter()
            .map(|s| (*s).to_string())
            .collect();
            if write_through {
                a.push("--write-through".into());
            }
            a
        };
        let mut sargs = common("secondary", "s.img");
        sargs.extend(["--listen".to_string(), format!("127.0.0.1:{port}")]);
        let _s = spawn(&bin, &sargs);
        wait_for(&dir.path().join("secondary.ctl"));
        let mut pargs = common("primary", "p.img");
        pargs.extend(["--peer".to_string(), format!("127.0.0.1:{port}")]);
        let _p = spawn(&bin, &pargs);
        let sock = dir.path().join("primary.sock");
        wait_for(&sock);
        // Let the initial sync (all holes: no data) end before measuring.
        std::thread::sleep(Duration::from_millis(500));
        let mode = if write_through {
            "write-through"
        } else {
            "default"
        };
        for qd in [1usize, 16] {
            let (ops, el) = run(&sock, qd, secs);
            let iops = ops as f64 / el;
            let mibs = iops * BS as f64 / f64::from(1u32 << 20);
            let lat = el / ops.max(1) as f64 * qd as f64 * 1e6;
            println!("{mode:<14} {qd:>3} {iops:>10.0} {mibs:>9.2} {lat:>12.0}");
            table.push((write_through, qd, iops));
        }
    }
    for qd in [1usize, 16] {
        let get = |wt| {
            table
                .iter()
                .find(|(w, q, _)| *w == wt && *q == qd)
                .map_or(0.0, |t| t.2)
        };
        let (d, w) = (get(false), get(true));
        if w > 0.0 {
            println!(
                "qd {qd}: write-through costs {:.1}x the time per write ({d:.0} vs {w:.0} IOPS)",
                d / w
            );
        }
    }
}
