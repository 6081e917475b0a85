//! After a take-over by h2 (real agents and shims in namespaces), h1 comes back with its old
//! disk: its agent adopts the swapped roles, its blkback becomes h2's secondary, h2's agent
//! resyncs it and reports vm1 protected again — no operator command in between. The resync
//! copies data only where the disk holds data (a full sync that skips holes: there is no
//! bitmap exchange between the two former roles yet), and both copies end identical.

mod agent_shims;

use std::time::{Duration, Instant};

use agent_shims::{qemu_io, wait_until, Pool, MIB};
use xenft_tests::netns::require_root;

#[test]
fn the_old_primary_returns_as_secondary_and_the_vm_is_protected_again_without_operator_action() {
    if !require_root(
        "the_old_primary_returns_as_secondary_and_the_vm_is_protected_again_without_operator_action",
    ) {
        return;
    }
    // Arrange: vm1 protected on h1, 4 MiB written through h1, then h1 dies and h2 takes over.
    let mut pool = Pool::new();
    pool.start_primary_on_h1();
    assert!(
        pool.wait_protected(),
        "h1 never protected vm1\n{}",
        pool.log("agent-h1.log")
    );
    let (ok, out) = qemu_io(&pool.nbd_uri(0), false, &["write -P 0x11 0 4M", "flush"]);
    assert!(ok && out.contains("wrote 4194304/4194304"), "{out}");
    pool.kill_host(0);
    assert!(
        wait_until(Duration::from_secs(15), || pool.runs_vm1(1)),
        "h2 did not take over\n{}",
        pool.log("agent-h2.log")
    );
    // The VM keeps writing on h2 while h1 is away: 2 MiB more.
    let (ok, out) = qemu_io(&pool.nbd_uri(1), false, &["write -P 0x22 64M 2M", "flush"]);
    assert!(ok && out.contains("wrote 2097152/2097152"), "{out}");
    let phase = pool.vm1(1).map(|(_, phase, _)| phase).unwrap_or_default();
    assert!(
        phase == "failed-over" || phase == "degraded",
        "without its peer the VM is unprotected on h2, not {phase}"
    );

    // Act: h1 comes back — its host starts the blkback as secondary (the role the pool now
    // gives it), the relay in standby and the agent; nobody asks for a resync.
    let back = Instant::now();
    pool.start_secondary_components(0);
    pool.start_agent(0);

    // Assert: protected again, roles swapped, both copies identical.
    let protected = wait_until(Duration::from_secs(30), || pool.runs_vm1_protected(1));
    assert!(
        protected,
        "vm1 not protected again: h2 {:?}, h1 {:?}\n{}",
        pool.vm1(1),
        pool.vm1(0),
        pool.log("agent-h2.log")
    );
    assert!(
        pool.holds_vm1_for(0, 1),
        "h1 must be the secondary: {:?}",
        pool.vm1(0)
    );
    let blk1 = pool.blk_status(0).unwrap();
    assert_eq!(blk1["role"], "secondary", "{blk1}");
    assert_eq!(blk1["secondary"]["disk"], "consistent", "{blk1}");
    let blk2 = pool.blk_status(1).unwrap();
    assert_eq!(blk2["primary"]["peer"], "in_sync", "{blk2}");
    let copied = blk2["primary"]["last_resync"]["bytes_copied"]
        .as_u64()
        .unwrap();
    assert!(
        (6 * MIB..=8 * MIB).contains(&copied),
        "the resync copied {copied} bytes: it should copy the 6 MiB of data, not the 128 MiB disk\n{blk2}"
    );
    let same = std::process::Command::new("cmp")
        .arg(pool.p("disk-h1.img"))
        .arg(pool.p("disk-h2.img"))
        .status()
        .unwrap()
        .success();
    assert!(same, "h1's copy differs from h2's after the resync");
    eprintln!(
        "re-protected {:?} after h1 came back, resync copied {copied} bytes",
        back.elapsed()
    );
}
