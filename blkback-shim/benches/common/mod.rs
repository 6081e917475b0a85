//! Shared pieces of the blkback benchmarks: the shim binaries as separate processes (primary
//! and secondary over a loopback two-path A-link), qemu-nbd as the baseline, and a pipelined
//! NBD write load.
#![allow(dead_code, missing_docs)]

use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use xenft_blkback::nbd::client::{pipelined_reads, pipelined_writes, NbdClient};

pub const BIN: &str = env!("CARGO_BIN_EXE_xenft-blkback");

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free loopback port")
}

pub struct Bed {
    pub dir: tempfile::TempDir,
    pub size: u64,
    ports: [u16; 2],
    /// Mirror over plain TCP instead of the A-link.
    pub tcp: bool,
}

impl Bed {
    pub fn new(size: u64) -> Self {
        let dir =
            tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
                .expect("temp dir");
        std::fs::write(
            dir.path().join("secret"),
            b"blkback benchmark pool secret 32",
        )
        .unwrap();
        Self {
            dir,
            size,
            ports: [free_port(), free_port()],
            tcp: false,
        }
    }

    pub fn p(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
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
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn xenft-blkback"),
        )
    }

    fn alink_args(&self, primary: bool) -> Vec<String> {
        if self.tcp {
            let a = format!("127.0.0.1:{}", self.ports[0]);
            let flag = if primary { "--peer" } else { "--listen" };
            return vec![flag.into(), a];
        }
        let (me, peer) = if primary {
            ("host-a", "host-b")
        } else {
            ("host-b", "host-a")
        };
        let mut a = vec![
            "--secret-file".into(),
            self.p("secret").display().to_string(),
            "--host".into(),
            me.into(),
            "--peer-host".into(),
            peer.into(),
        ];
        for port in self.ports {
            a.push("--alink-path".into());
            a.push(if primary {
                format!("127.0.0.1:0=127.0.0.1:{port}")
            } else {
                format!("127.0.0.1:{port}=127.0.0.1:0")
            });
        }
        a
    }

    /// The shim serving `disk` with no peer.
    pub fn local(&self, disk: &str, sock: &str) -> Proc {
        let p = self.spawn(&[
            "--role".into(),
            "local".into(),
            "--disk".into(),
            self.p(disk).display().to_string(),
            "--size".into(),
            self.size.to_string(),
            "--nbd-unix".into(),
            self.p(sock).display().to_string(),
        ]);
        wait_socket(&self.p(sock));
        p
    }

    pub fn secondary(&self) -> Proc {
        let mut args = vec![
            "--role".into(),
            "secondary".into(),
            "--disk".into(),
            self.p("secondary.img").display().to_string(),
            "--size".into(),
            self.size.to_string(),
            "--control".into(),
            self.p("secondary.ctl").display().to_string(),
        ];
        args.extend(self.alink_args(false));
        let p = self.spawn(&args);
        wait_status(&self.p("secondary.ctl"), |_| true);
        p
    }

    pub fn primary(&self, sock: &str) -> Proc {
        let mut args = vec![
            "--role".into(),
            "primary".into(),
            "--disk".into(),
            self.p("primary.img").display().to_string(),
            "--size".into(),
            self.size.to_string(),
            "--nbd-unix".into(),
            self.p(sock).display().to_string(),
            "--control".into(),
            self.p("primary.ctl").display().to_string(),
        ];
        args.extend(self.alink_args(true));
        let p = self.spawn(&args);
        wait_status(&self.p("primary.ctl"), |_| true);
        p
    }

    /// qemu-nbd serving `disk` (created sparse) on `sock`.
    pub fn qemu_nbd(&self, disk: &str, sock: &str) -> Proc {
        let f = std::fs::File::create(self.p(disk)).unwrap();
        f.set_len(self.size).unwrap();
        let p = Proc(
            Command::new("qemu-nbd")
                .args(["-f", "raw", "-t", "-x", "xenft", "--cache=writeback", "-k"])
                .arg(self.p(sock))
                .arg(self.p(disk))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    eprintln!(
                        "bench: cannot run qemu-nbd ({e}): install qemu-utils \
                         (scripts/bench installs scripts/deps/blkback.apt)"
                    );
                    std::process::exit(2)
                }),
        );
        wait_socket(&self.p(sock));
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.p("log")).unwrap_or_default()
    }
}

pub fn wait_socket(p: &Path) {
    let start = Instant::now();
    while UnixStream::connect(p).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no socket {}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub use xenft_tests::components::peer_link as link;

pub fn wait_status(sock: &Path, f: impl Fn(&Value) -> bool) -> Value {
    xenft_tests::components::wait_blkback_status(sock, Duration::from_secs(600), f)
}

/// Runs `offsets` writes of `block` bytes at queue depth `depth` (then a flush) against the
/// NBD socket; returns seconds.
pub fn write_load(
    rt: &tokio::runtime::Runtime,
    sock: &Path,
    offsets: Vec<u64>,
    block: u32,
    depth: usize,
) -> f64 {
    rt.block_on(async {
        let c = NbdClient::connect_unix(sock, "xenft")
            .await
            .expect("nbd connect");
        pipelined_writes(c, offsets, block, depth)
            .await
            .expect("write load")
    })
}

/// Runs reads of `block` bytes at `offsets` at queue depth `depth` against the NBD socket;
/// returns seconds.
pub fn read_load(
    rt: &tokio::runtime::Runtime,
    sock: &Path,
    offsets: Vec<u64>,
    block: u32,
    depth: usize,
) -> f64 {
    rt.block_on(async {
        let c = NbdClient::connect_unix(sock, "xenft")
            .await
            .expect("nbd connect");
        pipelined_reads(c, offsets, block, depth)
            .await
            .expect("read load")
    })
}

/// CPU time (user + system) a process has used so far, in seconds; 0 if unknown.
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start at the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&t| t > 0)
        .unwrap_or(100);
    (ticks(11) + ticks(12)) as f64 / tck as f64
}

/// Deterministic pseudo-random u64 stream (xorshift).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
