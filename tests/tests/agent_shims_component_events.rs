//! Failure class (d) in production: the components push their failures as events of the
//! control contract and the agent acts on them (root, network namespaces, the real
//! `xenft-agent`, `xenft-blkback` and `xenft-netback`). vm1 runs protected on h1; h1's disk
//! file is cut short under its blkback, then h1's uplink is pulled: h1's agent records each
//! redirect with the component's cause, and nobody fails over.

mod agent_shims;

use std::time::Duration;

use agent_shims::{qemu_io, wait_until, Pool};
use serde_json::Value;
use xenft_tests::netns::require_root;

/// The component faults host `i`'s agent decided on.
fn faults(pool: &Pool, i: usize) -> Vec<Value> {
    pool.decisions(i)
        .into_iter()
        .filter(|d| d["class"] == "component_fault")
        .collect()
}

fn redirected(pool: &Pool, i: usize) -> Vec<String> {
    pool.status(i)
        .and_then(|v| v["vms"][0]["redirected"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_failed_disk_and_a_pulled_uplink_reach_the_agent_as_redirects_with_their_cause_and_no_failover()
{
    if !require_root("component events") {
        return;
    }
    // Arrange: vm1 protected on h1, some data written through h1's blkback.
    let pool = Pool::protected_on_h1(2);
    let uri = pool.nbd_uri(0);
    let (ok, out) = qemu_io(&uri, false, &["write -P 0x5a 4M 1M", "flush"]);
    assert!(ok, "{out}");

    // Act 1: h1's disk file is cut short under its blkback, then read past the cut.
    std::fs::OpenOptions::new()
        .write(true)
        .open(pool.p("disk-h1.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (ok, out) = qemu_io(&uri, false, &["read -P 0x5a 4M 1M"]);
    assert!(
        ok && !out.contains("verification failed"),
        "the read is served from h2's copy: {out}"
    );

    // Assert 1: h1's agent heard it from blkback and recorded the redirect with the cause.
    assert!(
        wait_until(Duration::from_secs(10), || redirected(&pool, 0)
            .contains(&"disk".to_string())),
        "h1's agent never redirected the disk: {:?}\n{}",
        pool.status(0),
        pool.log("agent-h1.log")
    );
    let disk = faults(&pool, 0);
    assert!(
        disk.iter().any(|d| d["action"]["kind"] == "redirect"
            && d["action"]["component"] == "disk"
            && d["reason"].as_str().unwrap_or("").contains("truncated")),
        "no disk redirect with the store's cause: {disk:?}"
    );

    // Act 2: h1's uplink is pulled.
    pool.h[0].ip(&["link", "set", "up0", "down"]).unwrap();

    // Assert 2: the relay's event reaches the agent, which redirects the uplink, with the cause.
    assert!(
        wait_until(Duration::from_secs(10), || redirected(&pool, 0)
            .contains(&"uplink".to_string())),
        "h1's agent never redirected the uplink: {:?}\n{}",
        pool.status(0),
        pool.log("agent-h1.log")
    );
    let uplink = faults(&pool, 0);
    assert!(
        uplink.iter().any(|d| d["action"]["component"] == "uplink"
            && d["reason"].as_str().unwrap_or("").contains("up0")),
        "no uplink redirect naming the interface: {uplink:?}"
    );

    // Assert 3: no failover: vm1 still runs on h1, h2 still holds the replica.
    std::thread::sleep(Duration::from_secs(2));
    assert!(pool.runs_vm1(0), "vm1 left h1: {:?}", pool.vm1(0));
    assert!(!pool.runs_vm1(1), "h2 took vm1 over: {:?}", pool.vm1(1));
    assert!(
        pool.decisions(1)
            .iter()
            .all(|d| d["action"]["kind"] != "fail_over"),
        "h2 decided a failover: {:?}",
        pool.decisions(1)
    );

    // Repair: the uplink comes back and the agent restores it.
    pool.h[0].ip(&["link", "set", "up0", "up"]).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !redirected(&pool, 0)
            .contains(&"uplink".to_string())),
        "the uplink was never restored: {:?}",
        pool.status(0)
    );
}
