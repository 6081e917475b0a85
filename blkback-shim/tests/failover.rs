//! Failover with real processes and files: the primary is SIGKILLed mid-stream, the secondary
//! is stopped cleanly and promoted, takes more writes, and the old primary comes back as the
//! secondary. The resync copies only the union of what the new primary wrote since its
//! promotion and what the old primary reported as possibly unacknowledged, new → old.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port, peer_link, wait_for_status};
use xenft_blkback::mirror::bitmap::{DirtyBitmap, DEFAULT_CHUNK};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const BIN: &str = env!("CARGO_BIN_EXE_xenft-blkback");

/// A child process killed (SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// SIGTERM and wait for a clean exit.
    fn stop(mut self, log: &str) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = self.0.wait().unwrap();
        assert!(status.success(), "clean exit: {status:?}\n{log}");
    }
    fn sigkill(self) {
        drop(self);
    }
}

/// Two hosts, A and B, each with its disk and its default bitmap and state files beside it,
/// mirrored over plain TCP (`port` is where the secondary listens) or over a two-path
/// A-link (`alink`: the same link whatever the roles; host-a dials, host-b accepts).
struct Pair {
    dir: tempfile::TempDir,
    alink: Option<[u16; 2]>,
}

impl Pair {
    fn new(alink: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("secret"),
            b"failover test pool secret, 32 b",
        )
        .unwrap();
        Self {
            dir,
            alink: alink.then(|| [free_port(), free_port()]),
        }
    }
    /// Transport arguments of host `h` (`primary`: dial `port`, else listen on it).
    fn peer_args(&self, h: &str, primary: bool, port: u16) -> Vec<String> {
        let Some(ports) = self.alink else {
            let flag = if primary { "--peer" } else { "--listen" };
            return vec![flag.into(), format!("127.0.0.1:{port}")];
        };
        let peer = if h == "a" { "b" } else { "a" };
        let mut v = vec![
            "--secret-file".to_string(),
            self.p("secret").display().to_string(),
            "--host".into(),
            format!("host-{h}"),
            "--peer-host".into(),
            format!("host-{peer}"),
            "--alink-path-timeout-ms".into(),
            "2000".into(),
        ];
        for p in ports {
            v.push("--alink-path".into());
            v.push(if h == "a" {
                format!("127.0.0.1:0=127.0.0.1:{p}")
            } else {
                format!("127.0.0.1:{p}=127.0.0.1:0")
            });
        }
        v
    }
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.p("log")).unwrap_or_default()
    }
    fn spawn(&self, args: Vec<String>) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.p("log"))
            .unwrap();
        Proc(
            Command::new(BIN)
                .args(args)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }
    /// Host `h` as primary, dialing its peer on `port`.
    fn primary(&self, h: &str, port: u16) -> Proc {
        let p = self.spawn(
            vec![
                "--role".into(),
                "primary".into(),
                "--disk".into(),
                self.p(&format!("{h}.img")).display().to_string(),
                "--size".into(),
                SIZE.to_string(),
                "--nbd-unix".into(),
                self.p(&format!("{h}.sock")).display().to_string(),
                "--control".into(),
                self.p(&format!("{h}.ctl")).display().to_string(),
            ]
            .into_iter()
            .chain(self.peer_args(h, true, port))
            .collect(),
        );
        wait_for_status(&self.p(&format!("{h}.ctl")), |_| true);
        p
    }
    /// Host `h` as secondary, listening on `port`.
    fn secondary(&self, h: &str, port: u16) -> Proc {
        let p = self.spawn(
            vec![
                "--role".into(),
                "secondary".into(),
                "--disk".into(),
                self.p(&format!("{h}.img")).display().to_string(),
                "--size".into(),
                SIZE.to_string(),
                "--control".into(),
                self.p(&format!("{h}.ctl")).display().to_string(),
            ]
            .into_iter()
            .chain(self.peer_args(h, false, port))
            .collect(),
        );
        wait_for_status(&self.p(&format!("{h}.ctl")), |_| true);
        p
    }
}

fn block(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| u8::try_from((i * 31 + k as u64 * 7) % 251).unwrap() | 1)
        .collect()
}

fn chunks_of(offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    offset / DEFAULT_CHUNK..=(offset + len - 1) / DEFAULT_CHUNK
}

#[test]
fn returning_old_primary_gets_only_the_union_of_both_sides_dirty_regions() {
    failover_resyncs_only_the_union(&Pair::new(false));
}

#[test]
fn over_alink_returning_old_primary_gets_only_the_union_of_both_sides_dirty_regions() {
    failover_resyncs_only_the_union(&Pair::new(true));
}

