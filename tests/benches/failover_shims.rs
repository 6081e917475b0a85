//! `scripts/bench failover`: 20 take-overs with the real components (root): two hosts
//! in network namespaces, each running `xenft-agent` (drivers "real"), `xenft-blkback` and
//! `xenft-netback`. Each trial SIGKILLs the current primary host's agent, shims and VM
//! process, and times until the other host (a) reports the VM running — its blkback promoted
//! (serving the disk over NBD) and the VM process started — and (b) a gratuitous ARP for the
//! VM's address is seen by a client. The killed host then comes back as secondary and is
//! resynced before the next trial (re-protection without operator action, timed too).
//!
//! `-- --level 3`: the VM is a synthetic guest protected by the checkpoint engine (which also
//! drives blkback's and netback's epochs); the take-over freezes the memory replica, commits
//! the disk epochs up to its checkpoint, resumes the guest and announces it. The killed host
//! then returns as secondary (a fresh `xenft-checkpoint secondary` too): the agent resyncs the
//! disk and the resumed guest's engine protects it toward that host again (re-protection timed
//! until the agent reports it protected and the returning replica holds a checkpoint).
//!
//! Baseline measured side by side: the agent's configured detection timeout (`peer_dead_ms`),
//! the floor below which no take-over can legally happen. Last line: one JSON object.

#[path = "../tests/agent_shims/mod.rs"]
mod agent_shims;

use std::time::{Duration, Instant};

use agent_shims::{wait_until, ArpWatch, Pool};

