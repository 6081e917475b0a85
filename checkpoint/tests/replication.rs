//! End-to-end checkpointing between a real synthetic guest (primary) and a replica, over the
//! in-memory channel, with and without a damaging link.

// Test arithmetic on small fixed sizes; the cast lints guard production offsets.
#![allow(clippy::cast_possible_truncation)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use xenft_checkpoint::domain::Domain;
use xenft_checkpoint::engine::commit::{RecordingSink, SinkEvent};
use xenft_checkpoint::engine::primary::{start_protection, EpochPolicy, Phase, PrimaryConfig};
use xenft_checkpoint::engine::secondary::{start_secondary, SecondaryConfig};
use xenft_checkpoint::engine::transport::{memory_pair, Fault, FaultInjector};
use xenft_checkpoint::local::{LocalDomain, LocalGuestConfig};
use xenft_checkpoint::workload::{replay, Pattern, WorkloadSpec, WorkloadState, PAGE_SIZE};

const MIB: u64 = 1 << 20;

fn guest_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xenft-synthetic-guest"))
}

fn workload(pattern: Pattern, seed: u64, rate_mib: u64) -> WorkloadState {
    WorkloadState::new(
        WorkloadSpec {
            pattern,
            write_len: 512,
            rate_bytes_per_s: rate_mib * MIB,
        },
        seed,
    )
    .unwrap()
}

fn all_memory(d: &mut impl Domain) -> Vec<u8> {
    let pfns: Vec<u64> = (0..d.memory_pages()).collect();
    let mut buf = vec![0u8; pfns.len() * PAGE_SIZE];
    d.read_pages(&pfns, &mut buf).unwrap();
    buf
}

fn config(checkpoints: u64) -> PrimaryConfig {
    PrimaryConfig {
        epoch: EpochPolicy::Fixed(Duration::from_millis(4)),
        verify_memory_digest: true,
        max_checkpoints: Some(checkpoints),
        precopy_chunk_pages: 1024,
        ..PrimaryConfig::default()
    }
}

/// Runs `checkpoints` checkpoints of `start` on a `mib` MiB guest; returns the replica
/// (stopped) and what the sink saw.
fn protect(
    start: WorkloadState,
    mib: u64,
    cfg: PrimaryConfig,
    damage: Option<xenft_checkpoint::engine::transport::FaultPlan>,
) -> (
    xenft_checkpoint::engine::secondary::StoppedSecondary<LocalDomain>,
    xenft_checkpoint::engine::secondary::SecondaryStatus,
    xenft_checkpoint::engine::primary::ProtectionStatus,
    Arc<RecordingSink>,
) {
    let checkpoints = cfg.max_checkpoints.unwrap();
    let primary = LocalDomain::spawn(&LocalGuestConfig {
        binary: guest_binary(),
        memory_bytes: mib * MIB,
        workload: start,
        tracking: Default::default(),
    })
    .unwrap();
    let replica = LocalDomain::replica(guest_binary(), mib * MIB).unwrap();
    let (mut a, b) = memory_pair();
    if let Some(plan) = damage {
        a.0 = Box::new(FaultInjector::new(a.0, plan));
    }
    let secondary = start_secondary(
        replica,
        b,
        SecondaryConfig {
            verify_memory_digest: true,
        },
    )
    .unwrap();
    let sink = Arc::new(RecordingSink::new());
    let protection = start_protection(primary, a, sink.clone(), cfg).unwrap();
    let last = protection.status();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while !protection.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let pstatus = protection.status();
    let _ = last;
    assert!(
        pstatus.committed_epoch > 0,
        "nothing committed: {pstatus:?}"
    );
    assert_eq!(pstatus.checkpoints, checkpoints, "{pstatus:?}");
    drop(protection.stop());
    let sstatus = secondary.status();
    let stopped = secondary.stop().unwrap();
    (stopped, sstatus, pstatus, sink)
}

#[test]
fn replica_memory_equals_primary_memory_at_every_committed_checkpoint() {
    let seed = rand::random::<u64>();
    let start = workload(Pattern::Random, seed, 20);
    let (mut stopped, s, p, sink) = protect(start, 16, config(210), None);
    assert_eq!(p.phase, Phase::Stopped, "seed {seed}");
    assert!(s.digest_checks >= 200, "seed {seed}: {s:?}");
    assert_eq!(s.digest_mismatches, 0, "seed {seed}: {s:?}");
    assert_eq!(s.rejected_epochs, 0, "seed {seed}: {s:?}");
    // Every checkpoint was announced, then committed once, in order.
    let committed = sink.committed();
    let announced: Vec<u64> = sink
        .events()
        .into_iter()
        .filter_map(|e| match e {
            SinkEvent::Checkpoint(n) => Some(n),
            SinkEvent::Commit(_) => None,
        })
        .collect();
    assert_eq!(committed, announced, "seed {seed}");
    assert_eq!(committed.len(), 210);
    assert_eq!(Some(*committed.last().unwrap()), s.committed_epoch);
    // The replica is exactly the workload replayed to the committed progress counter.
    let (_, ctx) = stopped.committed().unwrap();
    let at = WorkloadState::decode(&ctx.0).unwrap();
    let mut expect = vec![0u8; 16 * MIB as usize];
    let mut r = start;
    replay(&mut expect, &mut r, at.counter);
    assert!(all_memory(stopped.domain_mut()) == expect, "seed {seed}");
    assert!(p.wire_bytes < p.raw_bytes, "{p:?}");
    // The agent serves these snapshots as JSON.
    let j = serde_json::to_value(&p).unwrap();
    assert_eq!(j["phase"]["phase"], "stopped");
    assert_eq!(j["committed_epoch"], p.committed_epoch);
    assert_eq!(serde_json::to_value(&s).unwrap()["digest_mismatches"], 0);
}

