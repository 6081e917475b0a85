//! `scripts/bench netback`: relay throughput (iperf3 TCP, vm → client) and added round-trip
//! latency (UDP ping-pong, vm → client → vm), side by side for
//! - `direct`: the kernel path a vif normally takes (vif and uplink ports of a Linux bridge in
//!   the host namespace) — the baseline;
//! - `passthrough`: the shim relaying in pass-through mode;
//! - `epochs`: the shim in buffered mode with 25 ms epochs, each committed as soon as it ends
//!   (an instantly acknowledging secondary), so the figure is the shim's own cost.
//!
//! Same namespaces, offload settings (kernel defaults: on) and MTU in all three. Needs
//! root and iperf3. The last line printed is a JSON object: `passthrough_vs_direct` and
//! `output_commit_vs_direct` (the epochs configuration) are medians of the per-round ratios
//! (each round measures the three configurations back to back, so load from elsewhere on the
//! host hits them alike); `*_relay_cpu_s_per_gb` is the relay's CPU time (this process: the
//! relay's threads, and the epoch driver) per GB iperf3 moved.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{shim_config, start_shim, Line, CLIENT_IP, R, VM_IP};
use xenft_netback::{Mode, Shim};

const EPOCH: Duration = Duration::from_millis(25);
const IPERF_SECS: &str = "3";
const PINGS: usize = 400;
const UDP_PORT: u16 = 7300;
/// SCHED_FIFO priority of the relay threads (and the epoch driver).
const RT_PRIORITY: u8 = 10;

fn bench_shim_config() -> xenft_netback::ShimConfig {
    let mut cfg = shim_config();
    cfg.realtime_priority = Some(RT_PRIORITY);
    cfg
}

/// The baseline: vif0 and up0 bridged by the host kernel.
fn bridge_host(line: &Line) -> R<()> {
    line.host
        .ip(&["link", "add", "br0", "type", "bridge", "stp_state", "0"])?;
    line.host.ip(&["link", "set", "vif0", "master", "br0"])?;
    line.host.ip(&["link", "set", "up0", "master", "br0"])?;
    line.host.ip(&["link", "set", "br0", "up"])?;
    Ok(())
}

/// CPU seconds (user + system) this process has used so far.
fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces): utime and
    // stime are the 12th and 13th, in clock ticks of 1/100 s (USER_HZ).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// iperf3 from the VM to the client: (Mbit/s received, bytes sent).
fn iperf_mbps(line: &Line) -> R<(f64, f64)> {
    let mut server = line
        .client
        .command("iperf3")
        .args(["-s", "-1", "-B", &CLIENT_IP.to_string(), "-p", "5299"])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = line
        .vm
        .command("iperf3")
        .args([
            "-c",
            &CLIENT_IP.to_string(),
            "-p",
            "5299",
            "-t",
            IPERF_SECS,
            "-J",
        ])
        .output();
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| {
            format!(
                "iperf3 gave no figure: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
    let bytes = v["end"]["sum_sent"]["bytes"].as_f64().unwrap_or(0.0);
    Ok((bps / 1e6, bytes))
}

/// Round-trip times in ms of `PINGS` UDP requests from the VM, echoed by the client.
fn rtts_ms(line: &Line) -> R<Vec<f64>> {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let echo = line.client.spawn(move || -> std::io::Result<()> {
        // The measuring apparatus runs real-time in every configuration alike, so that the
        // figures show the data path and not this host's other work.
        let _ = xenft_netback::sys::set_realtime_priority(RT_PRIORITY);
        let s = UdpSocket::bind((CLIENT_IP, UDP_PORT))?;
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
        let mut buf = [0u8; 64];
        while !stop2.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                s.send_to(&buf[..n], from)?;
            }
        }
        Ok(())
    })?;
    std::thread::sleep(Duration::from_millis(100));
    let pinger = line.vm.spawn(|| -> std::io::Result<Vec<f64>> {
        let _ = xenft_netback::sys::set_realtime_priority(RT_PRIORITY);
        let s = UdpSocket::bind((VM_IP, 0))?;
        s.connect((CLIENT_IP, UDP_PORT))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut out = Vec::with_capacity(PINGS);
        let mut buf = [0u8; 64];
        // Warm-up: resolves neighbours.
        s.send(&[0; 8])?;
        let _ = s.recv(&mut buf);
        for i in 0..PINGS {
            let seq = u64::try_from(i).unwrap_or(0).to_be_bytes();
            let t = Instant::now();
            s.send(&seq)?;
            loop {
                let n = s.recv(&mut buf)?;
                if n == 8 && buf[..8] == seq {
                    break;
                }
            }
            out.push(t.elapsed().as_secs_f64() * 1e3);
            // A gap spread evenly over 0..25 ms, so that requests land at every phase of an
            // epoch (a reply arrives right after a commit; a fixed short gap would always send
            // early in the next epoch and understate the wait).
            std::thread::sleep(Duration::from_micros((i as u64 * 7919) % 25_000));
        }
        Ok(out)
    })?;
    let r = pinger.join().map_err(|_| "pinger panicked")?;
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    Ok(r?)
}

