//! The synthetic guest as a real process: pause/resume, userfaultfd dirty tracking, vCPU
//! context, and resuming a copy from a checkpoint.

// Test arithmetic on small fixed sizes; the cast lints guard production offsets.
#![allow(clippy::cast_possible_truncation)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use xenft_checkpoint::domain::Domain;
use xenft_checkpoint::local::guest::Tracking;
use xenft_checkpoint::local::{LocalDomain, LocalGuestConfig};
use xenft_checkpoint::workload::{replay, Pattern, WorkloadSpec, WorkloadState, PAGE_SIZE};

const MIB: u64 = 1 << 20;

fn guest_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xenft-synthetic-guest"))
}

fn workload(pattern: Pattern, seed: u64) -> WorkloadState {
    WorkloadState::new(
        WorkloadSpec {
            pattern,
            write_len: 256,
            rate_bytes_per_s: 40 * MIB,
        },
        seed,
    )
    .unwrap()
}

fn all_memory(d: &mut LocalDomain) -> Vec<u8> {
    let pfns: Vec<u64> = (0..d.memory_pages()).collect();
    let mut buf = vec![0u8; pfns.len() * PAGE_SIZE];
    d.read_pages(&pfns, &mut buf).unwrap();
    buf
}

/// Resumes `d` (running or paused) and returns its paused state once its workload has got
/// past `from`; a loaded machine may not schedule the guest at once, so poll up to 10 s.
fn run_past(d: &mut LocalDomain, from: u64) -> WorkloadState {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(20));
        d.pause().unwrap();
        let st = WorkloadState::decode(&d.vcpu_context().unwrap().0).unwrap();
        if st.counter > from {
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "guest made no progress in 10 s"
        );
        d.resume().unwrap();
    }
}

fn counter(d: &mut LocalDomain) -> WorkloadState {
    WorkloadState::decode(&d.vcpu_context().unwrap().0).unwrap()
}

#[test]
fn paused_guest_memory_matches_replay_of_its_progress_counter() {
    let start = workload(Pattern::Random, 11);
    let mut d = LocalDomain::spawn(&LocalGuestConfig {
        binary: guest_binary(),
        memory_bytes: 16 * MIB,
        workload: start,
        tracking: Default::default(),
    })
    .unwrap();
    let st = run_past(&mut d, 0);
    let mut expect = vec![0u8; 16 * MIB as usize];
    let mut s = start;
    replay(&mut expect, &mut s, st.counter);
    assert_eq!(s, st);
    assert!(all_memory(&mut d) == expect, "memory differs from replay");
    // Paused means paused: nothing changes while paused.
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(counter(&mut d), st);
}

#[test]
fn dirty_log_holds_every_changed_page_and_only_written_ones_async_tracking() {
    dirty_log_is_exact(Tracking::Async);
}

#[test]
fn dirty_log_holds_every_changed_page_and_only_written_ones_fault_tracking() {
    dirty_log_is_exact(Tracking::Sync);
}

#[test]
fn auto_tracking_picks_the_asynchronous_mode_on_this_kernel() {
    let d = LocalDomain::spawn(&LocalGuestConfig {
        binary: guest_binary(),
        memory_bytes: MIB,
        workload: workload(Pattern::Random, 1),
        tracking: Tracking::Auto,
    })
    .unwrap();
    assert_eq!(d.tracking(), Some(Tracking::Async));
}

fn dirty_log_is_exact(tracking: Tracking) {
    let start = workload(
        Pattern::HotSet {
            hot_pages: 64,
            hot_percent: 80,
        },
        5,
    );
    let mut d = LocalDomain::spawn(&LocalGuestConfig {
        binary: guest_binary(),
        memory_bytes: 16 * MIB,
        workload: start,
        tracking,
    })
    .unwrap();
    assert_eq!(d.tracking(), Some(tracking));
    for round in 0..5 {
        d.pause().unwrap();
        let _ = d.read_and_clear_dirty().unwrap();
        let s1 = counter(&mut d);
        let m1 = all_memory(&mut d);
        d.resume().unwrap();
        std::thread::sleep(Duration::from_millis(10 * round));
        let s2 = run_past(&mut d, s1.counter);
        let dirty: BTreeSet<u64> = d.read_and_clear_dirty().unwrap().into_iter().collect();
        assert_eq!(counter(&mut d), s2);
        let m2 = all_memory(&mut d);
        d.resume().unwrap();
        let changed: BTreeSet<u64> = (0..m1.len() / PAGE_SIZE)
            .filter(|&p| {
                m1[p * PAGE_SIZE..(p + 1) * PAGE_SIZE] != m2[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
            })
            .map(|p| p as u64)
            .collect();
        let mut written = BTreeSet::new();
        let mut s = s1;
        let mut data = Vec::new();
        while s.counter < s2.counter {
            written.insert(s.next_op(d.memory_pages(), &mut data) / PAGE_SIZE as u64);
        }
        assert!(!changed.is_empty());
        assert!(
            changed.is_subset(&dirty),
            "a changed page is missing from the dirty log"
        );
        assert_eq!(
            dirty, written,
            "dirty log must be exactly the written pages"
        );
    }
}

#[test]
fn replica_started_from_checkpoint_continues_the_exact_sequence() {
    let start = workload(Pattern::Sequential, 99);
    let mut primary = LocalDomain::spawn(&LocalGuestConfig {
        binary: guest_binary(),
        memory_bytes: 4 * MIB,
        workload: start,
        tracking: Default::default(),
    })
    .unwrap();
    run_past(&mut primary, 0);
    let ctx = primary.vcpu_context().unwrap();
    let mem = all_memory(&mut primary);
    drop(primary);

    let mut replica = LocalDomain::replica(guest_binary(), 4 * MIB).unwrap();
    let pfns: Vec<u64> = (0..replica.memory_pages()).collect();
    replica.write_pages(&pfns, &mem).unwrap();
    replica.set_vcpu_context(&ctx).unwrap();
    replica.start_from_replica().unwrap();
    let at_checkpoint = WorkloadState::decode(&ctx.0).unwrap();
    let st = run_past(&mut replica, at_checkpoint.counter);
    let mut expect = vec![0u8; 4 * MIB as usize];
    let mut s = start;
    replay(&mut expect, &mut s, st.counter);
    assert!(all_memory(&mut replica) == expect);
}

#[test]
fn starting_a_replica_without_context_is_refused() {
    let mut replica = LocalDomain::replica(guest_binary(), MIB).unwrap();
    assert!(replica.start_from_replica().is_err());
    assert!(replica.pause().is_err());
}

#[test]
fn xen_backend_on_a_host_without_xen_says_so() {
    let err = match xenft_checkpoint::xen::XenDomain::open(1, 1) {
        Ok(_) => panic!("this test host has no Xen"),
        Err(e) => e.to_string(),
    };
    // Without the libraries: "libxenctrl not found: ..."; with Debian's Xen tools installed
    // but no hypervisor (as after `apt-get install xen-utils`): "this host has no Xen: ...".
    assert!(err.contains("this host has no Xen"), "{err}");
}