fn failover_resyncs_only_the_union(pair: &Pair) {
    let (port_ab, port_ba) = (free_port(), free_port());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();

    // A primary, B secondary, in sync.
    let b = pair.secondary("b", port_ab);
    let a = pair.primary("a", port_ab);
    wait_for_status(&pair.p("a.ctl"), |v| peer_link(v) == "in_sync");

    // A stream of 64 KiB writes over the first 16 MiB; A dies mid-stream (SIGKILL).
    let killer = {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(a.0.id()).unwrap());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        })
    };
    let sock = pair.p("a.sock");
    let acked = rt.block_on(async move {
        let mut c = xenft_blkback::nbd::client::NbdClient::connect_unix(&sock, "xenft")
            .await
            .unwrap();
        let mut n = 0u64;
        while n < 1_000_000 {
            let off = (n % 256) * DEFAULT_CHUNK;
            if c.write(off, &block(n, 65536), false).await.is_err() {
                break;
            }
            n += 1;
        }
        n
    });
    killer.join().unwrap();
    a.sigkill();
    assert!(acked > 0 && acked < 1_000_000, "{acked} writes acked");

    // Promotion: B stops cleanly (leaving its promotion bitmap) and starts as primary.
    b.stop(&pair.log());
    assert!(
        pair.p("b.img.xenft-bitmap").exists(),
        "a consistent secondary leaves a bitmap for its promotion\n{}",
        pair.log()
    );
    let b = pair.primary("b", port_ba);
    let v = wait_for_status(&pair.p("b.ctl"), |v| peer_link(v) == "degraded");
    assert_eq!(v["primary"]["dirty_bytes"], 0, "{v}");

    // B takes writes while A is away: 3 MiB at 40 MiB and 64 KiB inside A's region.
    let sock = pair.p("b.sock");
    let b_writes: Vec<(u64, u64)> = vec![(40 * MIB, 3 * MIB), (5 * MIB, 64 * 1024)];
    let w = b_writes.clone();
    rt.block_on(async move {
        let mut c = xenft_blkback::nbd::client::NbdClient::connect_unix(&sock, "xenft")
            .await
            .unwrap();
        for (i, (off, len)) in w.into_iter().enumerate() {
            let data = block(7000 + i as u64, usize::try_from(len).unwrap());
            c.write(off, &data, false).await.unwrap();
        }
    });

    // What A will report: its dirty bits and activity-log extents at the kill.
    let (_, report) = DirtyBitmap::read_report(&pair.p("a.img.xenft-bitmap"), SIZE, DEFAULT_CHUNK)
        .unwrap()
        .expect("the killed primary's bitmap is a trustworthy report");
    let mut union: std::collections::BTreeSet<u64> = (0..SIZE / DEFAULT_CHUNK)
        .filter(|&i| report[usize::try_from(i / 8).unwrap()] & (1 << (i % 8)) != 0)
        .collect();
    assert!(!union.is_empty(), "A had writes in flight when it died");
    for &(off, len) in &b_writes {
        union.extend(chunks_of(off, len));
    }
    let union_bytes = union.len() as u64 * DEFAULT_CHUNK;
    assert!(
        union_bytes < SIZE / 2,
        "the test must not degenerate into a full sync"
    );

    // A returns as B's secondary: B resyncs only the union, B → A.
    let a = pair.secondary("a", port_ba);
    let v = wait_for_status(&pair.p("b.ctl"), |v| {
        peer_link(v) == "in_sync" && v["primary"]["last_resync"].is_object()
    });
    let r = &v["primary"]["last_resync"];
    assert_eq!(r["full"], false, "{v}\n{}", pair.log());
    let moved = r["bytes_copied"].as_u64().unwrap() + r["bytes_zeroed"].as_u64().unwrap();
    eprintln!("acked {acked} writes before the kill; resync moved {moved} bytes = union {union_bytes} of {SIZE}");
    assert_eq!(moved, union_bytes, "{v}\n{}", pair.log());
    assert!(
        !pair.p("a.img.xenft-bitmap").exists(),
        "the report is consumed"
    );

    // Both copies identical once B's writes are durable and both stopped cleanly.
    b.stop(&pair.log());
    a.stop(&pair.log());
    let same = Command::new("cmp")
        .arg(pair.p("a.img"))
        .arg(pair.p("b.img"))
        .status()
        .expect("cmp (diffutils) installed")
        .success();
    assert!(
        same,
        "copies differ after the failover resync\n{}",
        pair.log()
    );
}

#[test]
fn a_promoted_secondary_without_the_old_primarys_report_does_a_full_sync() {
    let pair = Pair::new(false);
    let (port_ab, port_ba) = (free_port(), free_port());
    let b = pair.secondary("b", port_ab);
    let a = pair.primary("a", port_ab);
    wait_for_status(&pair.p("a.ctl"), |v| peer_link(v) == "in_sync");
    a.sigkill();
    b.stop(&pair.log());
    let b = pair.primary("b", port_ba);
    // A's bitmap is lost: it cannot say what it wrote that B never acknowledged.
    std::fs::remove_file(pair.p("a.img.xenft-bitmap")).unwrap();
    std::fs::write(pair.p("a.img.xenft-state"), "consistent clean\n").unwrap();
    let a = pair.secondary("a", port_ba);
    let v = wait_for_status(&pair.p("b.ctl"), |v| {
        peer_link(v) == "in_sync" && v["primary"]["last_resync"].is_object()
    });
    assert_eq!(v["primary"]["last_resync"]["full"], true, "{v}");
    b.stop(&pair.log());
    a.stop(&pair.log());
}