#[test]
fn hot_set_and_sequential_workloads_replicate_exactly() {
    for (i, pattern) in [
        Pattern::HotSet {
            hot_pages: 300,
            hot_percent: 90,
        },
        Pattern::Sequential,
    ]
    .into_iter()
    .enumerate()
    {
        let start = workload(pattern, 1000 + i as u64, 30);
        let (_, s, _, _) = protect(start, 8, config(60), None);
        assert!(s.digest_checks >= 60, "{pattern:?}: {s:?}");
        assert_eq!(s.digest_mismatches, 0, "{pattern:?}: {s:?}");
    }
}

#[test]
fn corrupt_truncated_and_lost_frames_are_refused_then_resent() {
    let start = workload(Pattern::Random, 77, 20);
    let plan = Box::new(|i: u64, f: &bytes::Bytes| match i {
        i if i < 20 => Fault::Pass,
        i if i % 29 == 0 => Fault::Corrupt(i as usize * 7),
        i if i % 31 == 0 => Fault::Truncate(f.len() / 2),
        i if i % 37 == 0 => Fault::Drop,
        _ => Fault::Pass,
    });
    let cfg = PrimaryConfig {
        resend_after: Duration::from_millis(200),
        ..config(80)
    };
    let (mut stopped, s, p, sink) = protect(start, 8, cfg, Some(plan));
    assert!(s.rejected_epochs > 0, "{s:?}");
    assert!(p.resent_epochs > 0, "{p:?}");
    eprintln!("damaged link: {s:?}\n{p:?}");
    assert_eq!(s.digest_mismatches, 0, "{s:?}");
    let committed = sink.committed();
    assert_eq!(
        committed.len(),
        80,
        "every checkpoint eventually committed once"
    );
    assert!(committed.windows(2).all(|w| w[0] < w[1]));
    let (_, ctx) = stopped.committed().unwrap();
    let at = WorkloadState::decode(&ctx.0).unwrap();
    let mut expect = vec![0u8; 8 * MIB as usize];
    let mut r = start;
    replay(&mut expect, &mut r, at.counter);
    assert!(all_memory(stopped.domain_mut()) == expect);
}

#[test]
fn losing_the_secondary_fails_protection_and_leaves_the_guest_running() {
    let start = workload(Pattern::Random, 3, 20);
    let primary = LocalDomain::spawn(&LocalGuestConfig {
        binary: guest_binary(),
        memory_bytes: 8 * MIB,
        workload: start,
        tracking: Default::default(),
    })
    .unwrap();
    let (a, b) = memory_pair();
    let replica = LocalDomain::replica(guest_binary(), 8 * MIB).unwrap();
    let secondary = start_secondary(replica, b, SecondaryConfig::default()).unwrap();
    let p = start_protection(
        primary,
        a,
        Arc::new(RecordingSink::new()),
        PrimaryConfig {
            epoch: EpochPolicy::Fixed(Duration::from_millis(5)),
            ..PrimaryConfig::default()
        },
    )
    .unwrap();
    assert!(p.wait_committed(10, Duration::from_secs(20)));
    // The secondary host dies: its end of the channel goes away.
    drop(secondary);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !matches!(p.status().phase, Phase::Failed(_)) {
        assert!(std::time::Instant::now() < deadline, "{:?}", p.status());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(p.is_finished());
    let mut guest = p.stop().unwrap();
    guest.pause().unwrap();
    let c1 = WorkloadState::decode(&guest.vcpu_context().unwrap().0).unwrap();
    guest.resume().unwrap();
    // It runs again (polling: a loaded machine may not schedule it at once).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(20));
        guest.pause().unwrap();
        let c2 = WorkloadState::decode(&guest.vcpu_context().unwrap().0).unwrap();
        if c2.counter > c1.counter {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "guest left stopped after protection failed"
        );
        guest.resume().unwrap();
    }
}

#[test]
fn an_early_checkpoint_request_ends_a_long_epoch_at_once() {
    let primary = LocalDomain::spawn(&LocalGuestConfig {
        binary: guest_binary(),
        memory_bytes: 4 * MIB,
        workload: workload(Pattern::Random, 8, 5),
        tracking: Default::default(),
    })
    .unwrap();
    let (a, b) = memory_pair();
    let replica = LocalDomain::replica(guest_binary(), 4 * MIB).unwrap();
    let secondary = start_secondary(replica, b, SecondaryConfig::default()).unwrap();
    let p = start_protection(
        primary,
        a,
        Arc::new(RecordingSink::new()),
        PrimaryConfig {
            epoch: EpochPolicy::Fixed(Duration::from_secs(3600)),
            ..PrimaryConfig::default()
        },
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while p.status().phase != Phase::Protected {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(p.status().checkpoints, 0, "hour-long epoch");
    for n in 1..=3u64 {
        p.checkpoint_now();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while p.status().checkpoints < n {
            assert!(
                std::time::Instant::now() < deadline,
                "early checkpoint {n} not taken"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let last = p.status().epoch;
    assert!(p.wait_committed(last, Duration::from_secs(10)));
    // Stop wakes the hour-long sleep too.
    let t = std::time::Instant::now();
    drop(p.stop().unwrap());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(secondary.status().committed_epoch, Some(last));
}
