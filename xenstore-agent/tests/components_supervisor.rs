//! The component supervisor with the real `xenft-blkback`: two hosts' supervisors on loopback
//! (127.0.0.1 and 127.0.0.2) start the VM's mirrored disk from the registry's plan, restart a
//! killed component, are adopted by a restarted agent, and stop everything when the VM is
//! unprotected.

use std::time::{Duration, Instant};

use xenft_agent::xapi::components::{plan, Change, Supervisor, BACKOFF};
use xenft_control::blkback::{NodeStatus, PeerLink, Reply, Request};
use xenft_control::{Blkback, Client};

mod runtime_pool;
use runtime_pool::{blkback_binary, host_facts, loopback_desired, wait_until};

fn peer_link(ctl: &std::path::Path) -> Option<PeerLink> {
    match Client::<Blkback>::new(ctl, Duration::from_secs(2)).call(&Request::Status) {
        Ok(Reply::Status(s)) => match s.node {
            NodeStatus::Primary { primary } => Some(primary.peer),
            _ => None,
        },
        _ => None,
    }
}

fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'))
    })
}

#[test]
fn components_follow_the_plan_restart_after_a_crash_survive_an_agent_restart_and_stop_on_unprotect()
{
    let bin = blkback_binary();
    let dir = tempfile::tempdir().unwrap();
    let facts = |me: &str| host_facts(dir.path(), me, &bin);
    let base = 20_000 + u16::try_from(std::process::id() % 20_000).unwrap();
    let d = loopback_desired(base, "4c1d-vm", "web01", 2);
    let (p1, pr1) = plan(&d, &facts("u1"));
    let (p2, pr2) = plan(&d, &facts("u2"));
    assert!(pr1.is_empty() && pr2.is_empty(), "{pr1:?} {pr2:?}");
    let (mut s1, mut s2) = (
        Supervisor::new(facts("u1").run_dir),
        Supervisor::new(facts("u2").run_dir),
    );
    let now = Instant::now();
    assert!(matches!(
        &s2.reconcile(&p2, now)[..],
        [Change::Started { .. }]
    ));
    assert!(matches!(
        &s1.reconcile(&p1, now)[..],
        [Change::Started { .. }]
    ));
    let ctl = facts("u1").run_dir.join("4c1d-vm/blkback.sock");
    wait_until("the mirror in sync", 30, || {
        peer_link(&ctl) == Some(PeerLink::InSync)
    });

    // The secondary's blkback is killed: its supervisor restarts it after the backoff and
    // the mirror is in sync again.
    let pid2 = s2.pid("4c1d-vm", "blkback").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid2).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the exit to be seen", 5, || {
        s2.reconcile(&p2, Instant::now())
            .iter()
            .any(|c| matches!(c, Change::Exited { .. }))
    });
    assert!(s2.pid("4c1d-vm", "blkback").is_none());
    std::thread::sleep(BACKOFF);
    assert!(matches!(
        &s2.reconcile(&p2, Instant::now())[..],
        [Change::Started { .. }]
    ));
    wait_until("the mirror in sync again", 30, || {
        peer_link(&ctl) == Some(PeerLink::InSync)
    });

    // The agent restarts: a new supervisor adopts the running primary.
    let pid1 = s1.pid("4c1d-vm", "blkback").unwrap();
    s1.release();
    let mut s1 = Supervisor::new(facts("u1").run_dir);
    assert_eq!(
        s1.reconcile(&p1, Instant::now()),
        vec![Change::Adopted {
            vm: "4c1d-vm".into(),
            name: "blkback",
            pid: pid1
        }]
    );
    assert_eq!(peer_link(&ctl), Some(PeerLink::InSync));

    // The VM is taken over by h2 (the registry now records it there): h2's blkback, the
    // secondary that was promoted, is the primary the plan now wants — kept, not replaced
    // under the running VM; and a restarted agent on h2 adopts it as such.
    let mut taken = d.clone();
    taken.vms.get_mut("4c1d-vm").unwrap().resident_on = Some("u2".into());
    taken.vms.get_mut("4c1d-vm").unwrap().secondary = "u1".into();
    let (p2_primary, _) = plan(&taken, &facts("u2"));
    assert!(p2_primary[0].args.contains(&"primary".to_string()));
    let pid2 = s2.pid("4c1d-vm", "blkback").unwrap();
    assert_eq!(s2.reconcile(&p2_primary, Instant::now()), vec![]);
    s2.release();
    let mut s2 = Supervisor::new(facts("u2").run_dir);
    assert_eq!(
        s2.reconcile(&p2_primary, Instant::now()),
        vec![Change::Adopted {
            vm: "4c1d-vm".into(),
            name: "blkback",
            pid: pid2
        }]
    );

    // Unprotected: everything stops (the VM is not ours to touch).
    let pid2 = s2.pid("4c1d-vm", "blkback").unwrap();
    assert!(matches!(
        &s1.reconcile(&[], Instant::now())[..],
        [Change::Stopped { .. }]
    ));
    assert!(matches!(
        &s2.reconcile(&[], Instant::now())[..],
        [Change::Stopped { .. }]
    ));
    wait_until("the processes to end", 10, || gone(pid1) && gone(pid2));
}
