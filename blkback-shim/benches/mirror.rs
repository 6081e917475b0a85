//! `scripts/bench mirror`: write throughput through (a) qemu-nbd serving a raw file (baseline),
//! (b) the shim without a peer, (c) the shim mirrored to a second shim process over a loopback
//! two-path A-link, on 1 GiB files, in the same run; (a) and (b) run side by side, each load
//! measured on one then the other in every repeat. Loads: sequential 1 MiB writes over the
//! whole disk (queue depth 8) and random 4 KiB writes at queue depth 16, each ending with a
//! flush, then random 4 KiB reads at queue depth 16 of the written disk (page cache warm for
//! both servers alike), each run `REPEAT` times (best kept). Last line: JSON with raw figures
//! and the ratios `shim_vs_qemu_nbd` and `mirrored_vs_unmirrored` (sequential writes),
//! `rand_shim_vs_qemu_nbd` (random writes) and `rand_read_shim_vs_qemu_nbd` (random reads),
//! `alink_cpu_vs_plain_tcp_primary` and `_secondary` (CPU per sequential GiB of each mirror
//! host over the A-link vs over plain TCP).
//!
//! Beside throughput it reports the CPU seconds per GiB that each process (server(s) and the
//! NBD client) used in the best sequential run, and from them the CPU-bound ceiling of each
//! configuration on this machine (all cores busy with nothing else): on a 2-core box where
//! client, primary and secondary share the cores, the mirrored path cannot beat
//! `cores / cpu_s_per_gib` however the pipeline is arranged.
//!
//! Environment: `BENCH_SIZE_MIB` (default 1024), `BENCH_RANDOM_OPS` (default 32768),
//! `BENCH_REPEAT` (default 3), `BENCH_DIR` (default /var/tmp).

mod common;

use common::{cpu_secs, link, read_load, wait_status, write_load, Bed, Rng};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Figures {
    seq_mib_s: f64,
    rand_iops: f64,
    rand_read_iops: f64,
    /// CPU microseconds per operation of the server process(es) in the best random write and
    /// random read runs: where a server loses when the cores are the limit.
    rand_cpu_us_per_op: [f64; 2],
    /// CPU seconds per GiB of the best sequential run: the shim process(es), then this
    /// process (the NBD client).
    seq_cpu_s_per_gib: Vec<f64>,
}

/// Measures each server in `servers` (socket, pids of its processes), alternating between them
/// in every repeat so that servers measured together share the machine's state (other load,
/// page cache) as closely as possible; the best of `repeat` runs per load and server.
fn measure(
    rt: &tokio::runtime::Runtime,
    servers: &[(&std::path::Path, &[u32])],
    size: u64,
    ops: u64,
    repeat: u64,
) -> Vec<Figures> {
    let block = 1u64 << 20;
    let seq: Vec<u64> = (0..size / block).map(|i| i * block).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let rand: Vec<u64> = (0..ops)
        .map(|_| (rng.next_u64() % (size / 4096)) * 4096)
        .collect();
    let rand_reads: Vec<u64> = (0..ops)
        .map(|_| (rng.next_u64() % (size / 4096)) * 4096)
        .collect();
    let mut best: Vec<Figures> = servers
        .iter()
        .map(|_| Figures {
            seq_mib_s: 0.0,
            rand_iops: 0.0,
            rand_read_iops: 0.0,
            rand_cpu_us_per_op: [0.0; 2],
            seq_cpu_s_per_gib: Vec::new(),
        })
        .collect();
    let me = std::process::id();
    for _ in 0..repeat {
        for ((sock, pids), best) in servers.iter().zip(&mut best) {
            let cpu = || -> Vec<f64> { pids.iter().chain([&me]).map(|&p| cpu_secs(p)).collect() };
            let before = cpu();
            let t = write_load(rt, sock, seq.clone(), 1 << 20, 8);
            let gib = size as f64 / f64::from(1u32 << 30);
            let used: Vec<f64> = cpu()
                .iter()
                .zip(&before)
                .map(|(a, b)| ((a - b) / gib * 1000.0).round() / 1000.0)
                .collect();
            if (size >> 20) as f64 / t > best.seq_mib_s {
                best.seq_mib_s = (size >> 20) as f64 / t;
                best.seq_cpu_s_per_gib = used;
            }
        }
        let server_cpu = |pids: &[u32]| pids.iter().map(|&p| cpu_secs(p)).sum::<f64>();
        let us_per_op = |secs: f64| (secs / ops as f64 * 1e7).round() / 10.0;
        for ((sock, pids), best) in servers.iter().zip(&mut best) {
            let before = server_cpu(pids);
            let t = write_load(rt, sock, rand.clone(), 4096, 16);
            if ops as f64 / t > best.rand_iops {
                best.rand_iops = ops as f64 / t;
                best.rand_cpu_us_per_op[0] = us_per_op(server_cpu(pids) - before);
            }
        }
        for ((sock, pids), best) in servers.iter().zip(&mut best) {
            let before = server_cpu(pids);
            let t = read_load(rt, sock, rand_reads.clone(), 4096, 16);
            if ops as f64 / t > best.rand_read_iops {
                best.rand_read_iops = ops as f64 / t;
                best.rand_cpu_us_per_op[1] = us_per_op(server_cpu(pids) - before);
            }
        }
    }
    best
}

