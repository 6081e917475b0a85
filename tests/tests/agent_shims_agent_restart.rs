//! SIGKILL of the agent alone (root, namespaces, real processes): after h2 took vm1 over, its
//! agent is killed and restarted. The VM process it had started keeps running and is adopted
//! (not started a second time), h2 stays the primary and its blkback keeps serving the disk.

mod agent_shims;

use std::time::Duration;

use agent_shims::{qemu_io, wait_until, Pool};
use xenft_tests::netns::require_root;

#[test]
fn a_restarted_agent_adopts_its_running_vm_instead_of_starting_a_second_one() {
    if !require_root("a_restarted_agent_adopts_its_running_vm_instead_of_starting_a_second_one") {
        return;
    }
    let mut pool = Pool::new();
    pool.start_primary_on_h1();
    assert!(pool.wait_protected(), "h1 never protected vm1");
    pool.kill_host(0);
    assert!(
        wait_until(Duration::from_secs(15), || pool.runs_vm1(1)),
        "h2 did not take over"
    );
    assert!(wait_until(Duration::from_secs(5), || pool
        .vm_pid_file(1)
        .exists()));
    std::thread::sleep(Duration::from_millis(100));
    let pid = std::fs::read_to_string(pool.vm_pid_file(1)).unwrap();

    // Act: only the agent dies and comes back.
    if let Some(mut a) = pool.procs[1].agent.take() {
        let _ = a.kill();
        let _ = a.wait();
    }
    pool.start_agent(1);

    // Assert: same VM process, still the primary, disk still served.
    assert!(
        wait_until(Duration::from_secs(10), || pool.runs_vm1(1)),
        "the restarted agent lost the VM: {:?}\n{}",
        pool.vm1(1),
        pool.log("agent-h2.log")
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        std::fs::read_to_string(pool.vm_pid_file(1)).unwrap(),
        pid,
        "a second VM process was started"
    );
    assert!(
        pool.log("agent-h2.log")
            .contains("adopted the VM process of a previous agent"),
        "{}",
        pool.log("agent-h2.log")
    );
    let (ok, out) = qemu_io(&pool.nbd_uri(1), false, &["write -P 0x44 0 64k"]);
    assert!(ok && out.contains("wrote 65536/65536"), "{out}");
}
