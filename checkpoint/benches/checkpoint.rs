//! `scripts/bench checkpoint`: a 1 GiB synthetic guest dirtying 5, 20 and 100 MB/s, protected
//! with adaptive epochs (xenft default for level 3), side by side with a Remus-like baseline
//! (fixed 25 ms epochs). Reports epochs/s, pause p50/p99/max, wire vs raw bytes and secondary
//! lag; the last line is a JSON object.
//!
//! Options (after `--`): `--seconds N` per run (default 5), `--memory-mib N` (default 1024),
//! `--rate MB` (one rate only), `--tracking sync|async|auto` (default sync), `--write-len N`
//! bytes of random data per page-dirtying write (default 1024; 4096 = whole pages of noise,
//! the worst case for compression).

// Figures are reported as floats; the casts only feed printing.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use xenft_checkpoint::engine::commit::RecordingSink;
use xenft_checkpoint::engine::primary::{start_protection, EpochPolicy, PrimaryConfig};
use xenft_checkpoint::engine::secondary::{start_secondary, SecondaryConfig};
use xenft_checkpoint::engine::transport::memory_pair;
use xenft_checkpoint::local::guest::Tracking;
use xenft_checkpoint::local::{LocalDomain, LocalGuestConfig};
use xenft_checkpoint::workload::{Pattern, WorkloadSpec, WorkloadState};

/// Default bytes of incompressible data per page-dirtying write (a quarter page).
const WRITE_LEN: u32 = 1024;

struct Run {
    epochs_per_s: f64,
    pause_p50: f64,
    pause_p99: f64,
    pause_max: f64,
    wire_vs_raw: f64,
    dirty_mb_s: f64,
    commit_p50: f64,
    commit_p99: f64,
    lag_max_bytes: u64,
    lag_mean_bytes: f64,
    precopy_s: f64,
}

