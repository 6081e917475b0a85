//! Level 3 end to end with the real components (root, namespaces): h1 runs a synthetic guest
//! protected by the checkpoint engine, which stamps blkback's disk epochs (`checkpoint N`,
//! `commit N` on h1's blkback); h2's blkback holds each epoch's writes until its commit. An NBD
//! client writes while checkpoints run; h1 (agent, shims, engine) is SIGKILLed. h2's agent must
//! freeze the memory replica at its last checkpoint N, commit the disk epochs <= N, drop the
//! later ones, serve the disk, resume the guest and start the VM's process (the domain
//! command, `after_resume: start`): every acknowledged write of an epoch <= N is on the disk,
//! and none of a later epoch.

mod agent_shims;

use std::time::Duration;

use agent_shims::{assert_disk_is_checkpoint, checkpoint_status, wait_until, EpochWriter, Pool};
use xenft_tests::netns::require_root;

#[test]
fn a_level3_take_over_keeps_exactly_the_disk_writes_of_the_resumed_checkpoint() {
    if !require_root("a_level3_take_over_keeps_exactly_the_disk_writes_of_the_resumed_checkpoint") {
        return;
    }
    let mut pool = Pool::level3_protected_on_h1();
    // The engine drives h1's relay too: its output epochs follow the checkpoints.
    let relay_committed = || {
        pool.relay_counters(0)
            .and_then(|v| v["counters"]["committed_epoch"].as_u64())
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(10), || relay_committed() > 3),
        "the relay's epochs are not committed by the engine: {:?}\n{}",
        pool.relay_counters(0),
        pool.log("ck-h1.log")
    );

    // The client writes while checkpoints stamp the epochs.
    let writer = EpochWriter::start(&pool, 0);
    assert!(
        wait_until(Duration::from_secs(20), || writer.count() >= 30),
        "the NBD client could not write through h1"
    );

    // Act: h1 dies — its checkpoint engine first, so that the last acknowledged writes
    // belong to an epoch no checkpoint completed (the writes of a host that dies between two
    // checkpoints).
    let acked = pool.kill_host_mid_epoch(0, writer);
    assert!(
        wait_until(Duration::from_secs(15), || pool.runs_vm1(1)),
        "h2 did not take over: {:?}\n{}",
        pool.vm1(1),
        pool.log("agent-h2.log")
    );

    // Assert: guest resumed at N, disk = writes of epochs <= N.
    let ck = checkpoint_status(&pool.ckpt_ctl(1)).unwrap();
    assert_eq!(ck["state"], "running", "{ck}");
    let n = ck["committed_epoch"].as_u64().unwrap();
    let blk = pool.blk_status(1).unwrap();
    assert_eq!(blk["role"], "primary", "{blk}");
    // The VM's process runs on h2 now: the agent started it after the memory resume.
    assert!(
        wait_until(Duration::from_secs(5), || pool.vm_pid_file(1).exists()),
        "h2's agent resumed the memory but did not start the VM's process\n{}",
        pool.log("agent-h2.log")
    );
    let pid = std::fs::read_to_string(pool.vm_pid_file(1)).unwrap();
    assert!(
        std::path::Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "the VM process started on h2 is not alive"
    );
    let (kept, dropped) = assert_disk_is_checkpoint(&pool, 1, n, &acked);
    assert!(kept > 0, "no write landed in an epoch <= {n}: {acked:?}");
    eprintln!(
        "checkpoint {n}: {} acked writes kept, {} of later epochs dropped, {} straddling",
        kept,
        dropped,
        acked.len() - kept - dropped
    );
}
