//! SIGKILL the primary process at chosen and at random points; the secondary must keep the
//! last checkpoint it acknowledged, never lose one whose output was released, and its resumed
//! guest must continue the primary's exact workload sequence.

// Test arithmetic on small fixed sizes; the cast lints guard production offsets.
#![allow(clippy::cast_possible_truncation)]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xenft_checkpoint::domain::Domain;
use xenft_checkpoint::engine::secondary::{start_secondary, SecondaryConfig};
use xenft_checkpoint::engine::transport::unix_stream;
use xenft_checkpoint::local::LocalDomain;
use xenft_checkpoint::workload::{replay, Pattern, WorkloadSpec, WorkloadState, PAGE_SIZE};

const MIB: u64 = 1 << 20;
const MEMORY_MIB: u64 = 16;

fn guest_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xenft-synthetic-guest"))
}

fn start_state(seed: u64) -> WorkloadState {
    WorkloadState::new(
        WorkloadSpec {
            pattern: Pattern::Random,
            write_len: 512,
            rate_bytes_per_s: 20 * MIB,
        },
        seed,
    )
    .unwrap()
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn all_memory(d: &mut LocalDomain) -> Vec<u8> {
    let pfns: Vec<u64> = (0..d.memory_pages()).collect();
    let mut buf = vec![0u8; pfns.len() * PAGE_SIZE];
    d.read_pages(&pfns, &mut buf).unwrap();
    buf
}

fn expected_memory(seed: u64, counter: u64) -> Vec<u8> {
    let mut mem = vec![0u8; (MEMORY_MIB * MIB) as usize];
    let mut s = start_state(seed);
    replay(&mut mem, &mut s, counter);
    mem
}

struct Outcome {
    /// Checkpoint the secondary resumed from.
    failover_epoch: u64,
    /// Highest checkpoint the primary committed (released output for) before dying.
    released: Option<u64>,
    /// Epoch numbers of the checkpoints the primary took, in order.
    taken: Vec<u64>,
}

impl Outcome {
    /// Epoch number of the k-th checkpoint (1-based).
    fn kth(&self, k: usize) -> u64 {
        self.taken[k - 1]
    }
}

/// Runs a primary process that dies (by `crash` args, or by SIGKILL after `kill_after`),
/// then fails over and checks the resumed replica.
fn run(seed: u64, crash: &[&str], kill_after: Option<Duration>) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("ckpt.sock");
    let log_path = dir.path().join("commits");
    let listener = UnixListener::bind(&sock_path).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_xenft-checkpoint"))
        .arg("primary")
        .args(["--guest-binary", guest_binary().to_str().unwrap()])
        .args(["--memory-mib", &MEMORY_MIB.to_string()])
        .args(["--connect", sock_path.to_str().unwrap()])
        .args([
            "--pattern",
            "random",
            "--rate-mib",
            "20",
            "--write-len",
            "512",
        ])
        .args(["--seed", &seed.to_string(), "--epoch-ms", "10"])
        .args(["--commit-log", log_path.to_str().unwrap()])
        .args(crash)
        .stdout(Stdio::null())
        // Its guest outlives it by a moment (it exits when the control socket closes): keep
        // its output away from the test's pipes.
        .stderr(std::fs::File::create(dir.path().join("primary.err")).unwrap())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let (sock, _) = listener.accept().unwrap();
    let replica = LocalDomain::replica(guest_binary(), MEMORY_MIB * MIB).unwrap();
    let secondary = start_secondary(
        replica,
        unix_stream(sock).unwrap(),
        SecondaryConfig::default(),
    )
    .unwrap();
    if let Some(after) = kill_after {
        std::thread::sleep(after);
        child.0.kill().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "primary did not die");
        std::thread::sleep(Duration::from_millis(10));
    };
    use std::os::unix::process::ExitStatusExt;
    let primary_err = std::fs::read_to_string(dir.path().join("primary.err")).unwrap_or_default();
    assert_eq!(
        status.signal(),
        Some(9),
        "primary must die by SIGKILL: {status:?}; its stderr: {primary_err}"
    );
    while !secondary.status().primary_gone {
        assert!(Instant::now() < deadline, "secondary did not notice");
        std::thread::sleep(Duration::from_millis(5));
    }
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let released = log
        .lines()
        .filter_map(|l| l.strip_prefix("commit ")?.parse::<u64>().ok())
        .max();
    let taken: Vec<u64> = log
        .lines()
        .filter_map(|l| l.strip_prefix("checkpoint ")?.parse::<u64>().ok())
        .collect();

    let mut stopped = secondary.stop().unwrap();
    let Some((epoch, ctx)) = stopped.committed() else {
        // Killed during pre-copy: nothing to resume, and failover says so.
        assert_eq!(released, None);
        assert!(matches!(
            stopped.failover(),
            Err(xenft_checkpoint::engine::EngineError::NoCommittedCheckpoint)
        ));
        return Outcome {
            failover_epoch: 0,
            released,
            taken,
        };
    };
    let at = WorkloadState::decode(&ctx.0).unwrap();
    assert!(
        released.is_none_or(|r| epoch >= r),
        "released epoch {released:?} lost: secondary has {epoch}"
    );
    // The replica holds exactly the state of its committed checkpoint...
    assert!(all_memory(stopped.domain_mut()) == expected_memory(seed, at.counter));
    // ...and the resumed guest continues the same sequence from there.
    let (mut resumed, failover_epoch) = stopped.failover().unwrap();
    assert_eq!(failover_epoch, epoch);
    // Let it run until it has made progress (a loaded machine may not schedule it at once).
    let deadline = Instant::now() + Duration::from_secs(10);
    let now = loop {
        std::thread::sleep(Duration::from_millis(60));
        resumed.pause().unwrap();
        let now = WorkloadState::decode(&resumed.vcpu_context().unwrap().0).unwrap();
        if now.counter > at.counter {
            break now;
        }
        assert!(Instant::now() < deadline, "resumed guest made no progress");
        resumed.resume().unwrap();
    };
    assert!(all_memory(&mut resumed) == expected_memory(seed, now.counter));
    Outcome {
        failover_epoch,
        released,
        taken,
    }
}