fn pct(sorted: &[f64], p: usize) -> f64 {
    let idx = (sorted.len() * p).div_ceil(100).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// Kill → (VM running on the secondary, GARP seen), in ms, for the pool's current primary.
fn take_over(pool: &mut Pool, arp: &ArpWatch, primary: usize, trial: usize) -> f64 {
    let secondary = 1 - primary;
    let t0 = Instant::now();
    pool.kill_host(primary);
    let running = wait_until(Duration::from_secs(10), || {
        pool.vm1(secondary)
            .is_some_and(|(local, _, _)| local == "running")
    });
    assert!(running, "trial {trial}: no take-over");
    let t_run = t0.elapsed();
    assert!(
        wait_until(Duration::from_secs(5), || arp.seen_since(t0) > 0),
        "trial {trial}: no GARP"
    );
    let t_garp = arp
        .seen
        .lock()
        .unwrap()
        .iter()
        .find(|t| **t >= t0)
        .map_or(t_run, |t| t.duration_since(t0));
    let took = t_run.max(t_garp).as_secs_f64() * 1000.0;
    eprintln!(
        "trial {trial}: serving after {took:.0} ms (VM running {:.0} ms, GARP {:.0} ms)",
        t_run.as_secs_f64() * 1000.0,
        t_garp.as_secs_f64() * 1000.0
    );
    took
}

/// Waits until host `i`'s memory replica holds more than `n` checkpoints.
fn replica_holds(pool: &Pool, i: usize, n: u64) -> bool {
    wait_until(Duration::from_secs(20), || pool.committed(i) > n)
}

/// Level 3: one pool; after each take-over the dead host returns as the secondary (engine,
/// shims, agent) and the resumed guest is protected toward it again (see the module doc).
/// Returns (serve times, re-protect times).
fn level3(trials: usize) -> (Vec<f64>, Vec<f64>) {
    let mut pool = Pool::new();
    pool.level = 3;
    pool.start_primary_on_h1();
    let arp = ArpWatch::start(&pool.client, "eth0");
    let mut primary = 0;
    let (mut serve, mut reprotect) = (Vec::new(), Vec::new());
    for trial in 0..trials {
        let secondary = 1 - primary;
        assert!(
            pool.wait_protected_on(primary),
            "trial {trial}: vm1 not protected on h{}",
            primary + 1
        );
        assert!(
            replica_holds(&pool, secondary, 3),
            "trial {trial}: no checkpoint"
        );
        // The last take-over's repeated announcements must be over (see level 2).
        std::thread::sleep(Duration::from_millis(1000));
        serve.push(take_over(&mut pool, &arp, primary, trial));
        // The dead host returns as the secondary: its engine listens for the resumed guest.
        let back = Instant::now();
        pool.start_secondary_components(primary);
        pool.start_agent(primary);
        assert!(
            pool.wait_protected_on(secondary) && replica_holds(&pool, primary, 0),
            "trial {trial}: not re-protected"
        );
        let re = back.elapsed().as_secs_f64() * 1000.0;
        reprotect.push(re);
        eprintln!("trial {trial}: re-protected (memory too) {re:.0} ms after the host returned");
        primary = secondary;
    }
    (serve, reprotect)
}

fn main() {
    if !xenft_tests::netns::is_root() {
        println!("{{\"error\":\"needs root for network namespaces\"}}");
        return;
    }
    let trials = 20;
    let args: Vec<String> = std::env::args().collect();
    let level3_run = args.windows(2).any(|w| w[0] == "--level" && w[1] == "3");
    if level3_run {
        let (serve, reprotect) = level3(trials);
        report(
            3,
            trials,
            serve,
            reprotect,
            "real: xenft-agent, xenft-blkback (epochs, promote), xenft-netback (epochs, GARP), xenft-checkpoint (synthetic guest, 16 MiB)",
        );
        return;
    }
    let mut pool = Pool::new();
    pool.start_primary_on_h1();
    let arp = ArpWatch::start(&pool.client, "eth0");
    let mut primary = 0;
    let (mut serve, mut reprotect) = (Vec::new(), Vec::new());
    for trial in 0..trials {
        assert!(
            pool.wait_protected_on(primary),
            "trial {trial}: vm1 not protected on h{}",
            primary + 1
        );
        let secondary = 1 - primary;
        // The last take-over's repeated announcements (3 × 200 ms) must be over, so that the
        // GARP timed below is the new host's.
        std::thread::sleep(Duration::from_millis(1000));
        let took = take_over(&mut pool, &arp, primary, trial);
        serve.push(took);
        // The dead host returns as the secondary.
        let back = Instant::now();
        pool.start_secondary_components(primary);
        pool.start_agent(primary);
        assert!(
            pool.wait_protected_on(secondary),
            "trial {trial}: not re-protected"
        );
        let re = back.elapsed().as_secs_f64() * 1000.0;
        reprotect.push(re);
        eprintln!("trial {trial}: re-protected {re:.0} ms after the host returned");
        primary = secondary;
    }
    report(
        2,
        trials,
        serve,
        reprotect,
        "real: xenft-agent, xenft-blkback (promote, NBD), xenft-netback (GARP), VM = a process",
    );
}

/// Prints the run's JSON line: take-over and re-protection percentiles against the
/// detection floor (the agent's default peer-dead time).
fn report(
    level: u8,
    trials: usize,
    mut serve: Vec<f64>,
    mut reprotect: Vec<f64>,
    components: &str,
) {
    serve.sort_by(f64::total_cmp);
    reprotect.sort_by(f64::total_cmp);
    let floor = xenft_agent::timing::Timing::default().peer_dead_ms as f64;
    let p99 = pct(&serve, 99);
    println!(
        "{}",
        serde_json::json!({
            "bench": "failover",
            "level": level,
            "trials": trials,
            "failover_p50_ms": pct(&serve, 50).round(),
            "failover_p99_ms": p99.round(),
            "failover_max_ms": serve.last().copied().unwrap_or(0.0).round(),
            "reprotect_p50_ms": pct(&reprotect, 50).round(),
            "reprotect_max_ms": reprotect.last().copied().unwrap_or(0.0).round(),
            "baseline_detection_floor_ms": floor,
            "p99_over_floor_ratio": (p99 / floor * 100.0).round() / 100.0,
            "target_p99_ms": 1000,
            "components": components
        })
    );
}
