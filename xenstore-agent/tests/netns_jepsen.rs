//! Jepsen-style run with real processes in network namespaces (needs root): a 2-host pool
//! (two `xenft-agent`s, one `xenft-quorum`) under ≥ 200 random faults with random timing —
//! cut one A-link path, cut both, cut a host's management network (and its quorum link),
//! isolate a host, SIGKILL a host's agent, heal (links up, killed agents restarted). Seeded;
//! the seed is printed (replay with XENFT_NETNS_SEED).
//!
//! A checker thread polls both agents' status APIs all along:
//! - split brain: both report a running copy of the VM at one poll;
//! - false failover: a take-over while the old primary's agent was alive and reachable through
//!   some path (an A-link or the management network) for the whole detection window;
//! - missed failover: after the agent running the VM is killed, a protected and connected peer
//!   must run it within 2.5 s.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Pool, VmState, ALINKS, MGMT};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xenft_tests::netns::require_root;

#[derive(Debug)]
struct Net {
    alive: [bool; 2],
    down: [Vec<&'static str>; 2],
    last_unreachable: Instant,
}

impl Net {
    fn up(&self, dev: &str) -> bool {
        !self.down[0].contains(&dev) && !self.down[1].contains(&dev)
    }
    fn reachable(&self) -> bool {
        self.alive[0] && self.alive[1] && (self.up("al0") || self.up("al1") || self.up("mgmt"))
    }
    fn mark(&mut self) {
        if !self.reachable() {
            self.last_unreachable = Instant::now();
        }
    }
}

#[derive(Default, Debug)]
struct Findings {
    split_brain: Vec<String>,
    false_failover: Vec<String>,
    takeovers: usize,
    polls: u64,
}

#[test]
fn two_host_pool_of_real_processes_survives_200_random_faults() {
    if !require_root("two_host_pool_of_real_processes_survives_200_random_faults") {
        return;
    }
    let seed: u64 = std::env::var("XENFT_NETNS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::random::<u64>() % 1_000_000);
    println!("seed {seed} (replay with XENFT_NETNS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pool = Pool::new();
    let start = Instant::now();
    while !(pool.status(0).is_some_and(|s| s.phase == "protected")
        && pool.status(1).is_some_and(|s| s.phase == "protected"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no initial protection"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let net = Arc::new(Mutex::new(Net {
        alive: [true, true],
        down: [Vec::new(), Vec::new()],
        last_unreachable: Instant::now() - Duration::from_secs(10),
    }));
    let findings = Arc::new(Mutex::new(Findings::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let latest: Arc<Mutex<[Option<VmState>; 2]>> = Arc::new(Mutex::new([None, None]));

    // The checker: its own handles on the namespaces' status endpoints.
    let checker = {
        let (net, findings, stop, latest) =
            (net.clone(), findings.clone(), stop.clone(), latest.clone());
        let names = [pool.h[0].name().to_string(), pool.h[1].name().to_string()];
        std::thread::spawn(move || {
            let mut last_runner: Option<usize> = None;
            let mut was_running = [false, false];
            while !stop.load(Ordering::Relaxed) {
                let s = [
                    common::status_by_name(&names[0]),
                    common::status_by_name(&names[1]),
                ];
                let running = [
                    s[0].as_ref().is_some_and(VmState::running),
                    s[1].as_ref().is_some_and(VmState::running),
                ];
                let mut f = findings.lock().unwrap();
                f.polls += 1;
                if running[0] && running[1] {
                    f.split_brain.push(format!("{:?}", s));
                }
                for i in 0..2 {
                    if running[i] && !was_running[i] {
                        if last_runner == Some(1 - i) {
                            f.takeovers += 1;
                            let n = net.lock().unwrap();
                            // Detection window (500 ms) plus poll and status latency.
                            let window = Duration::from_millis(700);
                            if n.alive[1 - i]
                                && n.reachable()
                                && n.last_unreachable.elapsed() > window
                            {
                                f.false_failover.push(format!(
                                    "h{} took over while h{} was alive and reachable for {:?}: {:?}",
                                    i + 1,
                                    2 - i,
                                    n.last_unreachable.elapsed(),
                                    n
                                ));
                            }
                        }
                        last_runner = Some(i);
                    }
                }
                was_running = running;
                drop(f);
                *latest.lock().unwrap() = s;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let mut faults = 0;
    let mut latencies = Vec::new();
    let mut missed = Vec::new();
    while faults < 200 {
        std::thread::sleep(Duration::from_millis(rng.gen_range(30..=150)));
        let h = rng.gen_range(0..2usize);
        let roll = rng.gen_range(0..100);
        let mut n = net.lock().unwrap();
        match roll {
            0..=19 => {
                let dev = ALINKS[rng.gen_range(0..2)];
                pool.link(h, dev, false);
                n.down[h].push(dev);
            }
            20..=34 => {
                for dev in ALINKS {
                    pool.link(h, dev, false);
                    n.down[h].push(dev);
                }
            }
            35..=49 => {
                for dev in MGMT {
                    pool.link(h, dev, false);
                    n.down[h].push(dev);
                }
            }
            50..=59 => {
                for dev in ALINKS.iter().chain(&MGMT) {
                    pool.link(h, dev, false);
                    n.down[h].push(dev);
                }
            }
            60..=71 => {
                if !pool.alive(h) {
                    continue;
                }
                let s = latest.lock().unwrap().clone();
                let victim_runs = s[h].as_ref().is_some_and(VmState::running);
                let peer = 1 - h;
                // Both sides must agree the VM is protected (no resync in flight) and the
                // replica must be consistent.
                let peer_ready = pool.alive(peer)
                    && s[h].as_ref().is_some_and(|x| x.phase == "protected")
                    && s[peer]
                        .as_ref()
                        .is_some_and(|x| x.phase == "protected" && x.consistent && !x.running())
                    && !n.down[peer].contains(&"mgmt")
                    && !n.down[peer].contains(&"q");
                pool.kill_agent(h);
                n.alive[h] = false;
                n.mark();
                drop(n);
                faults += 1;
                if victim_runs && peer_ready {
                    // No further faults until the peer has taken over (or the deadline passed).
                    let t0 = Instant::now();
                    loop {
                        if latest.lock().unwrap()[peer]
                            .as_ref()
                            .is_some_and(VmState::running)
                        {
                            latencies.push(t0.elapsed().as_millis());
                            break;
                        }
                        if t0.elapsed() > Duration::from_millis(2500) {
                            missed.push(format!(
                                "h{} killed, h{} never took over\n{}",
                                h + 1,
                                peer + 1,
                                pool.log_tail(peer)
                            ));
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                continue;
            }
            _ => {
                for i in 0..2 {
                    for dev in ALINKS.iter().chain(&MGMT) {
                        pool.link(i, dev, true);
                    }
                    n.down[i].clear();
                    if !pool.alive(i) {
                        pool.start_agent(i);
                        n.alive[i] = true;
                    }
                }
            }
        }
        n.mark();
        faults += 1;
    }
    // Heal everything and let the pool settle: exactly one copy, protected again.
    {
        let mut n = net.lock().unwrap();
        for i in 0..2 {
            for dev in ALINKS.iter().chain(&MGMT) {
                pool.link(i, dev, true);
            }
            n.down[i].clear();
            pool.start_agent(i);
            n.alive[i] = true;
        }
    }
    let settle = Instant::now();
    let settled = loop {
        let s = latest.lock().unwrap().clone();
        let ok = s
            .iter()
            .all(|x| x.as_ref().is_some_and(|x| x.phase == "protected"))
            && s.iter()
                .filter(|x| x.as_ref().is_some_and(VmState::running))
                .count()
                == 1;
        if ok {
            break true;
        }
        if settle.elapsed() > Duration::from_secs(15) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stop.store(true, Ordering::Relaxed);
    checker.join().unwrap();
    let f = findings.lock().unwrap();
    latencies.sort_unstable();
    println!(
        "seed={seed} faults={faults} polls={} takeovers={} split_brain={} false_failover={} missed_failover={} kill->takeover ms {:?}",
        f.polls,
        f.takeovers,
        f.split_brain.len(),
        f.false_failover.len(),
        missed.len(),
        latencies
    );
    assert!(f.split_brain.is_empty(), "split brain: {:?}", f.split_brain);
    assert!(
        f.false_failover.is_empty(),
        "false failover: {:?}",
        f.false_failover
    );
    assert!(missed.is_empty(), "missed failover: {missed:?}");
    let last = latest.lock().unwrap().clone();
    assert!(
        settled,
        "not protected again after the final heal: {last:?}\nh1:\n{}\nh2:\n{}",
        pool.log_tail(0),
        pool.log_tail(1)
    );
}
