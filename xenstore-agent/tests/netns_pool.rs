//! Real processes in network namespaces (needs root): two `xenft-agent`s and one
//! `xenft-quorum`. Scripted faults with `ip link set down` and SIGKILL; throughout, the two
//! agents' status APIs are polled and the VM must never run on both.

mod common;

use std::time::{Duration, Instant};

use common::{Pool, VmState, ALINKS, MGMT};
use xenft_tests::netns::require_root;

/// Polls both agents until `cond` holds; fails on a split brain or after `timeout`.
fn until(
    pool: &Pool,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&[Option<VmState>; 2]) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let s = [pool.status(0), pool.status(1)];
        let running = |x: &Option<VmState>| x.as_ref().is_some_and(VmState::running);
        assert!(
            !(running(&s[0]) && running(&s[1])),
            "split brain while waiting for {what}: {s:?}"
        );
        if cond(&s) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {what}: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is(s: &Option<VmState>, local: &str, phase: &str) -> bool {
    s.as_ref()
        .is_some_and(|s| (local == "*" || s.local == local) && (phase == "*" || s.phase == phase))
}

#[test]
fn agents_in_namespaces_survive_link_cuts_isolation_and_sigkill() {
    if !require_root("agents_in_namespaces_survive_link_cuts_isolation_and_sigkill") {
        return;
    }
    let mut pool = Pool::new();
    until(&pool, "protection", Duration::from_secs(15), |s| {
        is(&s[0], "running", "protected") && is(&s[1], "stopped", "protected")
    });

    // One A-link path down: logged only, still protected, no take-over.
    pool.link(0, "al0", false);
    std::thread::sleep(Duration::from_millis(1000));
    until(&pool, "still protected", Duration::from_secs(1), |s| {
        is(&s[0], "running", "protected") && is(&s[1], "stopped", "*")
    });

    // All A-links down: degraded, no take-over (the peer is alive on the management network).
    pool.link(0, "al1", false);
    until(&pool, "degraded", Duration::from_secs(3), |s| {
        is(&s[0], "running", "degraded")
    });
    std::thread::sleep(Duration::from_millis(1500));
    until(&pool, "no take-over", Duration::from_secs(1), |s| {
        is(&s[0], "running", "*") && is(&s[1], "stopped", "*")
    });
    for dev in ALINKS {
        pool.link(0, dev, true);
    }
    until(&pool, "re-protection", Duration::from_secs(10), |s| {
        is(&s[0], "*", "protected") && is(&s[1], "*", "protected")
    });

    // Isolate h1 (A-links, mgmt, quorum link): it fences, h2 takes over.
    for dev in ALINKS.iter().chain(&MGMT) {
        pool.link(0, dev, false);
    }
    let took = until(
        &pool,
        "take-over of an isolated primary",
        Duration::from_secs(5),
        |s| is(&s[1], "running", "*"),
    );
    until(&pool, "fenced old primary", Duration::from_secs(2), |s| {
        !is(&s[0], "running", "*")
    });
    println!("isolated primary replaced in {} ms", took.as_millis());
    for dev in ALINKS.iter().chain(&MGMT) {
        pool.link(0, dev, true);
    }
    until(
        &pool,
        "old primary back as secondary",
        Duration::from_secs(10),
        |s| {
            is(&s[0], "stopped", "protected")
                && is(&s[1], "running", "protected")
                && s[0].as_ref().is_some_and(|x| x.primary == "h2")
        },
    );

    // SIGKILL the primary's agent: h1 takes over.
    pool.kill_agent(1);
    let took = until(
        &pool,
        "take-over after SIGKILL",
        Duration::from_secs(5),
        |s| is(&s[0], "running", "*"),
    );
    println!(
        "take-over {} ms after SIGKILL of the primary agent",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(2), "take-over took {took:?}");
}