/// The `p`th percentile (nearest rank) of a non-empty sample.
fn pct(v: &[f64], p: usize) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = (p * (s.len() - 1) + 50) / 100;
    s[rank.min(s.len() - 1)]
}

/// Drives epochs on an absolute 25 ms schedule: begin N+1, commit N.
fn epoch_driver(shim: Arc<Shim>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        // The checkpoint engine's timer runs real-time too, or epochs stretch on a busy host.
        if let Err(e) = xenft_netback::sys::set_realtime_priority(RT_PRIORITY) {
            eprintln!("epoch driver stays on the default scheduler: {e}");
        }
        let mut n = 1;
        let _ = shim.begin_epoch(n);
        let mut next = Instant::now() + EPOCH;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            next += EPOCH;
            let _ = shim.begin_epoch(n + 1);
            let _ = shim.commit(n);
            n += 1;
        }
        n
    })
}

struct Figures {
    mbps: f64,
    p50: f64,
    p99: f64,
    /// CPU seconds of this process (the relay) per GB during the throughput run.
    cpu_s_per_gb: f64,
}

/// Throughput and the relay's CPU per GB: (Mbit/s, CPU-s/GB).
fn throughput(line: &Line) -> R<(f64, f64)> {
    let cpu0 = process_cpu_s();
    let (mbps, bytes) = iperf_mbps(line)?;
    let cpu = process_cpu_s() - cpu0;
    Ok((
        mbps,
        if bytes > 0.0 {
            cpu / (bytes / 1e9)
        } else {
            0.0
        },
    ))
}

/// Adds the round-trip figures to a throughput run's.
fn latency(line: &Line, (mbps, cpu_s_per_gb): (f64, f64)) -> R<Figures> {
    let r = rtts_ms(line)?;
    Ok(Figures {
        mbps,
        p50: pct(&r, 50),
        p99: pct(&r, 99),
        cpu_s_per_gb,
    })
}

