//! Level-3 re-protection end to end with the real components (root, namespaces): h1 protects
//! a synthetic guest toward h2 (checkpoint engine, blkback, netback, agents); h1 is SIGKILLed
//! and h2's agent resumes the guest from its last checkpoint. h1 then comes back the way a
//! host does — a fresh `xenft-checkpoint secondary --control`, blkback secondary, relay in
//! standby, agent — and nobody else acts: h2's agent resyncs the disk and asks its engine to
//! protect the running guest toward h1, so vm1 is protected again, h1's replica commits
//! growing checkpoints, and the guest on h2 kept running (same process, its workload counter
//! moving) throughout. Then, with a client writing through h2, h2 dies in turn: h1 resumes the
//! guest from those checkpoints with exactly the disk writes of the resumed checkpoint.

mod agent_shims;

use std::time::{Duration, Instant};

use agent_shims::{assert_disk_is_checkpoint, checkpoint_status, wait_until, EpochWriter, Pool};
use serde_json::Value;
use xenft_tests::netns::require_root;

fn alive(pid: u64) -> bool {
    i32::try_from(pid)
        .is_ok_and(|p| nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok())
}

#[test]
fn after_a_level3_take_over_the_returning_host_becomes_secondary_and_the_vm_is_protected_again() {
    if !require_root(
        "after_a_level3_take_over_the_returning_host_becomes_secondary_and_the_vm_is_protected_again",
    ) {
        return;
    }
    // Arrange: the level-3 pool of agent_shims_level3_pool, protected on h1.
    let mut pool = Pool::level3_protected_on_h1();

    // h1 dies; h2 takes over and resumes the guest.
    pool.kill_host(0);
    assert!(
        wait_until(Duration::from_secs(15), || pool.runs_vm1(1)),
        "h2 did not take over: {:?}\n{}",
        pool.vm1(1),
        pool.log("agent-h2.log")
    );
    let st = checkpoint_status(&pool.ckpt_ctl(1)).unwrap();
    assert_eq!(st["state"], "running", "{st}");
    let pid = st["guest_pid"].as_u64().expect("the resumed guest's pid");

    // Act: h1 comes back as a host does, with every component in the secondary role.
    let back = Instant::now();
    pool.start_secondary_components(0);
    assert!(wait_until(Duration::from_secs(10), || pool
        .ckpt_ctl(0)
        .exists()));
    pool.start_agent(0);

    // Assert: protected again on h2, through the agent's status API.
    let protected = wait_until(Duration::from_secs(30), || pool.runs_vm1_protected(1));
    assert!(
        protected,
        "vm1 not protected again: h2 {:?}, h1 {:?}\n{}\n{}",
        pool.vm1(1),
        pool.vm1(0),
        pool.log("agent-h2.log"),
        pool.log("ck-h2.log")
    );
    assert!(
        pool.holds_vm1_for(0, 1),
        "h1 must be the secondary: {:?}",
        pool.vm1(0)
    );
    // h1's new replica commits growing checkpoints of the guest running on h2.
    assert!(
        wait_until(Duration::from_secs(20), || pool.committed(0) > 3),
        "h1's replica receives no checkpoint: {:?}\n{}",
        checkpoint_status(&pool.ckpt_ctl(0)),
        pool.log("ck-h2.log")
    );
    let first = pool.committed(0);
    assert!(
        wait_until(Duration::from_secs(10), || pool.committed(0) > first + 3),
        "h1's committed epoch does not grow past {first}"
    );
    // h2's relay, in pass-through since the take-over, buffers output per epoch again.
    let relay = |k: &str| {
        pool.relay_counters(1)
            .and_then(|v| v["counters"][k].as_u64())
            .unwrap_or(0)
    };
    let r0 = relay("committed_epoch");
    assert!(
        wait_until(Duration::from_secs(10), || relay("committed_epoch")
            > r0 + 3),
        "h2's relay does not commit output epochs: {:?}\n{}",
        pool.relay_counters(1),
        pool.log("ck-h2.log")
    );
    let st = checkpoint_status(&pool.ckpt_ctl(1)).unwrap();
    assert_eq!(st["state"], "protecting", "{st}");
    assert_eq!(st["primary"]["phase"], "protected", "{st}");
    // The guest was never stopped or restarted: same process, and its work goes on.
    assert_eq!(st["guest_pid"].as_u64(), Some(pid), "{st}");
    assert!(alive(pid), "the guest on h2 died");
    let counter = |v: &Value| v["primary"]["guest_counter"].as_u64().unwrap_or(0);
    let c0 = counter(&st);
    assert!(
        wait_until(Duration::from_secs(10), || checkpoint_status(
            &pool.ckpt_ctl(1)
        )
        .is_some_and(|v| counter(&v) > c0)),
        "the guest on h2 makes no progress while protected: {st}"
    );
    eprintln!(
        "re-protected {:?} after h1 came back; h1 committed epoch {}, checkpoint pause p99 {} ms, max {} ms",
        back.elapsed(),
        pool.committed(0),
        st["primary"]["pause_p99_ms"],
        st["primary"]["pause_max_ms"]
    );

    // The protection is real: a client writes through h2 while checkpoints stamp the disk
    // epochs; when h2 dies in turn, h1 resumes the guest from the checkpoints it received
    // since it came back, with exactly the disk writes of that checkpoint.
    let writer = EpochWriter::start(&pool, 1);
    assert!(
        wait_until(Duration::from_secs(20), || writer.count() >= 30),
        "the NBD client could not write through h2"
    );
    let before = pool.committed(0);
    // h2 dies — its engine (and with it the guest) first, so that the last acknowledged writes
    // belong to an epoch no checkpoint completed.
    let acked = pool.kill_host_mid_epoch(1, writer);
    assert!(
        wait_until(Duration::from_secs(15), || pool.runs_vm1(0)),
        "h1 did not take over in turn: {:?}\n{}",
        pool.vm1(0),
        pool.log("agent-h1.log")
    );
    let st = checkpoint_status(&pool.ckpt_ctl(0)).unwrap();
    assert_eq!(st["state"], "running", "{st}");
    assert!(
        st["committed_epoch"].as_u64().unwrap() >= before,
        "h1 resumed from an older checkpoint than it held: {st}"
    );
    assert!(st["guest_pid"].as_u64().is_some_and(alive), "{st}");
    let n = st["committed_epoch"].as_u64().unwrap();
    let (kept, dropped) = assert_disk_is_checkpoint(&pool, 0, n, &acked);
    assert!(
        kept > 0 && dropped > 0,
        "writes on both sides of checkpoint {n} expected: {acked:?}"
    );
    eprintln!(
        "second take-over at checkpoint {n}: {} acked writes kept, {} of later epochs dropped, {} straddling",
        kept,
        dropped,
        acked.len() - kept - dropped
    );
}
