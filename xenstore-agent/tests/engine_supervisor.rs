//! A level-3 VM's components under the agent's supervisor with the real binaries: two hosts'
//! supervisors on loopback (127.0.0.1 and 127.0.0.2) start, from the registry's plan, the
//! mirrored disk (`xenft-blkback`) and the checkpoint engine (`xenft-checkpoint primary |
//! secondary --control`, a synthetic guest); the primary's engine commits checkpoints and
//! stamps the disk epochs; the secondary's engine is SIGKILLed, its supervisor restarts it,
//! and the agent's `Checkpointer` (the supervised engine's `CheckpointDriver`, found by
//! convention) protects the same guest again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use xenft_agent::drivers::{supervised_checkpoints, Convention};
use xenft_agent::ids::{HostId, VmId};
use xenft_agent::xapi::components::{plan, Change, HostFacts, Supervisor, BACKOFF};
use xenft_agent::xapi::engine_plan::{EngineFacts, EngineGuest};
use xenft_control::blkback::{self, NodeStatus, PeerLink};
use xenft_control::checkpoint::{Request, State, Status};
use xenft_control::{Blkback, Checkpoint, Client};

mod runtime_pool;
use runtime_pool::{blkback_binary, host_facts, loopback_desired, wait_until};

const VM: &str = "5e2a-vm";

/// `xenft-checkpoint` and `xenft-synthetic-guest`, built for this test.
fn checkpoint_binaries() -> (PathBuf, PathBuf) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let st = std::process::Command::new(cargo)
        .args(["build", "-q", "-p", "xenft-checkpoint", "--bins"])
        .arg("--manifest-path")
        .arg(manifest)
        .status()
        .expect("cargo build");
    assert!(st.success(), "building xenft-checkpoint failed");
    let dir = xenft_tests::lab::target_dir();
    (
        dir.join("xenft-checkpoint"),
        dir.join("xenft-synthetic-guest"),
    )
}

fn engine_status(sock: &Path) -> Option<Status> {
    match Client::<Checkpoint>::new(sock, Duration::from_secs(2)).call(&Request::Status) {
        Ok(xenft_control::checkpoint::Reply::Status(s)) => Some(*s),
        _ => None,
    }
}

/// The primary blkback's peer link and current disk epoch.
fn disk(ctl: &Path) -> Option<(PeerLink, u64)> {
    match Client::<Blkback>::new(ctl, Duration::from_secs(2)).call(&blkback::Request::Status) {
        Ok(blkback::Reply::Status(s)) => match s.node {
            NodeStatus::Primary { primary } => Some((primary.peer, primary.epoch)),
            _ => None,
        },
        _ => None,
    }
}

fn committed(s: &Option<Status>) -> u64 {
    s.as_ref().and_then(|s| s.committed_epoch).unwrap_or(0)
}

fn names(changes: &[Change]) -> Vec<&'static str> {
    let mut v: Vec<_> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Started { name, .. } => Some(*name),
            _ => None,
        })
        .collect();
    v.sort_unstable();
    v
}

/// Kills, when dropped (a failed test too), every component a supervisor started under these
/// runtime directories: each runs in its own process group (its pid), guest included.
struct KillComponents(Vec<PathBuf>);

