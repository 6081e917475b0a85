//! `scripts/bench resync`: a 1 GiB disk full of data is first fully synced to a fresh secondary
//! (timed: the full sync), then the secondary is killed, 1 % of the disk is rewritten at random
//! while it is away, and it is restarted (timed: the resync). Both over a loopback two-path
//! A-link between two shim processes. Last line: JSON with `resync_vs_full` (resync time over
//! full sync time) and the bytes each copied.
//!
//! The 1 % is rewritten as random 64 KiB-aligned 64 KiB blocks (the bitmap granularity). A
//! second figure, `resync_vs_full_scattered_4k`, rewrites the same byte count as random 4 KiB
//! writes, where each write dirties a whole 64 KiB chunk (16× amplification).
//!
//! Environment: `BENCH_SIZE_MIB` (default 1024), `BENCH_DIR` (default /var/tmp).

mod common;

use common::{link, wait_status, write_load, Bed, Rng};
use std::io::Write;

fn secs(v: &serde_json::Value) -> f64 {
    v["primary"]["last_resync"]["elapsed_secs"]
        .as_f64()
        .unwrap_or(0.0)
}

fn copied(v: &serde_json::Value) -> u64 {
    v["primary"]["last_resync"]["bytes_copied"]
        .as_u64()
        .unwrap_or(0)
}

/// Kills the secondary, rewrites with `offsets`/`block` while it is away, restarts it and
/// returns the resync status.
fn away_and_back(
    bed: &Bed,
    rt: &tokio::runtime::Runtime,
    sec: &mut Option<common::Proc>,
    offsets: Vec<u64>,
    block: u32,
) -> serde_json::Value {
    sec.take();
    wait_status(&bed.p("primary.ctl"), |v| link(v) == "degraded");
    write_load(rt, &bed.p("primary.sock"), offsets, block, 16);
    *sec = Some(bed.secondary());
    // Degraded until the new session is up, resyncing until the end marker is acknowledged.
    wait_status(&bed.p("primary.ctl"), |v| link(v) == "in_sync")
}

fn main() {
    let size = std::env::var("BENCH_SIZE_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1024)
        << 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let bed = Bed::new(size);
    // A disk full of data (no holes, no zeroes): the full sync must copy every byte.
    {
        let mut f = std::fs::File::create(bed.p("primary.img")).unwrap();
        let mut rng = Rng(42);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..size >> 20 {
            for c in buf.chunks_mut(8) {
                c.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            f.write_all(&buf).unwrap();
        }
        f.sync_all().unwrap();
    }
    let mut sec = Some(bed.secondary());
    let _pri = bed.primary("primary.sock");
    let full = wait_status(&bed.p("primary.ctl"), |v| {
        link(v) == "in_sync" && v["primary"]["last_resync"]["full"] == true
    });
    let (full_s, full_b) = (secs(&full), copied(&full));
    eprintln!("full sync: {full_b} bytes in {full_s:.2} s");

    let chunk = 64u64 << 10;
    let nchunks = size / chunk;
    let want = (nchunks / 100).max(1);
    let mut rng = Rng(7);
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < want {
        picked.insert(rng.next_u64() % nchunks);
    }
    let offsets: Vec<u64> = picked.iter().map(|c| c * chunk).collect();
    let sessions_before = wait_status(&bed.p("primary.ctl"), |_| true)["primary"]["sessions"]
        .as_u64()
        .unwrap_or(0);
    let st = away_and_back(&bed, &rt, &mut sec, offsets, 64 << 10);
    assert!(st["primary"]["sessions"].as_u64().unwrap_or(0) > sessions_before);
    let (re_s, re_b) = (secs(&st), copied(&st));
    eprintln!("resync after 1% (64 KiB blocks): {re_b} bytes in {re_s:.3} s");

    // Same byte count as scattered 4 KiB writes.
    let n4k = want * 16;
    let offsets: Vec<u64> = (0..n4k)
        .map(|_| (rng.next_u64() % (size / 4096)) * 4096)
        .collect();
    let st2 = away_and_back(&bed, &rt, &mut sec, offsets, 4096);
    let (sc_s, sc_b) = (secs(&st2), copied(&st2));
    eprintln!("resync after 1% (4 KiB scattered): {sc_b} bytes in {sc_s:.3} s");

    write_load(&rt, &bed.p("primary.sock"), Vec::new(), 4096, 1);
    let identical =
        std::fs::read(bed.p("primary.img")).ok() == std::fs::read(bed.p("secondary.img")).ok();
    assert!(identical, "copies differ after resync: {}", bed.log());
    let r = |a: f64, b: f64| {
        if b > 0.0 {
            (a / b * 10000.0).round() / 10000.0
        } else {
            0.0
        }
    };
    let out = serde_json::json!({
        "bench": "resync",
        "size_mib": size >> 20,
        "full_sync_secs": full_s,
        "full_sync_bytes": full_b,
        "resync_secs": re_s,
        "resync_bytes": re_b,
        "resync_vs_full": r(re_s, full_s),
        "resync_scattered_4k_secs": sc_s,
        "resync_scattered_4k_bytes": sc_b,
        "resync_vs_full_scattered_4k": r(sc_s, full_s),
        "copies_identical": identical,
    });
    println!("{out}");
}