fn crash(k: u64, point: &str) -> Vec<String> {
    vec![
        "--crash-at".into(),
        k.to_string(),
        "--crash-point".into(),
        point.into(),
    ]
}

fn run_crash(seed: u64, k: u64, point: &str) -> Outcome {
    let args = crash(k, point);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run(seed, &refs, None)
}

#[test]
fn killed_before_sending_a_checkpoint_secondary_resumes_the_previous_one() {
    let o = run_crash(21, 15, "before-send");
    // The 15th checkpoint never left; the 14th reached the secondary whole.
    assert_eq!(o.failover_epoch, o.kth(14));
    assert!(o.released.is_some_and(|r| r <= o.kth(14)));
}

#[test]
fn killed_in_the_middle_of_a_checkpoint_the_partial_epoch_is_discarded() {
    let o = run_crash(24, 15, "mid-stream");
    assert_eq!(
        o.failover_epoch,
        o.kth(14),
        "taken {:?} released {:?}",
        o.taken,
        o.released
    );
}

#[test]
fn killed_after_the_ack_the_secondary_has_the_checkpoint_the_primary_never_committed() {
    let o = run_crash(22, 12, "after-ack");
    assert!(o.failover_epoch >= o.kth(12));
    assert!(o.released.is_none_or(|r| r < o.kth(12)));
}

#[test]
fn killed_before_committing_output_stays_held_and_the_secondary_is_ahead() {
    let o = run_crash(25, 12, "before-commit");
    assert!(o.failover_epoch >= o.kth(12));
    assert_eq!(o.released, Some(o.kth(11)));
}

#[test]
fn killed_right_after_releasing_output_the_released_checkpoint_survives() {
    let o = run_crash(23, 10, "after-commit");
    assert_eq!(o.released, Some(o.kth(10)));
    assert!(o.failover_epoch >= o.kth(10));
}

#[test]
fn killed_at_random_moments_the_secondary_resumes_consistently() {
    for i in 0..3u64 {
        let ms = 100 + rand::random::<u64>() % 1200;
        let seed = rand::random::<u64>();
        let o = run(seed, &[], Some(Duration::from_millis(ms)));
        eprintln!(
            "round {i}, seed {seed}: killed after {ms} ms, resumed from {}",
            o.failover_epoch
        );
    }
}