impl Drop for KillComponents {
    fn drop(&mut self) {
        for pidfile in self.0.iter().flat_map(|d| {
            std::fs::read_dir(d.join(VM))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "pid"))
        }) {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                .filter(|&p| p > 0)
            {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

#[test]
fn a_level_3_vms_engines_are_supervised_and_the_driver_protects_again_after_a_restart() {
    let blkback = blkback_binary();
    let (engine, guest) = checkpoint_binaries();
    let dir = tempfile::tempdir().unwrap();
    let facts = |me: &str| HostFacts {
        engine: Some(EngineFacts {
            binary: engine.clone(),
            guest: EngineGuest::Synthetic {
                binary: guest.clone(),
                memory_mib: 16,
            },
            epoch_ms: 20,
        }),
        ..host_facts(dir.path(), me, &blkback)
    };
    let base = 24_000 + u16::try_from(std::process::id() % 20_000).unwrap();
    let _cleanup = KillComponents(vec![facts("u1").run_dir, facts("u2").run_dir]);
    let d = loopback_desired(base, VM, "db01", 3);
    let (p1, pr1) = plan(&d, &facts("u1"));
    let (p2, pr2) = plan(&d, &facts("u2"));
    assert!(pr1.is_empty() && pr2.is_empty(), "{pr1:?} {pr2:?}");
    let (mut s1, mut s2) = (
        Supervisor::new(facts("u1").run_dir),
        Supervisor::new(facts("u2").run_dir),
    );

    // Both hosts start the disk and the engine.
    let now = Instant::now();
    assert_eq!(names(&s2.reconcile(&p2, now)), ["blkback", "checkpoint"]);
    assert_eq!(names(&s1.reconcile(&p1, now)), ["blkback", "checkpoint"]);
    let run1 = facts("u1").run_dir.join(VM);
    let (ck1, ck2) = (
        run1.join("checkpoint.sock"),
        facts("u2").run_dir.join(VM).join("checkpoint.sock"),
    );
    wait_until("the secondary's committed checkpoints", 40, || {
        committed(&engine_status(&ck2)) >= 3
    });
    let st = engine_status(&ck1).unwrap();
    assert_eq!(st.state, State::Protecting, "{st:?}");
    let pid = st.guest_pid.expect("the synthetic guest");
    // The engine stamps the VM's disk epochs.
    wait_until(
        "the disk in sync with stamped epochs",
        30,
        || matches!(disk(&run1.join("blkback.sock")), Some((PeerLink::InSync, e)) if e > 0),
    );

    // The secondary's engine is killed: protection ends on the primary, the guest runs on;
    // the supervisor starts the engine again after its backoff.
    let pid2 = s2.pid(VM, "checkpoint").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid2).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the exit to be seen", 5, || {
        s2.reconcile(&p2, Instant::now()).iter().any(|c| {
            matches!(
                c,
                Change::Exited {
                    name: "checkpoint",
                    ..
                }
            )
        })
    });
    wait_until("the primary unprotected", 10, || {
        engine_status(&ck1).is_some_and(|s| s.state == State::Running)
    });
    std::thread::sleep(BACKOFF);
    assert_eq!(names(&s2.reconcile(&p2, Instant::now())), ["checkpoint"]);

    // The agent's Checkpointer for supervised VMs protects the guest again.
    let checkpointer = supervised_checkpoints(Convention {
        run_dir: facts("u1").run_dir,
        request_timeout: Duration::from_secs(5),
        sync_timeout: Duration::from_secs(60),
    });
    let vm = VmId::new(VM).unwrap();
    checkpointer
        .protect(&vm, &HostId::new("h2").unwrap())
        .unwrap();
    let st = engine_status(&ck1).unwrap();
    assert_eq!(st.state, State::Protecting, "{st:?}");
    assert_eq!(st.guest_pid, Some(pid), "the same guest");
    let p = st.primary.unwrap();
    assert!(p.committed_epoch > 0, "{p:?}");
    assert_eq!(p.peer, "alink:h2");
    let first = committed(&engine_status(&ck2));
    wait_until("the restarted secondary's epochs to grow", 20, || {
        committed(&engine_status(&ck2)) >= first + 3
    });
    let report = checkpointer.report(&vm).expect("the engine's status");
    assert_eq!(report["state"], "protecting", "{report}");

    // Unprotected: every component stops.
    assert_eq!(s1.reconcile(&[], Instant::now()).len(), 2);
    assert_eq!(s2.reconcile(&[], Instant::now()).len(), 2);
}