fn run(
    memory_mib: u64,
    rate_mb: u64,
    policy: EpochPolicy,
    seconds: u64,
    tracking: Tracking,
    write_len: u32,
) -> Run {
    let guest = PathBuf::from(env!("CARGO_BIN_EXE_xenft-synthetic-guest"));
    let workload = WorkloadState::new(
        WorkloadSpec {
            pattern: Pattern::Random,
            write_len,
            rate_bytes_per_s: rate_mb * 1_000_000,
        },
        rate_mb,
    )
    .expect("workload");
    let primary = LocalDomain::spawn(&LocalGuestConfig {
        binary: guest.clone(),
        memory_bytes: memory_mib << 20,
        workload,
        tracking,
    })
    .expect("spawn guest");
    let replica = LocalDomain::replica(guest, memory_mib << 20).expect("replica");
    let (a, b) = memory_pair();
    let secondary = start_secondary(replica, b, SecondaryConfig::default()).expect("secondary");
    let t0 = Instant::now();
    let p = start_protection(
        primary,
        a,
        Arc::new(RecordingSink::new()),
        PrimaryConfig {
            epoch: policy,
            ..PrimaryConfig::default()
        },
    )
    .expect("protection");
    while p.status().checkpoints == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let precopy_s = t0.elapsed().as_secs_f64();
    // Measure lag once pre-copy's last chunks are acknowledged (a checkpoint committed).
    while p.status().committed_epoch == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let end = Instant::now() + Duration::from_secs(seconds);
    let (mut lag_max, mut lag_sum, mut lag_n) = (0u64, 0u64, 0u64);
    while Instant::now() < end {
        let st = p.status();
        lag_max = lag_max.max(st.lag_bytes);
        lag_sum += st.lag_bytes;
        lag_n += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = p.status();
    drop(p.stop());
    drop(secondary.stop());
    let secs = st.protected_for.as_secs_f64().max(1e-9);
    Run {
        epochs_per_s: st.checkpoints as f64 / secs,
        pause_p50: st.pause.p50,
        pause_p99: st.pause.p99,
        pause_max: st.pause.max,
        wire_vs_raw: st.wire_bytes as f64 / (st.raw_bytes.max(1)) as f64,
        dirty_mb_s: st.raw_bytes as f64 / secs / 1e6,
        commit_p50: st.commit_latency.p50,
        commit_p99: st.commit_latency.p99,
        lag_max_bytes: lag_max,
        lag_mean_bytes: lag_sum as f64 / lag_n.max(1) as f64,
        precopy_s,
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let seconds = opt("--seconds", 5);
    let tracking = args
        .iter()
        .position(|a| a == "--tracking")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| Tracking::from_name(v))
        .unwrap_or_default();
    let rates: Vec<u64> = match opt("--rate", 0) {
        0 => vec![5, 20, 100],
        r => vec![r],
    };
    let memory_mib = opt("--memory-mib", 1024);
    let write_len = u32::try_from(opt("--write-len", u64::from(WRITE_LEN)))
        .unwrap_or(WRITE_LEN)
        .clamp(1, 4096);
    let adaptive = EpochPolicy::Adaptive {
        min: Duration::from_millis(5),
        max: Duration::from_millis(25),
        max_pause_share: 0.1,
        max_pause: Duration::from_millis(5),
    };
    let remus = EpochPolicy::Fixed(Duration::from_millis(25));
    let mut out = Map::new();
    out.insert("memory_mib".into(), json!(memory_mib));
    out.insert("write_bytes_per_dirtied_page".into(), json!(write_len));
    out.insert("seconds_per_run".into(), json!(seconds));
    out.insert("tracking".into(), json!(tracking.name()));
    for rate in rates {
        let x = run(memory_mib, rate, adaptive, seconds, tracking, write_len);
        let base = run(memory_mib, rate, remus, seconds, tracking, write_len);
        eprintln!(
            "{rate:>3} MB/s  xenft adaptive: {:.1} epochs/s, pause p50/p99/max {:.2}/{:.2}/{:.2} ms, \
             wire/raw {:.3}, dirty {:.1} MB/s, commit p50/p99 {:.1}/{:.1} ms, lag max {} B, pre-copy {:.1} s",
            x.epochs_per_s, x.pause_p50, x.pause_p99, x.pause_max, x.wire_vs_raw, x.dirty_mb_s,
            x.commit_p50, x.commit_p99, x.lag_max_bytes, x.precopy_s
        );
        eprintln!(
            "{rate:>3} MB/s  baseline fixed 25 ms: {:.1} epochs/s, pause p50/p99/max {:.2}/{:.2}/{:.2} ms, wire/raw {:.3}",
            base.epochs_per_s, base.pause_p50, base.pause_p99, base.pause_max, base.wire_vs_raw
        );
        let k = |name: &str| format!("{name}_{rate}mb");
        let mut put = |name: &str, v: Value| {
            out.insert(k(name), v);
        };
        put("epochs_per_s", json!(round(x.epochs_per_s)));
        put("pause_p50_ms", json!(round(x.pause_p50)));
        put("pause_p99_ms", json!(round(x.pause_p99)));
        put("pause_max_ms", json!(round(x.pause_max)));
        put("wire_vs_raw", json!(round(x.wire_vs_raw)));
        put("dirty_mb_s", json!(round(x.dirty_mb_s)));
        put("commit_p50_ms", json!(round(x.commit_p50)));
        put("commit_p99_ms", json!(round(x.commit_p99)));
        put("lag_max_bytes", json!(x.lag_max_bytes));
        put("lag_mean_bytes", json!(round(x.lag_mean_bytes)));
        put("precopy_s", json!(round(x.precopy_s)));
        put(
            "baseline_fixed25_epochs_per_s",
            json!(round(base.epochs_per_s)),
        );
        put(
            "baseline_fixed25_pause_p99_ms",
            json!(round(base.pause_p99)),
        );
        put(
            "epochs_per_s_vs_baseline",
            json!(round(x.epochs_per_s / base.epochs_per_s.max(1e-9))),
        );
    }
    println!("{}", Value::Object(out));
}
