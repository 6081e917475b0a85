//! Level 1 with the real domain starter (root, namespaces): vm1 runs on h1 as a process the
//! operator started; h1 dies (agent and VM, SIGKILL). h2's agent restarts the VM on the
//! reserved host by starting its configured command, and says why.

mod agent_shims;

use std::time::Duration;

use agent_shims::{wait_until, Pool};
use xenft_tests::netns::require_root;

#[test]
fn a_level1_vm_is_restarted_on_the_reserved_host_by_its_command() {
    if !require_root("a_level1_vm_is_restarted_on_the_reserved_host_by_its_command") {
        return;
    }
    let mut pool = Pool::new();
    pool.level = 1;
    pool.start_agent(1);
    pool.start_agent(0);
    assert!(
        wait_until(Duration::from_secs(20), || pool
            .vm1(0)
            .is_some_and(|(local, _, _)| local == "running")
            && pool.vm1(1).is_some()),
        "h1 does not run vm1\n{}",
        pool.log("agent-h1.log")
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !pool.vm_pid_file(1).exists(),
        "h2 started the VM while h1 ran it"
    );

    pool.kill_host(0);

    assert!(
        wait_until(Duration::from_secs(15), || pool.runs_vm1(1)),
        "h2 did not restart vm1: {:?}\n{}",
        pool.vm1(1),
        pool.log("agent-h2.log")
    );
    assert!(
        wait_until(Duration::from_secs(5), || pool.vm_pid_file(1).exists()),
        "h2's agent did not start the VM's command"
    );
    let pid: i32 = std::fs::read_to_string(pool.vm_pid_file(1))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the restarted VM process is not alive"
    );
    let st = pool.status(1).unwrap();
    let why: Vec<String> = st["last_decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["vm"] == "vm1" && d["action"]["kind"] == "fail_over")
        .map(|d| d["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(!why.is_empty(), "no fail-over decision: {st}");
}