fn main() {
    let size = env("BENCH_SIZE_MIB", 1024) << 20;
    let ops = env("BENCH_RANDOM_OPS", 32768);
    let repeat = env("BENCH_REPEAT", 3).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");

    // qemu-nbd and the shim without a peer are up together and measured in turns.
    let bed = Bed::new(size);
    let (q, s) = {
        let qp = bed.qemu_nbd("qemu.img", "qemu.sock");
        let sp = bed.local("local.img", "local.sock");
        let (qs, ss) = (bed.p("qemu.sock"), bed.p("local.sock"));
        let mut f = measure(
            &rt,
            &[(&qs, &[qp.0.id()]), (&ss, &[sp.0.id()])],
            size,
            ops,
            repeat,
        );
        let s = f.pop().expect("two servers measured");
        (f.pop().expect("two servers measured"), s)
    };
    let _ = std::fs::remove_file(bed.p("qemu.img"));
    let _ = std::fs::remove_file(bed.p("local.img"));
    eprintln!(
        "qemu-nbd: seq {:.0} MiB/s, rand {:.0} IOPS, rand read {:.0} IOPS",
        q.seq_mib_s, q.rand_iops, q.rand_read_iops
    );
    eprintln!(
        "shim: seq {:.0} MiB/s, rand {:.0} IOPS, rand read {:.0} IOPS",
        s.seq_mib_s, s.rand_iops, s.rand_read_iops
    );

    let m = {
        let sec = bed.secondary();
        let pri = bed.primary("primary.sock");
        wait_status(&bed.p("primary.ctl"), |v| link(v) == "in_sync");
        let sock = bed.p("primary.sock");
        let f = measure(
            &rt,
            &[(&sock, &[pri.0.id(), sec.0.id()])],
            size,
            ops,
            repeat,
        )
        .pop()
        .expect("one server measured");
        let st = wait_status(&bed.p("primary.ctl"), |_| true);
        assert_eq!(
            link(&st),
            "in_sync",
            "peer dropped during the benchmark: {}",
            bed.log()
        );
        f
    };
    eprintln!(
        "shim mirrored: seq {:.0} MiB/s, rand {:.0} IOPS",
        m.seq_mib_s, m.rand_iops
    );
    let identical =
        std::fs::read(bed.p("primary.img")).ok() == std::fs::read(bed.p("secondary.img")).ok();
    assert!(identical, "mirror copies differ after the benchmark");
    drop(bed);

    // Diagnostic: the same mirror over one plain TCP connection (no HMAC, one path).
    let mut bed = Bed::new(size);
    bed.tcp = true;
    let t = {
        let sec = bed.secondary();
        let pri = bed.primary("primary.sock");
        wait_status(&bed.p("primary.ctl"), |v| link(v) == "in_sync");
        let sock = bed.p("primary.sock");
        measure(
            &rt,
            &[(&sock, &[pri.0.id(), sec.0.id()])],
            size,
            ops,
            repeat,
        )
        .pop()
        .expect("one server measured")
    };
    eprintln!(
        "shim mirrored over plain TCP: seq {:.0} MiB/s, rand {:.0} IOPS",
        t.seq_mib_s, t.rand_iops
    );
    drop(bed);

    let r = |a: f64, b: f64| {
        if b > 0.0 {
            (a / b * 1000.0).round() / 1000.0
        } else {
            0.0
        }
    };
    // The CPU-bound ceiling of the mirrored path on this machine: every CPU second it needs
    // per GiB (primary, secondary and client share the same cores) at full use of all cores.
    let ncpu = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let cpu_total = |f: &Figures| f.seq_cpu_s_per_gib.iter().sum::<f64>();
    let ceiling = |f: &Figures| {
        let c = cpu_total(f);
        if c > 0.0 {
            (ncpu / c * 1024.0).round()
        } else {
            0.0
        }
    };
    // CPU seconds per GiB of one process of a mirrored run: 0 primary, 1 secondary.
    let cpu_of = |f: &Figures, i: usize| f.seq_cpu_s_per_gib.get(i).copied().unwrap_or(0.0);
    let out = serde_json::json!({
        "bench": "mirror",
        "size_mib": size >> 20,
        "seq_write_1m_qd8_mib_s": {
            "qemu_nbd": q.seq_mib_s.round(),
            "shim": s.seq_mib_s.round(),
            "shim_mirrored": m.seq_mib_s.round(),
            "shim_mirrored_plain_tcp": t.seq_mib_s.round(),
        },
        "rand_write_4k_qd16_iops": {
            "qemu_nbd": q.rand_iops.round(),
            "shim": s.rand_iops.round(),
            "shim_mirrored": m.rand_iops.round(),
            "shim_mirrored_plain_tcp": t.rand_iops.round(),
        },
        "shim_vs_qemu_nbd": r(s.seq_mib_s, q.seq_mib_s),
        "mirrored_vs_unmirrored": r(m.seq_mib_s, s.seq_mib_s),
        // Issue 16: the mirrored throughput against what this run's CPU ceiling allows,
        // mirrored / (min(1, ceiling / unmirrored) x unmirrored).
        "mirrored_vs_ceiling": r(m.seq_mib_s, s.seq_mib_s.min(ceiling(&m))),
        "rand_read_4k_qd16_iops": {
            "qemu_nbd": q.rand_read_iops.round(),
            "shim": s.rand_read_iops.round(),
            "shim_mirrored": m.rand_read_iops.round(),
            "shim_mirrored_plain_tcp": t.rand_read_iops.round(),
        },
        "rand_server_cpu_us_per_op": {
            "note": "server process(es), best run: [random 4 KiB write, random 4 KiB read]",
            "qemu_nbd": q.rand_cpu_us_per_op,
            "shim": s.rand_cpu_us_per_op,
            "shim_mirrored": m.rand_cpu_us_per_op,
            "shim_mirrored_plain_tcp": t.rand_cpu_us_per_op,
        },
        "rand_shim_vs_qemu_nbd": r(s.rand_iops, q.rand_iops),
        "rand_read_shim_vs_qemu_nbd": r(s.rand_read_iops, q.rand_read_iops),
        "rand_mirrored_vs_unmirrored": r(m.rand_iops, s.rand_iops),
        "mirror_copies_identical": identical,
        "seq_cpu_s_per_gib": {
            "note": "best sequential run; [server processes..., NBD client]",
            "qemu_nbd": q.seq_cpu_s_per_gib,
            "shim": s.seq_cpu_s_per_gib,
            "shim_mirrored": m.seq_cpu_s_per_gib,
            "shim_mirrored_plain_tcp": t.seq_cpu_s_per_gib,
        },
        "cpus": ncpu,
        "seq_cpu_bound_ceiling_mib_s": {
            "shim": ceiling(&s),
            "shim_mirrored": ceiling(&m),
            "shim_mirrored_plain_tcp": ceiling(&t),
        },
        "mirrored_ceiling_vs_unmirrored_measured": r(ceiling(&m), s.seq_mib_s),
        // What the A-link (authenticated, multi-path) costs over a bare TCP connection for
        // the same mirrored GiB, on each host.
        "alink_cpu_vs_plain_tcp_primary": r(cpu_of(&m, 0), cpu_of(&t, 0)),
        "alink_cpu_vs_plain_tcp_secondary": r(cpu_of(&m, 1), cpu_of(&t, 1)),
    });
    println!("{out}");
}
