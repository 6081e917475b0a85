//! Deterministic simulated pools under random faults: split brain, false failover and missed
//! failover must all be zero. The seed is printed; set XENFT_SIM_SEED to replay one.

use xenft_agent::ids::{HostId, VmId};
use xenft_agent::lifecycle::Phase;
use xenft_agent::sim::{Fault, Sim, SimConfig};

fn seed() -> u64 {
    match std::env::var("XENFT_SIM_SEED") {
        Ok(s) => s.parse().expect("XENFT_SIM_SEED must be a number"),
        Err(_) => rand::random::<u64>() % 1_000_000,
    }
}

fn run(cfg: SimConfig) {
    println!(
        "seed {} (replay with XENFT_SIM_SEED={})",
        cfg.seed, cfg.seed
    );
    let report = Sim::new(cfg).run_random();
    println!("{}", report.summary());
    assert!(report.faults >= 200);
    assert!(report.ok(), "{}", report.summary());
}

#[test]
fn two_host_pool_without_quorum_server_survives_200_random_faults() {
    run(SimConfig::pool(2, 0, true, seed()));
}

#[test]
fn three_host_pool_with_one_quorum_server_survives_200_random_faults() {
    run(SimConfig::pool(3, 1, false, seed()));
}

#[test]
fn two_host_pool_with_two_quorum_servers_survives_200_random_faults() {
    run(SimConfig::pool(2, 2, false, seed()));
}

fn h(n: &str) -> HostId {
    HostId::new(n).unwrap()
}
fn vm(n: &str) -> VmId {
    VmId::new(n).unwrap()
}

#[test]
fn killed_primary_is_taken_over_within_one_second() {
    let mut sim = Sim::new(SimConfig::pool(3, 1, false, 1));
    sim.run_for(3000);
    assert_eq!(sim.phase(&h("h2"), &vm("vm1")), Some(Phase::Protected));
    sim.fault(&Fault::Kill(0));
    sim.run_for(1000);
    assert_eq!(sim.running_on(&vm("vm1")), vec![h("h2")]);
    let r = sim.report();
    assert!(r.ok(), "{}", r.summary());
}

#[test]
fn cutting_every_alink_degrades_but_never_fails_over() {
    let mut sim = Sim::new(SimConfig::pool(2, 0, true, 2));
    sim.run_for(3000);
    sim.fault(&Fault::CutAllAlinks(0, 1));
    sim.run_for(3000);
    assert_eq!(sim.running_on(&vm("vm1")), vec![h("h1")]);
    assert_eq!(sim.phase(&h("h1"), &vm("vm1")), Some(Phase::Degraded));
    sim.fault(&Fault::Heal);
    sim.run_for(2000);
    assert_eq!(sim.phase(&h("h1"), &vm("vm1")), Some(Phase::Protected));
    assert_eq!(sim.report().takeovers, 0);
}

#[test]
fn isolated_primary_fences_itself_and_the_peer_takes_over() {
    let mut sim = Sim::new(SimConfig::pool(3, 1, false, 3));
    sim.run_for(3000);
    sim.fault(&Fault::Isolate(0));
    sim.run_for(2000);
    assert_eq!(sim.running_on(&vm("vm1")), vec![h("h2")]);
    sim.fault(&Fault::Heal);
    sim.run_for(3000);
    // The old primary came back as the secondary and resynced.
    assert_eq!(sim.running_on(&vm("vm1")), vec![h("h2")]);
    assert_eq!(sim.phase(&h("h1"), &vm("vm1")), Some(Phase::Protected));
    let r = sim.report();
    assert!(r.fences >= 1);
    assert!(r.ok(), "{}", r.summary());
}

#[test]
fn returning_primary_becomes_secondary_and_resyncs() {
    let mut sim = Sim::new(SimConfig::pool(2, 0, true, 4));
    sim.run_for(3000);
    sim.fault(&Fault::Kill(0));
    sim.run_for(2000);
    assert_eq!(sim.running_on(&vm("vm1")), vec![h("h2")]);
    sim.fault(&Fault::Heal);
    sim.run_for(3000);
    assert_eq!(sim.running_on(&vm("vm1")), vec![h("h2")]);
    assert_eq!(sim.phase(&h("h1"), &vm("vm1")), Some(Phase::Protected));
    assert_eq!(sim.phase(&h("h2"), &vm("vm1")), Some(Phase::Protected));
}

#[test]
fn without_storage_heartbeat_or_quorum_an_isolated_primary_causes_split_brain() {
    // The documented trade-off of the two-host rule: with neither a quorum server nor a
    // storage heartbeat, an isolated primary looks dead. The checker must see the split brain.
    let mut sim = Sim::new(SimConfig::pool(2, 0, false, 6));
    sim.run_for(3000);
    sim.fault(&Fault::Isolate(0));
    sim.run_for(2000);
    let r = sim.report();
    assert!(!r.split_brain.is_empty(), "{}", r.summary());
    assert_eq!(sim.running_on(&vm("vm1")).len(), 2);
}

#[test]
fn take_over_latency_after_host_death_stays_under_one_second() {
    let mut sim = Sim::new(SimConfig::pool(3, 1, false, seed()));
    sim.run_for(3000);
    for round in 0..20u64 {
        let victim = usize::try_from(round % 3).unwrap();
        sim.fault(&Fault::Kill(victim));
        sim.run_for(2500);
        sim.fault(&Fault::Heal);
        sim.run_for(3000);
    }
    let r = sim.report();
    println!("{}", r.summary());
    assert!(r.ok(), "{}", r.summary());
    assert!(r.failover_latencies_ms.len() >= 20, "{}", r.summary());
    assert!(r.failover_percentile(99).unwrap() < 1000, "{}", r.summary());
}
