//! `xenft-checkpoint primary --control` as processes over a real two-path A-link on
//! 127.0.0.1: the primary protects its guest; its secondary is SIGKILLed and protection ends
//! (event `protection_ended`, status `running`) while the process and its guest run on; a
//! fresh secondary is started with the mirrored A-link options and `protect` protects the
//! same guest again, its committed epochs growing; `unprotect` ends protection, the guest
//! still running. A primary with no secondary at its start runs its guest unprotected
//! (`protection_ended`) until `protect`. Prints the time from the fresh secondary's start to
//! "protected again".

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use xenft_control::checkpoint::{Event, Request};
use xenft_control::{Checkpoint, Client};

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Free loopback addresses (bound, then released).
fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// The A-link options of one side: `mine[i]=theirs[i]`, 1 s path timeout.
fn link_args(
    mine: &[SocketAddr],
    theirs: &[SocketAddr],
    hosts: (&str, &str),
    d: &Path,
) -> Vec<String> {
    let mut v = Vec::new();
    for (m, t) in mine.iter().zip(theirs) {
        v.push("--alink-path".to_string());
        v.push(format!("{m}={t}"));
    }
    let secret = d.join("secret").display().to_string();
    for (k, val) in [
        ("--host", hosts.0),
        ("--peer-host", hosts.1),
        ("--secret-file", secret.as_str()),
        ("--alink-path-timeout-ms", "1000"),
    ] {
        v.push(k.to_string());
        v.push(val.to_string());
    }
    v
}

/// `xenft-checkpoint <args> --control <dir>/<name>.ctl` with a 16 MiB synthetic guest; waits
/// for its control socket.
fn engine(d: &Path, name: &str, args: &[String]) -> (KillOnDrop, PathBuf) {
    let ctl = d.join(format!("{name}.ctl"));
    let c = Command::new(env!("CARGO_BIN_EXE_xenft-checkpoint"))
        .args(args)
        .args([
            "--guest-binary",
            env!("CARGO_BIN_EXE_xenft-synthetic-guest"),
        ])
        .args(["--memory-mib", "16", "--control"])
        .arg(&ctl)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join(format!("{name}.err"))).unwrap())
        .spawn()
        .unwrap();
    let c = KillOnDrop(c);
    wait_for(&format!("{name}'s control socket"), 10, || ctl.exists());
    (c, ctl)
}

fn secondary(
    d: &Path,
    name: &str,
    mine: &[SocketAddr],
    theirs: &[SocketAddr],
) -> (KillOnDrop, PathBuf) {
    let mut args = vec![
        "secondary".to_string(),
        "--protect-epoch-ms".into(),
        "20".into(),
    ];
    args.extend(link_args(mine, theirs, ("h2", "h1"), d));
    engine(d, name, &args)
}

