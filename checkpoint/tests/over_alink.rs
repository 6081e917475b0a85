//! Checkpointing over a real A-link (two paths on loopback), then failover.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xenft_checkpoint::engine::commit::RecordingSink;
use xenft_checkpoint::engine::primary::{start_protection, EpochPolicy, Phase, PrimaryConfig};
use xenft_checkpoint::engine::secondary::{start_secondary, SecondaryConfig};
use xenft_checkpoint::local::{LocalDomain, LocalGuestConfig};
use xenft_checkpoint::workload::{Pattern, WorkloadSpec, WorkloadState};

const MIB: u64 = 1 << 20;

fn guest_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xenft-synthetic-guest"))
}

#[test]
fn checkpoints_commit_over_the_alink_and_replica_matches_every_time() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (l1, l2) = rt.block_on(xenft_alink::testing::loopback_pair(2)).unwrap();
    assert!(rt.block_on(l1.wait_connected(Duration::from_secs(5))));
    let start = WorkloadState::new(
        WorkloadSpec {
            pattern: Pattern::Random,
            write_len: 512,
            rate_bytes_per_s: 20 * MIB,
        },
        5,
    )
    .unwrap();
    let primary = LocalDomain::spawn(&LocalGuestConfig {
        binary: guest_binary(),
        memory_bytes: 16 * MIB,
        workload: start,
        tracking: Default::default(),
    })
    .unwrap();
    let replica = LocalDomain::replica(guest_binary(), 16 * MIB).unwrap();
    let a = xenft_checkpoint::alink::endpoint(&l1, rt.handle().clone()).unwrap();
    let b = xenft_checkpoint::alink::endpoint(&l2, rt.handle().clone()).unwrap();
    assert!(xenft_checkpoint::alink::endpoint(&l2, rt.handle().clone()).is_err());
    let secondary = start_secondary(
        replica,
        b,
        SecondaryConfig {
            verify_memory_digest: true,
        },
    )
    .unwrap();
    let sink = Arc::new(RecordingSink::new());
    let p = start_protection(
        primary,
        a,
        sink.clone(),
        PrimaryConfig {
            epoch: EpochPolicy::Fixed(Duration::from_millis(5)),
            verify_memory_digest: true,
            max_checkpoints: Some(60),
            ..PrimaryConfig::default()
        },
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = p.status();
    assert_eq!(st.phase, Phase::Stopped, "{st:?}");
    assert_eq!(sink.committed().len(), 60);
    let s = secondary.status();
    assert!(s.digest_checks >= 60 && s.digest_mismatches == 0, "{s:?}");

    // The primary host goes away; membership (the agent) declares it dead and fails over.
    let _domain = p.stop().unwrap();
    l1.shutdown();
    let (_running, epoch) = secondary.failover().unwrap();
    assert_eq!(Some(&epoch), sink.committed().last());
}