fn main() -> R<()> {
    if !xenft_tests::netns::require_root("netback bench") {
        return Ok(());
    }
    // Five rounds, interleaved, so that load from elsewhere on the host hits all three
    // configurations alike; the median round is reported. Within a round the three throughput
    // runs come back to back (the latency runs after them), direct and pass-through in turns
    // first, so that the ratio compares runs seconds apart under the same load.
    let mut rounds = Vec::new();
    let mut pass_counters = None;
    let mut ep_counters = None;
    for round in 0..5 {
        let direct_line = Line::new()?;
        bridge_host(&direct_line)?;
        let pass_line = Line::new()?;
        let pass_shim = start_shim(&pass_line.host, bench_shim_config())?;
        let ep_line = Line::new()?;
        let mut cfg = bench_shim_config();
        cfg.mode = Mode::Buffered;
        let ep_shim = Arc::new(start_shim(&ep_line.host, cfg)?);
        let stop = Arc::new(AtomicBool::new(false));
        let driver = epoch_driver(Arc::clone(&ep_shim), Arc::clone(&stop));
        let figures = (|| -> R<(Figures, Figures, Figures)> {
            let (direct_tp, pass_tp) = if round % 2 == 0 {
                let d = throughput(&direct_line)?;
                (d, throughput(&pass_line)?)
            } else {
                let p = throughput(&pass_line)?;
                (throughput(&direct_line)?, p)
            };
            let ep_tp = throughput(&ep_line)?;
            Ok((
                latency(&direct_line, direct_tp)?,
                latency(&pass_line, pass_tp)?,
                latency(&ep_line, ep_tp)?,
            ))
        })();
        stop.store(true, Ordering::Relaxed);
        let _ = driver.join();
        pass_counters = Some(pass_shim.counters());
        ep_counters = Some(ep_shim.counters());
        let (direct, pass, ep) = figures?;
        eprintln!(
            "round {round}: direct {:.0} Mbit/s rtt p50 {:.3} p99 {:.3} ms | passthrough {:.0} Mbit/s ({:.2}) rtt p50 {:.3} p99 {:.3} ms relay {:.3} CPU-s/GB | epochs {:.0} Mbit/s ({:.2}) rtt p50 {:.3} p99 {:.3} ms relay {:.3} CPU-s/GB",
            direct.mbps, direct.p50, direct.p99,
            pass.mbps, pass.mbps / direct.mbps, pass.p50, pass.p99, pass.cpu_s_per_gb,
            ep.mbps, ep.mbps / direct.mbps, ep.p50, ep.p99, ep.cpu_s_per_gb
        );
        rounds.push((direct, pass, ep));
    }
    let med = |f: &dyn Fn(&(Figures, Figures, Figures)) -> f64| {
        let v: Vec<f64> = rounds.iter().map(f).collect();
        pct(&v, 50)
    };
    let direct = Figures {
        mbps: med(&|r| r.0.mbps),
        p50: med(&|r| r.0.p50),
        p99: med(&|r| r.0.p99),
        cpu_s_per_gb: 0.0,
    };
    let pass = Figures {
        mbps: med(&|r| r.1.mbps),
        p50: med(&|r| r.1.p50),
        p99: med(&|r| r.1.p99),
        cpu_s_per_gb: med(&|r| r.1.cpu_s_per_gb),
    };
    let ep = Figures {
        mbps: med(&|r| r.2.mbps),
        p50: med(&|r| r.2.p50),
        p99: med(&|r| r.2.p99),
        cpu_s_per_gb: med(&|r| r.2.cpu_s_per_gb),
    };
    let ratio = med(&|r| r.1.mbps / r.0.mbps);
    let commit_ratio = med(&|r| r.2.mbps / r.0.mbps);
    let (pass_counters, ep_counters) = (
        pass_counters.ok_or("no round ran")?,
        ep_counters.ok_or("no round ran")?,
    );
    let drops = |c: &xenft_netback::Counters| {
        let d = &c.dropped;
        d.runt + d.oversize + d.spoofed_source + d.standby + d.discarded + d.send_failed
    };
    let epoch_ms = EPOCH.as_secs_f64() * 1e3;
    let minus_epoch = ep.p99 - direct.p99 - epoch_ms;
    let json = serde_json::json!({
        "bench": "netback",
        "rounds": rounds.len(),
        "passthrough_vs_direct": ratio,
        "output_commit_vs_direct": commit_ratio,
        "passthrough_relay_cpu_s_per_gb": pass.cpu_s_per_gb,
        "epochs_relay_cpu_s_per_gb": ep.cpu_s_per_gb,
        "added_latency_p99_ms_minus_epoch": minus_epoch,
        "epoch_ms": epoch_ms,
        "shim_realtime_priority": RT_PRIORITY,
        "direct_mbps": direct.mbps,
        "passthrough_mbps": pass.mbps,
        "epochs_mbps": ep.mbps,
        "direct_rtt_p50_ms": direct.p50,
        "direct_rtt_p99_ms": direct.p99,
        "passthrough_rtt_p50_ms": pass.p50,
        "passthrough_rtt_p99_ms": pass.p99,
        "epochs_rtt_p50_ms": ep.p50,
        "epochs_rtt_p99_ms": ep.p99,
        "added_latency_passthrough_p50_ms": pass.p50 - direct.p50,
        "added_latency_passthrough_p99_ms": pass.p99 - direct.p99,
        "added_latency_epochs_p50_ms": ep.p50 - direct.p50,
        "added_latency_epochs_p99_ms": ep.p99 - direct.p99,
        "passthrough_drops": drops(&pass_counters),
        "epochs_drops": drops(&ep_counters),
        "epochs_early_checkpoints": ep_counters.early_checkpoint_requests,
        "target_passthrough_ge_0_9": ratio >= 0.9,
        "target_added_latency_le_epoch_plus_1ms": minus_epoch <= 1.0,
    });
    println!("{json}");
    Ok(())
}