fn control(path: &Path, req: &Request) -> Value {
    xenft_tests::components::outcome_json::<Checkpoint>(path, req).expect("the engine answers")
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn committed_on(ctl: &Path) -> u64 {
    control(ctl, &Request::Status)["committed_epoch"]
        .as_u64()
        .unwrap_or(0)
}

fn alive(pid: u64) -> bool {
    let pid = i32::try_from(pid).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// The primary protects (phase `protected`) and its secondary holds a checkpoint.
fn protected(ctl: &Path) -> bool {
    let st = control(ctl, &Request::Status);
    st["state"] == "protecting"
        && st["primary"]["phase"] == "protected"
        && st["primary"]["committed_epoch"].as_u64() > Some(0)
}

#[test]
fn a_controlled_primary_outlives_its_secondary_and_protects_again_toward_a_fresh_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("secret"), b"a pool secret of more than 16 bytes").unwrap();
    let addrs = free_addrs(4);
    let (a_addrs, b_addrs) = (&addrs[..2], &addrs[2..]);

    // Arrange: A protects its guest toward B.
    let (mut b, b_ctl) = secondary(d, "b", b_addrs, a_addrs);
    let mut args: Vec<String> = ["primary", "--epoch-ms", "20", "--seed", "7"]
        .map(String::from)
        .to_vec();
    args.extend(link_args(a_addrs, b_addrs, ("h1", "h2"), d));
    let (mut a, a_ctl) = engine(d, "a", &args);
    wait_for("B's checkpoints", 30, || committed_on(&b_ctl) >= 3);
    wait_for("A protected", 10, || protected(&a_ctl));
    let st = control(&a_ctl, &Request::Status);
    let pid = st["guest_pid"].as_u64().expect("the guest's pid");
    let counter_before = st["primary"]["guest_counter"].as_u64().unwrap();
    assert_eq!(st["primary"]["peer"], "alink:h2", "{st}");
    // A primary has no replica to stop or resume.
    for req in [Request::Stop, Request::Failover] {
        let r = control(&a_ctl, &req);
        assert_eq!(r["ok"], false, "{req:?}: {r}");
        assert!(r["error"].as_str().unwrap().contains("primary"), "{r}");
    }
    let mut events = Client::<Checkpoint>::new(&a_ctl, Duration::from_secs(5))
        .subscribe()
        .unwrap();

    // Act: B is SIGKILLed.
    b.0.kill().unwrap();
    b.0.wait().unwrap();

    // Assert: protection ends with an event; A and its guest run on, unprotected.
    let ev = events
        .next_within(Duration::from_secs(10))
        .unwrap()
        .expect("protection_ended within 10 s");
    let Event::ProtectionEnded { reason } = ev;
    assert!(reason.contains("secondary is gone"), "{reason}");
    assert!(a.0.try_wait().unwrap().is_none(), "the primary exited");
    let st = control(&a_ctl, &Request::Status);
    assert_eq!(st["state"], "running", "{st}");
    assert!(st["committed_epoch"].is_null(), "unprotected: {st}");
    assert!(st["last_error"].as_str().is_some(), "{st}");
    assert_eq!(st["guest_pid"].as_u64(), Some(pid), "same guest: {st}");
    assert!(alive(pid), "the guest died with protection");
    // Until a fresh secondary is there, `protect` is refused and changes nothing.
    let r = control(&a_ctl, &Request::Protect { peer: None });
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(control(&a_ctl, &Request::Status)["state"], "running");

    // Act: a fresh secondary (mirrored A-link options); `protect` until accepted.
    let t0 = Instant::now();
    let (_b2, b2_ctl) = secondary(d, "b2", b_addrs, a_addrs);
    wait_for("protect accepted", 20, || {
        control(&a_ctl, &Request::Protect { peer: None })["ok"] == true
    });
    wait_for("A protected again", 30, || protected(&a_ctl));
    let again = t0.elapsed();
    eprintln!(
        "fresh secondary start -> protected again (its first committed checkpoint): {} ms",
        again.as_millis()
    );

    // Assert: the same guest, which ran on meanwhile, protected again; B2's epochs grow.
    let st = control(&a_ctl, &Request::Status);
    assert_eq!(st["guest_pid"].as_u64(), Some(pid), "{st}");
    assert!(
        st["primary"]["guest_counter"].as_u64().unwrap() > counter_before,
        "the guest did not run on: {st}, before {counter_before}"
    );
    let first = committed_on(&b2_ctl);
    wait_for("B2's epochs to grow", 20, || {
        committed_on(&b2_ctl) >= first + 5
    });
    assert_eq!(
        control(&a_ctl, &Request::Protect { peer: None })["already"],
        true
    );

    // `unprotect` ends it; the guest runs on.
    let u = control(&a_ctl, &Request::Unprotect);
    assert_eq!(u["ok"], true, "{u}");
    let st = control(&a_ctl, &Request::Status);
    assert_eq!(st["state"], "running", "{st}");
    assert!(st["last_error"].is_null(), "asked for: {st}");
    assert!(alive(pid));
    assert!(a.0.try_wait().unwrap().is_none());
}

#[test]
fn a_controlled_primary_without_a_secondary_runs_its_guest_unprotected_until_protect() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("secret"), b"a pool secret of more than 16 bytes").unwrap();
    let addrs = free_addrs(4);
    let (a_addrs, b_addrs) = (&addrs[..2], &addrs[2..]);

    // Arrange: A starts with nobody on the other end, and gives up its own first try after 1 s.
    let mut args: Vec<String> = ["primary", "--epoch-ms", "20", "--alink-wait-s", "1"]
        .map(String::from)
        .to_vec();
    args.extend(link_args(a_addrs, b_addrs, ("h1", "h2"), d));
    let (mut a, a_ctl) = engine(d, "a", &args);
    let mut events = Client::<Checkpoint>::new(&a_ctl, Duration::from_secs(5))
        .subscribe()
        .unwrap();

    // Assert: the guest runs unprotected, the reason is published and reported.
    let Event::ProtectionEnded { reason } = events
        .next_within(Duration::from_secs(10))
        .unwrap()
        .expect("protection_ended");
    assert!(reason.contains("no secondary"), "{reason}");
    let st = control(&a_ctl, &Request::Status);
    assert_eq!(st["state"], "running", "{st}");
    assert!(
        st["last_error"].as_str().unwrap().contains("no live path"),
        "{st}"
    );
    let pid = st["guest_pid"].as_u64().unwrap();
    assert!(alive(pid));
    assert!(a.0.try_wait().unwrap().is_none(), "the primary exited");

    // Act: a secondary appears; the agent's `protect` protects the guest.
    let (_b, b_ctl) = secondary(d, "b", b_addrs, a_addrs);
    wait_for("protect accepted", 20, || {
        control(&a_ctl, &Request::Protect { peer: None })["ok"] == true
    });
    wait_for("B's checkpoints", 30, || committed_on(&b_ctl) >= 3);
    wait_for("A protected", 10, || protected(&a_ctl));
    assert_eq!(
        control(&a_ctl, &Request::Status)["guest_pid"].as_u64(),
        Some(pid)
    );
}
